"""Do kvdedup's online client and vLLM's ``vllm bench serve`` report the same numbers?

    python -m experiments.bench_agreement --out results/bench-agreement [--reps 3] [--quick]

One server, one workload, the same traffic from every client, ``--reps`` times:

* server: one ``kvdedup serve`` (:func:`experiments.online.server_command`) for ``--arm``
  of ``--config`` (default ``vllm``: prefix caching off, so a run leaves no cached state
  to the next; an arm with caching gets ``/reset_prefix_cache`` before every run);
* workload: the first ``--num-prompts`` requests of the config's use case, in order;
* clients: ``kvdedup`` (``online.run_client`` + ``compute_metrics``, what online runs
  report), ``vllm-bench`` (vLLM's benchmark, unchanged, on the workload converted by
  :mod:`experiments.vllm_bench`), ``vllm-bench-2`` (vLLM's benchmark again: the A/A
  noise reference, its ratio to ``vllm-bench`` is run-to-run noise), optionally
  ``vllm-func`` (kvdedup's client with vLLM's request function);
* same traffic: rep ``i`` uses vLLM's own arrival times for seed ``seed + i`` (its
  ``get_request``, replayed on a virtual clock by :func:`vllm_arrivals`) for every client;
  the prompts are the same token ids (the conversion checks the round trip; vLLM's
  per-request ``usage`` prompt and output token counts are checked against the workload);
* order: each client alone on the server in turn, the order rotating by one every rep,
  as a user would run either.

Output in ``--out``: ``runs.csv`` (a row per client and rep), ``agreement.csv`` and
``agreement.json`` (per metric and client: median and min-max over reps, and the paired
ratio client / ``vllm-bench`` per rep: median and min-max; provenance), ``vllm/`` (vLLM's
result JSON and output per run), ``server.log``. Invariant: every ratio is of two runs of
the same rep, i.e. same server, same arrivals, adjacent in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

REF = "vllm-bench"
AA = "vllm-bench-2"   # vLLM's benchmark again: its ratio to REF is run-to-run noise (A/A)
CLIENTS = ("kvdedup", "vllm-func", REF, AA)
FUNCS = {"kvdedup": "kvdedup", "vllm-func": "vllm"}   # client -> online.run_client request_func
METRICS = ("median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "request_throughput",
           "mean_ttft_ms", "p90_ttft_ms", "median_itl_ms", "median_e2el_ms", "output_throughput")
HEADLINE = METRICS[:4]


def vllm_arrivals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s after the start) that ``vllm bench serve --seed seed`` uses for ``n``
    requests: its ``get_request`` after ``np.random.seed(seed)`` (as its ``main`` does),
    on a virtual clock so nothing waits. numpy's global state is restored afterwards."""
    from unittest import mock

    import numpy as np
    import vllm.benchmarks.serve as vs

    now = [0.0]

    async def sleep(s: float) -> None:
        now[0] += s

    async def collect() -> list[float]:
        return [now[0] async for _ in vs.get_request(list(range(n)), rate, burstiness)]

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with mock.patch.object(vs, "time", SimpleNamespace(time=lambda: now[0])), \
                mock.patch.object(vs, "asyncio", SimpleNamespace(sleep=sleep)):
            return asyncio.run(collect())
    finally:
        np.random.set_state(state)


def agreement(rows: list[dict], metrics=METRICS, ref: str = REF, tol: float = 0.05) -> list[dict]:
    """Per metric and client: median/min/max over reps and the paired ratio to ``ref``
    (same rep) as median/min/max. ``agree`` (clients other than ``ref``): the ratios
    straddle 1, or their median is within ``tol`` of 1, or (with an ``AA`` client) within
    the range of the A/A ratios ``AA / ref``, i.e. within run-to-run noise."""
    by = {(r["client"], r["rep"]): r for r in rows}
    clients = [c for c in CLIENTS if any(k[0] == c for k in by)]
    out = []
    for m in metrics:
        cells = {}
        for c in clients:
            vals = [r[m] for r in rows if r["client"] == c and r.get(m) is not None]
            ratios = [by[(c, rep)][m] / by[(ref, rep)][m] for (cc, rep) in sorted(by)
                      if cc == c and (ref, rep) in by and by[(c, rep)].get(m) is not None
                      and by[(ref, rep)].get(m)]
            cells[c] = {"metric": m, "client": c, "reps": len(vals),
                        "median": statistics.median(vals) if vals else None,
                        "min": min(vals, default=None), "max": max(vals, default=None),
                        "ratio_median": statistics.median(ratios) if ratios else None,
                        "ratio_min": min(ratios, default=None),
                        "ratio_max": max(ratios, default=None)}
        aa = cells.get(AA, {})
        for c, row in cells.items():
            if c != ref and row["ratio_median"] is not None:
                med = row["ratio_median"]
                row["agree"] = bool(row["ratio_min"] <= 1.0 <= row["ratio_max"]
                                    or abs(med - 1.0) <= tol
                                    or (aa.get("ratio_min") is not None
                                        and aa["ratio_min"] <= med <= aa["ratio_max"]))
            out.append(row)
    return out


def format_table(table: list[dict], ref: str = REF) -> str:
    """The side-by-side table: a line per metric, a column pair per client."""
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    clients = list(dict.fromkeys(r["client"] for r in table))
    lines = [f"{'metric':<20}" + "".join(f"{c + ' median [min-max]':>34}" for c in clients)
             + "".join(f"{c + '/' + ref + ' [min-max]':>34}" for c in clients if c != ref)]
    for m in dict.fromkeys(r["metric"] for r in table):
        cells = {r["client"]: r for r in table if r["metric"] == m}
        spec = ".3f" if "throughput" in m and "output" not in m else ".1f"
        line = f"{m:<20}"
        for c in clients:
            r = cells[c]
            line += f"{f(r['median'], spec) + ' [' + f(r['min'], spec) + '-' + f(r['max'], spec) + ']':>34}"
        for c in clients:
            if c != ref:
                r = cells[c]
                txt = (f"{f(r['ratio_median'], '.3f')} [{f(r['ratio_min'], '.3f')}-"
                       f"{f(r['ratio_max'], '.3f')}] "
                       f"{'A/A' if c == AA else 'ok' if r.get('agree') else 'DIFF'}")
                line += f"{txt:>34}"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
def _reset_cache(base_url: str) -> None:
    req = urllib.request.Request(base_url + "/reset_prefix_cache", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status != 200:
            raise RuntimeError(f"/reset_prefix_cache answered {r.status}")


def _kv_metrics(ctx, res, dur) -> dict:
    from experiments.online import compute_metrics

    m = compute_metrics(res, dur, ctx.slo_s)
    m["tokens_match"] = all(r.output_tokens == mt for r, mt in zip(res, ctx.max_tokens))
    return m


def _vllm_checks(m: dict, ctx, arrivals) -> dict:
    """Add ``schedule_dev_ms`` (vLLM's actual send offsets vs ``arrivals``) and
    ``tokens_match`` (its per-request usage counts vs the workload's)."""
    starts = m.get("start_times") or []
    if len(starts) == len(arrivals):
        m["schedule_dev_ms"] = 1e3 * max(abs((s - starts[0]) - (a - arrivals[0]))
                                         for s, a in zip(starts, arrivals))
    m["tokens_match"] = (m.get("input_lens") == [len(p) for p in ctx.prompts]
                         and m.get("output_lens") == list(ctx.max_tokens))
    return m


def _run_one(ctx, rep: int, arrivals, client: str) -> dict:
    """One client alone on the server: its metrics (plus the checks) for rep ``rep``."""
    from experiments.online import run_client

    if client not in (REF, AA):
        res, dur = run_client(ctx.base_url, ctx.prompts, ctx.max_tokens, arrivals, ctx.timeout_s,
                              request_func=FUNCS[client])
        return _kv_metrics(ctx, res, dur)
    from experiments.vllm_bench import bench_argv, run_bench

    d = ctx.out / "vllm"
    d.mkdir(parents=True, exist_ok=True)
    argv = bench_argv(ctx.base_url, ctx.dataset, len(ctx.prompts), ctx.rate, ctx.burstiness,
                      ctx.seed + rep, d, f"rep{rep}-{client}.json")
    with open(d / f"rep{rep}-{client}.log", "w") as log, contextlib.redirect_stdout(log):
        return _vllm_checks(run_bench(argv), ctx, arrivals)


def _row(client: str, rep: int, seed: int, m: dict, load0: float, t0: float) -> dict:
    row = {"client": client, "rep": rep, "seed": seed,
           "completed": m["completed"], "failed": m["failed"],
           "duration_s": _num(m.get("duration_s", m.get("duration"))),
           **{k: _num(m.get(k)) for k in METRICS}, "tokens_match": bool(m["tokens_match"]),
           "schedule_dev_ms": _num(m.get("schedule_dev_ms")),
           "client_cpu_s": round(m["client_cpu_s"], 2),   # this process, setup included
           "loadavg_1m": f"{load0:.2f}->{os.getloadavg()[0]:.2f}",
           "wall_s": round(time.time() - t0, 1)}
    print(f"rep {rep} {client:<10} ok {row['completed']}/{row['completed'] + row['failed']}  "
          + "  ".join(f"{k} {row[k]:.4g}" for k in HEADLINE if row[k] is not None)
          + f"  load {row['loadavg_1m']}", flush=True)
    return row


def run(args) -> tuple[list[dict], dict]:
    """Start the server, run every client ``args.reps`` times; returns (rows, provenance)."""
    from experiments import runner
    from experiments.config import ConfigError, load_config
    from experiments.online import (free_port, run_client, server_command, start_server,
                                    stop_server, warmup_prompts)
    from experiments.vllm_bench import convert
    from vllm_ext.models import resolve_model

    cfg = load_config(args.config)
    runner.ensure_workloads(cfg)
    wl = runner.check_inputs(cfg)[args.use_case or cfg.workloads[0].use_case]
    if args.arm == "sequence":
        raise ConfigError("--arm sequence keeps documents between runs (no reset); "
                          "use vllm, vllm-apc or prefix")
    if args.num_prompts > len(wl.requests):
        raise ConfigError(f"--num-prompts {args.num_prompts} > {len(wl.requests)} requests")
    reqs = wl.requests[: args.num_prompts]
    model_dir = resolve_model(cfg.model)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset = out / "vllm-custom.jsonl"
    convert(wl.path, dataset, args.num_prompts, model_dir)
    caching = args.arm != "vllm"
    if caching:
        os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # for /reset_prefix_cache
    port = free_port()
    cmd = server_command(model_dir, args.arm, cfg.engine, args.num_blocks or cfg.num_blocks[0],
                         port)
    srv = start_server(cmd, port, out / "server.log", cfg.online["server_start_timeout_s"])
    ctx = SimpleNamespace(base_url=srv.base_url, prompts=[r.prompt_token_ids for r in reqs],
                          max_tokens=[r.output_len for r in reqs], rate=args.rate,
                          burstiness=args.burstiness, seed=args.seed, out=out, dataset=dataset,
                          timeout_s=cfg.online["request_timeout_s"],
                          slo_s=cfg.online["slo_normalized_latency_s"])
    rows: list[dict] = []
    try:
        run_client(srv.base_url, [], [], [], ctx.timeout_s,
                   warmup=warmup_prompts(reqs, 2) + [ctx.prompts[0]])
        for rep in range(args.reps):
            seed = args.seed + rep
            arrivals = vllm_arrivals(len(reqs), args.rate, args.burstiness, seed)
            k = rep % len(args.clients)
            for client in args.clients[k:] + args.clients[:k]:
                if caching:
                    _reset_cache(srv.base_url)
                load0, t0, cpu0 = os.getloadavg()[0], time.time(), time.process_time()
                m = _run_one(ctx, rep, arrivals, client)
                m["client_cpu_s"] = time.process_time() - cpu0
                rows.append(_row(client, rep, seed, m, load0, t0))
    finally:
        alive = srv.proc.poll() is None
        stop_server(srv)
    prov = {"command": " ".join([os.path.basename(sys.executable), "-m",
                                 "experiments.bench_agreement", *sys.argv[1:]]),
            "commit": _git_commit(), "config": cfg.name, "use_case": args.use_case
            or cfg.workloads[0].use_case, "workload": str(wl.path), "arm": args.arm,
            "num_blocks": args.num_blocks or cfg.num_blocks[0], "num_prompts": len(reqs),
            "request_rate": args.rate, "burstiness": args.burstiness, "seed": args.seed,
            "reps": args.reps, "clients": args.clients,
            "server_alive_at_end": alive, "cpus": os.cpu_count(),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return rows, prov


def _num(v) -> float | None:
    """A plain float (vLLM's metrics are numpy scalars, which JSON cannot write)."""
    return None if v is None else float(v)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent).stdout.strip() or None
    except OSError:
        return None


def write(out: Path, rows: list[dict], table: list[dict], prov: dict) -> None:
    """runs.csv, agreement.csv, agreement.json."""
    for name, data in (("runs.csv", rows), ("agreement.csv", table)):
        keys = list(dict.fromkeys(k for r in data for k in r))
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(data)
    (out / "agreement.json").write_text(json.dumps(
        {"provenance": prov, "agreement": table, "runs": rows}, indent=1) + "\n")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_agreement",
                                 description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/bench-agreement"))
    ap.add_argument("--config", default="online-latency", help="config giving model, engine "
                    "settings, capacity and workload")
    ap.add_argument("--use-case", help="workload of the config (default: its first)")
    ap.add_argument("--arm", default="vllm", help="server arm (vllm, vllm-apc, prefix)")
    ap.add_argument("--num-blocks", type=int, help="KV capacity (default: the config's first)")
    ap.add_argument("--num-prompts", type=int, default=10, help="first N workload requests")
    ap.add_argument("--rate", type=float, default=0.2, help="req/s (inf: all at once)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    ap.add_argument("--reps", type=int, default=3, help="paired repetitions (>= 3 for a spread)")
    ap.add_argument("--seed", type=int, default=0, help="rep i uses arrival seed seed + i")
    ap.add_argument("--clients", nargs="+", default=["kvdedup", REF, AA], choices=CLIENTS,
                    help=f"clients to compare ({REF} is the reference and is always run; "
                    f"{AA} runs it again, as the A/A noise reference; vllm-func is kvdedup's "
                    f"client with vLLM's request function)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="'ok' when the paired "
                    "ratios straddle 1 or their median is within this of 1")
    ap.add_argument("--quick", action="store_true", help="8 prompts at 0.5 req/s, 2 reps "
                    "(a smoke test: too few reps for a spread)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from experiments.config import ConfigError
    from experiments.online import ServerError
    from experiments.vllm_bench import BenchError
    from experiments.workloads import WorkloadError

    args = make_parser().parse_args(argv)
    if args.quick:
        args.num_prompts, args.rate, args.reps = 8, 0.5, 2
    if REF not in args.clients:
        args.clients.append(REF)
    if args.reps < 1 or args.num_prompts < 1 or args.rate <= 0:
        print("error: --reps, --num-prompts and --rate must be > 0", file=sys.stderr)
        return 2
    try:
        rows, prov = run(args)
    except (ConfigError, WorkloadError, BenchError, ServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = agreement(rows, tol=args.tolerance)
    write(args.out, rows, table, prov)
    print(f"\n{prov['reps']} paired reps, {prov['num_prompts']} prompts of {prov['use_case']} "
          f"at {prov['request_rate']} req/s, arm {prov['arm']}, one server, same arrivals per "
          f"rep; machine load per run in runs.csv (loadavg_1m, {os.cpu_count()} CPUs)\n"
          + format_table(table))
    bad = [r for r in rows if r["failed"] or not r["tokens_match"]]
    if bad:
        print(f"warning: {len(bad)} runs had failed requests or token counts other than the "
              f"workload's (see runs.csv)", file=sys.stderr)
    print(f"results in {args.out} (runs.csv, agreement.csv, agreement.json)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

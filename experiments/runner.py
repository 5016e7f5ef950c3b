"""Sweep driver: plan the runs of a config, run them interleaved and resumably, write
``OUT/runs/<run_id>.json``, ``OUT/runs.parquet``, ``OUT/summary.json`` and print a table.

Order: for each repetition, for each cell (use case x capacity x request count [x rate]),
every arm in turn (A B C A B C ...), so slow drift of the machine hits all arms alike.
Each run gets a fresh engine: offline runs execute in a child process
(``python -m experiments.offline``), online runs start a fresh server. A run whose JSON
exists with ``status: ok`` is not rerun (resume by invoking the same command again);
failed runs are retried on the next invocation. Everything is checked before the first
engine starts: arms, workload files, request counts, max_model_len and KV capacity.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from experiments.config import Config, ConfigError, blocks_needed
from experiments.env import collect_env
from experiments.schema import BASELINE_ARM, PARQUET_FIELDS, RUN_FIELDS, validate_run
from experiments.summary import arm_rank, cell_key, generated_tokens, summarize_groups

REPO = Path(__file__).resolve().parent.parent
SUMMARY_METRICS_OFFLINE = ("request_throughput", "total_token_throughput", "output_throughput",
                           "elapsed_s", "peak_physical_blocks", "mean_physical_blocks",
                           "peak_logical_blocks", "mean_dedup_ratio", "hit_rate", "preemptions",
                           "reused_fraction", "median_ttft_s", "p99_ttft_s")
SUMMARY_METRICS_ONLINE = ("p95_normalized_latency_s", "mean_normalized_latency_s", "goodput",
                          "mean_ttft_ms", "p95_ttft_ms", "mean_tpot_ms", "p95_e2el_ms",
                          "completed", "failed")


# ----------------------------------------------------------------------------- workloads
def ensure_workloads(cfg: Config, log=print) -> None:
    """Generate/prepare missing workload files that the config says how to make."""
    from vllm_ext.models import resolve_model

    for w in cfg.workloads:
        if w.file.exists():
            continue
        if not (w.generate or w.prepare):
            raise ConfigError(f"workload file not found: {w.file} (use case {w.use_case!r}; "
                              f"the config gives no 'generate'/'prepare' recipe)")
        recipe = w.generate or w.prepare
        tok = recipe.get("tokenizer", cfg.model)
        tok_dir = resolve_model(tok) if tok else None
        if w.generate:
            cmd = ["generate", recipe["kind"]]
        else:
            cmd = ["prepare", recipe["name"]]
        cmd = [sys.executable, "-m", "experiments.workloads", *cmd, "--out", str(w.file),
               "--quiet"]
        if tok_dir:
            cmd += ["--tokenizer", tok_dir]
        for k, v in (recipe.get("args") or {}).items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        log(f"generating workload {w.use_case}: {' '.join(cmd[1:])}")
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0 or not w.file.exists():
            raise ConfigError(f"could not make workload {w.file}: "
                              f"{(p.stderr or p.stdout).strip()[-800:]}")


def check_inputs(cfg: Config) -> dict[str, Any]:
    """Load every workload and check request counts, lengths and capacities against the
    config; returns {use_case: Workload}. Raises ConfigError before any engine starts."""
    from experiments.workloads import WorkloadError, load_workload

    bs = cfg.block_size
    mml = cfg.engine.get("max_model_len")
    seq_blocks = blocks_needed(int(mml), 0, bs) if mml else 0  # one max_model_len sequence
    loaded = {}
    for w in cfg.workloads:
        try:
            wl = load_workload(w.file)
        except WorkloadError as e:
            raise ConfigError(str(e)) from None
        loaded[w.use_case] = wl
        n_max = len(wl.requests)
        if cfg.kind == "offline":
            for n in cfg.num_requests:
                if n > n_max:
                    raise ConfigError(f"num_requests {n} > the {n_max} requests of workload "
                                      f"{w.file} (use case {w.use_case!r})")
            used = wl.requests[: max(cfg.num_requests)]
        else:
            used = wl.requests
        worst = max(range(len(used)), key=lambda i: len(used[i].prompt_token_ids) + used[i].output_len)
        r = used[worst]
        plen, olen = len(r.prompt_token_ids), r.output_len
        if mml and plen + olen > int(mml):
            raise ConfigError(f"workload {w.file} request {worst + 1} needs {plen} prompt + {olen} "
                              f"output = {plen + olen} tokens > max_model_len {mml}; regenerate it "
                              f"with --max-model-len/--max-prompt-tokens or raise max_model_len")
        need = blocks_needed(plen, olen, bs)
        for nb in cfg.num_blocks:
            if need > nb:
                raise ConfigError(
                    f"capacity too small: num_blocks {nb} cannot hold even one request of "
                    f"{w.use_case!r} (request {worst + 1}: ceil(({plen} prompt + {olen} output)"
                    f"/{bs}) = {need} blocks of {bs} tokens); use num_blocks >= {need}")
            if seq_blocks + 1 > nb:  # vLLM keeps one block back (its null block)
                raise ConfigError(
                    f"num_blocks {nb} is below what vLLM needs for max_model_len {mml}: one "
                    f"sequence of max_model_len must fit in the pool less its null block, "
                    f"ceil({mml}/{bs}) + 1 = {seq_blocks + 1} blocks; lower "
                    f"engine.max_model_len to <= {(nb - 1) * bs} or use more blocks")
    return loaded


# ----------------------------------------------------------------------------- planning
def _fmt_rate(r: float) -> str:
    return "inf" if math.isinf(r) else f"{r:g}"


def make_run_id(kind: str, use_case: str, arm: str, nb: int, nr: int | None,
                rate: float | None, rep: int) -> str:
    parts = [kind, use_case, arm, f"b{nb}"]
    if nr is not None:
        parts.append(f"n{nr}")
    if rate is not None:
        parts.append(f"r{_fmt_rate(rate)}")
    parts.append(f"rep{rep}")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))


def plan(cfg: Config) -> list[dict]:
    """All runs of the sweep in execution order (reps outermost, arms innermost)."""
    runs = []
    for rep in range(cfg.reps):
        for w in cfg.workloads:
            for nb in cfg.num_blocks:
                if cfg.kind == "offline":
                    cells = [(nr, None) for nr in cfg.num_requests]
                else:
                    cells = [(None, rate) for rate in cfg.online["request_rates"]]
                for nr, rate in cells:
                    for arm in cfg.arms:
                        runs.append({"run_id": make_run_id(cfg.kind, w.use_case, arm, nb, nr, rate, rep),
                                     "kind": cfg.kind, "arm": arm, "use_case": w.use_case,
                                     "workload_file": str(w.file), "num_blocks": nb,
                                     "num_requests": nr, "request_rate": rate, "rep": rep})
    return runs


def load_existing(out: Path) -> dict[str, dict]:
    runs = {}
    d = out / "runs"
    if d.is_dir():
        for f in sorted(d.glob("*.json")):
            try:
                runs[f.stem] = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                pass  # unreadable: rerun it
    return runs


# ----------------------------------------------------------------------------- one run
def _error_from_log(log: Path) -> str:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errs = [ln for ln in lines if re.match(r"^\s*[A-Za-z_.]*(Error|Exception)\b.*", ln)]
    if errs:
        return errs[-1].strip()[:500]
    return " | ".join(ln.strip() for ln in lines[-3:])[:500]


# Offline runs execute in a forked child of a runner that has imported vLLM once (saves
# ~9 s of imports per run); the child starts its own session so the whole engine (child +
# the engine-core/worker processes vLLM spawns) is one process group, killed after the run.
FORK_RUNS = os.environ.get("KVDEDUP_EXPERIMENTS_FORK", "1") != "0"
_PRELOADED = False


def _preload() -> None:
    global _PRELOADED
    if not _PRELOADED:
        import vllm_ext.launch  # noqa: F401
        from vllm_ext import SamplingParams  # noqa: F401  (imports vLLM)
        _PRELOADED = True


def _wait_group(pid: int, wait, timeout_s: float, log: Path) -> int:
    try:
        rc = wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(pid)
        wait()
        raise RuntimeError(f"run timed out after {timeout_s:.0f} s (log {log})") from None
    except KeyboardInterrupt:
        _kill_group(pid)
        raise
    _kill_group(pid)  # engine processes left behind by the run
    return rc


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _fork_child(spec_path: Path, res_path: Path, log: Path, timeout_s: float) -> int:
    _preload()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.setsid()
            fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ["KVDEDUP_RUNNER_CHILD"] = "1"
            from experiments.offline import main as offline_main

            code = offline_main([str(spec_path), str(res_path)])
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    deadline = time.monotonic() + timeout_s

    def wait(timeout=None):
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            if timeout is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("offline run", timeout)
            time.sleep(0.2)

    return _wait_group(pid, wait, timeout_s, log)


def _run_offline_child(spec: dict, out: Path, timeout_s: float) -> dict:
    rid = spec["run_id"]
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    spec_path, res_path = work / f"{rid}.spec.json", work / f"{rid}.result.json"
    res_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    log = out / "logs" / f"{rid}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KVDEDUP_RUNNER_CHILD": "1"}
    if FORK_RUNS:
        rc = _fork_child(spec_path, res_path, log, timeout_s)
    else:
        with open(log, "w", encoding="utf-8") as lf:
            proc = subprocess.Popen([sys.executable, "-m", "experiments.offline", str(spec_path),
                                     str(res_path)], cwd=REPO, env=env, stdout=lf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            rc = _wait_group(proc.pid, proc.wait, timeout_s, log)
    if rc != 0 or not res_path.exists():
        raise RuntimeError(f"run exited with status {rc}: {_error_from_log(log)} (log {log})")
    res = json.loads(res_path.read_text(encoding="utf-8"))
    spec_path.unlink(missing_ok=True)
    res_path.unlink(missing_ok=True)
    return res


def execute(run: dict, cfg: Config, out: Path, model_dir: str, env_rec: dict) -> dict:
    """Run one planned run; never raises for a failed run (returns status failed)."""
    rid = run["run_id"]
    trace_rel = f"traces/{rid}.jsonl"
    rec: dict[str, Any] = {
        "run_id": rid, "kind": run["kind"], "arm": run["arm"], "use_case": run["use_case"],
        "workload_file": run["workload_file"], "num_blocks": run["num_blocks"],
        "block_size": cfg.block_size, "num_requests": run["num_requests"] or 0,
        "rep": run["rep"], "model": cfg.model, "config_id": cfg.config_id(),
        "status": "ok", "error": None, "env": env_rec,
    }
    t0 = time.time()
    load0 = os.getloadavg()[0]
    try:
        if run["kind"] == "offline":
            spec = {"run_id": rid, "arm": run["arm"], "model": model_dir, "engine": cfg.engine,
                    "sequence": cfg.sequence,
                    "num_blocks": run["num_blocks"], "workload_file": run["workload_file"],
                    "num_requests": run["num_requests"], "trace": str(out / trace_rel),
                    "raw_trace": str(out / "work" / f"{rid}.engine.jsonl")}
            res = _run_offline_child(spec, out, cfg.run_timeout_s)
            res["trace"] = trace_rel
        else:
            from experiments.online import run_online

            spec = {"run_id": rid, "arm": run["arm"], "model_dir": model_dir,
                    "engine": cfg.engine, "num_blocks": run["num_blocks"],
                    "sequence": cfg.sequence,
                    "workload_file": run["workload_file"], "online": cfg.online,
                    "request_rate": run["request_rate"],
                    "seed": int(cfg.engine.get("seed", 0)) + 1000 * run["rep"],
                    "trace": str(out / trace_rel), "log": str(out / "logs" / f"{rid}.log")}
            res = run_online(spec)
            res["trace"] = trace_rel if (out / trace_rel).exists() else None
        rec.update(res)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - a crashed run is recorded, the sweep goes on
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        if run["kind"] == "online":
            rec["request_rate"] = run["request_rate"]
    rec["wall_s"] = time.time() - t0
    # 1-min load average before/after: other work on the host slows a run (flag it)
    rec["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    rec["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # every schema field of this run's scope is present (null when unavailable)
    for s in RUN_FIELDS:
        if s.scope in ("all", rec["kind"]) and s.name not in rec:
            rec[s.name] = [] if s.type == "list" else None
    try:
        validate_run(rec, rid)
    except Exception as e:  # noqa: BLE001
        rec["status"], rec["error"] = "failed", f"result failed schema validation: {e}"
    return rec


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- summary
def summarize(runs: list[dict], cfg: Config | None = None) -> dict:
    """Per cell (``experiments.summary.CELL_KEYS``) and arm: median [min, max] of the
    metrics, ratio vs vllm-apc (offline: request throughput; online: goodput), and for
    online the max rate meeting the SLO."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault(cell_key(r), []).append(r)
    out_cells = []
    for key in sorted(cells, key=lambda k: tuple((x is None, x) for x in k)):
        rs = cells[key]
        kind, uc, nb, last = key
        ok = [r for r in rs if r["status"] == "ok"]
        metrics = SUMMARY_METRICS_OFFLINE if kind == "offline" else SUMMARY_METRICS_ONLINE
        cell: dict[str, Any] = {"kind": kind, "use_case": uc, "num_blocks": nb,
                                "num_requests": last if kind == "offline" else None,
                                "request_rate": last if kind == "online" else None,
                                "arms": {}, "comparable": True, "notes": []}
        # refuse to compare runs that generated different numbers of tokens (offline)
        if kind == "offline":
            counts = {generated_tokens(r) for r in ok}
            if len(counts) > 1:
                cell["comparable"] = False
                cell["notes"].append("generated token counts differ between runs "
                                     f"({sorted(counts, key=lambda c: (c is None, c))}): "
                                     "ratios not computed")
            bad = [r["run_id"] for r in ok if r.get("reference_output_lens_match") is False]
            if bad:
                cell["comparable"] = False
                cell["notes"].append(f"runs not generating the reference lengths: {bad}")
        main = "request_throughput" if kind == "offline" else "goodput"
        groups = {g["key"]["arm"]: g for g in summarize_groups(
            ok, ["arm"], metrics, [main] if cell["comparable"] else [])}
        for arm in sorted({r["arm"] for r in rs}, key=arm_rank):
            g = groups.get(arm, {"stats": {m: None for m in metrics}, "ratios": {}})
            entry: dict[str, Any] = {
                "n_ok": sum(1 for r in ok if r["arm"] == arm),
                "n_failed": sum(1 for r in rs if r["arm"] == arm and r["status"] != "ok"),
                "runs": sorted(r["run_id"] for r in rs if r["arm"] == arm), **g["stats"]}
            if kind == "offline" and entry["n_ok"]:
                entry["total_output_tokens"] = next(
                    r.get("total_output_tokens") for r in ok if r["arm"] == arm)
            entry["ratio_vs_vllm_apc"] = g["ratios"].get(main)
            if cell["comparable"]:
                entry["paired_ratios"] = paired_ratios(ok, arm, main)
            cell["arms"][arm] = entry
        out_cells.append(cell)
    summary: dict[str, Any] = {"baseline_arm": BASELINE_ARM,
                               "ratio_metric": {"offline": "request_throughput", "online": "goodput"},
                               "num_runs": len(runs),
                               "num_ok": sum(1 for r in runs if r["status"] == "ok"),
                               "num_failed": sum(1 for r in runs if r["status"] != "ok"),
                               "cells": out_cells}
    if cfg is not None:
        summary.update({"config": cfg.name, "config_file": str(cfg.path) if cfg.path else None,
                        "config_id": cfg.config_id(), "kind": cfg.kind, "model": cfg.model,
                        "arms": cfg.arms, "reps": cfg.reps, "engine": cfg.engine})
        if cfg.kind == "online":
            summary["online"] = cfg.online
    # online: the highest offered rate whose median p95 normalized latency meets the SLO
    slo_tab: dict[str, Any] = {}
    for c in out_cells:
        if c["kind"] != "online":
            continue
        for arm, e in c["arms"].items():
            k = f"{c['use_case']}|b{c['num_blocks']}|{arm}"
            slot = slo_tab.setdefault(k, {"use_case": c["use_case"], "num_blocks": c["num_blocks"],
                                          "arm": arm, "max_rate_meeting_slo": None})
            p95 = e.get("p95_normalized_latency_s")
            slo = next((r.get("slo_normalized_latency_s") for r in runs
                        if r["run_id"] in e["runs"] and r.get("slo_normalized_latency_s")), None)
            if p95 and slo and p95["median"] <= slo and e["n_failed"] == 0:
                cur = slot["max_rate_meeting_slo"]
                slot["max_rate_meeting_slo"] = c["request_rate"] if cur is None else max(cur, c["request_rate"])
    if slo_tab:
        summary["max_rate_meeting_slo"] = list(slo_tab.values())
    return summary


def paired_ratios(runs: list[dict], arm: str, metric: str) -> list[float]:
    """``metric`` of ``arm`` over the baseline's, rep by rep (runs of one cell; the reps
    are interleaved, so rep i of both arms ran side by side)."""
    by = {(r["arm"], r.get("rep")): r.get(metric) for r in runs}
    out = []
    for (a, rep), v in sorted(by.items(), key=lambda kv: str(kv[0][1])):
        b = by.get((BASELINE_ARM, rep))
        if a == arm and v and b:
            out.append(v / b)
    return out


def write_parquet(runs: list[dict], out: Path) -> None:
    import pandas as pd

    rows = [{k: r.get(k) for k in PARQUET_FIELDS} for r in runs]
    df = pd.DataFrame(rows, columns=list(PARQUET_FIELDS))
    tmp = out / ".runs.parquet.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out / "runs.parquet")


def _f(v: dict | None, fmt: str, key: str = "median") -> str:
    return "-" if not v else format(v[key], fmt)


def format_table(summary: dict) -> str:
    lines = []
    for c in summary["cells"]:
        if c["kind"] == "offline":
            lines.append(f"\n{c['use_case']}  num_blocks={c['num_blocks']}  "
                         f"num_requests={c['num_requests']}  (median [min-max] over reps)")
            hdr = (f"{'arm':<10} {'ok':>4} {'req/s':>22} {'vs vllm-apc':>11} {'pairs':>11} "
                   f"{'TTFT med':>8} {'p99':>7} {'peak blocks':>11} {'dedup':>6} {'f':>5} "
                   f"{'hit rate':>8}")
            lines += [hdr, "-" * len(hdr)]
            for arm, e in c["arms"].items():
                rq = e["request_throughput"]
                rqs = "-" if not rq else f"{rq['median']:.3f} [{rq['min']:.3f}-{rq['max']:.3f}]"
                ratio = "-" if e["ratio_vs_vllm_apc"] is None else f"{e['ratio_vs_vllm_apc']:.2f}x"
                pr = e.get("paired_ratios") or []
                pairs = f"{min(pr):.2f}-{max(pr):.2f}" if len(pr) > 1 and arm != BASELINE_ARM else "-"
                lines.append(f"{arm:<10} {e['n_ok']:>2}/{e['n_ok'] + e['n_failed']:<1} {rqs:>22} "
                             f"{ratio:>11} {pairs:>11} {_f(e['median_ttft_s'], '.2f'):>7}s "
                             f"{_f(e['p99_ttft_s'], '.1f'):>6}s "
                             f"{_f(e['peak_physical_blocks'], '.0f'):>11} "
                             f"{_f(e['mean_dedup_ratio'], '.2f'):>6} "
                             f"{_f(e['reused_fraction'], '.2f'):>5} {_f(e['hit_rate'], '.3f'):>8}")
        else:
            lines.append(f"\n{c['use_case']}  num_blocks={c['num_blocks']}  rate={c['request_rate']:g} req/s")
            hdr = f"{'arm':<10} {'ok':>5} {'p95 norm lat s/tok':>19} {'mean TTFT ms':>13} {'goodput':>8} {'failed':>7} {'ratio vs vllm-apc':>18}"
            lines += [hdr, "-" * len(hdr)]
            for arm, e in c["arms"].items():
                ratio = "-" if e["ratio_vs_vllm_apc"] is None else f"{e['ratio_vs_vllm_apc']:.2f}x"
                lines.append(f"{arm:<10} {e['n_ok']:>2}/{e['n_ok'] + e['n_failed']:<2} "
                             f"{_f(e['p95_normalized_latency_s'], '.4f'):>19} "
                             f"{_f(e['mean_ttft_ms'], '.1f'):>13} {_f(e['goodput'], '.3f'):>8} "
                             f"{_f(e['failed'], '.0f'):>7} {ratio:>18}")
        for n in c["notes"]:
            lines.append(f"  note: {n}")
    for s in summary.get("max_rate_meeting_slo", []):
        lines.append(f"max rate meeting SLO: {s['use_case']} b{s['num_blocks']} {s['arm']}: "
                     f"{s['max_rate_meeting_slo']}")
    return "\n".join(lines).lstrip("\n")


def finalize(out: Path, cfg: Config | None = None) -> dict:
    """Rebuild runs.parquet and summary.json from OUT/runs/*.json."""
    runs = list(load_existing(out).values())
    if not runs:
        raise ConfigError(f"{out}: no runs to summarize")
    write_parquet(runs, out)
    summary = summarize(runs, cfg)
    write_json_atomic(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- sweep
def default_out(cfg: Config, quick: bool) -> Path:
    return REPO / "results" / (cfg.name + ("-quick" if quick and not cfg.name.endswith("quick") else ""))


def run_sweep(cfg: Config, out: Path, dry_run: bool = False, progress: bool = True,
              log=print) -> tuple[dict | None, list[dict]]:
    """Run (or resume) the sweep. Returns (summary, records of the runs executed now)."""
    from vllm_ext.launch import apply_cpu_env

    apply_cpu_env()  # inherited by every run (and recorded in each run's env)
    ensure_workloads(cfg, log)
    check_inputs(cfg)
    runs = plan(cfg)
    existing = load_existing(out)
    cid = cfg.config_id()
    for rid, r in existing.items():
        if r.get("config_id") not in (None, cid) and any(p["run_id"] == rid for p in runs):
            raise ConfigError(f"{out} holds run {rid} from a different engine config "
                              f"(config_id {r.get('config_id')} != {cid}); use another --out")
    todo = [r for r in runs if existing.get(r["run_id"], {}).get("status") != "ok"]
    log(f"{cfg.name}: {len(runs)} runs planned ({len(runs) - len(todo)} already done), "
        f"{len(todo)} to run -> {out}")
    if dry_run:
        for r in todo:
            log(f"  would run {r['run_id']}")
        return None, []
    from vllm_ext.models import resolve_model

    model_dir = resolve_model(cfg.model)
    env_rec = collect_env()
    done_now = []
    if todo:
        from tqdm import tqdm

        bar = tqdm(todo, desc=cfg.name, unit="run", disable=not progress, file=sys.stderr)
        for r in bar:
            bar.set_postfix_str(r["run_id"][-48:])
            rec = execute(r, cfg, out, model_dir, env_rec)
            write_json_atomic(out / "runs" / f"{r['run_id']}.json", rec)
            done_now.append(rec)
            if rec["status"] != "ok":
                bar.write(f"run {r['run_id']} failed: {rec['error']}")
                if str(rec["error"]).startswith("ServerError"):
                    # a server that does not start will not start for the next run either
                    bar.close()
                    finalize(out, cfg)
                    raise ConfigError(f"server for run {r['run_id']} failed to start "
                                      f"(recorded as failed; sweep stopped): "
                                      f"{rec['error'][len('ServerError: '):]}")
        bar.close()
        # the runner keeps only its final outputs
        try:
            (out / "work").rmdir()
        except OSError:
            pass
    summary = finalize(out, cfg)
    return summary, done_now

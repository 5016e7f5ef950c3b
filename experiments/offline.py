"""One offline throughput run: a fresh engine, all requests submitted at once.

Run by the sweep driver in its own process (``python -m experiments.offline SPEC RESULT``)
so every run gets a fresh engine and prefix cache, and a crash or hang of one run is
recorded as a failed run instead of ending the sweep.

Method: build ``vllm_ext.LLM(model, dedup=<arm's mode>, num_gpu_blocks_override=N,
trace=...)``; send one short warm-up request (its own random tokens, so it shares nothing
with the workload) and exclude it; then ``llm.generate`` all prompts at once as
``{"prompt_token_ids": ...}`` with ``SamplingParams(max_tokens=output_len, ignore_eos=True,
temperature=0)``. Throughput is over the wall time of that one ``generate`` call.
Block and hit metrics come from kvdedup's per-step trace, restricted to the steps of the
measured batch, with the cumulative counters rebased to its start.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm_ext.metrics import COUNTERS  # the cumulative step counters (engine-free module)

WARMUP_TOKENS = 40
WARMUP_OUTPUT = 4
TRACE_KEYS = ("step", "time", "start", "num_running", "num_waiting", "logical_blocks", "physical_blocks",
              "peak_physical_blocks", "peak_logical_blocks", "dedup_ratio", "bytes_saved",
              *COUNTERS)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a partly written last line
    return rows


def summarize_trace(rows: list[dict], first_step: int, base: dict, t0: float) -> tuple[list[dict], dict]:
    """Steps after ``first_step`` (the measured batch), rebased: ``time`` and ``start``
    from ``t0`` (engine clock) and counters minus ``base``. Returns (rows, metrics)."""
    out = []
    for r in rows:
        if r.get("step", 0) <= first_step:
            continue
        r = dict(r)
        for k in ("time", "start"):
            if k in r:
                r[k] = round(float(r[k]) - t0, 6)
        for k in COUNTERS:
            if k in r:
                r[k] = r[k] - base.get(k, 0)
        out.append({k: r[k] for k in TRACE_KEYS if k in r})
    m: dict[str, Any] = {"peak_physical_blocks": None, "mean_physical_blocks": None,
                         "peak_logical_blocks": None, "mean_dedup_ratio": None}
    if out:
        phys = [r["physical_blocks"] for r in out]
        busy = [r for r in out if r["physical_blocks"] > 0]
        m["peak_physical_blocks"] = float(max(phys))
        m["mean_physical_blocks"] = float(sum(phys) / len(phys))
        m["peak_logical_blocks"] = float(max(r["logical_blocks"] for r in out))
        m["mean_dedup_ratio"] = (float(sum(r["dedup_ratio"] for r in busy) / len(busy))
                                 if busy else 1.0)
    return out, m


_LAST_LLM: list = []


def warmup_prompt(reqs) -> list[int]:
    """A short prompt of token ids drawn at random from the workload's own (so valid)
    ids: its first block matches no workload prompt's first block, so it shares nothing."""
    import random

    vocab = sorted({t for r in reqs for t in r.prompt_token_ids[:256]})
    rng = random.Random(12345)
    return [rng.choice(vocab) for _ in range(WARMUP_TOKENS)]


def warm_up(llm, reqs) -> None:
    """One short request that shares nothing with the workload (``warmup_prompt``)."""
    from vllm_ext import SamplingParams

    llm.generate([{"prompt_token_ids": warmup_prompt(reqs)}],
                 SamplingParams(max_tokens=WARMUP_OUTPUT, ignore_eos=True, temperature=0),
                 use_tqdm=False)


def batch_inputs(reqs) -> tuple[list[dict], list]:
    """The measured batch: each request's prompt as token ids, greedy, writing exactly its
    ``output_len`` tokens (EOS ignored)."""
    from vllm_ext import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0.0)
              for r in reqs]
    return prompts, params


def run_offline(spec: dict) -> dict:
    """Run one offline measurement described by ``spec`` (see the runner) -> metrics."""
    import vllm_ext

    from experiments.config import arm_engine_kwargs
    from experiments.workloads import load_workload

    wl = load_workload(spec["workload_file"])
    reqs = wl.requests[: spec["num_requests"]]
    mode, arm_kw = arm_engine_kwargs(spec["arm"], spec.get("sequence"))
    raw_trace = Path(spec["raw_trace"])
    raw_trace.parent.mkdir(parents=True, exist_ok=True)
    if raw_trace.exists():
        raw_trace.unlink()
    kw = dict(spec["engine"])
    kw.update(arm_kw)
    kw["num_gpu_blocks_override"] = int(spec["num_blocks"])
    kw.setdefault("disable_log_stats", False)   # per-request timings (TTFT) in the outputs
    t_start = time.perf_counter()
    llm = vllm_ext.LLM(spec["model"], dedup=mode, trace=str(raw_trace), **kw)
    startup_s = time.perf_counter() - t_start
    _LAST_LLM[:] = [llm]
    try:
        warm_up(llm, reqs)
        base = vllm_ext.dedup_stats(llm)
        prompts, params = batch_inputs(reqs)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        end = vllm_ext.dedup_stats(llm)
    except BaseException:
        _shutdown(llm)
        raise
    gen_lens = [len(o.outputs[0].token_ids) for o in outs]
    ttfts = [o.metrics.first_token_latency for o in outs
             if getattr(o, "metrics", None) is not None and o.metrics.first_token_latency > 0]
    in_tokens = sum(len(r.prompt_token_ids) for r in reqs)
    out_tokens = sum(gen_lens)
    # time base of the measured batch on the engine clock: the trace's last warm-up step
    rows = read_jsonl(raw_trace)
    warm_steps = [r for r in rows if r["step"] <= base["step"]]
    t_base = warm_steps[-1]["time"] if warm_steps else 0.0
    trace_rows, tm = summarize_trace(rows, int(base["step"]), base, t_base)
    trace_path = Path(spec["trace"])
    trace_path.parent.mkdir(parents=True, exist_ok=True)
    with open(trace_path, "w", encoding="utf-8") as f:
        for r in trace_rows:
            f.write(json.dumps(r) + "\n")
    raw_trace.unlink(missing_ok=True)
    q = end["prefix_queries"] - base["prefix_queries"]
    h = end["prefix_hits"] - base["prefix_hits"]
    ref = [r.output_len for r in reqs]
    return {
        "elapsed_s": elapsed,
        "request_throughput": len(reqs) / elapsed,
        "total_token_throughput": (in_tokens + out_tokens) / elapsed,
        "output_throughput": out_tokens / elapsed,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        **tm,
        "hit_rate": h / q if q else 0.0,
        "preemptions": int(end["preemptions"] - base["preemptions"]),
        "verified_hits": int(end["verified_hits"] - base["verified_hits"]),
        "collisions": int(end["collisions"] - base["collisions"]),
        "prefix_queries": int(q),
        "prefix_hits": int(h),
        "sequence_hits": int(end.get("sequence_hits", 0) - base.get("sequence_hits", 0)),
        "sequence_tokens_reused": int(end.get("sequence_tokens_reused", 0)
                                      - base.get("sequence_tokens_reused", 0)),
        # f: fraction of prompt tokens whose KV was injected (sequence mode)
        "reused_fraction": (end.get("sequence_tokens_reused", 0)
                            - base.get("sequence_tokens_reused", 0)) / in_tokens if in_tokens else 0.0,
        "median_ttft_s": float(np.median(ttfts)) if ttfts else None,
        "p99_ttft_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "generated_lens": gen_lens,
        "reference_output_lens_match": gen_lens == ref,
        "startup_s": startup_s,
        "trace_steps": len(trace_rows),
    }


def _shutdown(llm) -> None:
    """Stop the engine core now and remove its stats board (``vllm_ext.shutdown``); best
    effort, the process exits right after anyway."""
    import vllm_ext

    try:
        vllm_ext.shutdown(llm)
    except Exception:  # noqa: BLE001 - best effort; process exit cleans up the rest
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m experiments.offline SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    res = run_offline(spec)
    if os.environ.get("KVDEDUP_RUNNER_CHILD") != "1":
        _shutdown(_LAST_LLM[0]) if _LAST_LLM else None
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(res), encoding="utf-8")
    os.replace(tmp, argv[1])
    if os.environ.get("KVDEDUP_RUNNER_CHILD") == "1":
        # No engine teardown (~4 s): the runner kills this run's process group next.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

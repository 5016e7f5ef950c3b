"""What kvdedup's own code costs per engine step, measured directly rather than through
the spread of two throughput runs.

Runs each arm's engine in a process of its own, with vLLM's engine core in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the scheduler and the worker share the
profiler); it sends one warm-up request, then profiles
one ``generate`` call over the workload with ``cProfile`` and reports, from the profile:

* ``scheduler_s``: kvdedup's ``DedupScheduler.schedule`` and ``update_from_output``
  less the vLLM ``Scheduler`` methods they call (chunking, planning, admission rules,
  metrics, trace);
* ``attention_wrapper_s``: kvdedup's attention backend's ``forward`` less the kernels it
  hands rows to (``own_time``);
* ``stock_kernel_s``, ``kvdedup_kernel_s``: time in vLLM's and kvdedup's attention kernels;
* ``generate_s``, ``steps`` and ``own_ms_per_step`` = (scheduler + wrapper) / steps.

The profiler slows Python code more than the kernels, so the shares it gives are an upper
bound on kvdedup's. Arms as in the experiment configs (``vllm-apc`` runs kvdedup's
scheduler in ``observe`` mode, so its ``scheduler_s`` is the metrics alone).

    python -m experiments.overhead WORKLOAD.jsonl --arms vllm-apc shared --num-blocks 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: (file suffix, function) of the entry points read from the profile.
K_SCHED = ("vllm_ext/scheduler.py", "schedule"), ("vllm_ext/scheduler.py", "update_from_output")
V_SCHED = (("vllm/v1/core/sched/scheduler.py", "schedule"),
           ("vllm/v1/core/sched/scheduler.py", "update_from_output"))
K_ATTN = ("vllm_ext/attention.py", "forward")
V_ATTN = ("vllm/v1/attention/backends/cpu_attn.py", "forward")
STOCK_KERNEL = ("vllm/_custom_ops.py", "cpu_attention_with_kv_cache")
K_KERNEL = ("vllm_ext/kernels.py", "borrowed_attention")


def _match(key, where) -> bool:
    file, _line, func = key
    return func == where[1] and file.replace(os.sep, "/").endswith(where[0])


def _cum(stats: dict, where, caller_in: str | None = None) -> float:
    """Cumulative seconds of ``where``; with ``caller_in``, only the calls made from
    functions in files whose path contains it."""
    total = 0.0
    for key, (_cc, _nc, _tt, ct, callers) in stats.items():
        if not _match(key, where):
            continue
        if caller_in is None:
            total += ct
        else:
            total += sum(c[3] for k, c in callers.items()
                         if caller_in in k[0].replace(os.sep, "/"))
    return total


def own_time(stats: dict) -> dict:
    """kvdedup's time from a ``pstats.Stats.stats`` mapping ``(file, line, func) ->
    (cc, nc, tottime, cumtime, callers)``:

    * ``scheduler_s``: kvdedup's ``schedule`` and ``update_from_output`` less the vLLM
      methods they call;
    * ``attention_wrapper_s``: kvdedup's attention ``forward`` less what it hands to
      kernels: vLLM's backend ``forward``, vLLM's kernel called from kvdedup's files (the
      rows that borrow nothing, and the scratch copies of the dense path) and kvdedup's
      kernel. What is left is the per-step planning, row splitting and copies;
    * ``stock_kernel_s`` and ``kvdedup_kernel_s``: the attention kernels themselves (work,
      not overhead: a borrower row runs kvdedup's kernel instead of vLLM's)."""
    cum = lambda where, caller_in=None: _cum(stats, where, caller_in)  # noqa: E731
    sched = sum(cum(w) for w in K_SCHED) - sum(cum(w) for w in V_SCHED)
    ours = cum(K_ATTN)
    kernel = cum(K_KERNEL)
    wrapper = ours - cum(V_ATTN) - cum(STOCK_KERNEL, "vllm_ext/") - kernel if ours else 0.0
    return {"scheduler_s": max(0.0, sched), "attention_wrapper_s": max(0.0, wrapper),
            "stock_kernel_s": cum(STOCK_KERNEL), "kvdedup_kernel_s": kernel}


def profile_arm(arm: str, workload: Path, num_blocks: int, num_requests: int | None,
                sequence: dict) -> dict:
    import cProfile
    import pstats
    import time

    import vllm_ext

    from experiments.config import arm_engine_kwargs
    from experiments.offline import batch_inputs, warm_up
    from experiments.workloads import load_workload

    reqs = load_workload(workload).requests[:num_requests]
    mode, kw = arm_engine_kwargs(arm, sequence)
    llm = vllm_ext.LLM("smollm2", dedup=mode, num_gpu_blocks_override=num_blocks,
                       block_size=32, dtype="float32", max_model_len=2048, max_num_seqs=32,
                       max_num_batched_tokens=2048, enforce_eager=True, seed=0, **kw)
    try:
        warm_up(llm, reqs)
        step0 = vllm_ext.dedup_stats(llm)["step"]
        prompts, params = batch_inputs(reqs)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        llm.generate(prompts, params, use_tqdm=False)
        prof.disable()
        elapsed = time.perf_counter() - t0
        steps = int(vllm_ext.dedup_stats(llm)["step"] - step0)
    finally:
        vllm_ext.shutdown(llm)
    own = own_time(pstats.Stats(prof).stats)
    total = own["scheduler_s"] + own["attention_wrapper_s"]
    return {"arm": arm, "generate_s": elapsed, "steps": steps, **own,
            "own_ms_per_step": 1e3 * total / steps if steps else None,
            "own_share": total / elapsed if elapsed else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.overhead",
                                 description="kvdedup's own time per engine step, profiled in "
                                             "one process per arm (SmolLM2, block size 32)")
    ap.add_argument("workload", type=Path, help="workload JSONL (python -m experiments.workloads)")
    ap.add_argument("--arms", nargs="+", default=["vllm-apc", "shared"], metavar="ARM",
                    help="arms to profile, one engine each, in turn (default vllm-apc shared)")
    ap.add_argument("--num-blocks", type=int, default=512, metavar="N", help="KV pool (default 512)")
    ap.add_argument("--num-requests", type=int, default=None, metavar="N",
                    help="first N requests of the workload (default all)")
    ap.add_argument("--k", type=int, default=None, help="k for sequence/shared (default the engine's)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one arm, JSON out
    args = ap.parse_args(argv)
    from experiments.config import ConfigError, check_arms
    from experiments.workloads import WorkloadError, load_workload

    try:
        check_arms(args.arms)
        load_workload(args.workload)
        if args.num_blocks < 2:
            raise ConfigError(f"--num-blocks must be at least 2, got {args.num_blocks}")
        if args.k is not None and args.k < 0:
            raise ConfigError(f"--k must be >= 0, got {args.k}")
    except (ConfigError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq = {} if args.k is None else {"k": args.k}
    if args.one:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        row = profile_arm(args.arms[0], args.workload, args.num_blocks, args.num_requests, seq)
        print("OVERHEAD " + json.dumps(row))
        return 0
    rows = []
    for arm in args.arms:
        cmd = [sys.executable, "-m", "experiments.overhead", str(args.workload), "--one",
               "--arms", arm, "--num-blocks", str(args.num_blocks)]
        cmd += ["--num-requests", str(args.num_requests)] if args.num_requests else []
        cmd += ["--k", str(args.k)] if args.k is not None else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("OVERHEAD ")]
        if proc.returncode != 0 or not line:
            print(f"error: arm {arm} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        r = json.loads(line[-1][len("OVERHEAD "):])
        rows.append(r)
        print(f"{r['arm']:<12} {r['steps']:>5} steps  generate {r['generate_s']:7.2f} s  "
              f"scheduler {r['scheduler_s']:.3f} s  attention wrapper "
              f"{r['attention_wrapper_s']:.3f} s  own {r['own_ms_per_step']:.2f} ms/step "
              f"({100 * r['own_share']:.2f}%)  kernels: vLLM {r['stock_kernel_s']:.2f} s, "
              f"kvdedup {r['kvdedup_kernel_s']:.2f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the one admission case vLLM 0.32 misses: a shared prefix longer than a step's budget.

vLLM registers a request's block hashes when its blocks are allocated, so followers
admitted in the same step as the first request already hit its blocks. When the shared
prefix is longer than ``max_num_batched_tokens``, the first request's prefill spans several
steps and followers admitted meanwhile see only the blocks allocated so far; they
recompute the rest. This script measures how much that costs (prefix hit tokens vs the
maximum possible, and elapsed time) for stock APC and kvdedup prefix mode, so a decision
about an admission rule rests on numbers.

    python -m experiments.admission [--model tiny] [--shared 3840] [--budget 2560] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def run(model: str, dedup: str, shared: int, unique: int, n: int, budget: int, reps: int,
        chunk_cap: int = 0):
    import vllm_ext
    from vllm_ext import SamplingParams

    rng = np.random.default_rng(0)
    llm = vllm_ext.LLM(model, dedup=dedup, enable_prefix_caching=True, enforce_eager=True,
                       max_model_len=shared + unique + 64, max_num_batched_tokens=budget,
                       num_gpu_blocks_override=(n + 2) * (unique + 64) // 32 + shared // 32 + 64,
                       long_prefill_token_threshold=chunk_cap, seed=0)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    rows = []
    for rep in range(reps):
        doc = rng.integers(3, 2000, size=shared).tolist()
        prompts = [{"prompt_token_ids": doc + rng.integers(3, 2000, size=unique).tolist()}
                   for _ in range(n)]
        before = vllm_ext.dedup_stats(llm)
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        after = vllm_ext.dedup_stats(llm)
        hits = after["prefix_hits"] - before["prefix_hits"]
        rows.append({"arm": dedup, "rep": rep, "long_prefill_token_threshold": chunk_cap, "elapsed_s": round(elapsed, 3), "hit_tokens": hits,
                     "max_hit_tokens": (n - 1) * (shared // 32 * 32),
                     "hit_fraction_of_max": round(hits / ((n - 1) * (shared // 32 * 32)), 4),
                     "preemptions": after["preemptions"] - before["preemptions"],
                     "collisions": after["collisions"] - before["collisions"]})
    vllm_ext.shutdown(llm)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.admission", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--shared", type=int, default=3840, help="shared prefix tokens")
    p.add_argument("--unique", type=int, default=64, help="unique suffix tokens per request")
    p.add_argument("--n", type=int, default=16, help="requests per burst")
    p.add_argument("--budget", type=int, default=2560, help="max_num_batched_tokens")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--long-prefill-threshold", type=int, nargs="+", default=[0, 512],
                   help="vLLM's per-request prefill chunk cap (0: none); one run set each")
    a = p.parse_args(argv)
    rows = []
    for cap in a.long_prefill_threshold:
        for arm in ("observe", "prefix"):  # observe = stock APC behaviour, measured
            rows += run(a.model, arm, a.shared, a.unique, a.n, a.budget, a.reps, cap)
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

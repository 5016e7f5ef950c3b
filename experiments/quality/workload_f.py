"""f (share of prompt tokens reused) that a recompute rule leaves on a workload file,
planned offline the way sequence mode plans it (no engine).

Requests in file order; each is planned against the store built by the requests before
it, and then adds its own exact region to the store (chunks before its first injection
stop, as ``vllm_ext.sequence`` captures them); the exact prefix hit is the longest common
prefix, in whole blocks, with an earlier request's exact region. Requests that run at the
same time in the engine wait for each other's runs (``should_hold``), so file order is
the engine's order for reuse purposes.

    python -m experiments.quality f WORKLOAD.jsonl --rules k=32 k=32,tail=16
"""

from __future__ import annotations

import numpy as np

from dedup.hashing import chunk_runs
from dedup.index import DedupIndex
from dedup.planner import ChunkSource, plan_injections

from .plans import BLOCK
from .rules import Rule


def planned_f(prompts: list[list[int]], rule: Rule, min_inject: int = 32) -> dict:
    """Tokens reused per request and in all under ``rule`` (contiguous rules only)."""
    if not rule.contiguous or rule.src != "first":
        raise ValueError(f"rule {rule.name}: the engine plans only k and tail")
    idx = DedupIndex(1 << 60)
    exact: list[np.ndarray] = []
    reused, total = [], 0
    for n, toks in enumerate(prompts):
        arr = np.asarray(toks, np.int64)
        hit = 0
        for e in exact:
            m = min(len(e), len(arr))
            neq = np.flatnonzero(e[:m] != arr[:m])
            hit = max(hit, int(neq[0]) if neq.size else m)
        start = min(hit // BLOCK * BLOCK, (len(arr) - 1) // BLOCK * BLOCK)
        chunks = chunk_runs(arr)
        inj = plan_injections(arr, chunks, idx, start=start, max_end=len(arr) - 1, k=rule.k,
                              min_inject=min_inject, tail=rule.tail)
        limit = inj[0].stop if inj else len(arr)
        for c in chunks:
            if c.end <= limit:
                idx.insert(c.digest, arr[c.start:c.end], ChunkSource(f"r{n}", c.start), c.end - c.start)
        exact.append(arr[:limit])
        reused.append(sum(i.num_tokens for i in inj))
        total += len(arr)
    return {"rule": rule.name, "requests": len(prompts), "prompt_tokens": total,
            "reused_tokens": int(sum(reused)), "f": sum(reused) / total if total else 0.0}


def main(path, rule_list: list[Rule]) -> int:
    from experiments.workloads.format import load_workload

    prompts = [list(r.prompt_token_ids) for r in load_workload(path).requests]
    print(f"{path}: {len(prompts)} requests")
    for rule in rule_list:
        r = planned_f(prompts, rule)
        print(f"  {r['rule']:>16}: f = {r['f']:.3f} ({r['reused_tokens']} of {r['prompt_tokens']} tokens)")
    return 0

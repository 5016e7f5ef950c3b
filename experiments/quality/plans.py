"""Which target positions take stored KV, and from where: the engine's plan, offline.

Mirrors ``vllm_ext.sequence.SequenceState`` for one target prompt after its stored
copies (``sources``) were computed: every chunk of every source is in the store (first
sighting wins, as in the engine), the exact prefix hit is the longest common prefix in
whole blocks (the prefix cache), and ``dedup.planner.plan_injections`` gives the runs.
A plan is an int array over target positions: ``-1`` = computed, else the source position
whose KV is injected (``src_name`` says which source). Pure numpy; no engine, no torch.

Selection rules: the planner's own (``k``: EPIC's first-k of each run; ``tail``: also
the last tokens of each run, contiguous), and on top of it
* ``top_deviation``: also recompute the ``r`` share of injected tokens with the highest
  deviation score (CacheBlend; not contiguous).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedup.hashing import chunk_runs
from dedup.index import DedupIndex
from dedup.planner import ChunkSource, Injection, plan_injections

BLOCK = 32


@dataclass
class Plan:
    src_pos: np.ndarray          # [n] int64, -1 = computed
    src_name: list[str | None]   # [n] which source, None where computed
    injections: list[Injection]

    @property
    def f(self) -> float:
        """Fraction of the prompt whose KV is injected (reused)."""
        return float(np.mean(self.src_pos >= 0)) if self.src_pos.size else 0.0

    @property
    def ranges(self) -> int:
        """Computed ranges the scheduler must run (contiguous stretches of -1)."""
        c = self.src_pos < 0
        return int(c[0]) + int(np.sum(c[1:] & ~c[:-1])) if c.size else 0


def store(sources: dict[str, list[int]], budget: int = 1 << 40) -> DedupIndex:
    """An index holding every chunk of each source, in order (first sighting wins)."""
    idx = DedupIndex(budget)
    for name, toks in sources.items():
        arr = np.asarray(toks, np.int64)
        for c in chunk_runs(arr):
            idx.insert(c.digest, arr[c.start:c.end], ChunkSource(name, c.start), c.end - c.start)
    return idx


def prefix_hit(target: list[int], sources: dict[str, list[int]], block: int = BLOCK) -> int:
    """Tokens of ``target`` an exact prefix cache would hit: the longest common prefix
    with any source, in whole blocks, leaving the last token to compute."""
    best = 0
    for s in sources.values():
        n = min(len(s), len(target))
        neq = np.flatnonzero(np.asarray(s[:n]) != np.asarray(target[:n]))
        best = max(best, int(neq[0]) if neq.size else n)
    return min(best // block * block, (len(target) - 1) // block * block)


def plan(target: list[int], sources: dict[str, list[int]], k: int, min_inject: int = 32,
         tail: int = 0) -> Plan:
    """The engine's sequence-mode plan for ``target`` after ``sources`` (``tail``: the
    planner's option of recomputing each run's last tokens)."""
    arr = np.asarray(target, np.int64)
    idx = store(sources)
    injections = plan_injections(arr, chunk_runs(arr), idx, start=prefix_hit(target, sources),
                                 max_end=len(arr) - 1, k=k, min_inject=min_inject, tail=tail)
    src = np.full(len(arr), -1, np.int64)
    names: list[str | None] = [None] * len(arr)
    for inj in injections:
        for pc in inj.pieces:
            src[pc.dst:pc.dst + pc.length] = np.arange(pc.src, pc.src + pc.length)
            names[pc.dst:pc.dst + pc.length] = [idx.get(pc.digest).payload.source] * pc.length
    return Plan(src, names, injections)


def top_deviation(p: Plan, score: np.ndarray, r: float) -> Plan:
    """Also recompute the ``r`` share (of the injected tokens) with the highest ``score``."""
    src = p.src_pos.copy()
    inj = np.flatnonzero(src >= 0)
    m = int(round(r * inj.size))
    if m:
        src[inj[np.argsort(-score[inj], kind="stable")[:m]]] = -1
    return Plan(src, list(p.src_name), p.injections)

"""Step-based model of the KV blocks held when requests run C at a time.

Model (deliberately simple, no engine):

* Requests are admitted in file order into ``C`` slots (arrival times are
  ignored: an offline batch).  A request admitted at step ``a`` runs for
  ``max(output_len, 1)`` engine steps: the first step prefills the whole
  prompt and emits the first token; each later step decodes one token.  At
  its ``k``-th step (``k = 0..output_len-1``) it holds KV for
  ``prompt_len + k`` tokens, i.e. ``ceil((prompt_len + k) / B)`` *logical*
  blocks (vLLM allocates slots for the tokens being computed; the KV of the
  last sampled token is never written).  A finished request frees its slot
  for the next step.  Memory is unbounded (no preemption).
* *Physical* blocks are the distinct blocks among the requests running at
  that step under a sharing rule.  Each request carries a list of shareable
  prompt pieces ``(key, cost_tokens)``; equal keys held by several running
  requests (or twice in one request) are stored once.  Everything else is
  private to its request: the trailing partial prompt block and all blocks
  holding generated tokens (their content is unknown offline).

  - block rules (``none``, ``prefix``, ``block``): the keys are full prompt
    blocks; physical = distinct keys + sum over requests of
    ``ceil((prompt_len + k)/B) - num_keys``.  ``none`` has no keys, so
    physical = logical.
  - token-granular rule (``run``): keys are content-defined runs of any
    length; physical tokens = total length of distinct runs + uncovered
    prompt tokens + generated tokens held; physical blocks =
    ``ceil(physical tokens / B)`` (runs packed without padding: a lower
    bound).

Time is measured in engine steps; means are over steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from analysis import AnalysisError

__all__ = ["RequestFootprint", "simulate_kv_blocks", "SIMULATION_MODEL"]

SIMULATION_MODEL = (
    "step-based: C slots filled in file order; a request runs max(output_len,1) steps "
    "(prefill + 1 token, then 1 token/step) and holds ceil((prompt+k)/B) logical blocks at "
    "its k-th step; physical = distinct shareable prompt blocks (or runs, packed, for 'run') "
    "among running requests + private partial/generated blocks; means over steps; "
    "unbounded memory, no preemption"
)

#: Max elements of one (requests x steps) matrix before a segment is split.
_MAX_CELLS = 1 << 20


@dataclass(frozen=True)
class RequestFootprint:
    """What one request holds: prompt/output lengths and shareable pieces.

    ``shared`` is a sequence of ``(key, cost_tokens)``: for block rules one
    entry per full prompt block (cost = block size), for the run rule one
    entry per content-defined run (cost = run length). ``covered`` (block rules)
    is how many of the request's own logical blocks the keys stand for, when that
    differs from ``len(shared)`` (shared mode: a borrowed range of n blocks may read
    n + 1 misaligned source blocks).
    """

    prompt_len: int
    output_len: int
    shared: Sequence[tuple[Hashable, int]]
    covered: int | None = None

    @property
    def covered_blocks(self) -> int:
        """Own logical blocks the keys stand for (block rules): ``covered`` if given,
        else one per key."""
        return len(self.shared) if self.covered is None else self.covered


def _ceil_div(a: np.ndarray, b: int) -> np.ndarray:
    return -(-a // b)


def simulate_kv_blocks(
    footprints: Sequence[RequestFootprint],
    block_size: int,
    concurrency: int,
    token_granular: bool = False,
) -> dict:
    """Run the step model; return peak/mean logical and physical blocks.

    Keys of the result: ``num_steps``, ``peak_logical_blocks``,
    ``mean_logical_blocks``, ``peak_physical_blocks``,
    ``mean_physical_blocks``, ``peak_dedup_ratio`` (peak logical / peak
    physical) and ``mean_dedup_ratio`` (mean over steps of logical/physical).
    """
    b = int(block_size)
    c = int(concurrency)
    if b < 1 or c < 1:
        raise AnalysisError("block size and concurrency must be positive")
    if not footprints:
        raise AnalysisError("no requests to simulate")

    n = len(footprints)
    prompt = np.array([f.prompt_len for f in footprints], dtype=np.int64)
    dur = np.array([max(int(f.output_len), 1) for f in footprints], dtype=np.int64)
    nkeys = np.array([f.covered_blocks for f in footprints],
                     dtype=np.int64)
    covered = np.array([sum(cst for _, cst in f.shared) for f in footprints], dtype=np.int64)
    if not token_granular and np.any(nkeys > _ceil_div(prompt, b)):
        raise AnalysisError("a block-rule footprint covers more blocks than its prompt")

    refcount: dict[Hashable, int] = {}
    key_cost: dict[Hashable, int] = {}
    distinct_cost = 0  # blocks (block rules) or tokens (run rule)

    def add(i: int) -> None:
        nonlocal distinct_cost
        for key, cost in footprints[i].shared:
            cnt = refcount.get(key, 0)
            if cnt == 0:
                key_cost[key] = cost
                distinct_cost += cost if token_granular else 1
            refcount[key] = cnt + 1

    def remove(i: int) -> None:
        nonlocal distinct_cost
        for key, _ in footprints[i].shared:
            cnt = refcount[key] - 1
            if cnt == 0:
                del refcount[key]
                distinct_cost -= key_cost.pop(key) if token_granular else 1
            else:
                refcount[key] = cnt

    step = 0
    nxt = 0
    running: list[int] = []
    start = np.zeros(n, dtype=np.int64)
    total_steps = 0
    sum_log = 0.0
    sum_phys = 0.0
    sum_ratio = 0.0
    peak_log = 0
    peak_phys = 0

    while nxt < n or running:
        while len(running) < c and nxt < n:
            start[nxt] = step
            add(nxt)
            running.append(nxt)
            nxt += 1
        idx = np.array(running, dtype=np.int64)
        end = int((start[idx] + dur[idx]).min())
        seg_len = max(1, _MAX_CELLS // len(idx))
        s0 = step
        while s0 < end:
            s1 = min(end, s0 + seg_len)
            steps = np.arange(s0, s1, dtype=np.int64)
            held = prompt[idx, None] + (steps[None, :] - start[idx, None])  # tokens held
            logical = _ceil_div(held, b).sum(axis=0)
            if token_granular:
                private_tokens = (held - covered[idx, None]).sum(axis=0)
                physical = _ceil_div(private_tokens + distinct_cost, b)
            else:
                private_blocks = (_ceil_div(held, b) - nkeys[idx, None]).sum(axis=0)
                physical = private_blocks + distinct_cost
            total_steps += len(steps)
            sum_log += float(logical.sum())
            sum_phys += float(physical.sum())
            sum_ratio += float((logical / np.maximum(physical, 1)).sum())
            peak_log = max(peak_log, int(logical.max()))
            peak_phys = max(peak_phys, int(physical.max()))
            s0 = s1
        step = end
        still = []
        for i in running:
            if start[i] + dur[i] == end:
                remove(i)
            else:
                still.append(i)
        running = still

    return {
        "num_steps": total_steps,
        "peak_logical_blocks": peak_log,
        "mean_logical_blocks": sum_log / total_steps,
        "peak_physical_blocks": peak_phys,
        "mean_physical_blocks": sum_phys / total_steps,
        "peak_dedup_ratio": peak_log / max(peak_phys, 1),
        "mean_dedup_ratio": sum_ratio / total_steps,
    }

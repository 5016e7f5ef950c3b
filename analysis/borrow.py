"""Shared mode's rule, offline: which KV blocks each request of a workload borrows.

The audit's ``shared`` rule predicts the engine's peak physical blocks in shared mode by
applying the engine's own planning to the workload in file order (no engine):

* each prompt is cut by ``dedup.hashing.chunk_runs`` and planned by
  ``dedup.planner.plan_injections`` against the chunks of earlier requests' exact
  regions, after its exact prefix hit (APC semantics, capped at ``len - 1``, whole blocks);
* each injection becomes a borrow (``dedup.planner.borrow_range``, ``edges`` as the
  engine's option: the run to the slot, or the whole reader blocks inside it), read from
  the source request's blocks; the reader holds no block wholly inside a borrow, and its
  partial blocks at a borrow's edges are its own;
* a request's exact region (before its first borrow) is keyed like prefix-cache blocks
  (full blocks by their chained hash, so identical prefixes count once; its partial last
  exact block by ``(request, block)``); a borrowed range adds the source's block keys, so a
  source block counts once however many running requests read it; everything after the
  first borrow (the tail, the edge blocks, generated tokens) is private to the request.

``analysis.simulate`` then counts distinct keys plus private blocks over the running set.
Differences from the engine: it assumes every source is still in the pool (no eviction),
requests run in file order, and a follower plans after its source's prefill completed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dedup.hashing import block_hashes, chunk_runs
from dedup.index import DedupIndex
from dedup.planner import (ChunkSource, borrow_range, edge_slots, placeholder_blocks,
                           plan_injections)

from analysis.simulate import RequestFootprint


def shared_footprints(prompts: Sequence[Sequence[int]], outputs: Sequence[int],
                      block_size: int, k: int = 32, min_inject: int = 32,
                      chunk_kwargs: dict | None = None,
                      edges: str = "slot") -> tuple[list[RequestFootprint], dict]:
    """Footprints of every request under shared mode, and totals
    (``borrowed_tokens``, ``borrowed_runs``, ``edge_tokens``, ``edge_slots``)."""
    B = block_size
    index = DedupIndex(1 << 62)
    seen: set[bytes] = set()
    keys_of: list[list] = []          # request -> key of each of its exact-region blocks
    out: list[RequestFootprint] = []
    totals = {"borrowed_tokens": 0, "borrowed_runs": 0, "edge_tokens": 0, "edge_slots": 0}
    for i, (toks, out_len) in enumerate(zip(prompts, outputs)):
        arr = np.asarray(toks, dtype=np.int64)
        n = len(arr)
        chained = block_hashes(arr, B) if n >= B else []
        hit = 0
        for h in chained[: (n - 1) // B]:
            if h not in seen:
                break
            hit += B
        chunks = chunk_runs(arr, **(chunk_kwargs or {})) if n else []
        inj = plan_injections(arr, chunks, index, start=hit, max_end=n - 1, k=k,
                              min_inject=min_inject)
        borrows = []
        for j in inj:
            rng = borrow_range(j, B, min_inject, edges)
            deltas = {pc.dst - pc.src for pc in j.pieces}
            if rng is None or len(deltas) != 1:
                continue
            src_req = index.get(j.pieces[0].digest).payload.source
            borrows.append((rng, deltas.pop(), int(src_req)))
            totals["edge_tokens"] += (rng[0] - j.stop) + (j.end - rng[1])
        exact = borrows[0][0][0] if borrows else n
        keys = [chained[b] if (b + 1) * B <= exact else ("block", i, b)
                for b in range(-(-exact // B))]
        keys_of.append(keys)
        shared = [(key, B) for key in keys]
        covered = len(keys)
        holes = placeholder_blocks([rng for rng, _, _ in borrows], B)
        for ((stop, end), delta, s), n_holes in zip(borrows, holes):
            src_keys = keys_of[s]
            first, last = (stop - delta) // B, (end - delta - 1) // B
            shared += [(src_keys[b] if b < len(src_keys) else ("block", s, b), B)
                       for b in range(first, last + 1)]
            covered += n_holes
            totals["edge_slots"] += edge_slots(stop, end, n_holes, B)
            totals["borrowed_tokens"] += end - stop
            totals["borrowed_runs"] += 1
        out.append(RequestFootprint(n, int(out_len), tuple(shared), covered=covered))
        seen.update(chained[: exact // B])
        for c in chunks:                  # the exact region becomes a source
            if c.end <= exact:
                index.insert(c.digest, arr[c.start:c.end], ChunkSource(str(i), c.start), 0)
    return out, totals

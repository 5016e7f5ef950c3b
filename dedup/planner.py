"""Which parts of a prompt can reuse stored KV computed at another offset (sequence mode).

Pure function over tokens, content-defined chunks and a ``DedupIndex`` of stored chunks;
no engine. The engine turns the result into scheduling stops and KV injections.

Rules
* A chunk is reusable when its digest is in the index AND its stored tokens equal the
  prompt's (``DedupIndex.lookup`` verifies; a collision is never reused).
* A *run* is a maximal sequence of consecutive reusable chunks whose stored sources are
  also consecutive in one source context (same ``source`` id, adjacent source positions):
  within a run the stored KV was computed as one contiguous text.
* Only tokens at or after ``start`` (what is already computed, e.g. an exact prefix hit)
  and before ``max_end`` (the last prompt token is always computed, for its logits) are
  injected. A stored chunk that runs past ``max_end`` (typically the prompt's last chunk,
  which ends with the document) still belongs to its run; only its part before
  ``max_end`` is injected. A stored chunk that straddles ``start`` still belongs to its
  run: its tokens before ``start`` are already exact and count toward the run's first
  ``k``.
* After a seam (a document following different text), chunk boundaries realign some
  tokens into the shared text; those tokens are computed as well. Extending runs back
  over them token by token was tried and dropped: on SmolLM2 it raised the reused
  fraction but multi-document quality at k=32 fell from -0.019 to -0.046 nats/token.
* The first ``k`` tokens of each run are recomputed (they re-attend to the new preceding
  text, EPIC's LegoLink rule); the rest of the run is injected. A run whose injected part
  is shorter than ``min_inject`` tokens is not worth a stop and is computed normally.
* Option ``tail``: the last ``tail`` tokens of each run (after clipping at ``max_end``)
  are recomputed too; the injection just ends earlier, so the computed part stays one
  contiguous range per run. In a chat prompt the stored copy's last chunk carries the
  turn end and the assistant header, whose KV summarizes the instruction it was stored
  under; measured on SmolLM2 (``python -m experiments.quality``), recomputing them moves
  outputs much less than reusing them, at a small cost in f.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .hashing import Chunk
from .index import DedupIndex


@dataclass(frozen=True)
class ChunkSource:
    """Where a stored chunk's KV came from: a source context id and its start position."""

    source: str
    start: int


@dataclass(frozen=True)
class Piece:
    """Inject stored chunk ``digest``'s tokens [offset, offset+length) at ``dst`` (they
    were computed at source position ``src``)."""

    digest: bytes
    offset: int
    length: int
    dst: int
    src: int


@dataclass
class Injection:
    """Compute the prompt up to ``stop``, then take [stop, end) from ``pieces``."""

    run_start: int
    stop: int
    end: int
    pieces: list[Piece] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.end - self.stop


def plan_injections(tokens: Sequence[int] | np.ndarray, chunks: Sequence[Chunk],
                    index: DedupIndex, *, start: int, max_end: int, k: int,
                    min_inject: int = 32, tail: int = 0) -> list[Injection]:
    """Injections for a prompt, in order, non-overlapping, each with ``start <= stop < end
    <= max_end``, ``stop >= run_start + k`` (and ``stop > start``) and ``end <= run end -
    tail``."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if tail < 0:
        raise ValueError(f"tail must be >= 0, got {tail}")
    arr = np.asarray(tokens)
    runs: list[list[tuple[Chunk, ChunkSource]]] = []
    for c in chunks:
        if c.end <= start or c.start >= max_end:
            continue
        entry = index.lookup(c.digest, arr[c.start:c.end])
        if entry is None:
            continue
        src: ChunkSource = entry.payload
        prev = runs[-1][-1] if runs else None
        if prev is not None and prev[0].end == c.start and prev[1].source == src.source \
                and prev[1].start + (prev[0].end - prev[0].start) == src.start:
            runs[-1].append((c, src))
        else:
            runs.append([(c, src)])
    out: list[Injection] = []
    for run in runs:
        run_start, end = run[0][0].start, min(run[-1][0].end, max_end) - tail
        stop = max(run_start + k, start + 1)
        if end - stop < min_inject:
            continue
        inj = Injection(run_start=run_start, stop=stop, end=end)
        for c, src in run:
            lo, hi = max(c.start, stop), min(c.end, end)
            if lo >= hi:
                continue
            off = lo - c.start
            inj.pieces.append(Piece(c.digest, off, hi - lo, lo, src.start + off))
        out.append(inj)
    return out


#: How a shared-mode borrow meets the reader's blocks: ``slot`` borrows the run's tokens
#: exactly (the reader's blocks at either edge are its own, part computed and part read
#: from the source); ``block`` borrows only the whole reader blocks inside the run and
#: computes the tokens at either edge.
EDGES = ("slot", "block")


def check_edges(edges: str) -> str:
    """``edges`` if it is one of ``EDGES``; else ValueError naming the choices."""
    if edges not in EDGES:
        raise ValueError(f"edges must be one of {', '.join(EDGES)}, got {edges!r}")
    return edges


def borrow_range(inj: Injection, block_size: int, min_tokens: int,
                 edges: str = "slot") -> tuple[int, int] | None:
    """The reader positions ``(stop, end)`` shared mode borrows from an injection, or None
    when too few remain.

    ``edges="slot"``: all of ``[inj.stop, inj.end)``, if at least ``min_tokens``.
    ``edges="block"``: the whole reader blocks inside it (``stop`` and ``end`` rounded
    inwards to multiples of ``block_size``), if at least ``max(block_size, min_tokens)``
    tokens; the tokens left at either edge are computed."""
    if check_edges(edges) == "slot":
        return (inj.stop, inj.end) if inj.end - inj.stop >= max(1, min_tokens) else None
    stop = -(-inj.stop // block_size) * block_size
    end = inj.end // block_size * block_size
    if end - stop < max(block_size, min_tokens):
        return None
    return stop, end


def edge_slots(stop: int, end: int, holes: int, block_size: int) -> int:
    """Borrowed positions of ``[stop, end)`` that fall in the reader's own (edge) blocks,
    when ``holes`` of its blocks are placeholders: those slots stay empty."""
    return end - stop - holes * block_size


def placeholder_blocks(ranges: Sequence[tuple[int, int]], block_size: int) -> list[int]:
    """For a request's borrowed ranges ``(stop, end)``, in order: how many of its blocks
    each one makes a placeholder (the blocks no position it computes falls in, so it holds
    no copy of them). Between two ranges the request computes tokens, so its table
    reaches the block of the next ``stop``; a range that starts where the last one ended
    also covers the block they meet in, when it reaches past that block's end. The
    partial blocks the request computes in are its own."""
    B = block_size
    out: list[int] = []
    table, last_end = 0, None
    for stop, end in ranges:
        table = max(table, stop // B if stop == last_end else -(-stop // B))
        n = max(0, end // B - table)
        out.append(n)
        table += n
        last_end = end
    return out

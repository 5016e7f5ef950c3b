"""Scheduler-side state of shared mode: runs borrowed from the block pool, at any offset.

Shared mode plans like sequence mode (``SequenceState``: content-defined chunks, verified
and tenant-salted digests, first ``k`` tokens of each run recomputed, followers held until
their owner computed the run, exact prefix cache kept clean) but it holds no copy of any
KV. The index maps a chunk digest to where its KV already sits in vLLM's block pool
(``PoolChunk``: the blocks of the request that computed it exactly), and a request that
contains the run *borrows* those slots instead of computing or copying them.

Ownership and reference counts (the pool's, through ``BlockHolder``):
* a plan holds a reference on every source block it will read, from admission until the
  request is preempted, finishes or is aborted (``drop``); so a source can never be
  reallocated while a borrower may read it, even after the request that computed it
  finished. Holding a cached free block takes it out of the free queue, and admission
  counts that against the free pool;
* the borrower's own block table holds the pool's null block (a placeholder vLLM never
  frees or caches) over the whole blocks of the borrowed range. Its edges (option
  ``edges``, ``dedup.planner.borrow_range``):
  - ``"slot"`` (default): the range is the run's tokens after its first ``k``, to the
    slot. The partial blocks at either edge are the borrower's own: its computed tokens
    sit in them, and the attention kernel reads the borrowed positions in them from the
    source (their slots stay empty: ``shared_edge_slots``);
  - ``"block"``: ``stop`` and ``end`` are rounded inwards to block boundaries, and the
    tokens between them and the run's (``shared_edge_tokens``) are computed normally;
* when no request holds a source block any more it returns to the pool's free queue,
  still indexed: the pool is the store. When the pool hands the block out again
  (``on_reuse``), every chunk that lives in it leaves the index (``shared_evictions``);
  a later plan that would have used it computes those tokens instead.
* frequency: each chunk counts the prompts that contained it (``sightings``); the pool
  reuses free blocks of chunks seen at least twice only when no other free block is
  left (``vllm_ext.block_pool``).

Per step the scheduler sends one ``Borrow`` per scheduled borrower (the slot its last
scheduled token is written to, and its segments); ``vllm_ext.attention`` reads them.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from itertools import islice
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dedup.hashing import Chunk
from dedup.planner import (ChunkSource, borrow_range, check_edges, edge_slots,
                           placeholder_blocks)

from .sequence import MAX_BYPASS, ORDER_WINDOW, RequestPlan, SequenceState

logger = logging.getLogger("kvdedup")
#: The group hold waits for at most this share of the usable pool, except for a document
#: and its readers (``SharedState.should_hold``). A larger group (a RAG prompt's passages
#: recur in most waiting prompts) is admitted once half the pool is free, instead of
#: waiting for the running requests to drain it.
GROUP_SHARE = 0.5
DEBUG = os.environ.get("KVDEDUP_DEBUG") == "1"


@dataclass(frozen=True)
class PoolChunk(ChunkSource):
    """A chunk's KV in the pool: ``blocks[i]`` holds source positions
    ``[(start // B + i) * B, ...)`` of the request ``source`` that computed it."""

    blocks: tuple[int, ...] = ()


@dataclass
class BorrowPlan:
    """Compute up to ``stop``, then read positions [stop, end) from source positions
    [src, src + end - stop), which sit in ``blocks`` (source block index ``src // B``
    onwards). ``delta`` = reader position - source position."""

    stop: int
    end: int
    delta: int
    src: int
    blocks: list[int]
    holes: int = 0          # reader blocks it makes placeholders (``placeholder_blocks``)
    edge_tokens: int = 0    # run tokens computed because the borrow was rounded to blocks
    edge_slots: int = 0     # borrowed positions that fall in the reader's own edge blocks

    @property
    def num_tokens(self) -> int:
        return self.end - self.stop

    def segment(self) -> tuple[int, int, int, int, list[int]]:
        return (self.stop, self.end - self.stop, self.delta, self.src, self.blocks)


@dataclass
class Borrow:
    """One scheduled borrower in one step: ``slot`` is where its last scheduled token's
    KV is written (identifies its batch row), ``segments`` its borrowed ranges."""

    slot: int
    segments: list = field(default_factory=list)


class BlockHolder(Protocol):
    """What shared mode needs from the pool (implemented by the KV manager)."""

    def hold(self, block_ids: list[int]) -> None: ...
    def release(self, block_ids: list[int]) -> None: ...
    def num_evictable(self, block_ids: list[int]) -> int: ...
    def num_usable_blocks(self) -> int: ...
    def place_borrow(self, request_id: str, start: int, end: int) -> bool: ...
    def num_request_blocks(self, request_id: str) -> int: ...
    def num_free_blocks(self) -> int: ...


class SharedState(SequenceState):
    def __init__(self, block_size: int, bytes_per_token: int, k: int, pool: BlockHolder,
                 min_inject: int = 32, admission: str = "group", edges: str = "slot",
                 **kwargs) -> None:
        if admission not in ("group", "gate"):
            raise ValueError(f"admission must be group or gate, got {admission!r}")
        self.admission = admission
        self.edges = check_edges(edges)
        # The index holds metadata only: the pool bounds what is stored.
        super().__init__(block_size, bytes_per_token, store_bytes=1 << 62, k=k,
                         min_inject=min_inject, **kwargs)
        self.pool = pool
        self.holds: dict[str, list[int]] = {}        # request -> source blocks it holds
        self.taken: dict[str, int] = {}               # request -> free blocks its holds took
        self.active: dict[str, list[BorrowPlan]] = {}  # request -> borrowed ranges
        self.block_chunks: dict[int, set[bytes]] = {}  # block -> chunks living in it
        self.sightings: Counter = Counter()           # chunk digest -> prompts with it
        self.borrows: list[Borrow] = []               # this step's, for the worker
        self.edge_tokens = 0
        self.edge_slots = 0
        self.shared_evictions = 0
        self.cancelled = 0
        self.running: list = []                       # vLLM's live running list (this step)
        self.followers: dict[bytes, list] = {}        # chunk -> waiting (request, tokens)
        self.group_held = 0                           # requests group-held (cumulative)
        self.group_seen: set[str] = set()             # live requests group-held once
        self.group_steps: Counter = Counter()         # live request -> steps held (counted)

    # -- admission ----------------------------------------------------------------------
    def chunks(self, request) -> list[Chunk]:
        first = request.request_id not in self._chunks
        c = super().chunks(request)
        if first:
            self.sightings.update({ch.digest for ch in c})
        return c

    def _new_plan(self, request, start: int) -> RequestPlan:
        """Shared mode: borrow each run (``_to_borrow``); hold the source blocks."""
        inj = self._injections(request, start)
        borrows = [b for b in (self._to_borrow(i) for i in inj) if b is not None]
        B = self.block_size
        for b, n in zip(borrows, placeholder_blocks([(b.stop, b.end) for b in borrows], B)):
            b.holes, b.edge_slots = n, edge_slots(b.stop, b.end, n, B)
        if DEBUG:
            logger.warning("kvdedup shared: plan %s start=%d injections=%s borrows=%s",
                           request.request_id, start, [(i.stop, i.end) for i in inj],
                           [(b.stop, b.end, b.delta) for b in borrows])
        p = RequestPlan(self.chunks(request), borrows,
                        exact_limit=borrows[0].stop if borrows else len(request.prompt_token_ids),
                        limited=bool(borrows))
        held = sorted({blk for b in borrows for blk in b.blocks})
        if held:
            self.taken[request.request_id] = self.pool.num_evictable(held)
            self.pool.hold(held)
            self.holds[request.request_id] = held
        return p

    def _to_borrow(self, inj) -> BorrowPlan | None:
        """The borrow of an injection (its edges as ``self.edges`` says), or None when
        too short, or when its source is not wholly in the pool any more."""
        B = self.block_size
        rng = borrow_range(inj, B, self.min_inject, self.edges)
        if rng is None:
            return None
        stop, end = rng
        deltas = {pc.dst - pc.src for pc in inj.pieces}
        if len(deltas) != 1:  # a run is one source context at one offset
            return None
        delta = deltas.pop()
        src = stop - delta
        where: dict[int, int] = {}
        for pc in inj.pieces:
            entry = self.index.get(pc.digest)
            chunk: PoolChunk = entry.payload
            first = chunk.start // B
            for i, blk in enumerate(chunk.blocks):
                where[first + i] = blk
        need = range(src // B, (src + end - stop - 1) // B + 1)
        if any(i not in where for i in need):
            return None
        return BorrowPlan(stop, end, delta, src, [where[i] for i in need],
                          edge_tokens=(stop - inj.stop) + (inj.end - end))

    def _admit(self, request, p: RequestPlan, start: int, free_blocks: int) -> bool:
        """Does a new request fit beside the running ones? ``free_blocks`` was read before
        the plan held its sources, so the cached free sources it took (``taken``) count.

        ``admission="group"``: the request needs every block it will own (its prompt less
        what it hit or borrows) plus one for decode, out of the free blocks less those
        promised to running requests (``promised``); with nothing running, vLLM's own gate
        decides. ``"gate"``: a borrower needs its blocks up to its first borrow, other
        requests pass (vLLM's gate counts their whole prompt)."""
        B = self.block_size
        taken = self.taken.pop(request.request_id, 0)
        if self.admission == "gate":
            if not p.injections:
                return True
            need = taken + max(0, -(-p.injections[0].stop // B) - start // B)
            if need > free_blocks - self.reserved:
                return False
            self.reserved += need
            return True
        if not self.running:
            return True
        need = taken + max(0, self._own_blocks(request, p.injections) - start // B) + 1
        return need <= free_blocks - self.promised()

    def _own_blocks(self, request, borrows) -> int:
        """Blocks a request's prompt occupies in its own table, less the placeholders of
        the ``borrows`` still to be placed."""
        B = self.block_size
        return -(-len(request.prompt_token_ids) // B) - sum(b.holes for b in borrows)

    def promised(self) -> int:
        """Blocks the running requests will still allocate: the rest of each one's prompt
        (less its pending borrows) and one block of decode growth each. Read from vLLM's
        live running list, so a request admitted earlier in this step counts with the
        blocks its first chunk already took."""
        n = 0
        for r in self.running:
            p = self.plans.get(r.request_id)
            pending = p.injections if p is not None else ()
            n += max(0, self._own_blocks(r, pending)
                     - self.pool.num_request_blocks(r.request_id)) + 1
        return n

    def borrowed_blocks(self, request) -> int:
        """Placeholder blocks the request's plan will take and has not yet placed (the
        admission gate counts no block of its own for them)."""
        p = self.plans.get(request.request_id)
        return sum(b.holes for b in p.injections) if p is not None else 0

    def begin_step(self, running, waiting=()) -> None:
        """Claims as in sequence mode; borrows allocate nothing, so ``admission="gate"``
        reserves only decode growth (one block per running request), and ``"group"``
        reads the running requests' promised blocks when it admits (``promised``). Notes
        which waiting requests (the first ``ORDER_WINDOW``) contain each chunk, for the
        group hold."""
        super().begin_step(running)
        self.reserved = len(running)
        self.running = running
        self.followers = {}
        if self.admission != "group":
            return
        for r in islice(waiting, ORDER_WINDOW):
            if r.request_id in self.plans or r.num_computed_tokens or not self._may_reuse(r):
                continue
            for c in self.chunks(r):
                self.followers.setdefault(c.digest, []).append((r, c.end - c.start))

    def should_hold(self, request, start: int) -> bool:
        """Followers wait for their owner (sequence mode's rule); with
        ``admission="group"`` a first occurrence also waits while it and its followers
        do not fit.

        Group hold: a fresh request that would compute chunks that other waiting
        requests contain (at least ``k + min_inject`` tokens each: its *followers*) is
        held while the free blocks, less the promised ones, cannot take its own blocks
        and every follower's (its prompt less the blocks it would borrow), plus one
        decode block each. Otherwise a small pool fills with first occurrences whose
        followers cannot be admitted until one finishes, by when the pool has handed out
        their sources. A request is not held when nothing runs (nothing would free
        blocks), nor after ``MAX_BYPASS`` counted steps held, so it never starves.

        A group waits for at most ``GROUP_SHARE`` of the usable pool, except a *document
        group*: one larger than that share that still fits in the pool, whose followers
        borrow at least as many blocks as the first occurrence holds (a document and its
        readers). At most one such group runs at a time, and a first occurrence admitted
        beside another group would strand its readers, so it waits for the whole group,
        and its held steps count only while it alone would fit (while the pool, not the
        hold, keeps it out, it loses nothing)."""
        if super().should_hold(request, start):
            return True
        if self.admission != "group" or not self.running or not self.followers \
                or request.request_id in self.plans or request.num_computed_tokens != 0 \
                or self.group_steps[request.request_id] >= MAX_BYPASS:
            return False
        B = self.block_size
        new = [c for c in self.chunks(request) if c.start >= start
               and c.digest not in self.index and c.digest not in self.claimed]
        shared: Counter = Counter()
        who: dict[str, object] = {}
        for c in new:
            for r, n in self.followers.get(c.digest, ()):
                if r.request_id != request.request_id:
                    shared[r.request_id] += n
                    who[r.request_id] = r
        need_each = self.k + self.min_inject
        group = [(who[rid], n) for rid, n in shared.items() if n >= need_each]
        if not group:
            return False
        indexed = sum(c.end - c.start for c in self.chunks(request) if c.digest in self.index)
        own = max(0, -(-len(request.prompt_token_ids) // B) - start // B
                  - max(0, indexed - self.k) // B) + 1
        need, borrowed = own, 0
        for r, n in group:
            need += max(0, -(-len(r.prompt_token_ids) // B) - max(0, n - self.k) // B) + 1
            borrowed += max(0, n - self.k) // B
        usable = self.pool.num_usable_blocks()
        cap = int(usable * GROUP_SHARE)
        document = cap < need <= usable and borrowed >= own
        if not document:
            need = min(need, cap)
        free = self.pool.num_free_blocks() - self.promised()
        if need <= free:
            return False
        if request.request_id not in self.group_seen:
            self.group_seen.add(request.request_id)
            self.group_held += 1
        if not document or own <= free:   # the hold, not the pool, keeps it waiting
            self.group_steps[request.request_id] += 1
        return True

    def _take_run(self, request, p: RequestPlan) -> int | None:
        """Shared mode (``jump`` calls it for each run the request stands at): the request
        gets placeholders over the borrowed blocks and skips to the borrow's ``end``; if
        the table cannot take them (it holds blocks past ``stop``), the range is computed
        instead (None)."""
        b = p.injections.pop(0)
        if not self.pool.place_borrow(request.request_id, b.stop, b.end):
            self.cancelled += 1
            return None
        self.active.setdefault(request.request_id, []).append(b)
        self.hits += 1
        self.tokens_reused += b.num_tokens
        self.edge_tokens += b.edge_tokens
        self.edge_slots += b.edge_slots
        return b.end

    # -- after the step is scheduled ----------------------------------------------------
    def after_schedule(self, request, num_scheduled: int, block_ids: list[int]) -> None:
        act = self.active.get(request.request_id)
        if act:
            pos = request.num_computed_tokens - 1
            B = self.block_size
            self.borrows.append(Borrow(block_ids[pos // B] * B + pos % B,
                                       [b.segment() for b in act]))
        p = self.plans.get(request.request_id)
        if p is not None:
            self._store_computed(request, p, num_scheduled, block_ids)

    def _store_chunk(self, request, c: Chunk, toks: np.ndarray, block_ids: list[int]) -> None:
        """Index the chunk where it sits: the blocks of its positions."""
        B = self.block_size
        blocks = tuple(block_ids[c.start // B:(c.end - 1) // B + 1])
        if self.index.insert(c.digest, toks, PoolChunk(request.request_id, c.start, blocks), 0):
            for blk in blocks:
                self.block_chunks.setdefault(blk, set()).add(c.digest)

    def take_borrows(self) -> list[Borrow]:
        out, self.borrows = self.borrows, []
        return out

    # -- the pool reuses blocks -----------------------------------------------------------
    def on_reuse(self, block_ids) -> None:
        """The pool handed these blocks out anew: chunks living in them are gone."""
        for blk in block_ids:
            for digest in self.block_chunks.pop(blk, ()):
                entry = self.index.get(digest)
                if entry is None:
                    continue
                self.index.remove(digest)
                self.shared_evictions += 1
                for other in entry.payload.blocks:
                    if other != blk:
                        self.block_chunks.get(other, set()).discard(digest)

    def protected(self, block_id: int) -> bool:
        """Does the block hold a chunk that recurs (seen in at least two prompts)?"""
        return any(self.sightings[d] >= 2 for d in self.block_chunks.get(block_id, ()))

    # -- lifecycle -----------------------------------------------------------------------
    def drop(self, request_id: str) -> None:
        super().drop(request_id)
        held = self.holds.pop(request_id, None)
        self.active.pop(request_id, None)
        self.taken.pop(request_id, None)
        if held:
            self.pool.release(held)

    def finish(self, request_id: str) -> None:
        super().finish(request_id)
        self.group_steps.pop(request_id, None)
        self.group_seen.discard(request_id)

    def stats(self) -> dict:
        st = super().stats()
        st.update(store_bytes=0, store_entries=len(self.index),
                  store_evictions=self.shared_evictions,
                  borrowed_runs=self.hits, borrowed_tokens=self.tokens_reused,
                  shared_edge_tokens=self.edge_tokens, shared_edge_slots=self.edge_slots,
                  shared_group_held=self.group_held,
                  held_source_blocks=len({b for h in self.holds.values() for b in h}))
        return st

"""Scheduler-side state of sequence mode: store index, per-request plans, step commands.

Owned by ``DedupScheduler`` (engine-core process). The KV itself lives in the worker
(``vllm_ext.kv_store``); this side decides everything and sends commands in the step's
connector metadata, so worker and scheduler never disagree:

* store index: a ``DedupIndex`` of chunk digest -> ``ChunkSource`` with each chunk's KV
  size; its LRU eviction under ``store_bytes`` decides what the worker drops. Admission
  policy: store on first sighting (every exactly computed chunk of a prompt is captured
  while there is room); a chunk is useful as soon as a second request contains it, and
  LRU drops chunks that never recur.
* plans: at admission a request's prompt is chunked (``dedup.hashing.chunk_runs``) and
  ``dedup.planner.plan_injections`` gives its injections; the chunks they use are pinned
  (ref count) until the KV is written, so they cannot be evicted in between.
* exact limit: a request's tokens before its first injection stop are exact. Only chunks
  and prefix-cache blocks below that limit are captured or registered: injected
  (approximate) KV and everything computed after it never enter either cache.
* same-step followers: a waiting request whose reusable runs are being computed by a
  request admitted earlier in the SAME step (their KV is captured during this step's
  forward) is held back one step (``clip`` returns 0, which ends vLLM's admission loop
  for the step), then planned against the captured chunks. In-flight digests are
  forgotten at the end of every step, so a request waits at most one step per chance.
* preemption cancels the request's remaining plan (full recompute from then on).
* requests asking for prompt logprobs are not planned (as vLLM skips prefix-cache reads
  for them): injected positions have no logits. ``inject_prompt_logprobs`` overrides this
  for evaluation only (entries at injected positions are placeholders with token id -1;
  request them with ``detokenize=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dedup.hashing import Chunk, chunk_runs
from dedup.index import DedupIndex
from dedup.planner import ChunkSource, Injection, plan_injections


@dataclass
class RequestPlan:
    chunks: list[Chunk]
    injections: list[Injection]
    exact_limit: int                    # tokens [0, exact_limit) are exact
    limited: bool = False               # some KV of this request is (or was) injected
    pinned: list[bytes] = field(default_factory=list)
    ready: Injection | None = None      # jumped over, KV to write once blocks exist
    captured_upto: int = 0              # chunks before this token offset are handled


@dataclass
class StepCommands:
    """What the worker does this step, in order: evict, inject, capture."""

    evicts: list[bytes] = field(default_factory=list)
    injects: list[tuple[list[int], list[tuple[bytes, int, int, int]]]] = field(default_factory=list)
    captures: list[tuple[bytes, list[int], int]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.evicts or self.injects or self.captures)


class SequenceState:
    def __init__(self, block_size: int, bytes_per_token: int, store_bytes: int, k: int,
                 min_inject: int = 32, chunk_args: dict | None = None,
                 inject_prompt_logprobs: bool = False) -> None:
        self.inject_prompt_logprobs = inject_prompt_logprobs
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.k = k
        self.min_inject = min_inject
        self.chunk_args = chunk_args or {}
        self.index = DedupIndex(store_bytes, on_evict=self._on_evict)
        self.plans: dict[str, RequestPlan] = {}
        self.inflight: set[bytes] = set()   # chunks computed by requests admitted this step
        self.held = 0
        self.cmds = StepCommands()
        self.hits = 0
        self.tokens_reused = 0

    def _on_evict(self, digest: bytes, payload) -> None:
        self.cmds.evicts.append(digest)

    # -- admission -----------------------------------------------------------------------
    def plan(self, request, start: int) -> RequestPlan:
        """Plan a request the first time the scheduler considers it (``start`` = tokens
        already computed or hit in the exact prefix cache)."""
        p = self.plans.get(request.request_id)
        if p is not None:
            return p
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int64)
        chunks = chunk_runs(prompt, **self.chunk_args) if len(prompt) else []
        sp = request.sampling_params
        wants_logprobs = sp is not None and sp.prompt_logprobs is not None
        inj = [] if wants_logprobs and not self.inject_prompt_logprobs else plan_injections(
            prompt, chunks, self.index, start=start, max_end=len(prompt) - 1, k=self.k,
            min_inject=self.min_inject)
        p = RequestPlan(chunks, inj, exact_limit=inj[0].stop if inj else len(prompt),
                        limited=bool(inj))
        for i in inj:
            for piece in i.pieces:
                self.index.acquire(piece.digest)
                p.pinned.append(piece.digest)
        self.plans[request.request_id] = p
        return p

    def _worth_waiting(self, request, start: int) -> bool:
        """Would this not-yet-planned request reuse enough of what requests admitted earlier
        in this step are computing now?"""
        if not self.inflight:
            return False
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int64)
        pending = sum(c.end - c.start for c in chunk_runs(prompt, **self.chunk_args)
                      if c.start >= start and c.digest in self.inflight
                      and c.digest not in self.index)
        return pending >= self.k + self.min_inject

    def clip(self, request, start: int, num_new: int) -> int:
        """Cap a prefill chunk so it stops at the request's next injection stop (0: hold the
        request back this step, see the module docstring)."""
        first = request.request_id not in self.plans
        if first and request.num_computed_tokens == 0 and self._worth_waiting(request, start):
            self.held += 1
            return 0
        p = self.plan(request, start)
        if first:
            self.inflight.update(c.digest for c in p.chunks
                                 if c.start >= start and c.end <= p.exact_limit)
        for inj in p.injections:
            if start < inj.stop < start + num_new:
                return inj.stop - start
        return num_new

    def jump(self, request) -> None:
        """Before a step: a request standing at an injection stop skips to the run's end."""
        p = self.plans.get(request.request_id)
        if p is None or not p.injections or p.ready is not None:
            return
        inj = p.injections[0]
        if request.num_computed_tokens == inj.stop:
            request.num_computed_tokens = inj.end
            p.ready = p.injections.pop(0)

    # -- after the step is scheduled ------------------------------------------------------
    def after_schedule(self, request, num_scheduled: int, block_ids: list[int]) -> None:
        p = self.plans.get(request.request_id)
        if p is None:
            return
        B = self.block_size

        def slots(lo: int, hi: int) -> list[int]:
            pos = np.arange(lo, hi)
            return (np.asarray(block_ids)[pos // B] * B + pos % B).tolist()

        if p.ready is not None:
            inj, p.ready = p.ready, None
            pieces = [(pc.digest, pc.offset, pc.length, pc.dst - pc.src) for pc in inj.pieces]
            self.cmds.injects.append((slots(inj.stop, inj.end), pieces))
            self.hits += 1
            self.tokens_reused += inj.num_tokens
            self._unpin(p, [pc.digest for pc in inj.pieces])
        done = min(request.num_computed_tokens, p.exact_limit)
        if done <= p.captured_upto:
            return
        lo = request.num_computed_tokens - num_scheduled
        src = request.request_id
        for c in p.chunks:
            if c.start < p.captured_upto or c.end > done:
                continue
            if c.start >= lo and c.digest not in self.index:
                toks = np.asarray(request.prompt_token_ids[c.start:c.end], dtype=np.int64)
                if self.index.insert(c.digest, toks, ChunkSource(src, c.start),
                                     (c.end - c.start) * self.bytes_per_token):
                    self.cmds.captures.append((c.digest, slots(c.start, c.end), c.start))
        p.captured_upto = done

    def stats(self) -> dict:
        st = self.index.stats()
        return {"sequence_hits": self.hits, "sequence_tokens_reused": self.tokens_reused,
                "store_bytes": st["bytes_held"], "store_entries": st["entries"],
                "store_evictions": st["evictions"], "sequence_held": self.held}

    def take_commands(self) -> StepCommands:
        """The step's worker commands; also ends the step's in-flight window."""
        cmds, self.cmds = self.cmds, StepCommands()
        self.inflight = set()
        return cmds

    # -- lifecycle -----------------------------------------------------------------------
    def _unpin(self, p: RequestPlan, digests: list[bytes]) -> None:
        for d in digests:
            if d in p.pinned:
                p.pinned.remove(d)
                self.index.release(d)

    def cancel(self, request_id: str) -> None:
        """Preemption: drop the remaining plan; the request recomputes normally."""
        p = self.plans.get(request_id)
        if p is not None:
            self._unpin(p, list(p.pinned))
            p.injections, p.ready = [], None
            p.captured_upto = max(p.captured_upto, p.exact_limit)

    def finish(self, request_id: str) -> None:
        self.cancel(request_id)
        self.plans.pop(request_id, None)

    def exact_limit(self, request_id: str) -> int | None:
        """Tokens of the request that may enter the exact prefix cache (None: all)."""
        p = self.plans.get(request_id)
        return p.exact_limit if p is not None and p.limited else None

"""kvdedup's scheduler: verified, salted prefix sharing plus per-step dedup metrics (vLLM 0.32).

Extends ``vllm.v1.core.sched.scheduler.Scheduler`` (load it with ``--scheduler-cls
vllm_ext.scheduler.DedupScheduler`` or ``LLM(scheduler_cls=...)``):

* ``__init__``: turns the ``KVCacheManager`` vLLM built into a ``VerifiedKVCacheManager``
  (hits checked against a token ledger) and opens the metrics outputs.
* ``add_request``: rehashes the request with ``dedup.hashing.block_hashes`` (salted by
  ``cache_salt``) before vLLM's ``add_request`` queues it, so every prefix lookup and
  every registered block uses kvdedup's hashes.
* ``schedule``: notes when the step began; in sequence and shared mode reorders the
  waiting queue (FCFS policy only) so that requests that can reuse a run now go first
  (``SequenceState.admission_order``); after vLLM allocates the step's blocks, notes
  peak occupancy.
* ``update_from_output``: after the step's finished requests free their blocks, records
  the step's ``StepStats`` and attaches it to the step's ``SchedulerStats`` as
  ``kv_connector_stats["kvdedup"]`` (read by vLLM's loggers through ``DedupConnector``).
* ``_preempt_request``: counts preemptions (sequence mode: drops the request's plan; it is
  planned afresh when admitted again).
* sequence mode: a finished request's plan is forgotten through the connector's
  ``request_finished`` hook (``DedupConnector.finish``).
* ``_mamba_block_aligned_split`` (vLLM's per-request prefill-chunk clip, used upstream
  for Mamba state alignment): sequence mode turns it on for attention-only models and
  clips a prefill at the request's next injection stop (or, in the exact region, at a
  content-defined chunk boundary); before each step, a request
  standing at a stop jumps over the injected run (``SequenceState.jump`` decides, the
  scheduler advances ``num_computed_tokens``), and the
  step's capture/inject/evict commands go to the worker in the connector metadata.

Every vLLM name used here is listed, with the reason, in ``vllm_ext.contract``.

Settings come from ``kv_transfer_config.kv_connector_extra_config`` (set by
``vllm_ext.launch``): ``mode`` ("prefix", "sequence" or "observe": metrics only, vLLM's
hashes and unverified hits, for measuring stock behaviour), ``trace`` (JSONL path) and
``board`` (stats board path for ``dedup_stats``), and, for tests only,
``debug_collide_hashes`` (hashes ignore token values, so every same-length prefix collides
and only token verification keeps requests apart).
"""

from __future__ import annotations

from collections import deque
from itertools import islice

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from .hasher import adopt_request, make_request_block_hasher
from .kv_manager import VerifiedKVCacheManager
from .launch import DEDUP_MODES, DEDUP_OPTIONS, MODE_OPTIONS, SHARED_ENV, check_options
from .metrics import StepRecorder, StepStats
from .sequence import ORDER_WINDOW, SequenceState
from .shared import SharedState
from .version import check_vllm_version

check_vllm_version()

MODES = tuple(m for m in DEDUP_MODES if m != "off")  # the modes this scheduler runs


def dedup_settings(vllm_config) -> dict:
    ktc = vllm_config.kv_transfer_config
    extra = dict(ktc.kv_connector_extra_config or {}) if ktc is not None else {}
    mode = extra.get("mode", "prefix")
    if mode not in MODES:
        raise ValueError(f"unknown kvdedup mode {mode!r}; choose one of {', '.join(MODES)}")
    extra["mode"] = mode
    return extra


class DedupScheduler(Scheduler):
    """vLLM's scheduler with content-verified prefix sharing and dedup metrics."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        settings = dedup_settings(vllm_config)
        self.dedup_mode = settings["mode"]
        self.verify_hits = self.dedup_mode != "observe"
        if self.dedup_mode == "prefix" and not self.cache_config.enable_prefix_caching:
            raise ValueError(f"kvdedup {self.dedup_mode} mode needs prefix caching on "
                             "(--enable-prefix-caching)")
        self.kv_cache_manager = VerifiedKVCacheManager.install(self.kv_cache_manager)
        self.kv_cache_manager.verify_hits = self.verify_hits
        self._dedup_hasher = make_request_block_hasher(
            self.hash_block_size, ignore_tokens=bool(settings.get("debug_collide_hashes")))
        self._bytes_per_block = self.kv_cache_manager.bytes_per_block
        self._step = 0
        self._preemptions = 0
        self._scheduled = self._prefill = 0  # tokens computed: all, prompt only
        self.recorder = StepRecorder(settings.get("board"), settings.get("trace"))
        self._peak = (0, 0)  # (logical, physical) right after allocation, this step
        self._starts: dict[int, float] = {}  # id(scheduler output) -> its schedule() start
        self.sequence: SequenceState | None = None   # SharedState in shared mode
        if self.dedup_mode in ("sequence", "shared"):
            self._init_reuse(settings)

    def _init_reuse(self, settings: dict) -> None:
        """Sequence or shared mode: the planner state, the prefill clip, the exact cap."""
        mode = self.dedup_mode
        if self.connector is None:
            raise ValueError(f"kvdedup {mode} mode needs the DedupConnector "
                             "(build the engine with vllm_ext.launch)")
        if self.has_mamba_layers:
            raise ValueError(f"kvdedup {mode} mode supports attention-only models")
        opts = check_options({k: settings[k] for k in MODE_OPTIONS[mode]
                              if settings.get(k) is not None})
        opts = {k: opts.get(k, DEDUP_OPTIONS[k]) for k in MODE_OPTIONS[mode]}
        eviction = opts.pop("eviction", None)
        common = dict(block_size=self.block_size,
                      bytes_per_token=self._bytes_per_block // self.block_size, **opts,
                      inject_prompt_logprobs=bool(settings.get("inject_prompt_logprobs", False)))
        if mode == "sequence":
            self.sequence = SequenceState(**common)
        else:
            from vllm.platforms import current_platform

            from .attention import installed

            if not current_platform.is_cpu():
                # the backend overrides CPU_ATTN only: elsewhere borrowed ranges would be
                # read as the null block they are in the block table
                raise ValueError("kvdedup shared mode has a CPU attention backend only; on "
                                 f"{current_platform.device_name} use --dedup sequence")
            if not installed():
                raise ValueError("kvdedup shared mode needs its attention backend: start "
                                 "the engine through vllm_ext.LLM or `kvdedup serve`, or "
                                 f"set {SHARED_ENV}=1 in its environment")
            self.sequence = SharedState(pool=self.kv_cache_manager, **common)
            self.kv_cache_manager.install_shared(self.sequence,
                                                 protect=eviction == "frequency")
        self.need_mamba_block_aligned_split = True
        self.kv_cache_manager.cache_limit = self.sequence.exact_limit
        self.connector.hold = self.sequence.should_hold
        self.connector.finish = self.sequence.finish

    def add_request(self, request) -> None:
        if self.verify_hits and request.request_id not in self.requests:
            adopt_request(request, self._dedup_hasher)
        super().add_request(request)

    def _preempt_request(self, request, *args, **kwargs) -> None:
        self._preemptions += 1
        if self.sequence is not None:
            self.sequence.drop(request.request_id)
        super()._preempt_request(request, *args, **kwargs)

    def _mamba_block_aligned_split(self, request, num_new_tokens: int,
                                   num_new_local_computed_tokens: int = 0,
                                   num_external_computed_tokens: int = 0) -> int:
        if self.has_mamba_layers or self.sequence is None:
            return super()._mamba_block_aligned_split(
                request, num_new_tokens, num_new_local_computed_tokens,
                num_external_computed_tokens)
        start = (request.num_computed_tokens + num_new_local_computed_tokens
                 + num_external_computed_tokens)
        if start >= request.num_prompt_tokens:
            return num_new_tokens
        free = (self.kv_cache_manager.block_pool.get_num_free_blocks()
                if request.status != RequestStatus.RUNNING else None)
        return self.sequence.clip(request, start, num_new_tokens, free)

    def schedule(self, *args, **kwargs):
        start = self.recorder.now()
        seq = self.sequence
        if seq is not None:
            for request in self.running:
                to = seq.jump(request)
                if to is not None:
                    request.num_computed_tokens = to
            self._reorder_waiting(seq)
            seq.begin_step(self.running, islice(self.waiting, ORDER_WINDOW))
        out = super().schedule(*args, **kwargs)
        self._starts[id(out)] = start
        self._step += 1
        self._peak = self._occupancy()
        for rid, n in out.num_scheduled_tokens.items():
            r = self.requests[rid]
            self._scheduled += n
            self._prefill += max(0, min(r.num_computed_tokens, r.num_prompt_tokens)
                                 - (r.num_computed_tokens - n))
        if seq is not None:
            mgr = self.kv_cache_manager
            for rid, n in out.num_scheduled_tokens.items():
                seq.after_schedule(self.requests[rid], n, mgr.get_block_ids(rid)[0])
            cmds = seq.take_commands()
            meta = out.kv_connector_metadata
            if isinstance(seq, SharedState) and meta is not None:
                meta.borrows = seq.take_borrows()
            if not cmds.empty() and meta is not None:
                meta.evicts, meta.injects, meta.captures = cmds.evicts, cmds.injects, cmds.captures
                # The worker must inject and arm captures BEFORE the forward (and after
                # vLLM zeroes new blocks): vLLM runs start_load_kv first only for steps
                # flagged as having synchronous loads.
                out.has_sync_kv_loads = True
        return out

    def _reorder_waiting(self, seq: SequenceState) -> None:
        """Reuse-aware admission order; the FCFS queue is a deque, the priority queue is
        left alone (its order is the caller's)."""
        if not isinstance(self.waiting, deque):
            return
        head = list(islice(self.waiting, ORDER_WINDOW))  # only the window is reordered
        order = seq.admission_order(
            head, lambda r: r.status == RequestStatus.PREEMPTED or r.num_computed_tokens > 0)
        if order is not None:
            for _ in head:
                self.waiting.popleft()
            self.waiting.extendleft(reversed(order))

    def update_from_output(self, scheduler_output, model_runner_output, *args, **kwargs):
        kvo = getattr(model_runner_output, "kv_connector_output", None)
        bad = set(kvo.invalid_block_ids or ()) if kvo is not None else set()
        if bad and self.sequence is not None:   # vLLM rewinds these requests itself
            for r in self.running:
                if bad.intersection(self.kv_cache_manager.get_block_ids(r.request_id)[0]):
                    self.sequence.load_failed(r.request_id)
        outputs = super().update_from_output(scheduler_output, model_runner_output, *args,
                                             **kwargs)
        snap = self._snapshot()
        snap.start = self._starts.pop(id(scheduler_output), self.recorder.current.time)
        self.recorder.record(snap, *self._peak)
        for eco in outputs.values():
            stats = getattr(eco, "scheduler_stats", None)
            if stats is not None:
                stats.kv_connector_stats = {**(stats.kv_connector_stats or {}),
                                            "kvdedup": self.recorder.current.to_dict()}
        return outputs

    def _occupancy(self) -> tuple[int, int]:
        mgr = self.kv_cache_manager
        logical = sum(mgr.num_request_blocks(r.request_id) for r in self.running)
        return logical, mgr.num_used_blocks()

    def _snapshot(self) -> StepStats:
        mgr = self.kv_cache_manager
        logical, physical = self._occupancy()
        c = mgr.counters
        num_running, num_waiting = self.get_request_counts()
        return StepStats(
            step=self._step, num_running=num_running, num_waiting=num_waiting,
            logical_blocks=logical, physical_blocks=physical,
            dedup_ratio=round(logical / physical, 4) if physical else 1.0,
            bytes_saved=max(logical - physical, 0) * self._bytes_per_block,
            prefix_queries=c.prefix_queries, prefix_hits=c.prefix_hits,
            verified_hits=c.verified_hits, collisions=c.collisions,
            preemptions=self._preemptions, scheduled_tokens=self._scheduled,
            prefill_tokens=self._prefill,
            **(self.sequence.stats() if self.sequence else {}),
            **self._borrow_stats())

    def _borrow_stats(self) -> dict:
        """Shared mode: placeholders in running tables, and the bytes they save once the
        source blocks kept alive only for borrowers are counted."""
        if not isinstance(self.sequence, SharedState):
            return {}
        mgr = self.kv_cache_manager
        running = [r.request_id for r in self.running]
        borrowed = sum(mgr.num_borrowed_blocks(rid) for rid in running)
        held = {b for rid in running for b in self.sequence.holds.get(rid, ())}
        owned = {b for rid in running for b in mgr.get_block_ids(rid)[0]}
        extra = len(held - owned)
        return {"borrowed_blocks": borrowed,
                "shared_bytes_saved": max(borrowed - extra, 0) * self._bytes_per_block}

    def shutdown(self) -> None:
        self.recorder.close()
        super().shutdown()

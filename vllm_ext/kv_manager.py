"""Prefix-cache hits verified against tokens (vLLM 0.32).

Extends ``vllm.v1.core.kv_cache_manager.KVCacheManager``:
* ``get_computed_blocks``: vLLM returns the longest run of leading blocks whose chained
  hashes are cached and trusts the hash. Here each returned block is checked against the
  ``BlockLedger`` (tokens and tenant the block was filled with); the hit is cut at the
  first block that differs, which is counted as a collision and recomputed.
* ``allocate_slots``: right after vLLM registers a request's full-block hashes (its
  ``coordinator.cache_blocks`` call at the end of the function, i.e. before the KV is
  computed), the ledger records which tokens those blocks hold, so requests admitted in
  the same step verify against them too.
* ``record_prefix_cache_stats``: the hit a request is admitted with is counted in
  kvdedup's counters at the same point vLLM counts its own, so unscheduled lookups are
  not counted twice.
* ``free``: forgets the request's ledger cursor (preemption and finish free blocks).
* shared mode, admission: vLLM admits a new request only if its whole prompt fits in the
  free blocks (``full_sequence_must_fit``, on by default). A borrower holds no block over
  the whole blocks of its borrowed ranges, so for a request with
  ``borrowed_blocks(request) > 0`` the gate counts only the blocks it will own
  (``_fits_full``) and vLLM's own gate is skipped.
* sequence and shared modes: ``cache_limit(request_id)`` caps which tokens may be
  registered in the prefix cache (vLLM's own caching is deferred and redone up to the cap).
* shared mode (``install_shared``): ``place_borrow`` puts the pool's null block in a
  request's block table over the whole blocks of a borrowed range; the next
  ``allocate_slots`` that succeeds for the request returns those placeholders ahead of its
  new blocks, so the model runner's copy of the table stays aligned with vLLM's.
  ``hold``/``release`` take and drop references on source blocks
  (``BlockPool.touch``/``free_blocks``); the pool itself is
  ``vllm_ext.block_pool.SharedBlockPool``.

Ownership: vLLM's BlockPool owns blocks and reference counts; this class never changes
them, it only shortens a hit before ``allocate_slots`` touches the hit blocks.
Only a single KV cache group (plain full-attention models) is supported.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from vllm.v1.request import RequestStatus

from dedup.ledger import BlockLedger

from .tenant import tenant_key
from .version import check_vllm_version

check_vllm_version()


@dataclass
class PrefixCounters:
    """Cumulative prefix-sharing counters (tokens for queries/hits, blocks otherwise)."""

    prefix_queries: int = 0       # prompt tokens looked up at first admission
    prefix_hits: int = 0          # tokens admitted as verified hits at first admission
    preempted_hits: int = 0       # hit tokens of re-admitted (preempted) requests
    verified_hits: int = 0        # blocks whose tokens were checked equal and shared
    collisions: int = 0           # blocks whose hash hit but tokens/tenant differed
    lookup_requests: int = 0      # admissions that looked the cache up


class VerifiedKVCacheManager(KVCacheManager):
    """``KVCacheManager`` whose prefix hits are checked against a token ledger.

    Installed by ``DedupScheduler`` on the manager vLLM's Scheduler built, through
    ``install`` (class swap plus the extra state), so every upstream constructor
    argument stays exactly as vLLM computed it.
    """

    ledger: BlockLedger
    counters: PrefixCounters

    @classmethod
    def install(cls, manager: KVCacheManager) -> "VerifiedKVCacheManager":
        if len(manager.kv_cache_config.kv_cache_groups) != 1:
            raise ValueError("kvdedup prefix mode supports models with one KV cache group; "
                             f"this model has {len(manager.kv_cache_config.kv_cache_groups)}")
        manager.__class__ = cls
        assert isinstance(manager, VerifiedKVCacheManager)
        manager._init_dedup_state()
        return manager

    def _init_dedup_state(self) -> None:
        self.block_size = self.coordinator.single_type_managers[0].block_size
        self.ledger = BlockLedger(self.block_pool.num_gpu_blocks, self.block_size)
        self.counters = PrefixCounters()
        self.verify_hits = True
        self.cache_limit = None  # request_id -> exact token limit or None (sequence mode)
        self._recorded: dict[str, int] = {}        # request id -> blocks recorded
        self._pending: dict[str, tuple[int, int]] = {}  # request id -> (verified, rejected)
        self._unsent_nulls: dict[str, int] = {}    # request id -> placeholders not yet sent
        self.borrowed_blocks = None  # request -> placeholders it will take (shared mode)

    # -- lookup ------------------------------------------------------------------------
    def get_computed_blocks(self, request):
        blocks, num_tokens, boundary = super().get_computed_blocks(request)
        hit = blocks.blocks[0] if blocks.blocks else ()
        if not hit:
            self._pending[request.request_id] = (0, 0)
            return blocks, num_tokens, boundary
        ids = [b.block_id for b in hit]
        if not self.verify_hits:
            self._pending[request.request_id] = (len(ids), 0)
            return blocks, num_tokens, boundary
        good = self.ledger.verify(ids, request.all_token_ids[: len(ids) * self.block_size],
                                  tenant_key(request))
        self._pending[request.request_id] = (good, int(good < len(ids)))
        if good == len(ids):
            return blocks, num_tokens, boundary
        cut = KVCacheBlocks((list(hit[:good]),))
        return cut, good * self.block_size, 0

    def record_prefix_cache_stats(self, request, num_hits: int) -> None:
        super().record_prefix_cache_stats(request, num_hits)
        verified, rejected = self._pending.pop(request.request_id, (0, 0))
        c = self.counters
        c.lookup_requests += 1
        if request.num_preemptions > 0:  # as vLLM: re-admissions are counted apart
            c.preempted_hits += num_hits
        else:
            c.prefix_queries += request.num_tokens
            c.prefix_hits += num_hits
        c.verified_hits += min(verified, num_hits // self.block_size)
        c.collisions += rejected

    # -- allocation --------------------------------------------------------------------
    def allocate_slots(self, request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       new_computed_blocks=None, num_lookahead_tokens: int = 0,
                       num_external_computed_tokens: int = 0,
                       delay_cache_blocks: bool = False, **kwargs):
        before = request.num_computed_tokens
        if kwargs.get("full_sequence_must_fit") and self.borrowed_blocks is not None:
            borrowed = self.borrowed_blocks(request)
            if borrowed:
                if not self._fits_full(request, borrowed, new_computed_blocks,
                                       kwargs.get("has_scheduled_reqs", True)):
                    return None
                kwargs["full_sequence_must_fit"] = False
        limit = self.cache_limit(request.request_id) if self.cache_limit else None
        capped = limit is not None and not delay_cache_blocks and self.enable_caching
        out = super().allocate_slots(
            request, num_new_tokens, num_new_computed_tokens, new_computed_blocks,
            num_lookahead_tokens, num_external_computed_tokens,
            delay_cache_blocks or capped, **kwargs)
        if out is not None and request.request_id in self._unsent_nulls:
            n = self._unsent_nulls.pop(request.request_id)
            out = KVCacheBlocks(([self.block_pool.null_block] * n + list(out.blocks[0]),))
        if out is None or delay_cache_blocks or not self.enable_caching:
            return out
        upto = min(before + num_new_computed_tokens + num_external_computed_tokens
                   + num_new_tokens, request.num_tokens)
        if capped:
            # Injected KV and everything after it stay out of the exact prefix cache.
            upto = min(upto, limit)
            self.coordinator.cache_blocks(request, upto)
        cached_upto = upto // self.block_size
        done = self._recorded.get(request.request_id, 0)
        if cached_upto > done:
            ids = self.coordinator.single_type_managers[0].req_to_blocks[request.request_id]
            B = self.block_size
            self.ledger.record([b.block_id for b in ids[done:cached_upto]],
                               request.all_token_ids[done * B: cached_upto * B],
                               tenant_key(request))
            self._recorded[request.request_id] = cached_upto
        return out

    def _fits_full(self, request, borrowed: int, new_computed_blocks,
                   has_scheduled_reqs: bool) -> bool:
        """vLLM's full-prompt admission gate, for a request that will hold ``borrowed``
        placeholder blocks instead of its own: the blocks it will own, plus prefix hits
        that sit in the free queue, plus vLLM's watermark, must fit in the free blocks."""
        B = self.block_size
        hits = list(new_computed_blocks.blocks[0]) if new_computed_blocks is not None else []
        owned = self.num_request_blocks(request.request_id) + len(hits)
        full = min(request.num_tokens, self.max_model_len)
        need = max(0, -(-full // B) - borrowed - owned)
        need += sum(b.ref_cnt == 0 and not b.is_null for b in hits)
        if has_scheduled_reqs and request.status in (RequestStatus.WAITING,
                                                     RequestStatus.PREEMPTED):
            need += self.watermark_blocks
        return need <= self.block_pool.get_num_free_blocks()

    def free(self, request) -> None:
        self._recorded.pop(request.request_id, None)
        self._pending.pop(request.request_id, None)
        self._unsent_nulls.pop(request.request_id, None)
        super().free(request)

    # -- shared mode: borrowed blocks ------------------------------------------------------
    def install_shared(self, state, protect: bool = True) -> None:
        """Shared mode: the pool reports reused blocks to ``state`` and, with ``protect``,
        reuses free blocks of recurring chunks only when no other free block is left."""
        from .block_pool import SharedBlockPool

        SharedBlockPool.install(self.block_pool, on_reuse=state.on_reuse,
                                protected=state.protected if protect else None)
        self.borrowed_blocks = state.borrowed_blocks

    def place_borrow(self, request_id: str, start: int, end: int) -> bool:
        """Null placeholders over the blocks of positions [start, end) of a running
        request that no position it computes falls in; False (nothing changed) unless its
        table ends with the block that holds position ``start - 1`` or, after a borrow
        that ended at ``start``, the one before (that block's positions are all borrowed).
        The blocks holding ``start`` and ``end`` are the request's own when it computes
        positions in them: the first is already in its table, the last is allocated when
        the request computes from ``end`` on."""
        blocks = self.coordinator.single_type_managers[0].req_to_blocks.get(request_id)
        B = self.block_size
        if blocks is None or end < start or not start // B <= len(blocks) <= -(-start // B):
            return False
        n = max(0, end // B - len(blocks))
        blocks.extend([self.block_pool.null_block] * n)
        self._unsent_nulls[request_id] = self._unsent_nulls.get(request_id, 0) + n
        return True

    def hold(self, block_ids: list[int]) -> None:
        """Take one reference on each block (cached free blocks leave the free queue)."""
        self.block_pool.touch([self.block_pool.blocks[i] for i in block_ids])

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference on each block (``hold``'s inverse)."""
        self.block_pool.free_blocks([self.block_pool.blocks[i] for i in block_ids])

    def num_evictable(self, block_ids: list[int]) -> int:
        """How many of these blocks sit in the free queue (holding them uses free room)."""
        return sum(self.block_pool.blocks[i].ref_cnt == 0 for i in block_ids)

    def num_free_blocks(self) -> int:
        """Blocks the pool can hand out now (free queue, cached ones included)."""
        return self.block_pool.get_num_free_blocks()

    def num_usable_blocks(self) -> int:
        """Blocks requests can ever hold (the pool less its null block)."""
        return self.block_pool.num_gpu_blocks - 1

    def num_borrowed_blocks(self, request_id: str) -> int:
        """Placeholders in a request's block table (blocks it reads but does not hold)."""
        blocks = self.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ())
        return sum(b.is_null for b in blocks)

    # -- occupancy ---------------------------------------------------------------------
    def num_request_blocks(self, request_id: str) -> int:
        """Blocks in a request's block table (its logical KV footprint)."""
        return len(self.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ()))

    def num_used_blocks(self) -> int:
        """Physical blocks referenced by at least one request (cached free blocks excluded;
        the pool's null block is not counted)."""
        return self.block_pool.num_gpu_blocks - 1 - self.block_pool.get_num_free_blocks()

    @property
    def bytes_per_block(self) -> int:
        cfg = self.kv_cache_config
        return sum(t.size for t in cfg.kv_cache_tensors) // max(cfg.num_blocks, 1)

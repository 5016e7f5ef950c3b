"""The block pool of shared mode (vLLM 0.32): it reports reuse and orders eviction.

Extends ``vllm.v1.core.block_pool.BlockPool`` (installed on the pool vLLM built by
switching its class, so every constructor argument stays vLLM's):

* ``get_new_blocks``: after vLLM hands blocks out (evicting their prefix-cache hashes),
  ``on_reuse(block_ids)`` tells shared mode's index that whatever KV they held is gone.
* ``free_blocks``: blocks whose reference count drops to 0 go back to the free queue as
  vLLM orders them, then, when ``protected`` is set, blocks of recurring content move to
  the end reused last and all others to the end reused first. vLLM's own order keeps
  hashed blocks (LRU) and reuses unhashed ones first; this keeps what recurs instead,
  a two-segment LRU (probationary / protected) over the pool's free queue.

Reference counts are vLLM's: this class never changes them beyond what ``free_blocks``
does, and never frees the null block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vllm.v1.core.block_pool import BlockPool

from .version import check_vllm_version

check_vllm_version()


class SharedBlockPool(BlockPool):
    on_reuse: Callable[[list[int]], None]
    protected: Callable[[int], bool] | None

    @classmethod
    def install(cls, pool: BlockPool, on_reuse, protected=None) -> "SharedBlockPool":
        pool.__class__ = cls
        assert isinstance(pool, SharedBlockPool)
        pool.on_reuse, pool.protected = on_reuse, protected
        return pool

    def get_new_blocks(self, num_blocks: int):
        blocks = super().get_new_blocks(num_blocks)
        self.on_reuse([b.block_id for b in blocks])
        return blocks

    def free_blocks(self, ordered_blocks: Iterable) -> None:
        blocks = list(ordered_blocks)
        super().free_blocks(blocks)
        if self.protected is None:
            return
        freed = {b.block_id: b for b in blocks
                 if b.ref_cnt == 0 and not b.is_null and b.pool in (None, self)}
        if not freed:
            return
        keep, drop = [], []
        for b in freed.values():
            (keep if self.protected(b.block_id) else drop).append(b)
            self.free_block_queue.remove(b)
        self.free_block_queue.prepend_n(drop)
        self.free_block_queue.append_n(keep)

"""The block pool of shared mode (vLLM 0.32): it reports reuse and orders eviction.

Extends ``vllm.v1.core.block_pool.BlockPool.get_new_blocks`` (installed on the pool vLLM
built by switching its class, so every constructor argument stays vLLM's):

* with ``protected`` set (``eviction="frequency"``), before vLLM pops ``n`` blocks from
  the front of its free queue, the first ``n`` free blocks that hold no recurring chunk
  are moved to the front, so blocks of content seen in two or more prompts are reused
  only once no other free block is left. Among themselves both kinds keep vLLM's order
  (unhashed blocks first, then least recently freed). The scan looks at most
  ``SCAN_LIMIT`` free blocks;
* after vLLM hands the blocks out (evicting their prefix-cache hashes),
  ``on_reuse(block_ids)`` tells shared mode's index that whatever KV they held is gone.

Reference counts and the free queue's contents are vLLM's; this class only reorders
free blocks and never touches the null block.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.v1.core.block_pool import BlockPool

from .version import check_vllm_version

check_vllm_version()

SCAN_LIMIT = 8192


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
        if self.protected is not None and num_blocks > 0:
            self._unprotected_first(num_blocks)
        blocks = super().get_new_blocks(num_blocks)
        self.on_reuse([b.block_id for b in blocks])
        return blocks

    def _unprotected_first(self, n: int) -> None:
        queue = self.free_block_queue
        chosen, skipped = [], False
        for i, block in enumerate(queue.iter_blocks_after(None)):
            if len(chosen) == n or i >= SCAN_LIMIT:
                break
            if self.protected(block.block_id):
                skipped = True
            else:
                chosen.append(block)
        if not skipped:
            return          # the front is unprotected already: vLLM's order stands
        for block in chosen:
            queue.remove(block)
        queue.prepend_n(chosen)

"""Shared mode's block pool on vLLM's own BlockPool: protected blocks reused last, reuse
reported."""

from __future__ import annotations

from vllm.v1.core.block_pool import BlockPool

from vllm_ext.block_pool import SharedBlockPool


def _pool(ranks: dict[int, bool], n: int = 12):
    reused: list[int] = []
    pool = SharedBlockPool.install(BlockPool(n, enable_caching=True, hash_block_size=32),
                                   on_reuse=reused.extend,
                                   protected=lambda b: ranks.get(b, False))
    return pool, reused


def test_unprotected_blocks_are_reused_first_and_vllm_order_kept_within_each_kind():
    ranks = {}
    pool, reused = _pool(ranks)
    blocks = pool.get_new_blocks(11)                  # every block but the null block
    ids = [b.block_id for b in blocks]
    for b, r in zip(ids, [1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0]):
        ranks[b] = bool(r)
    pool.free_blocks(blocks)                          # free queue in this order
    reused.clear()
    got = [b.block_id for b in pool.get_new_blocks(3)]
    assert got == [ids[2], ids[4], ids[6]]            # unprotected, in vLLM's order
    assert reused == got
    rest = [b.block_id for b in pool.get_new_blocks(8)]
    # the other unprotected blocks, then the protected ones (each in vLLM's order)
    assert rest == ids[7:] + [ids[0], ids[1], ids[3], ids[5]]


def test_unprotected_front_keeps_vllm_order():
    pool, _ = _pool({})
    blocks = pool.get_new_blocks(11)
    pool.free_blocks(blocks)
    assert [b.block_id for b in pool.get_new_blocks(4)] == [b.block_id for b in blocks[:4]]

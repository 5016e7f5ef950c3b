"""What each physical KV block holds, so that a prefix-cache hit is checked against tokens.

A prefix cache maps a chained block hash to a physical block and trusts the hash alone.
``BlockLedger`` keeps, for every physical block id, the token ids the block was filled
with and the tenant (salt) it was filled for. Before a hit is shared, ``verify`` compares
the requesting prompt's tokens with the ledger, block by block from the first, and stops
at the first block that differs: a hash collision is never shared.

Invariants
* A row is written (``record``) when the engine registers the block's hash, i.e. when
  the block is allocated to a request for those tokens; a block that is later refilled
  with other tokens is recorded again before its new hash can be looked up. A row that
  was never written has tenant id -1 and verifies as a mismatch.
* Verifying blocks 0..j of a chained prefix in order verifies the whole prefix: each
  block's own tokens are compared, and block i holds tokens [i*B, (i+1)*B).
* The ledger owns no blocks and changes no reference counts; it is a side table indexed
  by block id, sized once for the whole pool (``num_blocks * block_size`` int64).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


class BlockLedger:
    """Token contents and tenant of every physical block in a fixed-size pool."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self._tokens = np.zeros((num_blocks, block_size), dtype=np.int64)
        self._tenant = np.full(num_blocks, -1, dtype=np.int64)
        self._tenant_ids: dict[Hashable, int] = {}

    @property
    def num_blocks(self) -> int:
        return self._tenant.shape[0]

    def tenant_id(self, tenant: Hashable) -> int:
        """A small integer naming ``tenant`` (e.g. a cache salt); stable for the ledger's life."""
        tid = self._tenant_ids.get(tenant)
        if tid is None:
            tid = self._tenant_ids[tenant] = len(self._tenant_ids)
        return tid

    def record(self, block_ids: Sequence[int], tokens: Sequence[int], tenant: Hashable) -> None:
        """Note that ``block_ids[i]`` now holds ``tokens[i*B:(i+1)*B]`` for ``tenant``.

        ``len(tokens)`` must be exactly ``len(block_ids) * block_size`` (full blocks only).
        """
        n = len(block_ids)
        if n == 0:
            return
        rows = np.asarray(tokens, dtype=np.int64)
        if rows.size != n * self.block_size:
            raise ValueError(f"tokens must fill {n} blocks of {self.block_size}, got {rows.size}")
        ids = np.asarray(block_ids, dtype=np.int64)
        self._tokens[ids] = rows.reshape(n, self.block_size)
        self._tenant[ids] = self.tenant_id(tenant)

    def verify(self, block_ids: Sequence[int], tokens: Sequence[int], tenant: Hashable) -> int:
        """Number of leading blocks of ``block_ids`` whose recorded tokens and tenant equal
        ``tokens`` (block i against ``tokens[i*B:(i+1)*B]``). Blocks past the first
        mismatch are not counted even if they match."""
        n = len(block_ids)
        if n == 0:
            return 0
        want = np.asarray(tokens[: n * self.block_size], dtype=np.int64).reshape(n, self.block_size)
        ids = np.asarray(block_ids, dtype=np.int64)
        tid = self._tenant_ids.get(tenant, -2)
        ok = (self._tokens[ids] == want).all(axis=1) & (self._tenant[ids] == tid)
        if ok.all():
            return n
        return int(np.argmin(ok))

"""Prefill-sized borrower rows through vLLM's own CPU kernel, over a scratch copy (vLLM 0.32).

Extends the call of ``vllm._custom_ops.cpu_attention_with_kv_cache`` made by
``vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward``.

kvdedup's borrowed kernel (``kernels.borrowed_attention``) reads borrowed segments in
place, rotating the query by ``-delta`` per segment. That is the right trade for decode
rows (one query token: the query is cheap to rotate, the keys are many). For rows with
many query tokens (``MIN_QUERY_TOKENS``), vLLM's kernel is faster than kvdedup's by more
than the cost of copying the row's context once per layer
(``python -m experiments.kernel_bench --rows 4 --prefill 256``; also at 8 and 32 rows). So such a row's context is
copied, per layer, into scratch blocks: its own slots as they are and its borrowed slots
re-rotated by ``+delta`` (``kernels.materialize``, exact up to float rounding), and vLLM's
kernel attends over the scratch blocks as if the row had computed the whole context.

Memory: the scratch holds the context of this step's dense rows only, one layer at a
time (allocated once per step, reused by every layer, freed with the step). Rows that
would take it past ``SCRATCH_MAX_BYTES`` stay with the borrowed kernel.
"""

from __future__ import annotations

import os

import torch
from vllm import _custom_ops as ops
from vllm import envs

from . import kernels

# rows with fewer query tokens use the borrowed kernel (the variable is for tests)
MIN_QUERY_TOKENS = int(os.environ.get("KVDEDUP_DENSE_MIN_QUERY_TOKENS", "128"))
SCRATCH_MAX_BYTES = 256 << 20   # per step (one layer's copy at a time)


class DenseRows:
    """Borrower rows (kernel layout, as ``kernels.borrowed_attention`` takes them) that
    are attended by vLLM's kernel over scratch blocks.

    Invariant: ``scratch`` blocks ``first[r] ..`` hold row r's context only while
    ``__call__`` runs for one layer; nothing else reads or owns them."""

    def __init__(self, rows: torch.Tensor, seg_ptr: torch.Tensor, segs: torch.Tensor,
                 src_blocks: torch.Tensor, kv_shape: tuple[int, int, int, int], dtype,
                 num_heads: int, isa: str, causal: bool = True,
                 kv_cache_dtype: str = "auto") -> None:
        _, hkv, bs, d2 = kv_shape
        self.rows, self.seg_ptr, self.segs, self.src_blocks = rows, seg_ptr, segs, src_blocks
        seq = rows[:, 2].tolist()
        self.first, self.table, total = kernels.scratch_tables(seq, bs)
        self.scratch = torch.empty(total, hkv, bs, d2, dtype=dtype)
        q_lens = rows[:, 1]
        self.tokens = torch.cat([torch.arange(int(q0), int(q0) + int(n))
                                 for q0, n in rows[:, :2].tolist()])
        qsl = torch.zeros(len(seq) + 1, dtype=torch.int32)
        qsl[1:] = torch.cumsum(q_lens, 0)
        seq_lens = rows[:, 2].contiguous()
        self.stock = dict(
            query_start_loc=qsl, seq_lens=seq_lens, block_table=self.table,
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(seq), num_heads=num_heads, num_kv_heads=hkv,
                head_dim=d2 // 2, seq_lens=seq_lens, dtype=dtype, query_start_loc=qsl,
                causal=causal, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=kv_cache_dtype))
        self.causal, self.kv_cache_dtype = causal, kv_cache_dtype

    def __call__(self, query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                 out: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                 k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Write the rows' tokens of ``out`` ([T, Hq, D]) from ``query`` ([T, Hq, D])."""
        kernels.materialize(kv_cache, self.scratch, self.rows, block_table, self.seg_ptr,
                            self.segs, self.src_blocks, inv_freq, self.first)
        nb, hkv, bs, d2 = self.scratch.shape
        kc, vc = self.scratch.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
        sub_out = torch.empty(len(self.tokens), *query.shape[1:], dtype=query.dtype)
        ops.cpu_attention_with_kv_cache(
            query=query[self.tokens], key_cache=kc, value_cache=vc, output=sub_out,
            scale=scale, causal=self.causal, alibi_slopes=None, sliding_window=-1,
            softcap=0.0, s_aux=None, dynamic_causal=None, k_scale=k_scale,
            v_scale=v_scale, kv_cache_dtype=self.kv_cache_dtype, **self.stock)
        out[self.tokens] = sub_out


def split_rows(rows: list[tuple[int, int, int, int]], block_size: int,
               bytes_per_token: int) -> tuple[list[int], list[int]]:
    """Indices of the rows (q_start, q_len, seq_len, table row) for the borrowed kernel and
    of those for ``DenseRows``: each row with at least ``MIN_QUERY_TOKENS`` query tokens
    whose context still fits in the scratch (``SCRATCH_MAX_BYTES``, at ``bytes_per_token``
    of one layer's KV), in row order; a row that does not fit stays with the kernel."""
    kernel, dense, used = [], [], 0
    for i, (_, q_len, seq_len, _) in enumerate(rows):
        need = -(-seq_len // block_size) * block_size * bytes_per_token
        if q_len >= MIN_QUERY_TOKENS and used + need <= SCRATCH_MAX_BYTES:
            dense.append(i)
            used += need
        else:
            kernel.append(i)
    return kernel, dense

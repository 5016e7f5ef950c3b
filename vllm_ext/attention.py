"""kvdedup's CPU attention backend for shared mode (vLLM 0.32).

Extends ``vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend`` /
``CPUAttentionBackendImpl.forward``. Installed with vLLM's documented override,
``registry.register_backend(AttentionBackendEnum.CPU_ATTN, ...)``, by the general plugin
(``vllm_ext.plugin``) when ``KVDEDUP_SHARED_ATTENTION=1`` (set by ``vllm_ext.launch`` for
``dedup="shared"``); the CPU platform always resolves ``CPU_ATTN`` through the registry.

A *borrower* is a running request whose block table holds placeholders (the pool's null
block) over a run of positions whose KV sits in other slots of the pool. Each step the
scheduler sends, in the connector metadata, one ``Borrow`` per scheduled borrower: the
slot its last scheduled token is written to (unique in the step: it identifies the
batch row after vLLM's reordering, with no request id) and its segments.

Per step (computed at the first layer, reused by all):
* rows with no borrow run the stock kernel (``ops.cpu_attention_with_kv_cache``),
  as one sub-batch; a step with no borrower calls the stock ``forward`` unchanged;
* borrower rows with few query tokens (decode) run ``kernels.borrowed_attention`` (own
  blocks + segments, the query rotated by ``-delta`` per segment); those with many
  (prefill) run vLLM's kernel over a scratch copy of their context with the borrowed keys
  re-rotated (``vllm_ext.dense``). If either fails, the torch oracle computes the rows
  instead; the fault is logged and counted (``FAULTS``).
A row whose table holds a placeholder but that has no borrow cannot be computed
correctly; it is logged and counted as a fault (``missing_borrow``), never silently used.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import get_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from . import dense, kernels
from .rope import RotaryParams
from .version import check_vllm_version

check_vllm_version()
logger = logging.getLogger("kvdedup")
FAULTS: Counter = Counter()     # worker-process fault counts (kernel_fallback, missing_borrow)
# Tests set this so that a failing kernel path raises (and fails the test) instead of
# being computed, correctly, by the torch oracle.
STRICT = os.environ.get("KVDEDUP_STRICT_KERNELS") == "1"
# Fault injection for tests: the listed paths ("dense", "kernel") raise before they run.
FAIL = set(filter(None, os.environ.get("KVDEDUP_FAIL_KERNELS", "").split(",")))
CLASS_PATH = "vllm_ext.attention.SharedCPUAttentionBackend"


@dataclass
class StepPlan:
    """How one step's batch splits between the stock kernel (rows that borrow nothing),
    the borrowed kernel (``rows``) and vLLM's kernel over scratch copies (``dense``)."""

    rows: torch.Tensor            # int32 [R, 4]: borrower rows (kernel layout)
    seg_ptr: torch.Tensor
    segs: torch.Tensor
    src_blocks: torch.Tensor
    rest_tokens: torch.Tensor | None   # token indices of the other rows (None: none)
    rest: dict | None                  # stock-kernel arguments for the other rows
    dense: "dense.DenseRows | None"    # prefill-sized borrower rows (None: none)


def step_borrows():
    """This step's ``Borrow`` list from the worker's connector (``None`` outside shared
    mode or outside a step)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    conn = get_kv_transfer_group()
    return conn.step_borrows() if hasattr(conn, "step_borrows") else None


def _kernel_rows(found) -> tuple[torch.Tensor, ...]:
    """(rows, seg_ptr, segs, src_blocks) int32 tensors in the kernels' layout."""
    rows, seg_ptr, segs, src_blocks = [], [0], [], []
    for row, segments in found:
        rows.append(row)
        for dst, n, delta, src, blocks in segments:
            segs.append((dst, n, delta, src, len(src_blocks)))
            src_blocks.extend(blocks)
        seg_ptr.append(len(segs))
    i32 = lambda x, shape: torch.tensor(x, dtype=torch.int32).reshape(shape)
    return (i32(rows, (-1, 4)), i32(seg_ptr, (-1,)), i32(segs, (-1, 5)),
            i32(src_blocks, (-1,)))


def plan_step(md, borrows, kv_shape: tuple[int, int, int, int], num_heads: int,
              dtype, isa: str, kv_cache_dtype: str) -> StepPlan:
    """Match borrows to batch rows by the slot of each row's last query token; split the
    borrower rows between the borrowed kernel (few query tokens) and ``DenseRows``."""
    _, num_kv_heads, block_size, d2 = kv_shape
    head_dim = d2 // 2
    qsl = md.query_start_loc.to(torch.long)
    n_rows = qsl.numel() - 1
    last_slots = md.slot_mapping[qsl[1:] - 1].tolist()
    row_of = {s: i for i, s in enumerate(last_slots)}
    found, used = [], set()     # (row tuple, its segments with their source blocks)
    seq = md.seq_lens.tolist()
    for b in borrows:
        i = row_of.get(b.slot)
        if i is None:   # not in this batch (cannot happen unless scheduler and worker disagree)
            FAULTS["unmatched_borrow"] += 1
            continue
        used.add(i)
        q0, q1 = int(qsl[i]), int(qsl[i + 1])
        found.append(((q0, q1 - q0, seq[i], i), b.segments))
    kernel_rows, dense_rows = dense.split_rows(
        [r for r, _ in found], block_size, 2 * num_kv_heads * head_dim * dtype.itemsize)
    rest = [i for i in range(n_rows) if i not in used]
    bt = md.block_table
    nblk = (md.seq_lens + block_size - 1) // block_size
    if rest:
        cols = torch.arange(bt.shape[1])
        holes = (bt[rest] == 0) & (cols[None, :] < nblk[rest][:, None])
        if holes.any():
            FAULTS["missing_borrow"] += int(holes.any(dim=1).sum())
            logger.error("kvdedup shared attention: %d row(s) hold placeholder blocks "
                         "but no borrow; their outputs are wrong", int(holes.any(dim=1).sum()))
    plan = StepPlan(*_kernel_rows([found[i] for i in kernel_rows]), None, None, None)
    if dense_rows:
        plan.dense = dense.DenseRows(*_kernel_rows([found[i] for i in dense_rows]),
                                     kv_shape, dtype, num_heads, isa, md.causal,
                                     kv_cache_dtype)
    if rest:
        q_lens = (qsl[1:] - qsl[:-1])[rest]
        plan.rest_tokens = torch.cat([torch.arange(int(qsl[i]), int(qsl[i + 1])) for i in rest])
        sub_qsl = torch.zeros(len(rest) + 1, dtype=torch.int32)
        sub_qsl[1:] = torch.cumsum(q_lens, 0)
        sub_seq = md.seq_lens[rest].contiguous()
        plan.rest = dict(
            query_start_loc=sub_qsl, seq_lens=sub_seq, block_table=bt[rest].contiguous(),
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=len(rest), num_heads=num_heads, num_kv_heads=num_kv_heads,
                head_dim=head_dim, seq_lens=sub_seq, dtype=dtype, query_start_loc=sub_qsl,
                causal=md.causal, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, kv_cache_dtype=kv_cache_dtype))
    return plan


def _fell_back(path: str, exc: Exception) -> None:
    """A kernel path raised: re-raise under ``STRICT``, else count (``<path>_fallback``)
    and log it; the caller computes the rows with the torch oracle."""
    if STRICT:
        raise exc
    FAULTS[f"{path}_fallback"] += 1
    logger.error("kvdedup shared attention: the %s path failed (%s); using the torch "
                 "reference for this step", path, exc)


class SharedCPUAttentionImpl(CPUAttentionBackendImpl):
    """``CPUAttentionBackendImpl`` whose borrower rows read borrowed segments."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        cfg = get_current_vllm_config()
        unsupported = [name for name, on in (
            ("sliding window", self.sliding_window != -1), ("ALiBi", self.alibi_slopes is not None),
            ("logit soft-capping", bool(self.logits_soft_cap)), ("attention sinks", self.sinks is not None),
            ("an fp8 KV cache", self.is_fp8_kv_cache)) if on]
        if unsupported:
            raise ValueError(f"kvdedup shared mode does not support {', '.join(unsupported)}")
        self.rotary = RotaryParams.from_hf_config(cfg.model_config.hf_config)
        self.inv_freq = self.rotary.inv_freq()
        self._checked = False
        try:  # build or load the extension now, at engine start, not in the first borrow's step
            kernels.extension()
        except kernels.KernelUnavailable as exc:
            logger.error("kvdedup shared attention: %s; borrower rows will use the torch "
                         "reference", exc)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        borrows = step_borrows() if attn_metadata is not None else None
        if not borrows or self.attn_type != "decoder":
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        md = attn_metadata
        nb, hkv, bs, _ = kv_cache.shape
        if not self._checked:
            kernels.check_cache_layout(kv_cache.dtype, bs, self.head_size, layer.isa)
            self._checked = True
        plan = getattr(md, "kvdedup_plan", None)
        if plan is None:
            plan = md.kvdedup_plan = plan_step(
                md, borrows, tuple(kv_cache.shape), self.num_heads, query.dtype, layer.isa,
                self.kv_cache_dtype)
        T = md.num_actual_tokens
        q = query[:T].contiguous()
        out = output[:T].view(T, self.num_heads, self.head_size)
        if plan.rest is not None:
            key_cache, value_cache = kv_cache.view(nb, hkv, 2 * bs, -1).chunk(2, dim=2)
            sub_out = torch.empty(len(plan.rest_tokens), self.num_heads, self.head_size,
                                  dtype=query.dtype)
            ops.cpu_attention_with_kv_cache(
                query=q[plan.rest_tokens], key_cache=key_cache, value_cache=value_cache,
                output=sub_out, scale=self.scale, causal=md.causal, alibi_slopes=None,
                sliding_window=-1, softcap=0.0, s_aux=None, dynamic_causal=None,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                kv_cache_dtype=self.kv_cache_dtype, **plan.rest)
            out[plan.rest_tokens] = sub_out
        if plan.dense is not None:
            d = plan.dense
            try:
                if "dense" in FAIL:
                    raise RuntimeError("injected fault (KVDEDUP_FAIL_KERNELS)")
                d(q, kv_cache, md.block_table, out, self.inv_freq, self.scale,
                  layer._k_scale_float, layer._v_scale_float)
            except Exception as exc:  # the rows are computed by the oracle instead
                _fell_back("dense", exc)
                kernels.reference_borrowed_attention(
                    q, kv_cache, out, d.rows, md.block_table, d.seg_ptr, d.segs,
                    d.src_blocks, self.inv_freq, self.scale, rotary=self.rotary)
        if plan.rows.shape[0]:
            args = (q, kv_cache, out, plan.rows, md.block_table, plan.seg_ptr, plan.segs,
                    plan.src_blocks, self.inv_freq, self.scale)
            dst = out if out.is_contiguous() else torch.empty_like(q)
            try:
                if "kernel" in FAIL:
                    raise RuntimeError("injected fault (KVDEDUP_FAIL_KERNELS)")
                kernels.borrowed_attention(*args[:2], dst, *args[3:])
            except Exception as exc:  # the rows are computed by the oracle instead
                _fell_back("kernel", exc)
                kernels.reference_borrowed_attention(*args[:2], dst, *args[3:],
                                                     rotary=self.rotary)
            if dst is not out:
                for q0, n, _, _ in plan.rows.tolist():
                    out[q0:q0 + n] = dst[q0:q0 + n]
        return output


class SharedCPUAttentionBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with ``SharedCPUAttentionImpl``."""

    @staticmethod
    def get_impl_cls() -> type[SharedCPUAttentionImpl]:
        return SharedCPUAttentionImpl


def install() -> None:
    """Override the CPU attention backend (vLLM's documented, process-wide registry)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, CLASS_PATH)


def uninstall() -> None:
    """Put vLLM's own CPU backend back (a no-op when kvdedup's is not installed)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if installed():
        register_backend(AttentionBackendEnum.CPU_ATTN, AttentionBackendEnum.CPU_ATTN.value)


def installed() -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.CPU_ATTN.get_path() == CLASS_PATH

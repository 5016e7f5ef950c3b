"""The borrowed-attention C++ kernel equals the torch oracle (a contiguous copy of the keys
re-rotated to the reader's positions), on random segments, offsets and misalignments,
several rows per batch, GQA, decode and prefill rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_ext.kernels import (borrowed_attention, read_kv, reference_borrowed_attention)
from vllm_ext.rope import RotaryParams

ROT = RotaryParams(head_dim=64, theta=1e5)


def _batch(seed: int, B: int = 32, hkv: int = 3, group: int = 3, d: int = 64,
           dtype=torch.float32, n_rows: int = 5, nb: int = 160):
    """A random step: rows with own blocks and 0-3 borrowed segments each, at arbitrary
    (misaligned) source offsets and reader positions, in shuffled row order."""
    rng = np.random.default_rng(seed)
    kv = torch.randn(nb, hkv, B, 2 * d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    free = list(rng.permutation(np.arange(1, nb)))
    rows, segs, seg_ptr, src_blocks, tables = [], [], [0], [], []
    q_total = 0
    max_blocks = 0
    specs = []
    for r in range(n_rows):
        seq_len = int(rng.integers(40, 420))
        q_len = 1 if rng.random() < 0.5 else int(rng.integers(2, min(seq_len, 40)))
        nblk = -(-seq_len // B)
        table = [int(free.pop()) for _ in range(nblk)]
        # segments before the queries (as the scheduler makes them), any alignment
        row_segs, p = [], int(rng.integers(0, 20))
        for _ in range(int(rng.integers(0, 4))):
            limit = seq_len - q_len
            if p + 8 >= limit:
                break
            n = int(rng.integers(8, max(9, min(150, limit - p))))
            src = int(rng.integers(0, 500))
            first, last = src // B, (src + n - 1) // B
            tab = len(src_blocks)
            src_blocks += [int(b) for b in rng.integers(1, nb, size=last - first + 1)]
            row_segs.append((p, n, p - src, src, tab))
            p += n + int(rng.integers(0, 50))
        specs.append((q_len, seq_len, table, row_segs))
        max_blocks = max(max_blocks, nblk)
    order = rng.permutation(n_rows)  # the batch as a reordered model runner lays it out
    bt = torch.zeros(n_rows, max_blocks, dtype=torch.int32)
    for i, r in enumerate(order):
        q_len, seq_len, table, row_segs = specs[r]
        bt[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        rows.append((q_total, q_len, seq_len, i))
        q_total += q_len
        segs += row_segs
        seg_ptr.append(len(segs))
    t = lambda x, shape=None: torch.tensor(x, dtype=torch.int32).reshape(shape or (-1,))
    query = torch.randn(q_total, hkv * group, d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return dict(query=query, kv_cache=kv, rows=t(rows, (-1, 4)), block_table=bt,
                seg_ptr=t(seg_ptr), segs=t(segs, (-1, 5)) if segs else torch.zeros(0, 5, dtype=torch.int32),
                src_blocks=t(src_blocks) if src_blocks else torch.zeros(0, dtype=torch.int32),
                inv_freq=ROT.inv_freq(), scale=d ** -0.5)


def _run(fn, batch, **kw):
    out = torch.zeros_like(batch["query"])
    fn(batch["query"], batch["kv_cache"], out, batch["rows"], batch["block_table"],
       batch["seg_ptr"], batch["segs"], batch["src_blocks"], batch["inv_freq"],
       batch["scale"], **kw)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_kernel_equals_reference_float32(seed):
    b = _batch(seed)
    assert b["segs"].shape[0] > 0 or seed > 0
    got = _run(borrowed_attention, b)
    want = _run(reference_borrowed_attention, b, rotary=ROT)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("B,group,hkv", [(64, 1, 2), (32, 4, 2), (128, 2, 1)])
def test_kernel_block_sizes_and_gqa(B, group, hkv):
    b = _batch(11, B=B, group=group, hkv=hkv)
    got = _run(borrowed_attention, b)
    want = _run(reference_borrowed_attention, b, rotary=ROT)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_kernel_bfloat16_within_rounding():
    b = _batch(5, dtype=torch.bfloat16)
    got = _run(borrowed_attention, b).float()
    want = _run(reference_borrowed_attention, b, rotary=ROT).float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_zero_delta_segment_equals_plain_attention_over_the_source_blocks():
    """A segment with delta 0 whose source blocks ARE the row's blocks gives the same
    output as the row without the segment (no rotation, nothing moved)."""
    b = _batch(3, n_rows=1)
    q_len, seq_len = int(b["rows"][0, 1]), int(b["rows"][0, 2])
    table = b["block_table"][0]
    n = (seq_len - q_len) // 2
    seg = torch.tensor([[7, n, 0, 7, 0]], dtype=torch.int32)
    with_seg = {**b, "seg_ptr": torch.tensor([0, 1], dtype=torch.int32), "segs": seg,
                "src_blocks": table.clone()}
    without = {**b, "seg_ptr": torch.tensor([0, 0], dtype=torch.int32),
               "segs": torch.zeros(0, 5, dtype=torch.int32)}
    a, c = _run(borrowed_attention, with_seg), _run(borrowed_attention, without)
    assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


def test_untouched_rows_keep_their_output():
    b = _batch(4, n_rows=3)
    b["rows"] = b["rows"][1:2].contiguous()
    b["seg_ptr"] = b["seg_ptr"][1:3].contiguous()
    out = torch.full_like(b["query"], 7.0)
    borrowed_attention(b["query"], b["kv_cache"], out, b["rows"], b["block_table"],
                       b["seg_ptr"], b["segs"], b["src_blocks"], b["inv_freq"], b["scale"])
    q0, ql = int(b["rows"][0, 0]), int(b["rows"][0, 1])
    assert (out[:q0] == 7.0).all() and (out[q0 + ql:] == 7.0).all()
    assert not (out[q0:q0 + ql] == 7.0).any()


def test_bad_arguments_name_the_problem():
    b = _batch(0, n_rows=1)
    with pytest.raises(RuntimeError, match="int32"):
        borrowed_attention(b["query"], b["kv_cache"], torch.zeros_like(b["query"]),
                           b["rows"].long(), b["block_table"], b["seg_ptr"], b["segs"],
                           b["src_blocks"], b["inv_freq"], b["scale"])
    with pytest.raises(RuntimeError, match="block size 48"):
        kv = torch.zeros(4, 3, 48, 128)
        borrowed_attention(b["query"], kv, torch.zeros_like(b["query"]), b["rows"],
                           b["block_table"], b["seg_ptr"], b["segs"], b["src_blocks"],
                           b["inv_freq"], b["scale"])


def test_read_kv_matches_vllm_cache_write():
    from vllm_ext.kernels import check_cache_layout

    for dtype in (torch.float32, torch.bfloat16):
        check_cache_layout(dtype, 32, 64, "vec")
    kv = torch.zeros(2, 1, 32, 8)
    kv.view(2, 1, 64, 4)[1, 0, :32].view(4, 32)[2, 5] = 3.0   # key dim 2 of slot 5, block 1
    k, v = read_kv(kv, torch.tensor([1]), torch.tensor([5]))
    assert k[0, 0, 2] == 3.0 and k.abs().sum() == 3.0 and v.abs().sum() == 0


def _dense(batch):
    from vllm_ext.dense import DenseRows

    d = DenseRows(batch["rows"], batch["seg_ptr"], batch["segs"], batch["src_blocks"],
                  tuple(batch["kv_cache"].shape), batch["kv_cache"].dtype,
                  batch["query"].shape[1], "vec")
    out = torch.zeros_like(batch["query"])
    d(batch["query"], batch["kv_cache"], batch["block_table"], out, batch["inv_freq"],
      batch["scale"])
    return out, d


@pytest.mark.parametrize("seed", range(6))
def test_dense_rows_equal_reference(seed):
    """vLLM's kernel over the scratch copy (borrowed keys re-rotated by +delta) gives the
    oracle's output, on the same random misaligned segments, reordered rows and GQA."""
    b = _batch(seed + 20)
    got, d = _dense(b)
    want = _run(reference_borrowed_attention, b, rotary=ROT)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert d.scratch.shape[0] == sum(-(-int(s) // 32) for s in b["rows"][:, 2])


def test_materialize_copies_own_slots_and_rerotates_borrowed_ones():
    from vllm_ext.kernels import materialize, scratch_tables
    from vllm_ext.rope import rerotate

    b = _batch(7, n_rows=3)
    seq = b["rows"][:, 2].tolist()
    first, table, total = scratch_tables(seq, 32)
    scratch = torch.full((total, *b["kv_cache"].shape[1:]), float("nan"))
    materialize(b["kv_cache"], scratch, b["rows"], b["block_table"], b["seg_ptr"], b["segs"],
                b["src_blocks"], b["inv_freq"], first)
    # every scratch slot is written: the row's context, then zeros past seq_len (vLLM's
    # kernel reads whole blocks, so a NaN there would reach the output)
    assert torch.isfinite(scratch).all()
    for r, s_len in enumerate(seq):
        tail = torch.arange(s_len, -(-s_len // 32) * 32)
        k, v = read_kv(scratch, table[r, tail // 32], tail % 32)
        assert (k == 0).all() and (v == 0).all()
    for r, (_, _, seq_len, trow) in enumerate(b["rows"].tolist()):
        pos = torch.arange(seq_len)
        k, v = read_kv(scratch, table[r, pos // 32], pos % 32)
        blocks, offs = b["block_table"][trow, pos // 32].long(), pos % 32
        delta = torch.zeros(seq_len, dtype=torch.long)
        for dst, n, dl, src, tab in b["segs"][b["seg_ptr"][r]:b["seg_ptr"][r + 1]].tolist():
            sp = src + torch.arange(n)
            blocks[dst:dst + n] = b["src_blocks"][tab + sp // 32 - src // 32].long()
            offs[dst:dst + n] = sp % 32
            delta[dst:dst + n] = dl
        k0, v0 = read_kv(b["kv_cache"], blocks, offs)
        assert torch.equal(v, v0)
        assert torch.equal(k[delta == 0], k0[delta == 0])
        assert torch.allclose(k, rerotate(k0, delta, ROT).float(), atol=1e-5)


def test_materialize_refuses_a_scratch_too_small():
    from vllm_ext.kernels import materialize, scratch_tables

    b = _batch(2, n_rows=2)
    first, _, total = scratch_tables(b["rows"][:, 2].tolist(), 32)
    with pytest.raises(RuntimeError, match="does not fit"):
        materialize(b["kv_cache"], torch.zeros(total - 1, *b["kv_cache"].shape[1:]),
                    b["rows"], b["block_table"], b["seg_ptr"], b["segs"], b["src_blocks"],
                    b["inv_freq"], first)


def test_a_killed_builds_stale_lock_does_not_hang_the_next_load(tmp_path):
    """torch's build baton (``lock``) outlives a build that was killed; the next load must
    clear it and go on, not wait forever (this hung a CI run until its time limit)."""
    import os
    import shutil
    import subprocess
    import sys

    from vllm_ext.kernels import build_dir, extension

    extension()  # make sure the shared build exists to copy
    out = tmp_path / "build" / build_dir().name
    shutil.copytree(build_dir(), out)
    (out / "lock").touch()
    env = {**os.environ, "KVDEDUP_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "vllm_ext.kernels", "build"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stale build lock" in done.stderr
    assert not (out / "lock").exists()

"""Attention over borrowed KV segments: the C++ kernel, its build, and the torch oracle.

``borrowed_attention`` computes, for each listed batch row, attention over the row's own
KV blocks plus its *borrowed segments*: runs of the row's positions whose keys and values
sit in another request's slots of the same paged cache (kvdedup shared mode). Keys in
the cache were rotated (RoPE) at the position they were written at; a segment used
``delta`` positions later is attended with the query rotated by ``-delta``, which is exact.

Arguments (all CPU tensors; index tensors int32 and contiguous):

* ``query`` ``[T, Hq, D]`` post-RoPE queries of the whole step; ``output`` like it, only
  the listed rows' tokens are written;
* ``kv_cache`` ``[num_blocks, Hkv, block_size, 2 * D]``, vLLM 0.32's CPU layout (keys
  transposed per block and head, then values; ``check_cache_layout`` verifies it);
* ``rows`` ``[R, 4]`` = (first query token, query tokens, sequence length, block-table
  row); ``block_table`` ``[rows, max_blocks]``; positions inside segments are not read
  from it (they hold placeholders);
* ``seg_ptr`` ``[R + 1]``: row r's segments are ``segs[seg_ptr[r]:seg_ptr[r + 1]]``,
  sorted by position, each (dst, length, delta, src, src_tab): the row's positions
  [dst, dst + length) read the source positions [src, src + length), whose blocks are
  ``src_blocks[src_tab + i]`` for source block index ``src // block_size + i``;
* ``inv_freq`` float64 ``[D / 2]`` (``RotaryParams.inv_freq``), ``scale`` the softmax scale.

The extension is compiled on first use (or by ``python -m vllm_ext.kernels build``, which
``scripts/env.sh`` runs) into ``${KVDEDUP_CACHE:-~/.cache/kvdedup}/build/``, keyed by a
hash of the source. ``reference_borrowed_attention`` is the plain-torch oracle: it copies
the keys into one contiguous tensor, re-rotates the borrowed ones to the row's positions
(``rope.rerotate``) and runs softmax attention in float64.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from .rope import RotaryParams, rerotate

SOURCE = Path(__file__).with_name("csrc") / "borrowed_attention.cpp"
# -fopenmp: ATen's parallel_for is an inline OpenMP loop; without the flag it runs on one
# thread while vLLM's kernel uses all of them.
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


class KernelUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded."""


def build_dir() -> Path:
    root = Path(os.environ.get("KVDEDUP_CACHE", Path.home() / ".cache" / "kvdedup"))
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:12]
    return root.expanduser() / "build" / f"borrowed_attention-{digest}"


_FAILURE: list[KernelUnavailable] = []  # a failed build is not retried in this process


@contextmanager
def _build_lock(out: Path):
    """Serialize builds and loads in ``out`` across processes, and clear a dead build's
    baton. torch's ``cpp_extension.load`` guards a build with a ``lock`` file that it
    creates and deletes itself; a build killed in between leaves the file behind, and every
    later load then waits for it forever. This flock is released by the kernel when its
    holder dies, so whoever holds it knows no build is in progress and the file is stale."""
    with open(out / ".kvdedup-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = out / "lock"
            if stale.exists():
                print(f"[kvdedup] removing a stale build lock left by a killed build: {stale}",
                      file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@lru_cache(maxsize=1)
def _load():
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _build_lock(out):
            # copies of the flags: load() appends to the lists it is given
            return cpp_extension.load(name="kvdedup_borrowed_attention",
                                      sources=[str(SOURCE)], extra_cflags=list(CFLAGS),
                                      extra_ldflags=list(LDFLAGS), build_directory=str(out),
                                      verbose=False)
    except Exception as exc:  # compiler missing, bad flags, ...
        _FAILURE.append(KernelUnavailable(f"could not build {SOURCE.name} in {out}: {exc}"))
        raise _FAILURE[0] from exc


def extension():
    """The compiled module (built once per source hash; later loads take ~0.1 s). Raises
    ``KernelUnavailable``, at once after the first failure."""
    if _FAILURE:
        raise _FAILURE[0]
    return _load()


def borrowed_attention(query, kv_cache, output, rows, block_table, seg_ptr, segs,
                       src_blocks, inv_freq, scale: float) -> None:
    """The C++ kernel (see the module docstring); writes the rows' tokens of ``output``."""
    extension().borrowed_attention(query, kv_cache, output, rows, block_table, seg_ptr,
                                   segs, src_blocks, inv_freq, float(scale))


def materialize(kv_cache, scratch, rows, block_table, seg_ptr, segs, src_blocks, inv_freq,
                first_block) -> None:
    """The C++ copy: each row's context (own slots as they are, borrowed ones re-rotated
    by +delta) into ``scratch`` blocks ``first_block[r]``, ``first_block[r] + 1``, ...,
    so that vLLM's own kernel can attend over it (see ``scratch_tables``)."""
    extension().materialize(kv_cache, scratch, rows, block_table, seg_ptr, segs,
                            src_blocks, inv_freq, first_block)


def scratch_tables(seq_lens: list[int], block_size: int):
    """Consecutive scratch blocks per row: ``(first_block [R], block_table [R, max],
    total_blocks)``, int32."""
    n = [-(-s // block_size) for s in seq_lens]
    first = [0]
    for x in n[:-1]:
        first.append(first[-1] + x)
    width = max(n, default=1)
    table = torch.zeros(len(n), width, dtype=torch.int32)
    for r, (f, x) in enumerate(zip(first, n)):
        table[r, :x] = torch.arange(f, f + x, dtype=torch.int32)
    return torch.tensor(first, dtype=torch.int32), table, sum(n)


# ------------------------------------------------------------------ cache layout access
def read_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor):
    """Keys and values ``[n, Hkv, D]`` at slots (block, offset) of a CPU-layout cache."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    tiles = kv_cache.view(nb, hkv, 2 * bs * d)[blocks.long()]          # [n, Hkv, 2*B*D]
    k = tiles[..., : bs * d].view(-1, hkv, d, bs)                        # transposed
    v = tiles[..., bs * d:].view(-1, hkv, bs, d)
    idx = offsets.long()
    ar = torch.arange(len(idx))
    return k[ar, :, :, idx], v[ar, :, idx, :]


def check_cache_layout(dtype: torch.dtype, block_size: int, head_dim: int, isa: str) -> None:
    """Write distinct keys/values through vLLM's own CPU cache write and read them back
    with ``read_kv``; raise ``ValueError`` if the layout is not the one the kernel reads."""
    from vllm import _custom_ops as ops

    nb, hkv = 3, 2
    kv = torch.zeros(nb, hkv, block_size, 2 * head_dim, dtype=dtype)
    kc, vc = kv.view(nb, hkv, 2 * block_size, head_dim).chunk(2, dim=2)
    n = block_size + 3
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(n, hkv, head_dim, generator=gen).to(dtype)
    val = torch.randn(n, hkv, head_dim, generator=gen).to(dtype)
    slots = torch.arange(n) + block_size - 2
    ops.cpu_attn_reshape_and_cache(key, val, kc, vc, slots, isa)
    k, v = read_kv(kv, slots // block_size, slots % block_size)
    if not (torch.equal(k, key) and torch.equal(v, val)):
        raise ValueError(f"kvdedup shared mode: the CPU KV cache layout for {dtype}, block "
                         f"size {block_size}, head size {head_dim}, ISA {isa!r} is not the "
                         "one its attention kernel reads (keys transposed per block)")


# ------------------------------------------------------------------ the torch oracle
def reference_borrowed_attention(query, kv_cache, output, rows, block_table, seg_ptr, segs,
                                 src_blocks, inv_freq, scale: float,
                                 rotary: RotaryParams | None = None) -> None:
    """Plain-torch equivalent of ``borrowed_attention``: for each row, a contiguous copy of
    its keys (own slots as they are, borrowed ones re-rotated by +delta), then causal
    softmax attention in float64. ``rotary`` defaults to the one ``inv_freq`` encodes."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    if rotary is None:
        theta = float(inv_freq[1] ** (-d / 2)) if d > 2 else 10000.0
        rotary = RotaryParams(head_dim=d, theta=theta)
    hq = query.shape[1]
    group = hq // hkv
    for r, (q_start, q_len, seq_len, trow) in enumerate(rows.tolist()):
        blocks = torch.empty(seq_len, dtype=torch.long)
        offs = torch.empty(seq_len, dtype=torch.long)
        delta = torch.zeros(seq_len, dtype=torch.long)
        pos = torch.arange(seq_len)
        blocks[:] = block_table[trow, pos // bs].long()
        offs[:] = pos % bs
        for dst, n, dl, src, tab in segs[seg_ptr[r]:seg_ptr[r + 1]].tolist():
            n = min(n, seq_len - dst)
            sp = src + torch.arange(n)
            blocks[dst:dst + n] = src_blocks[tab + sp // bs - src // bs].long()
            offs[dst:dst + n] = sp % bs
            delta[dst:dst + n] = dl
        k, v = read_kv(kv_cache, blocks, offs)
        k = rerotate(k.to(torch.float64), delta, rotary)
        v = v.to(torch.float64)
        q = query[q_start:q_start + q_len].to(torch.float64)              # [Q, Hq, D]
        kk = k.repeat_interleave(group, dim=1)                            # [S, Hq, D]
        vv = v.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, kk) * scale
        qpos = seq_len - q_len + torch.arange(q_len)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)
        output[q_start:q_start + q_len] = out.to(output.dtype)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vllm_ext.kernels",
                                 description="Build kvdedup's C++ attention kernel.")
    ap.add_argument("command", choices=["build", "path"],
                    help="build: compile (or reuse) the extension; path: print its build dir")
    args = ap.parse_args(argv)
    if args.command == "path":
        print(build_dir())
        return 0
    try:
        extension()
    except KernelUnavailable as exc:
        print(f"kvdedup: {exc}", file=sys.stderr)
        return 1
    print(build_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())

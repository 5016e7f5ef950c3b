"""Borrowed-attention kernel vs vLLM's stock CPU attention kernel, on the same shapes.

For a batch of ``--rows`` requests of ``--seq-len`` tokens (SmolLM2-135M's attention
shapes by default: 9 query heads, 3 KV heads, head size 64, block size 32, float32), it
times, interleaved call by call:

* ``stock``: ``vllm._C.cpu_attention_with_kv_cache`` over each row's own block table;
* ``borrowed``: kvdedup's kernel with the same keys read through borrowed segments
  (``--borrowed`` of each row's tokens, at a misaligned source offset and a position
  delta, the rest from the row's own blocks);
* ``dense`` (prefill only; the engine uses it for rows of at least
  ``vllm_ext.dense.MIN_QUERY_TOKENS`` query tokens): each row's context copied into
  scratch blocks, borrowed keys re-rotated, then vLLM's kernel over the scratch.

All read the same number of keys, so the ratio is the cost of borrowing. It prints
decode (1 query token per row) and prefill (``--prefill`` query tokens per row) medians
with min-max over ``--reps`` and each arm's speed relative to stock (stock time / arm
time per interleaved rep; >= 1 means at least as fast), and writes them as JSON with
``--out``.

    python -m experiments.kernel_bench --rows 32 --seq-len 1100 --reps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def build_case(rows: int, seq_len: int, q_len: int, borrowed: float, hq: int, hkv: int,
               d: int, bs: int, dtype, seed: int = 0):
    from vllm import _custom_ops as ops
    from vllm import envs

    from vllm_ext.rope import RotaryParams

    g = torch.Generator().manual_seed(seed)
    nblk = -(-seq_len // bs)
    nb = rows * nblk * 2 + 8
    kv = torch.randn(nb, hkv, bs, 2 * d, generator=g).to(dtype)
    perm = torch.randperm(nb - 1, generator=g) + 1
    own = perm[: rows * nblk].view(rows, nblk).to(torch.int32)
    src = perm[rows * nblk:].to(torch.int32)
    query = torch.randn(rows * q_len, hq, d, generator=g).to(dtype)
    qsl = torch.arange(0, rows * q_len + 1, q_len, dtype=torch.int32)
    seq = torch.full((rows,), seq_len, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=rows, num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=seq, dtype=dtype,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)   # as the engine (and DenseRows) do
    # Borrowed segment: starts after 2 own blocks, block-aligned in the reader (as the
    # scheduler makes it), 11 slots into its first source block, delta != 0.
    n_seg = int(borrowed * seq_len) // bs * bs
    dst, src_pos = 2 * bs, 5 * bs + 11
    n_src = (src_pos + n_seg - 1) // bs - src_pos // bs + 1
    segs, src_blocks = [], []
    for r in range(rows):
        segs.append((dst, n_seg, dst - src_pos, src_pos, len(src_blocks)))
        src_blocks += src[(r * n_src) % max(1, len(src) - n_src):][:n_src].tolist()
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)
    rows_t = i32([(r * q_len, q_len, seq_len, r) for r in range(rows)]).view(-1, 4)
    return dict(kv=kv, own=own, query=query, qsl=qsl, seq=seq, meta=meta, rows=rows_t,
                seg_ptr=i32(list(range(rows + 1))), segs=i32(segs).view(-1, 5),
                src_blocks=i32(src_blocks), inv_freq=RotaryParams(d, 1e5).inv_freq(),
                scale=d ** -0.5, bs=bs)


def time_arms(c, reps: int, dense: bool) -> dict:
    """Each arm's median and min-max, and each arm's speed relative to ``stock`` (per
    interleaved rep: stock time / arm time)."""
    from vllm import _custom_ops as ops

    from vllm_ext.dense import DenseRows
    from vllm_ext.kernels import borrowed_attention

    kv = c["kv"]
    nb, hkv, bs, d2 = kv.shape
    kc, vc = kv.view(nb, hkv, 2 * bs, d2 // 2).chunk(2, dim=2)
    out_s, out_b, out_d = (torch.empty_like(c["query"]) for _ in range(3))

    def stock():
        ops.cpu_attention_with_kv_cache(
            query=c["query"], key_cache=kc, value_cache=vc, output=out_s,
            query_start_loc=c["qsl"], seq_lens=c["seq"], scale=c["scale"], causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=c["own"], softcap=0.0,
            scheduler_metadata=c["meta"], s_aux=None)

    def borrowed():
        borrowed_attention(c["query"], kv, out_b, c["rows"], c["own"], c["seg_ptr"],
                           c["segs"], c["src_blocks"], c["inv_freq"], c["scale"])

    arms = {"stock": stock, "borrowed": borrowed}
    if dense:  # set up once per step in the engine; the per-layer work is timed
        rows = DenseRows(c["rows"], c["seg_ptr"], c["segs"], c["src_blocks"], tuple(kv.shape),
                         kv.dtype, c["query"].shape[1], "vec")
        arms["dense"] = lambda: rows(c["query"], kv, c["own"], out_d, c["inv_freq"],
                                     c["scale"])
    for f in arms.values():
        f()
    times = {name: [] for name in arms}
    for _ in range(reps):
        for name, f in arms.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    summ = lambda xs: {"median_ms": 1e3 * statistics.median(xs), "min_ms": 1e3 * min(xs),
                       "max_ms": 1e3 * max(xs)}
    res = {name: summ(ts) for name, ts in times.items()}
    for name in arms:
        if name != "stock":
            ratios = sorted(s / b for s, b in zip(times["stock"], times[name]))
            res[name].update(ratio_median=statistics.median(ratios), ratio_min=ratios[0],
                             ratio_max=ratios[-1])
    return res


def _ms(x: dict) -> str:
    return f"{x['median_ms']:7.2f} ms [{x['min_ms']:.2f}-{x['max_ms']:.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.kernel_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="requests in the batch")
    ap.add_argument("--seq-len", type=int, default=1100, help="tokens per request")
    ap.add_argument("--prefill", type=int, default=64, help="query tokens per prefill row")
    ap.add_argument("--borrowed", type=float, default=0.8,
                    help="fraction of each row's tokens read through a borrowed segment")
    ap.add_argument("--heads", type=int, nargs=2, default=(9, 3), metavar=("Q", "KV"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if not 0.0 <= a.borrowed < 1.0 or a.seq_len < 4 * a.block_size:
        ap.error("--borrowed must be in [0, 1) and --seq-len at least 4 blocks")
    dtype = getattr(torch, a.dtype)
    res = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "threads": torch.get_num_threads()}
    for name, q_len in (("decode", 1), ("prefill", a.prefill)):
        case = build_case(a.rows, a.seq_len, q_len, a.borrowed, *a.heads, a.head_dim,
                          a.block_size, dtype)
        res[name] = r = time_arms(case, a.reps, dense=q_len > 1)
        line = f"{name:8s} stock {_ms(r['stock'])}"
        for arm in ("borrowed", "dense"):
            if arm in r:
                x = r[arm]
                line += (f"   {arm} {_ms(x)} = {x['ratio_median']:.2f}x stock "
                         f"[{x['ratio_min']:.2f}-{x['ratio_max']:.2f}]")
        print(line)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

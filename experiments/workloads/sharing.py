"""Shareable-fraction calculators and the workload summary used by ``show`` and meta.

Definitions (over all prompt tokens of a workload, in file order):

* ``prefix_shareable_fraction``: for each prompt, the length of its longest common
  prefix with ANY earlier prompt; summed, over the total number of prompt tokens.
  This is what an exact-prefix cache (vLLM automatic prefix caching with unbounded
  memory, block size 1) could reuse.
* ``run_shareable_fraction``: a token counts when some ``window``-token run
  (default 32) covering it already occurred earlier in the file, or earlier in the
  same prompt (at a smaller start position). This is what content-aware,
  position-independent sharing at 32-token granularity could reuse.
* ``nonprefix_run_shareable_fraction``: the run-covered tokens that lie after the
  prompt's longest common prefix, i.e. what run sharing adds over prefix sharing.

Implementation: the prefix part keeps earlier prompts in lexicographic order (the
longest common prefix with any earlier prompt is reached at a sorted neighbour); the
run part hashes every window with a 64-bit polynomial hash (numpy, wrap-around), so
two different windows collide with probability about 2**-64 per pair; tests check it
against a brute-force implementation over exact tuples.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

import numpy as np

RUN_WINDOW = 32
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    neq = np.flatnonzero(x != y)
    return int(neq[0]) if neq.size else n


def prefix_match_lengths(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Per prompt, the longest common prefix with any earlier prompt (0 for the first)."""
    seen: list[tuple[int, ...]] = []
    out = []
    for p in prompts:
        t = tuple(p)
        i = bisect.bisect_left(seen, t)
        best = 0
        if i > 0:
            best = _lcp(t, seen[i - 1])
        if i < len(seen):
            best = max(best, _lcp(t, seen[i]))
        out.append(best)
        seen.insert(i, t)
    return out


def _window_hashes(tokens: np.ndarray, window: int) -> np.ndarray:
    n = len(tokens) - window + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    t = tokens.astype(np.uint64) + np.uint64(1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(window):
            h = h * _HASH_BASE + t[k:k + n]
    return h


def run_covered_masks(prompts: Sequence[Sequence[int]], window: int = RUN_WINDOW) -> list[np.ndarray]:
    """Per prompt, a bool mask of tokens covered by a window that occurred before."""
    seen: set[int] = set()
    masks = []
    for p in prompts:
        arr = np.asarray(p, dtype=np.int64)
        h = _window_hashes(arr, window)
        mask = np.zeros(len(arr), dtype=bool)
        if h.size:
            hl = h.tolist()
            in_file = np.fromiter((x in seen for x in hl), dtype=bool, count=len(hl))
            _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
            in_prompt = first[inverse] < np.arange(len(h))
            starts = np.flatnonzero(in_file | in_prompt)
            if starts.size:
                diff = np.zeros(len(arr) + 1, dtype=np.int64)
                np.add.at(diff, starts, 1)
                np.add.at(diff, starts + window, -1)
                mask = np.cumsum(diff[:-1]) > 0
            seen.update(hl)
        masks.append(mask)
    return masks


def shareable_fractions(prompts: Sequence[Sequence[int]], window: int = RUN_WINDOW) -> dict[str, float]:
    """The three fractions defined in the module docstring (0.0 for no tokens)."""
    total = sum(len(p) for p in prompts)
    lcps = prefix_match_lengths(prompts)
    masks = run_covered_masks(prompts, window)
    run = sum(int(m.sum()) for m in masks)
    nonprefix = sum(int(m[l:].sum()) for m, l in zip(masks, lcps))
    if total == 0:
        return {"prefix_shareable_fraction": 0.0, "run_shareable_fraction": 0.0,
                "nonprefix_run_shareable_fraction": 0.0, "run_window": window}
    return {
        "prefix_shareable_fraction": round(sum(lcps) / total, 6),
        "run_shareable_fraction": round(run / total, 6),
        "nonprefix_run_shareable_fraction": round(nonprefix / total, 6),
        "run_window": window,
    }


def percentiles(values: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/max and mean of a list of lengths."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {"mean": round(float(a.mean()), 2),
            **{f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 90, 99)},
            "max": float(a.max())}


def summarize(requests: Sequence[Any], window: int = RUN_WINDOW) -> dict[str, Any]:
    """Counts, length percentiles and shareable fractions of a list of Requests."""
    prompts = [r.prompt_token_ids for r in requests]
    sessions = {r.session_id for r in requests if r.session_id is not None}
    timed = [r.arrival_time for r in requests if r.arrival_time is not None]
    s: dict[str, Any] = {
        "num_requests": len(requests),
        "num_sessions": len(sessions),
        "prompt_tokens_total": int(sum(len(p) for p in prompts)),
        "output_tokens_total": int(sum(r.output_len for r in requests)),
        "with_arrival_time": len(timed),
        "duration_s": round(max(timed), 3) if timed else None,
        "input_len": percentiles([len(p) for p in prompts]),
        "output_len": percentiles([r.output_len for r in requests]),
    }
    s.update(shareable_fractions(prompts, window))
    return s

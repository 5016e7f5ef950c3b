"""Metrics of output movement, shared by reuse arms and noise-floor arms.

Every arm is scored against the same full-prefill reference of a case's target prompt:

* ``logprob_delta``: teacher-forced mean over the reference continuation's tokens of
  ``log p_arm - log p_full`` (nats/token; negative: the arm finds the reference less
  likely). Robust to near-ties, unlike greedy agreement.
* ``top1_agreement``: fraction of continuation positions where the arm's top-1 token
  equals full prefill's.
* ``exact_match``: the arm's greedy output tokens equal the reference's.
* ``rougeL``: ROUGE-L F1 of the arm's greedy text against the reference text, with the
  maintained ``rouge-score`` implementation (stemmed, as for CNN/DailyMail).

``describe`` gives the per-case distribution (n, mean, median, quartiles, extremes);
``paired`` compares two arms case by case (median difference, bootstrap interval).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (``rouge-score``, stemmed); identical texts score 1.0 even when they
    have no scorable tokens (both empty)."""
    if candidate == reference:
        return 1.0
    return float(_scorer().score(reference, candidate)["rougeL"].fmeasure)


def logprob_delta(arm: Sequence[float], full: Sequence[float]) -> float:
    """Mean of ``arm - full`` log-probs per token (nats/token); nan when empty."""
    if len(arm) != len(full):
        raise ValueError(f"length mismatch: {len(arm)} vs {len(full)}")
    if not len(arm):
        return float("nan")
    return float(np.mean(np.asarray(arm, np.float64) - np.asarray(full, np.float64)))


def top1_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two top-1 token sequences agree; nan when empty."""
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    if not len(a):
        return float("nan")
    return float(np.mean([int(x == y) for x, y in zip(a, b)]))


def score(ref: dict, arm: dict, valid: Sequence[int] | None = None) -> dict:
    """Metrics of one arm against the case's reference. Both are dicts with ``lp`` and
    ``top1`` (teacher-forced, per continuation token), ``tokens`` and ``text`` (greedy);
    ``ref`` may carry ``answer`` (a task reference) to score both outputs against.
    ``valid``: the continuation positions to score (default all)."""
    idx = list(range(len(ref["lp"]))) if valid is None else list(valid)
    out = {
        "logprob_delta": logprob_delta([arm["lp"][i] for i in idx], [ref["lp"][i] for i in idx]),
        "top1_agreement": top1_agreement([arm["top1"][i] for i in idx], [ref["top1"][i] for i in idx]),
        "exact_match": list(arm["tokens"]) == list(ref["tokens"]),
        "first_token_agree": list(arm["tokens"][:1]) == list(ref["tokens"][:1]),
        "rougeL": rouge_l(arm["text"], ref["text"]),
        "scored_positions": len(idx),
    }
    if ref.get("answer"):
        out["rougeL_answer"] = rouge_l(arm["text"], ref["answer"])
    return out


def _clean(xs: Iterable) -> np.ndarray:
    vals = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return np.asarray(vals, np.float64)


def describe(xs: Iterable) -> dict:
    """n, mean, median, q1, q3, min, max of the finite values (None/nan dropped)."""
    a = _clean(xs)
    if not a.size:
        return {"n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "mean": float(a.mean()), "median": float(med), "q1": float(q1),
            "q3": float(q3), "min": float(a.min()), "max": float(a.max())}


def paired(a: Sequence, b: Sequence, n_boot: int = 2000, seed: int = 0) -> dict:
    """Case-by-case ``a - b`` over cases where both are finite: n, mean and median
    difference, a 95% bootstrap interval of the mean, and the share of cases with
    ``a >= b``."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    if not pairs:
        return {"n": 0}
    d = np.asarray([x - y for x, y in pairs])
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"n": int(d.size), "mean_diff": float(d.mean()), "median_diff": float(np.median(d)),
            "ci95_mean_diff": [float(lo), float(hi)], "share_a_ge_b": float(np.mean(d >= 0))}

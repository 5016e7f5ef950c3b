"""experiments.sequence_quality: the metrics by hand, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from experiments.sequence_quality import (Case, aggregate, mean_logprob_delta, rouge_l_f1,
                                          top1_agreement)


def test_rouge_l_is_rouge_score():
    # reference "the cat sat on the mat" (6), candidate "the cat lay on a mat" (6):
    # LCS = the, cat, on, mat = 4 -> P = R = 4/6 -> F1 = 2/3
    assert rouge_l_f1("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # candidate "cat mat" (2) vs reference (6): LCS 2 -> P 1, R 1/3 -> F1 = 0.5
    assert rouge_l_f1("cat mat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_l_f1("b a", "a b") == pytest.approx(0.5)          # LCS is order-sensitive
    # rouge-score's tokenizer: lowercased, punctuation dropped, Porter-stemmed
    assert rouge_l_f1("The Cats, sitting!", "the cat sits") == 1.0
    assert rouge_l_f1("same  words\nhere", "same words here") == 1.0
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("x", "") == 0.0
    assert rouge_l_f1("x y", "z") == 0.0


def test_logprob_delta_and_top1():
    assert mean_logprob_delta([-1.0, -2.0, -0.5], [-1.0, -1.5, -0.5]) == pytest.approx(-0.5 / 3)
    assert mean_logprob_delta([-1.0], [-1.0]) == 0.0
    assert math.isnan(mean_logprob_delta([], []))
    with pytest.raises(ValueError):
        mean_logprob_delta([-1.0], [])
    assert top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        top1_agreement([1], [1, 2])


def test_aggregate_leaves_out_cases_without_reuse():
    base = dict(workload="w", k=0, first_token_agree=True, exact_output_match=False,
                top1_agreement=1.0, rougeL_f1=1.0, target_reused_tokens=10, excluded_positions=0)
    rows = [dict(base, case_id="a", reused=True, logprob_delta=-0.1, f=0.5, f_tf=0.5),
            dict(base, case_id="b", reused=False, logprob_delta=-5.0, f=0.0, f_tf=0.0,
                 rougeL_f1=0.0, target_reused_tokens=0)]
    s = aggregate(rows)
    assert s["n_cases"] == 2 and s["n_cases_with_reuse"] == 1 and s["no_reuse_cases"] == ["b"]
    assert s["mean_logprob_delta"] == pytest.approx(-0.1) and s["rougeL_f1_mean"] == 1.0


@pytest.mark.engine
def test_tiny_end_to_end(tmp_path):
    """2 cases, k=0: an identical-context case (SOURCE == TARGET: every injected run is at
    its own offset, so reuse is exact) and a shifted-context case."""
    from experiments.sequence_quality import run

    rng = np.random.default_rng(7)
    doc = rng.integers(3, 2000, size=300).tolist()
    p1, p2 = rng.integers(3, 2000, size=40).tolist(), rng.integers(3, 2000, size=23).tolist()
    cases = [Case("same", "identical", p1 + doc, p1 + doc),
             Case("shift", "shifted", p1 + doc, p2 + doc)]
    summary = run(cases, "tiny", [0], tmp_path, max_new=8, store_bytes=64 << 20)

    rows = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    reuse = {r["case_id"]: r for r in rows if r["k"] == 0}
    assert set(reuse) == {"same", "shift"}
    for r in reuse.values():
        for key in ("logprob_delta", "top1_agreement", "first_token_agree", "rougeL_f1", "f",
                    "target_reused_tokens", "tf_reused_tokens", "scored_positions", "reused"):
            assert key in r
        assert r["reused"] and r["tf_reused_tokens"] > 0
        assert r["scored_positions"] == 8
    # the shifted target's greedy run injects; the identical one is an exact APC prefix hit
    assert reuse["shift"]["target_reused_tokens"] > 0 and 0 < reuse["shift"]["f"] <= 1
    same = reuse["same"]
    assert abs(same["logprob_delta"]) < 1e-3
    assert same["top1_agreement"] == 1.0 and same["first_token_agree"] and same["rougeL_f1"] == 1.0

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == json.loads(json.dumps(summary))
    for key in ("mean_logprob_delta", "median_logprob_delta", "first_token_agreement",
                "top1_agreement", "rougeL_f1_mean", "mean_f", "n_cases_with_reuse"):
        assert key in s["per_k"]["0"]
    assert s["per_k"]["0"]["n_cases_with_reuse"] == 2
    assert "vllm" in s["env"]["versions"] and s["env"]["git_commit"]
    assert "| 0 | all |" in (tmp_path / "summary.md").read_text()

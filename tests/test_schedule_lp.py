"""The co-residency LP bound (analysis.schedule_lp) against hand-solved cases and a
brute-force LP over every set of a small workload."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from analysis import AnalysisError
from analysis.packing import min_steps
from analysis.schedule_lp import lp_min_steps
from analysis.simulate import RequestFootprint

B = 4


def _doc_group(doc: str, outputs: list[int], doc_blocks: int = 10, own: int = 2):
    """Readers of one document: each holds the document's blocks (shared keys) and
    ``own`` private blocks."""
    keys = tuple(((doc, j), B) for j in range(doc_blocks))
    return [RequestFootprint(B * (doc_blocks + own), out, keys, covered=doc_blocks)
            for out in outputs]


def test_one_document_group_at_a_time_needs_each_groups_longest_reader():
    # a group takes 10 + 2 * 2 = 14 blocks; two groups (28) do not fit in 15 usable
    fps = _doc_group("a", [20, 1]) + _doc_group("b", [20, 1])
    r = lp_min_steps(fps, B, num_blocks=16)
    assert r["exact"] and r["lp_steps"] == 20 + 20
    assert r["largest_set"] == 2
    # the area bound lets the two long readers share the pool, so it says less
    assert min_steps(fps, B, 16)["min_steps"] < 40
    # with room for both groups, the longest reader is all it takes
    assert lp_min_steps(fps, B, num_blocks=29)["lp_steps"] == 20


def test_no_sharing_runs_as_many_requests_as_fit():
    fps = [RequestFootprint(5 * B, out, ()) for out in (4, 4, 4, 4)]
    assert lp_min_steps(fps, B, num_blocks=11)["lp_steps"] == 8      # two at a time
    fps = [RequestFootprint(5 * B, out, ()) for out in (10, 1, 1, 1)]
    assert lp_min_steps(fps, B, num_blocks=11)["lp_steps"] == 10     # the longest one


def test_token_granular_sets_fit_by_their_tokens():
    """The run rule's keys are runs of any length: two 6-token runs take 12 tokens, three
    4-token blocks' worth, where whole blocks would need four."""
    fps = [RequestFootprint(6, 10, (("a", 6),), covered=2),
           RequestFootprint(6, 10, (("b", 6),), covered=2)]
    assert lp_min_steps(fps, B, num_blocks=4, token_granular=True)["lp_steps"] == 10
    assert lp_min_steps(fps, B, num_blocks=4)["lp_steps"] == 20
    # a shared run counts once; tokens outside every run are the request's own
    fps = [RequestFootprint(11, 10, (("a", 8), ("x", 2))),
           RequestFootprint(10, 10, (("a", 8), ("y", 2)))]
    assert lp_min_steps(fps, B, num_blocks=4, token_granular=True)["lp_steps"] == 20
    assert lp_min_steps(fps, B, num_blocks=5, token_granular=True)["lp_steps"] == 10


def _brute_force(fps, usable, token_granular=False):
    """The LP with a column for every set that fits (scipy), for small workloads."""
    from scipy.optimize import linprog

    def fits(S):
        if token_granular:
            keys = {(k, t) for i in S for k, t in fps[i].shared}
            own = sum(fps[i].prompt_len - sum(t for _, t in fps[i].shared) for i in S)
            return own + sum(t for _, t in keys) <= usable * B
        keys = {(k, j) for i in S for k, t in fps[i].shared for j in range(-(-t // B))}
        own = sum(max(0, -(-fps[i].prompt_len // B) - fps[i].covered_blocks) for i in S)
        return own + len(keys) <= usable

    n = len(fps)
    cols = [S for m in range(1, n + 1) for S in itertools.combinations(range(n), m)
            if fits(S)]
    A = np.zeros((n, len(cols)))
    for j, S in enumerate(cols):
        A[list(S), j] = 1
    s = np.array([max(fp.output_len, 1) for fp in fps], dtype=float)
    res = linprog(np.ones(len(cols)), A_ub=-A, b_ub=-s, bounds=(0, None), method="highs")
    return res.fun


@pytest.mark.parametrize("seed", range(6))
def test_column_generation_equals_the_lp_over_every_set(seed):
    rng = np.random.default_rng(seed)
    docs = {d: tuple(((d, j), B) for j in range(int(rng.integers(2, 7)))) for d in "abc"}
    fps = []
    for _ in range(9):
        chosen = [d for d in "abc" if rng.random() < 0.5]
        keys = tuple(kv for d in chosen for kv in docs[d])
        own = int(rng.integers(1, 4))
        fps.append(RequestFootprint(B * (len(keys) + own), int(rng.integers(0, 20)), keys,
                                    covered=len(keys)))
    usable = max(fp.prompt_len // B for fp in fps) + int(rng.integers(0, 10))
    r = lp_min_steps(fps, B, num_blocks=usable + 1)
    assert r["exact"]
    assert r["lp_steps"] == int(np.ceil(_brute_force(fps, usable) - 1e-6))
    # the run rule: runs of any length, own tokens outside them
    runs = {d: tuple(((d, j), int(rng.integers(1, 9))) for j in range(3)) for d in "abc"}
    fps = [RequestFootprint(sum(t for _, t in keys) + int(rng.integers(0, 6)),
                            int(rng.integers(0, 20)), keys)
           for keys in (tuple(kv for d in "abc" if rng.random() < 0.5 for kv in runs[d])
                        for _ in range(9))]
    usable = -(-max(fp.prompt_len for fp in fps) // B) + int(rng.integers(0, 6))
    r = lp_min_steps(fps, B, num_blocks=usable + 1, token_granular=True)
    assert r["exact"]
    assert r["lp_steps"] == int(np.ceil(_brute_force(fps, usable, True) - 1e-6))


def test_a_request_larger_than_the_pool_is_refused():
    fps = _doc_group("a", [3])          # 12 blocks
    with pytest.raises(AnalysisError, match="request 0 needs 12 blocks"):
        lp_min_steps(fps, B, num_blocks=12)
    fps = [RequestFootprint(13, 3, (("a", 9),))]     # 13 tokens: 4 blocks unpadded
    with pytest.raises(AnalysisError, match="request 0 needs 4 blocks"):
        lp_min_steps(fps, B, num_blocks=4, token_granular=True)
    assert lp_min_steps(fps, B, num_blocks=5, token_granular=True)["lp_steps"] == 3
    with pytest.raises(AnalysisError, match="at least 2"):
        lp_min_steps(fps, B, num_blocks=1)


def test_a_search_past_its_node_budget_claims_no_bound():
    fps = [RequestFootprint(B, 3, ()) for _ in range(12)]
    r = lp_min_steps(fps, B, num_blocks=100, max_nodes=5)
    assert r["lp_steps"] is None and not r["exact"]


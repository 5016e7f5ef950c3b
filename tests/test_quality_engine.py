"""experiments.quality.engine end to end on the tiny model (one stock engine, one
sequence engine)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from experiments.quality import rows as rowsmod
from experiments.quality.cases import Case


@pytest.mark.engine
def test_engine_arms_on_tiny(tiny_model, tmp_path):
    rng = np.random.default_rng(7)
    doc = rng.integers(3, 2000, 300).tolist()
    p1, p2 = rng.integers(3, 2000, 40).tolist(), rng.integers(3, 2000, 23).tolist()
    tail = [11, 12, 13]
    cases = [Case("same", "heldout", "synthetic", "single", p1 + doc + tail, p1 + doc + tail,
                  {"ws": p1 + [5] + doc + tail}),
             Case("shift", "heldout", "synthetic", "single", p2 + doc + tail, p1 + doc + tail,
                  {"ws": p2 + [5] + doc + tail})]
    args = argparse.Namespace(out=tmp_path, floors=["ws"], max_new_tokens=8, group=4, engine_retries=0,
                              modes=["sequence"], k=[0], tail=[0], store_bytes=64 << 20)
    from experiments.quality.engine import run_engine

    run_engine(cases, tiny_model, args)
    got = rowsmod.done_by_case(rowsmod.load(tmp_path / "rows.jsonl"))
    assert set(got) == {"same", "shift"}
    for cid in got:
        assert set(got[cid]) == {"full", "floor:ws", "sequence:k=0"}
        ref = got[cid]["full"]
        assert len(ref["lp"]) == len(ref["tokens"]) and ref["greedy_is_top1"] == 1.0
    same, shift = got["same"]["sequence:k=0"], got["shift"]["sequence:k=0"]
    # identical context: an exact prefix hit, nothing injected, output unchanged
    assert same["f"] == 0 and same["top1_agreement"] == 1.0 and abs(same["logprob_delta"]) < 1e-3
    assert shift["f"] > 0.5 and shift["reused"] and shift["scored_positions"] > 0
    # resumable: a second run measures nothing new
    n = len(rowsmod.load(tmp_path / "rows.jsonl"))
    run_engine(cases, tiny_model, args)
    assert len(rowsmod.load(tmp_path / "rows.jsonl")) == n

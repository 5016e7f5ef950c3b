"""The packing bound (analysis.packing): hand-computed block-steps, the pool bound, the
longest-request bound, and the audit's --num-blocks output."""

from __future__ import annotations

import json

import pytest

from analysis import AnalysisError
from analysis.__main__ import main
from analysis.packing import block_steps, min_steps
from analysis.simulate import RequestFootprint

B = 32


def _pair(out_a: int = 10, out_b: int = 10):
    """Two 64-token prompts holding the same two shareable blocks."""
    keys = (("d0", B), ("d1", B))
    return [RequestFootprint(64, out_a, keys), RequestFootprint(64, out_b, keys)]


def test_shared_keys_count_once_for_their_longest_holder():
    # keys: 2 blocks x 10 steps; private: 1 block at steps 1..9 of each request
    assert block_steps(_pair(), B) == {"shared": 20, "private": 18, "total": 38}
    # a longer holder keeps the keys longer: 2 x 15 + 9 + 14
    assert block_steps(_pair(10, 15), B) == {"shared": 30, "private": 23, "total": 53}
    # without sharing each request holds its own prompt blocks
    own = [RequestFootprint(64, 10, ()), RequestFootprint(64, 10, ())]
    assert block_steps(own, B)["total"] == 2 * (2 * 10 + 9)


def test_min_steps_is_the_pool_bound_or_the_longest_request():
    assert min_steps(_pair(), B, num_blocks=2)["min_steps"] == 19      # ceil(38 / 2)
    assert min_steps(_pair(), B, num_blocks=3)["min_steps"] == 13      # ceil(38 / 3)
    assert min_steps(_pair(), B, num_blocks=100)["min_steps"] == 10    # the longest request
    with pytest.raises(AnalysisError, match="num_blocks"):
        min_steps(_pair(), B, num_blocks=0)


def test_run_rule_packs_runs_without_padding():
    fps = [RequestFootprint(48, 4, (("r", 40),)), RequestFootprint(48, 2, (("r", 40),))]
    # run: 40 tokens x 4 steps = 160 token-steps; private: 8 + k tokens at step k, i.e.
    # 8+9+10+11 + 8+9 = 55; packed: ceil(215 / 32) = 7 blocks, 5 of them the run's
    assert block_steps(fps, B, token_granular=True) == {
        "shared": 5, "private": 2, "total": 7}


def _readers_workload(tmp_path):
    """Four readers of one 8-block document after 12-token instructions (9 blocks each),
    20 output tokens each."""
    doc = list(range(100, 100 + 8 * B))
    path = tmp_path / "w.jsonl"
    with path.open("w") as f:
        for i in range(4):
            instr = list(range(10 + 20 * i, 10 + 20 * i + 12))
            f.write(json.dumps({"prompt_token_ids": instr + doc, "output_len": 20,
                                "arrival_time": None, "session_id": None,
                                "source": f"doc0:instr{i}"}) + "\n")
    return path


def test_audit_prints_and_returns_the_bound(tmp_path, capsys):
    path = _readers_workload(tmp_path)
    assert main(["audit", str(path), "--block-size", "32", "--num-blocks", "16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    bound = res["per_block_size"]["32"]["packing"]["16"]
    assert bound["shared"]["min_steps"] < bound["prefix"]["min_steps"]
    assert bound["none"]["min_steps"] == bound["prefix"]["min_steps"]  # no common prefix
    assert main(["audit", str(path), "--block-size", "32", "--num-blocks", "16"]) == 0
    assert "Fewest engine steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["audit", str(path), "--num-blocks", "0"])


def test_audit_lp_option(tmp_path, capsys):
    """A 16-block pool runs one stock request at a time (4 x 20 steps, analysis.schedule_lp)
    while shared mode fits readers side by side."""
    path = _readers_workload(tmp_path)
    assert main(["audit", str(path), "--block-size", "32", "--num-blocks", "16", "--lp",
                 "--k", "32", "--json"]) == 0
    bound = json.loads(capsys.readouterr().out)["per_block_size"]["32"]["packing"]["16"]
    assert bound["prefix"]["lp_steps"] == 80 and bound["prefix"]["lp_exact"]
    assert bound["shared"]["min_steps"] <= bound["shared"]["lp_steps"] < 80
    assert bound["run"]["lp_exact"]
    assert bound["run"]["min_steps"] <= bound["run"]["lp_steps"] <= bound["shared"]["lp_steps"]
    assert main(["audit", str(path), "--block-size", "32", "--num-blocks", "16", "--lp"]) == 0
    assert "any admission order" in capsys.readouterr().out
    assert main(["audit", str(path), "--lp"]) == 2      # --lp without a pool size
    assert "give --num-blocks" in capsys.readouterr().err

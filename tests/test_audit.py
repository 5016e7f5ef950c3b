"""Tests for analysis.audit / analysis.simulate on crafted workloads (hand-computed values)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import xxhash

from analysis import AnalysisError, audit
from analysis.__main__ import main
from analysis.audit import audit_requests, audit_workload, prefix_hit_tokens, read_workload
from analysis.simulate import RequestFootprint, simulate_kv_blocks
from dedup import hashing

_next_token = [1000]


def fresh(n: int) -> list[int]:
    """n tokens never used before in this test module (unique content)."""
    start = _next_token[0]
    _next_token[0] += n
    return list(range(start, start + n))


def rand(n: int, seed: int) -> list[int]:
    """n seeded random tokens (deterministic whatever tests run first)."""
    return [int(t) for t in np.random.default_rng(seed).integers(1, 50_000, size=n)]


def write_workload(path: Path, prompts, output_len=4, meta=True) -> Path:
    with path.open("w") as fh:
        for i, p in enumerate(prompts):
            fh.write(json.dumps({"prompt_token_ids": list(p), "output_len": output_len,
                                 "arrival_time": None, "session_id": f"s{i}",
                                 "source": "test"}) + "\n")
    if meta:
        path.with_name(path.name + ".meta.json").write_text(json.dumps({"name": "t"}))
    return path


# Sentinel chunker: a chunk ends after every token 0 (and at the end).  Used to
# check the audit's run bookkeeping exactly, independent of the real CDC.
SEP = 0


def _sentinel_chunk_runs(tokens, **_kw):
    out, start = [], 0
    for i, t in enumerate(tokens):
        if t == SEP or i == len(tokens) - 1:
            chunk = np.asarray(tokens[start:i + 1], dtype="<i4").tobytes()
            out.append(hashing.Chunk(start, i + 1, xxhash.xxh3_128_digest(chunk)))
            start = i + 1
    return out


@pytest.fixture
def sentinel_chunker(monkeypatch):
    fake = types.SimpleNamespace(block_hashes=hashing.block_hashes,
                                 chunk_runs=_sentinel_chunk_runs)
    monkeypatch.setattr(audit, "_hashing", lambda: fake)


# ------------------------------------------------------------ (a) prefix rule


def test_shared_template_of_k_blocks_exact_prefix_fraction():
    b, k = 16, 3
    template = fresh(k * b)
    suffix_lens = [10, 16, 20, 33, 5]
    prompts = [template + fresh(n) for n in suffix_lens]
    hits = prefix_hit_tokens(prompts, b)
    assert hits == [0] + [k * b] * 4
    total = sum(len(p) for p in prompts)
    res = audit_requests(prompts, [b, 32], concurrency=2)
    assert res["prefix_block_fraction"] == pytest.approx(4 * k * b / total)
    # position-independent blocks share exactly the template blocks as well
    assert res["fixed_block_fraction"] == pytest.approx(4 * k * b / total)
    per = res["per_block_size"]
    assert per["16"]["prefix"]["shareable_blocks"] == 4 * k
    assert per["16"]["total_full_blocks"] == sum(len(p) // 16 for p in prompts)
    # at B=32 the 48-token template is 1.5 blocks: only the first block is shared
    assert per["32"]["prefix"]["shareable_tokens"] == 4 * 32
    assert prefix_hit_tokens(prompts, 32) == [0, 32, 32, 32, 32]


def test_vllm_cap_on_exact_block_aligned_repeat():
    b = 16
    a = fresh(4 * b)  # 64 tokens, block aligned
    prompts = [a, a, a + fresh(1), a[:63], a[:17], a[:16]]
    # exact repeat: max_cache_hit_length = 63 -> 63 // 16 = 3 blocks = 48 tokens
    # a + 1 token: 64 // 16 = 4 blocks; a[:63]: 62 // 16 = 3; a[:17]: 1; a[:16]: 15 // 16 = 0
    assert prefix_hit_tokens(prompts, b) == [0, 48, 64, 48, 16, 0]
    res = audit_requests(prompts, [b])
    total = sum(len(p) for p in prompts)
    assert res["prefix_block_fraction"] == pytest.approx((48 + 64 + 48 + 16) / total)


def test_prefix_hit_tokens_accepts_dicts_and_workload_requests(tmp_path):
    a = fresh(32)
    path = write_workload(tmp_path / "w.jsonl", [a, a + fresh(3)])
    reqs = read_workload(path)
    assert prefix_hit_tokens(reqs, 16) == [0, 32]
    assert prefix_hit_tokens([{"prompt_token_ids": a}] * 2, 16) == [0, 16]


def test_prefix_chain_stops_at_first_miss():
    b = 8
    x, y, z = fresh(b), fresh(b), fresh(b)
    # second request shares block 0 and block 2 content but not block 1:
    # chained hashes make block 2 a miss too.
    assert prefix_hit_tokens([x + y + z + fresh(1), x + fresh(b) + z + fresh(1)], b) == [0, 8]


# ------------------------------------------------------------ (b) fixed blocks, (c) runs


def test_run_at_three_offsets_block_rule_and_within_prompt_repeat():
    b = 16
    run = fresh(4 * b)
    v = fresh(2 * b)
    prompts = [
        run,                              # first occurrence: computes
        fresh(16) + run,                  # aligned offset 16: 4 blocks shared
        fresh(7) + run + fresh(9),        # unaligned offset 7: nothing shared
        run + run,                        # all 8 blocks seen before
        v + v,                            # second copy shared within the prompt
    ]
    total = sum(len(p) for p in prompts)
    res = audit_requests(prompts, [b])
    assert res["fixed_block_fraction"] == pytest.approx((64 + 0 + 128 + 32) / total)
    # prefix: only run+run's leading 4 blocks hit (chain breaks at block 4)
    assert prefix_hit_tokens(prompts, b) == [0, 0, 0, 64, 0]
    assert res["prefix_block_fraction"] == pytest.approx(64 / total)


def test_run_at_three_offsets_run_rule_exact(sentinel_chunker):
    pieces = [fresh(5) + [SEP], fresh(9) + [SEP], fresh(3) + [SEP]]
    run = sum(pieces, [])
    y = fresh(6) + [SEP]
    prompts = [
        fresh(2) + [SEP] + run,                 # offset 3
        fresh(10) + [SEP] + run + fresh(4),     # offset 11, unique tail chunk
        fresh(30) + [SEP] + run,                # offset 31
        y + y,                                  # within-prompt repeat
    ]
    total = sum(len(p) for p in prompts)
    res = audit_requests(prompts, [16])
    assert res["runs"]["shareable_tokens"] == 2 * len(run) + len(y)
    assert res["chunk_run_fraction"] == pytest.approx((2 * len(run) + len(y)) / total)
    assert res["runs"]["shareable_runs"] == 2 * 3 + 1


def test_real_chunker_exact_repeat_and_shifted_run():
    run = rand(2000, seed=1)
    res = audit_requests([run, run, run], [16])
    assert res["chunk_run_fraction"] == pytest.approx(2 / 3)
    # shifted copies re-synchronise within ~W+m+avg tokens (dedup.hashing docs)
    prompts = [run, rand(37, seed=2) + run + rand(11, seed=3), rand(101, seed=4) + run]
    res = audit_requests(prompts, [16])
    shared = res["runs"]["shareable_tokens"]
    assert 2 * (len(run) - 400) <= shared <= 2 * len(run)


# ------------------------------------------------------------ simulation


def test_simulation_hand_computed():
    # B=4, C=2: two identical 8-token prompts (2 full blocks) for 1 step each,
    # then a unique 6-token prompt for 3 steps (holds 6, 7, 8 tokens).
    shared = ((b"a", 4), (b"b", 4))
    none = [RequestFootprint(8, 1, ()), RequestFootprint(8, 1, ()), RequestFootprint(6, 3, ())]
    pre = [RequestFootprint(8, 1, shared), RequestFootprint(8, 1, shared),
           RequestFootprint(6, 3, ((b"c", 4),))]
    s0 = simulate_kv_blocks(none, 4, 2)
    s1 = simulate_kv_blocks(pre, 4, 2)
    assert s0["num_steps"] == 4
    assert (s0["peak_logical_blocks"], s0["mean_logical_blocks"]) == (4, 2.5)
    assert (s0["peak_physical_blocks"], s0["mean_physical_blocks"]) == (4, 2.5)
    assert (s1["peak_physical_blocks"], s1["mean_physical_blocks"]) == (2, 2.0)
    assert s1["mean_dedup_ratio"] == pytest.approx((2 + 1 + 1 + 1) / 4)
    # one at a time: nothing is held concurrently, so nothing is shared
    s2 = simulate_kv_blocks(pre, 4, 1)
    assert s2["num_steps"] == 5 and s2["peak_physical_blocks"] == 2
    assert s2["mean_physical_blocks"] == s2["mean_logical_blocks"]


def test_simulation_run_rule_token_granular():
    fps = [RequestFootprint(10, 2, ((b"r", 10),)), RequestFootprint(10, 2, ((b"r", 10),))]
    s = simulate_kv_blocks(fps, 4, 2, token_granular=True)
    # step 0: logical 3+3, physical ceil(10/4)=3; step 1: logical 3+3, ceil((10+2)/4)=3
    assert s["peak_logical_blocks"] == 6 and s["peak_physical_blocks"] == 3


def test_audit_simulation_in_json(tmp_path):
    t = fresh(64)
    path = write_workload(tmp_path / "w.jsonl", [t + fresh(8) for _ in range(6)], output_len=10)
    res = audit_workload(path, [16, 32], concurrency=3)
    sim = res["per_block_size"]["16"]["simulation"]
    assert set(sim) == {"none", "prefix", "block", "run", "shared"}
    assert sim["none"]["peak_physical_blocks"] == sim["none"]["peak_logical_blocks"]
    # 72-token prompts, 10 steps: the last step holds 72+9 = 81 tokens = 6 blocks each;
    # 3 running requests share the 4 template blocks: 3*6 logical vs 4 + 3*(6-4) physical
    assert sim["prefix"]["peak_logical_blocks"] == 18
    assert sim["prefix"]["peak_physical_blocks"] == 10
    assert sim["block"]["peak_physical_blocks"] == 10
    assert res["meta"] == {"name": "t"}


# ------------------------------------------------------------ CLI and bad input


def test_cli_json_and_table(tmp_path, capsys):
    t = fresh(32)
    path = write_workload(tmp_path / "w.jsonl", [t + fresh(5), t + fresh(40)])
    assert main(["audit", str(path), "--block-size", "16", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("prefix_block_fraction", "fixed_block_fraction", "chunk_run_fraction"):
        assert 0.0 <= out[key] <= 1.0
    assert out["prefix_block_fraction"] == pytest.approx(32 / (37 + 72))
    assert set(out["per_block_size"]) == {"16", "32"}
    assert out["per_block_size"]["32"]["prefix"]["shareable_blocks"] == 1
    assert main(["audit", str(path), "--concurrency", "2"]) == 0
    text = capsys.readouterr().out
    assert "Shareable prompt tokens" in text and "KV blocks held" in text


@pytest.mark.parametrize("line, msg", [
    ("{bad json", "w.jsonl:2: bad JSON"),
    ('{"prompt_token_ids": [1], "output_len": 1}', "w.jsonl:2: missing field(s) arrival_time, session_id, source"),
    ('{"prompt_token_ids": [1, -3], "output_len": 1, "arrival_time": null, "session_id": null, "source": "x"}', "= -3 is not a non-negative int"),
    ('{"prompt_token_ids": [], "output_len": 1, "arrival_time": null, "session_id": null, "source": "x"}', "non-empty list"),
    ('{"prompt_token_ids": [1], "output_len": "3", "arrival_time": null, "session_id": null, "source": "x"}', "output_len must be"),
    ('{"prompt_token_ids": [1], "output_len": 0, "arrival_time": null, "session_id": null, "source": "x"}', "output_len must be an int >= 1"),
    ('{"prompt_token_ids": [1], "output_len": 2, "arrival_time": -1, "session_id": null, "source": "x"}', "arrival_time must be null or a finite number"),
])
def test_bad_workload_lines(tmp_path, capsys, line, msg):
    path = write_workload(tmp_path / "w.jsonl", [[1, 2, 3]])
    with path.open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(AnalysisError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        read_workload(path)
    assert main(["audit", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_missing_and_empty_workload(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such workload file" in capsys.readouterr().err
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(AnalysisError, match="workload is empty"):
        read_workload(tmp_path / "e.jsonl")


def test_bad_arguments(tmp_path, capsys):
    path = write_workload(tmp_path / "w.jsonl", [[1, 2, 3]])
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(path), "--block-size", "0"])
    assert exc.value.code == 2
    with pytest.raises(AnalysisError, match="duplicate block sizes"):
        audit_requests([[1, 2, 3]], [16, 16])
    with pytest.raises(AnalysisError, match="block size must be a positive int"):
        prefix_hit_tokens([[1, 2]], 0)
    assert main(["audit", str(path), "--run-min-len", "300", "--run-max-len", "10"]) == 2
    assert "chunk_runs rejected" in capsys.readouterr().err


def test_shared_rule_counts_a_borrowed_document_once(tmp_path):
    """Documents after different instructions: the shared rule borrows them (whole blocks
    inside each run after k tokens) and holds them once; with no recurrence it equals the
    prefix rule."""
    rng = np.random.default_rng(7)
    doc = rng.integers(3, 2000, size=640).tolist()
    prompts = [rng.integers(3, 2000, size=int(n)).tolist() + doc for n in (33, 50, 71, 90)]
    path = write_workload(tmp_path / "w.jsonl", prompts, output_len=4)
    res = audit_workload(path, [32], concurrency=4)
    r = res["per_block_size"]["32"]
    sim = r["simulation"]
    assert r["shared"]["borrowed_runs"] == 3 and r["shared"]["borrowed_tokens"] >= 3 * 480
    assert sim["shared"]["peak_physical_blocks"] < 0.5 * sim["prefix"]["peak_physical_blocks"]
    assert sim["shared"]["peak_logical_blocks"] == sim["prefix"]["peak_logical_blocks"]
    plain = write_workload(tmp_path / "p.jsonl",
                           [rng.integers(3, 2000, size=500).tolist() for _ in range(4)],
                           output_len=4)
    r2 = audit_workload(plain, [32], concurrency=4)["per_block_size"]["32"]
    assert r2["shared"]["borrowed_runs"] == 0
    assert r2["simulation"]["shared"]["peak_physical_blocks"] == \
        r2["simulation"]["prefix"]["peak_physical_blocks"]


def test_cli_k_sets_the_shared_rules_recomputed_head(tmp_path, capsys):
    """``--k`` reaches the shared rule: a larger k borrows fewer tokens of the same runs;
    a negative k is refused by name."""
    import json

    rng = np.random.default_rng(8)
    doc = rng.integers(3, 2000, size=640).tolist()
    prompts = [rng.integers(3, 2000, size=int(n)).tolist() + doc for n in (33, 50, 71, 90)]
    path = write_workload(tmp_path / "w.jsonl", prompts, output_len=4)
    borrowed = {}
    for k in (32, 128):
        capsys.readouterr()
        assert main(["audit", str(path), "--block-size", "32", "--k", str(k), "--json"]) == 0
        shared = json.loads(capsys.readouterr().out)["per_block_size"]["32"]["shared"]
        borrowed[k] = shared["borrowed_tokens"]
    assert borrowed[128] < borrowed[32]
    with pytest.raises(SystemExit) as exc:
        main(["audit", str(path), "--k", "-1"])
    assert exc.value.code == 2 and "--k: must be >= 0" in capsys.readouterr().err


def test_bad_edges_is_an_analysis_error(tmp_path):
    path = write_workload(tmp_path / "w.jsonl", [[1, 2, 3]])
    with pytest.raises(AnalysisError, match="edges must be one of slot, block, got 'slots'"):
        audit_workload(path, edges="slots")

"""experiments.quality: metrics, rules, plans, cases, summaries, make_engine (engine-free),
and the simulator's exactness on the tiny model."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from experiments.quality import metrics, plans, report, rules
from experiments.quality.cases import FLOORS, Case, _rag, _single, chat_ids, rag_sets
from experiments.quality.texts import INSTRUCTIONS, Doc, split_docs, split_of


# ------------------------------------------------------------------------- metrics
def test_metrics_by_hand():
    assert metrics.rouge_l("the cat lay on a mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert metrics.rouge_l("", "") == 1.0 and metrics.rouge_l("x", "") == 0.0
    assert metrics.logprob_delta([-1.0, -2.0], [-1.0, -1.0]) == pytest.approx(-0.5)
    assert metrics.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        metrics.top1_agreement([1], [])
    ref = {"lp": [-1.0, -2.0, -3.0], "top1": [5, 6, 7], "tokens": [5, 6, 7], "text": "a b c", "answer": "a b"}
    arm = {"lp": [-1.0, -2.5, -9.0], "top1": [5, 0, 7], "tokens": [5, 6, 8], "text": "a b d"}
    s = metrics.score(ref, arm, valid=[0, 1])
    assert s["logprob_delta"] == pytest.approx(-0.25) and s["top1_agreement"] == 0.5
    assert s["scored_positions"] == 2 and not s["exact_match"] and s["first_token_agree"]
    assert s["rougeL"] == pytest.approx(2 / 3) and s["rougeL_answer"] == pytest.approx(0.8)


def test_describe_and_paired():
    d = metrics.describe([1.0, 2.0, 3.0, None, float("nan"), 4.0])
    assert d["n"] == 4 and d["median"] == 2.5 and d["q1"] == 1.75 and d["q3"] == 3.25
    assert metrics.describe([]) == {"n": 0}
    p = metrics.paired([1.0, 2.0, None], [0.5, 2.5, 1.0])
    assert p["n"] == 2 and p["mean_diff"] == pytest.approx(0.0) and p["share_a_ge_b"] == 0.5
    lo, hi = p["ci95_mean_diff"]
    assert lo <= 0.0 <= hi


# --------------------------------------------------------------------------- rules
def test_rule_specs():
    r = rules.parse("k=16,tail=32")
    assert (r.k, r.tail, r.blend, r.contiguous) == (16, 32, 0.0, True) and r.name == "k=16,tail=32"
    b = rules.parse("k=0,blend=0.15,score=oracle")
    assert not b.contiguous and rules.parse(b.name) == b
    assert rules.parse("") == rules.Rule()
    for bad in ("k=-1", "k", "blend=2", "score=x", "foo=1"):
        with pytest.raises(ValueError, match="rule"):
            rules.parse(bad)


# --------------------------------------------------------------------------- plans
def _doc_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    doc = rng.integers(3, 5000, 400).tolist()
    head = rng.integers(3, 5000, 40).tolist()
    src = head + rng.integers(3, 5000, 25).tolist() + doc + [7, 8]
    tgt = head + rng.integers(3, 5000, 61).tolist() + doc + [7, 9, 10]
    return src, tgt


def test_plan_matches_the_planner_and_rules_shrink_it():
    src, tgt = _doc_case()
    assert plans.prefix_hit(tgt, {"s": src}) == 32           # 40 common tokens, whole blocks
    p0, p32 = plans.plan(tgt, {"s": src}, 0), plans.plan(tgt, {"s": src}, 32)
    assert p0.f > p32.f > 0.5 and p32.ranges == 2
    inj = np.flatnonzero(p32.src_pos >= 0)
    # injected tokens equal the source tokens they come from, and come from source "s"
    assert all(src[p32.src_pos[i]] == tgt[i] for i in inj) and set(p32.src_name[i] for i in inj) == {"s"}
    assert inj[0] - p32.injections[0].run_start == 32
    t = plans.plan(tgt, {"s": src}, 32, tail=64)
    assert np.sum(t.src_pos >= 0) == inj.size - 64 and t.ranges == 2     # still contiguous
    score = np.arange(len(tgt), dtype=float)
    b = plans.top_deviation(p32, score, 0.1)
    assert np.sum(b.src_pos >= 0) == inj.size - round(0.1 * inj.size)
    assert (b.src_pos[inj[-round(0.1 * inj.size):]] == -1).all()        # highest scores recomputed


def test_rules_select_and_closest():
    src, tgt = _doc_case()
    rng = np.random.default_rng(1)
    far = rng.integers(3, 5000, 120).tolist() + tgt[101:]               # another instruction
    assert rules.closest(tgt, {"far": far, "near": src}) == "near"
    p = rules.select(rules.parse("k=32,tail=16"), tgt, {"s": src})
    assert p.f == pytest.approx(plans.plan(tgt, {"s": src}, 32).f - 16 / len(tgt))
    cont = tgt[150:170]
    tf = rules.select(rules.parse("k=32,plan=tf"), tgt, {"s": src}, cont=cont)
    assert tf.src_pos.size == len(tgt) and tf.src_pos[-1] == -1 and 0 < tf.f <= plans.plan(tgt, {"s": src}, 32).f
    with pytest.raises(ValueError, match="deviation score"):
        rules.select(rules.parse("k=0,blend=0.1"), tgt, {"s": src})


# --------------------------------------------------------------------------- cases
class FakeTok:
    """Character-level stand-in for a chat tokenizer."""

    chat_template = "x"

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]

    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        sys_msg = [m["content"] for m in msgs if m["role"] == "system"] or ["default system"]
        user = [m["content"] for m in msgs if m["role"] == "user"][0]
        return f"<s>{sys_msg[0]}</s><u>{user}</u><a>"


def test_single_case_and_floors():
    tok = FakeTok()
    doc = Doc("news:1", "news", "First one. Then more text here.")
    c = _single(tok, "dev", doc, 5, 0, "dev-news-00")                  # intent "first"
    assert c.answer == "First one." and c.info["intent"] == "first" and c.info["source_intent"] == "summary"
    assert set(c.variants) == set(FLOORS) | {"same"} and c.variants["same"] == c.target and len(c.alt_sources) == len(INSTRUCTIONS["dev"]) - 1
    text = "".join(map(chr, c.target))
    assert text.startswith("<s>default system</s><u>Copy the first sentence") and doc.text in text
    assert "".join(map(chr, c.variants["ws"])) == text.replace("exactly.\n\n", "exactly. \n\n")
    assert "".join(map(chr, c.variants["sys"])).startswith("<s>You are SmolLM")
    with pytest.raises(ValueError, match="chat template"):
        chat_ids(type("T", (), {"chat_template": None})(), "x")


def test_rag_sets_move_shared_passages():
    pool = [Doc(f"passage:T{i}:{i}", "passage", f"text {i}", f"T{i}") for i in range(10)]
    for tgt, src in rag_sets(pool, 20, np.random.default_rng(0)):
        shared = [d for d in tgt if d in src]
        assert len(shared) == 2 and all(tgt.index(d) != src.index(d) for d in shared)
    c = _rag(FakeTok(), "heldout", *rag_sets(pool, 1, np.random.default_rng(0))[0],
             np.random.default_rng(0), "heldout-rag-00")
    assert c.kind == "multi-doc" and c.info["shared_docs"] == 2 and "Question:" in "".join(map(chr, c.target))


def test_splits_are_disjoint_by_topic():
    docs = [Doc(f"wiki:T{i}", "wiki", "x", f"T{i}") for i in range(50)]
    docs += [Doc(f"passage:T{i}:{i}", "passage", "y", f"T{i}") for i in range(50)]
    s = split_docs(docs, 0)
    assert s["dev"] and s["heldout"]
    assert not {d.topic for d in s["dev"]} & {d.topic for d in s["heldout"]}
    assert split_of("T3", 0) == split_of("T3", 0)


# ------------------------------------------------------------------------- reports
def test_summary_pairs_reuse_with_floors():
    rows = []
    for i in range(4):
        base = {"case_id": f"c{i}", "split": "heldout", "domain": "news"}
        rows.append({**base, "arm": "full", "tokens": [1, 2], "greedy_is_top1": 1.0})
        rows.append({**base, "arm": "floor:ws", "logprob_delta": -0.01, "top1_agreement": 1.0,
                     "rougeL": 1.0, "exact_match": True})
        rows.append({**base, "arm": "sim:k=32", "logprob_delta": -0.02 + 0.001 * i, "top1_agreement": 0.9,
                     "rougeL": 0.8, "exact_match": False, "f": 0.6, "reused": True})
    s = report.summarize(rows)["splits"]["heldout"]
    assert s["n_cases"] == 4 and s["arms"]["sim:k=32"]["f"]["median"] == 0.6
    v = s["vs_floor"]["sim:k=32"]["floor:ws"]
    assert v["logprob_delta"]["n"] == 4 and v["logprob_delta"]["mean_diff"] < 0
    md = report.markdown({"splits": {"heldout": s}, "goal_floor": "floor:ws"})
    assert "| sim:k=32 | 4 |" in md and "no (3 of 3 above)" in md


# -------------------------------------------------------------------- make_engine
def test_make_engine_raises_config_errors_at_once(monkeypatch):
    import vllm_ext

    from experiments.quality.engine import make_engine

    calls = []

    def fake(model, **kw):
        calls.append(kw)
        raise ValueError("unknown dedup mode 'shared'")

    monkeypatch.setattr(vllm_ext, "LLM", fake, raising=False)
    with pytest.raises(ValueError, match="unknown dedup mode"):
        make_engine("tiny", "shared", 256, 64, retries=5, wait_s=0)
    assert len(calls) == 1

    def flaky(model, **kw):
        calls.append(kw)
        if len(calls) < 3:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        return "engine"

    calls.clear()
    monkeypatch.setattr(vllm_ext, "LLM", flaky, raising=False)
    assert make_engine("tiny", "off", 256, 64, retries=2, wait_s=0) == "engine" and len(calls) == 3
    assert calls[0]["enable_prefix_caching"] is False

    def broken(model, **kw):
        calls.append(kw)
        raise RuntimeError("shape mismatch in layer 3")

    calls.clear()
    monkeypatch.setattr(vllm_ext, "LLM", broken, raising=False)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        make_engine("tiny", "sequence", 256, 64, {"k": 8}, retries=3, wait_s=0)
    assert len(calls) == 1 and calls[0]["dedup_options"] == {"k": 8}


def test_cli_rejects_bad_input(capsys):
    from experiments.quality.cli import make_parser

    ap = make_parser()
    with pytest.raises(SystemExit):
        ap.parse_args(["sim", "--rules", "k=x"])
    assert "bad value 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ap.parse_args(["sim", "--floors", "tabs"])
    a = ap.parse_args(["engine", "--modes", "sequence", "--k", "0", "32"])
    assert a.k == [0, 32] and a.floors == list(FLOORS)


# --------------------------------------------------------------------- simulator
def test_simulator_is_exact_for_an_identical_context(tiny_model):
    """Injecting the target's own KV (identical context) reproduces full prefill, and
    keys re-rotated from another offset match in layer 0 (position-free input)."""
    from experiments.quality.hfsim import Sim, kv_deviation
    from experiments.quality.simrun import deviation_map

    sim = Sim(tiny_model)
    rng = np.random.default_rng(3)
    doc = rng.integers(3, 2000, 300).tolist()
    tgt = rng.integers(3, 2000, 50).tolist() + doc + [5, 6]
    src = rng.integers(3, 2000, 20).tolist() + doc
    cT, lT = sim.prefill(tgt)
    T = Sim.stacked(cT)
    same = plans.Plan(np.where((np.arange(len(tgt)) >= 80) & (np.arange(len(tgt)) < 300), np.arange(len(tgt)), -1),
                      ["self"] * len(tgt), [])
    cR, lR = sim.reuse(tgt, same, {"self": T})
    assert float((lR - lT).abs().max()) < 1e-4
    ref = sim.readout(cT, lT, None, 8)
    out = sim.readout(cR, lR, ref["tokens"], 8)
    assert out["tokens"] == ref["tokens"] and metrics.score(ref, out)["logprob_delta"] == pytest.approx(0, abs=1e-4)
    p0 = plans.plan(tgt, {"source": src}, 0)
    assert p0.f > 0.4
    dk, dv = deviation_map(T, Sim.stacked(sim.prefill(src)[0]), p0, sim)
    mapped = p0.src_pos >= 0
    assert np.nanmax(dk[0, mapped]) < 1e-4 and np.nanmax(dv[0, mapped]) < 1e-4   # layer 0: position-free
    assert np.nanmean(dk[-1, mapped]) > 1e-3                                   # deeper: context
    k, v = kv_deviation(T, T, np.arange(10))
    assert k.shape == (4, 10) and float(k.max()) == 0.0


def test_planned_f_on_a_workload():
    from experiments.quality.workload_f import planned_f

    src, tgt = _doc_case()
    r = planned_f([src, tgt, tgt], rules.parse("k=32"))
    p = plans.plan(tgt, {"s": src}, 32)
    # the first request reuses nothing; the second as planned; the third is an exact prefix
    # hit up to the second's first stop and injects the rest
    assert r["requests"] == 3 and r["reused_tokens"] >= int(p.f * len(tgt))
    assert planned_f([src, tgt], rules.parse("k=32,tail=16"))["reused_tokens"] == int(p.f * len(tgt)) - 16
    with pytest.raises(ValueError, match="k and tail"):
        planned_f([src], rules.parse("k=0,blend=0.1"))


def test_guard_verdict_compares_each_mode_with_the_floor(capsys):
    import argparse

    from experiments.quality.cli import guard_verdict

    def arm(top1, lp=-0.01, f=None):
        return {"top1_agreement": {"mean": top1}, "logprob_delta": {"mean": lp},
                "f": {} if f is None else {"mean": f}}

    s = {"splits": {"heldout": {"n_cases": 5, "arms": {
        "floor:ws": arm(0.97), "sequence:k=32": arm(0.96, f=0.5), "shared:k=32": arm(0.90, f=0.4)}}}}
    args = argparse.Namespace(modes=["sequence", "shared"], guard_k=32, tolerance=0.02,
                              strict=False, out="x")
    assert guard_verdict(s, args) == 0          # reports, does not fail, by default
    out = capsys.readouterr().out
    assert "sequence  k=32" in out and "-> within" in out and "-> OUTSIDE" in out
    args.strict = True
    assert guard_verdict(s, args) == 1          # shared is 0.07 below the floor
    args.modes = ["sequence"]
    assert guard_verdict(s, args) == 0


def test_guard_rejects_a_mode_that_reuses_nothing_and_keeps_earlier_rows(tmp_path):
    from experiments.quality.cli import main

    (tmp_path / "rows.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit, match="reuse modes"):
        main(["guard", "--out", str(tmp_path), "--modes", "off"])
    assert (tmp_path / "rows.jsonl").read_text() == "{}\n"   # nothing set aside or lost

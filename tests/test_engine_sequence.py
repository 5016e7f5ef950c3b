"""Sequence mode on a real vLLM engine (tiny model).

Engines, one alive at a time: stock APC-off for reference outputs (a module-scoped
fixture, so any test also runs alone); sequence with APC off and k=0 (every reusable
token is injected); sequence with APC on, k=32, a small store budget and a step trace.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.engine

B = 32
TINY = dict(model="tiny", max_model_len=512, enforce_eager=True, seed=0)
BYTES_PER_TOKEN = 4 * 2 * 2 * 64 * 4   # tiny model: layers x (K,V) x kv_heads x head_dim x fp32


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(3, 2000, size=n).tolist()


def _greedy(llm, prompts, max_tokens=16):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _stats(llm):
    import vllm_ext

    return vllm_ext.dedup_stats(llm)


P, D, P2 = _tokens(1, 40), _tokens(2, 400), _tokens(3, 70)
A = P + D + _tokens(4, 10)
SAME_CONTEXT = [P + D + _tokens(10 + i, 12) for i in range(6)]
EXACT_ONLY = P2 + _tokens(30, 60)


@pytest.fixture(scope="module")
def ref(engines) -> dict[tuple, list[int]]:
    """Prompt -> greedy output (16 tokens) on stock vLLM without prefix caching."""
    llm = engines.get("stock-noapc", **TINY, num_gpu_blocks_override=40, dedup="off",
                      enable_prefix_caching=False)
    prompts = [A, *SAME_CONTEXT, EXACT_ONLY]
    return {tuple(p): o for p, o in zip(prompts, _greedy(llm, prompts))}


def _seq_k0(engines):
    # 30 blocks: two of the 452-token SAME_CONTEXT requests fit (15 blocks each) but
    # cannot both grow into a 16th block while decoding: the later one is preempted.
    return engines.get("seq-k0", **TINY, num_gpu_blocks_override=30, dedup="sequence",
                       enable_prefix_caching=False, dedup_options={"k": 0})


def test_run_from_identical_context_is_injected_and_output_is_exact(engines, ref):
    llm = _seq_k0(engines)
    assert _greedy(llm, [A]) == [ref[tuple(A)]]
    s0 = _stats(llm)
    out = _greedy(llm, [SAME_CONTEXT[0]])
    s1 = _stats(llm)
    assert s1["sequence_hits"] - s0["sequence_hits"] >= 1
    # the last stored chunk of A straddles its private suffix, so not all 440 shared tokens
    assert s1["sequence_tokens_reused"] - s0["sequence_tokens_reused"] >= 0.8 * 440
    assert out == [ref[tuple(SAME_CONTEXT[0])]]


def test_prompt_logprobs_requests_are_computed_not_injected(engines, ref):
    from vllm import SamplingParams

    llm = _seq_k0(engines)
    _greedy(llm, [A])  # A's runs are in the store (already, when the tests run in order)
    s0 = _stats(llm)
    out = llm.generate([{"prompt_token_ids": SAME_CONTEXT[1]}],
                       SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                                      prompt_logprobs=1), use_tqdm=False)[0]
    assert _stats(llm)["sequence_hits"] == s0["sequence_hits"]
    assert list(out.outputs[0].token_ids) == ref[tuple(SAME_CONTEXT[1])]
    assert all(lp is not None for lp in out.prompt_logprobs[1:])


def test_forced_preemption_during_planned_requests_completes_correctly(engines, ref):
    llm = _seq_k0(engines)
    s0 = _stats(llm)
    outs = _greedy(llm, SAME_CONTEXT, max_tokens=48)
    s1 = _stats(llm)
    assert s1["preemptions"] > s0["preemptions"], "30 blocks did not force preemption"
    assert s1["sequence_hits"] > s0["sequence_hits"]
    assert [o[:16] for o in outs] == [ref[tuple(p)] for p in SAME_CONTEXT]


@pytest.fixture(scope="module")
def seq_trace(tmp_path_factory):
    return tmp_path_factory.mktemp("seq") / "trace.jsonl"


def _seq_apc(engines, trace):
    return engines.get("seq-apc", **TINY, num_gpu_blocks_override=128, dedup="sequence",
                       trace=str(trace),
                       dedup_options={"k": 32, "store_bytes": 800 * BYTES_PER_TOKEN})


def test_injected_blocks_never_enter_the_prefix_cache(engines, seq_trace, ref):
    llm = _seq_apc(engines, seq_trace)
    _greedy(llm, [A])
    c = P2 + D + _tokens(20, 10)      # the document after another prefix: injected
    s0 = _stats(llm)
    _greedy(llm, [c])
    s1 = _stats(llm)
    assert s1["sequence_hits"] > s0["sequence_hits"]
    # A request sharing C's prompt up to the middle of the document: if C's injected
    # blocks had been cached, it would hit them; only blocks below C's first injection
    # stop (len(P2) + k) may be hit.
    # C's first injection stop: the first of C's chunks that A stored, plus k.
    from dedup.hashing import chunk_runs

    stored = {ch.digest for ch in chunk_runs(A)}
    run_start = next(ch.start for ch in chunk_runs(c) if ch.digest in stored)
    exact_blocks = (run_start + 32) // B * B
    e = P2 + D[:200] + _tokens(21, 10)
    polluted = (len(P2) + 200) // B * B
    assert exact_blocks < polluted  # the test can tell the two apart
    _greedy(llm, [e])
    s2 = _stats(llm)
    assert len(P2) // B * B <= s2["prefix_hits"] - s1["prefix_hits"] <= exact_blocks
    # A request sharing only the exact prefix gets exact outputs.
    assert _greedy(llm, [EXACT_ONLY]) == [ref[tuple(EXACT_ONLY)]]


def test_follower_in_the_same_batch_reuses_the_document(engines, seq_trace):
    llm = _seq_apc(engines, seq_trace)
    doc = _tokens(50, 400)
    first, follower = _tokens(51, 30) + doc + [7], _tokens(52, 45) + doc + [8]
    s0 = _stats(llm)
    p0 = _last_step(seq_trace).get("prefill_tokens", 0)
    _greedy(llm, [first, follower])            # submitted together
    s1 = _stats(llm)
    # Whether both land in the same step depends on arrival timing; either way the
    # follower must reuse the document (held until the first has computed it, see
    # test_sequence_state).
    assert s1["sequence_hits"] - s0["sequence_hits"] >= 1
    assert s1["sequence_tokens_reused"] - s0["sequence_tokens_reused"] >= 200
    last = _last_step(seq_trace)
    assert last["sequence_hits"] == s1["sequence_hits"]        # the trace shows the hits
    assert last["prefill_tokens"] - p0 < len(first) + len(follower) - 200   # not computed


def _last_step(trace) -> dict:
    lines = trace.read_text().splitlines() if trace.exists() else []
    return json.loads(lines[-1]) if lines else {}


def test_store_budget_holds_under_a_workload_ten_times_larger(engines, seq_trace):
    llm = _seq_apc(engines, seq_trace)
    budget = 800 * BYTES_PER_TOKEN
    _greedy(llm, [_tokens(100 + i, 400) for i in range(20)], max_tokens=1)
    s = _stats(llm)
    assert s["store_evictions"] > 0
    assert 0 < s["store_bytes"] <= budget
    steps = [json.loads(line) for line in seq_trace.read_text().splitlines()]
    assert max(st["store_bytes"] for st in steps) <= budget

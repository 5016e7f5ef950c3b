"""Prefix mode on a real vLLM engine (tiny model): exactness, hits, salts, collisions, bad input.

Engines are started in file order (stock APC off, stock APC on, prefix, prefix with
forced hash collisions), one alive at a time; each test uses its own random token
ranges so tests do not hit each other's cached blocks. Reference outputs come from a
module-scoped fixture, so any test also runs alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.engine

B = 32
COMMON = dict(model="tiny", num_gpu_blocks_override=32, max_model_len=512,
              enforce_eager=True, seed=0)


def _tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 2000, size=n).tolist()


def _greedy(llm, prompts, max_tokens=16, salts=None):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    for r, s in zip(reqs, salts or [None] * len(reqs)):
        if s is not None:
            r["cache_salt"] = s
    return [list(o.outputs[0].token_ids) for o in llm.generate(reqs, sp, use_tqdm=False)]


def _stats(llm):
    import vllm_ext

    return vllm_ext.dedup_stats(llm)


# Shared prefixes of block-aligned (64, 96) and unaligned (50, 77) lengths, two suffixes
# each; 8 requests x ~8 blocks each overflow the 32-block pool, forcing preemption.
EXACT_PROMPTS = [_tokens(10 + i, n) + _tokens(100 + 10 * i + j, m)
                 for i, n in enumerate([64, 96, 50, 77]) for j, m in enumerate([60, 93])]
STOCK = {"stock-noapc": dict(dedup="off", enable_prefix_caching=False),
         "stock-apc": dict(dedup="off", enable_prefix_caching=True)}


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return tmp_path_factory.mktemp("prefix") / "trace.jsonl"


def _prefix(engines, trace):
    return engines.get("prefix", **COMMON, dedup="prefix", trace=str(trace))


@pytest.fixture(scope="module")
def stock_outputs(engines):
    """Greedy outputs of EXACT_PROMPTS on stock vLLM, APC off and on."""
    out = {arm: _greedy(engines.get(arm, **COMMON, **kw), EXACT_PROMPTS, max_tokens=96)
           for arm, kw in STOCK.items()}
    for arm, outs in out.items():
        assert all(len(o) == 96 for o in outs), arm
    return out


def test_greedy_outputs_identical_across_arms_with_preemption(engines, stock_outputs, trace):
    llm = _prefix(engines, trace)
    before = _stats(llm)
    outs = _greedy(llm, EXACT_PROMPTS, max_tokens=96)
    after = _stats(llm)
    assert after["preemptions"] > before["preemptions"], "capacity did not force preemption"
    assert after["prefix_hits"] > before["prefix_hits"]
    assert after["collisions"] == 0
    assert outs == stock_outputs["stock-noapc"] == stock_outputs["stock-apc"]


def test_second_request_hits_four_verified_blocks(engines, trace):
    llm = _prefix(engines, trace)
    shared = _tokens(2000, 4 * B)
    _greedy(llm, [shared + _tokens(2001, 7)])
    before = _stats(llm)
    _greedy(llm, [shared + _tokens(2002, 9)])
    after = _stats(llm)
    assert after["prefix_hits"] - before["prefix_hits"] >= 4 * B
    assert after["verified_hits"] - before["verified_hits"] >= 4
    assert after["collisions"] == before["collisions"]


def test_cache_salt_keeps_tenants_apart(engines, trace):
    llm = _prefix(engines, trace)
    shared = _tokens(3000, 4 * B)
    _greedy(llm, [shared + [5]], salts=["tenant-a"])
    s0 = _stats(llm)
    out_b = _greedy(llm, [shared + [6]], salts=["tenant-b"])
    s1 = _stats(llm)
    assert s1["prefix_hits"] == s0["prefix_hits"], "a different salt must not share"
    out_a = _greedy(llm, [shared + [6]], salts=["tenant-a"])
    s2 = _stats(llm)
    assert s2["prefix_hits"] - s1["prefix_hits"] >= 4 * B, "the same salt must share"
    assert out_a == out_b


def _steps_after(trace, step: int) -> list[dict]:
    return [r for r in map(json.loads, trace.read_text().splitlines()) if r["step"] > step]


def test_burst_computes_shared_prefix_once(engines, trace):
    llm = _prefix(engines, trace)
    shared = _tokens(4000, 6 * B)
    before = _stats(llm)
    _greedy(llm, [shared + _tokens(4100 + i, 20) for i in range(8)], max_tokens=4)
    after = _stats(llm)
    # 8 requests, the first computes the 6 shared blocks, the 7 others hit all of them.
    assert after["prefix_hits"] - before["prefix_hits"] >= 7 * 6 * B
    assert after["verified_hits"] - before["verified_hits"] >= 7 * 6
    # While the burst runs, its 8 block tables (7 blocks each) hold the 6 shared blocks
    # once: at most 6 + 8 distinct blocks, against 8 * 7 referenced.
    steps = _steps_after(trace, before["step"])
    assert max(r["physical_blocks"] for r in steps) <= 6 + 8
    assert max(r["logical_blocks"] for r in steps) > max(r["physical_blocks"] for r in steps)


def test_forced_hash_collision_is_rejected_and_output_exact(engines, trace):
    x, y = _tokens(5000, 3 * B + 5), _tokens(5001, 3 * B + 5)
    ref = _greedy(_prefix(engines, trace), [y])
    llm = engines.get("prefix-collide", **COMMON, dedup="prefix",
                      dedup_options={"debug_collide_hashes": True})
    _greedy(llm, [x])
    before = _stats(llm)
    out = _greedy(llm, [y])
    after = _stats(llm)
    assert after["collisions"] - before["collisions"] >= 1
    assert after["prefix_hits"] == before["prefix_hits"]
    assert out == ref
    # Identical tokens under colliding hashes still share (verification passes).
    _greedy(llm, [x])
    assert _stats(llm)["prefix_hits"] - after["prefix_hits"] >= 3 * B


@pytest.mark.parametrize("prompt,needle", [([], "empty"), ([7] * 2000, "maximum context length")])
def test_bad_prompt_is_refused_and_engine_keeps_serving(engines, prompt, needle):
    llm = engines.get("prefix-collide", **COMMON, dedup="prefix",
                      dedup_options={"debug_collide_hashes": True})
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError)) as err:
        _greedy(llm, [prompt])
    assert needle in str(err.value).lower()
    assert len(_greedy(llm, [_tokens(6000, 40)])[0]) == 16


def test_unknown_dedup_mode_is_a_clear_error():
    import vllm_ext

    with pytest.raises(ValueError, match="unknown dedup mode 'bogus'"):
        vllm_ext.LLM("tiny", dedup="bogus")
    with pytest.raises(ValueError, match="do not pass enable_prefix_caching=False"):
        vllm_ext.LLM("tiny", dedup="prefix", enable_prefix_caching=False)

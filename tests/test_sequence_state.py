"""SequenceState without an engine: planning, same-step holds, pins, exact limits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vllm_ext.sequence import SequenceState

B = 32


def _req(rid, tokens):
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens, num_computed_tokens=0,
                           sampling_params=SimpleNamespace(prompt_logprobs=None))


def _tokens(seed, n):
    return np.random.default_rng(seed).integers(3, 2000, size=n).tolist()


def _schedule(state, req, n):
    """What the scheduler does for a request given a budget of ``n`` tokens this step."""
    n = min(n, len(req.prompt_token_ids) - req.num_computed_tokens)
    n = state.clip(req, req.num_computed_tokens, n)
    req.num_computed_tokens += n
    blocks = list(range(100, 100 + (len(req.prompt_token_ids) + B) // B))
    state.after_schedule(req, n, blocks)
    return n


def test_same_step_follower_is_held_once_then_reuses():
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    doc = _tokens(1, 400)
    first, follower = _req("a", _tokens(2, 30) + doc + [5]), _req("b", _tokens(3, 45) + doc + [6])
    # One step: vLLM admits (clips) both inside schedule(), then kvdedup post-processes.
    n = state.clip(first, 0, len(first.prompt_token_ids))
    assert n == len(first.prompt_token_ids)
    assert state.clip(follower, 0, 476) == 0           # same step: wait for the capture
    assert state.held == 1
    first.num_computed_tokens = n
    state.after_schedule(first, n, list(range(100, 114)))
    cmds = state.take_commands()                          # end of step
    assert len(cmds.captures) > 3
    n = state.clip(follower, 0, 476)                      # next step: planned, stops at run
    plan = state.plans["b"]
    assert plan.injections and n == plan.injections[0].stop
    assert plan.exact_limit == plan.injections[0].stop
    assert state.exact_limit("b") == plan.exact_limit and state.exact_limit("a") is None


def test_no_hold_without_enough_shared_tokens_and_pins_are_released():
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    a, b = _req("a", _tokens(4, 300)), _req("b", _tokens(5, 300))
    _schedule(state, a, 2048)
    assert state.clip(b, 0, 300) == 300 and state.held == 0
    state.take_commands()
    doc = a.prompt_token_ids[:250]
    c = _req("c", _tokens(6, 40) + doc + [9])
    stop = state.clip(c, 0, len(c.prompt_token_ids))
    pinned = list(state.plans["c"].pinned)
    assert pinned and stop < len(c.prompt_token_ids)
    state.finish("c")
    assert all(state.index.get(d).refs == 0 for d in pinned)

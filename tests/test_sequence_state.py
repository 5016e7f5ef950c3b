"""SequenceState without an engine: planning, follower holds, pins, exact limits."""

from __future__ import annotations

import numpy as np

from vllm_ext.sequence import SequenceState

from tests.fakes import request as _req
from tests.fakes import tokens as _tokens

B = 32


def _schedule(state, req, n):
    """What the scheduler does for a request given a budget of ``n`` tokens this step."""
    n = min(n, len(req.prompt_token_ids) - req.num_computed_tokens)
    n = state.clip(req, req.num_computed_tokens, n)
    req.num_computed_tokens += n
    blocks = list(range(100, 100 + (len(req.prompt_token_ids) + B) // B))
    state.after_schedule(req, n, blocks)
    return n


def test_follower_is_held_over_the_owners_prefill_then_reuses():
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    doc = _tokens(1, 400)
    first, follower = _req("a", _tokens(2, 30) + doc + [5]), _req("b", _tokens(3, 45) + doc + [6])
    state.begin_step([])
    # Step 1: the owner is admitted with a 200-token budget; its step ends on a chunk end.
    n = _schedule(state, first, 200)
    assert 0 < n <= 200 and n in {c.end for c in state.plans["a"].chunks}
    assert state.should_hold(follower, 0)                 # same step: owner computes the doc
    assert state.held == 1
    assert state.take_commands().captures
    # Step 2: the owner is still in its prefill: the follower keeps waiting (counted once).
    state.begin_step([first])
    assert state.should_hold(follower, 0) and state.held == 1
    _schedule(state, first, 2048)
    state.take_commands()
    # Step 3: everything the owner computed is captured: the follower is planned.
    state.begin_step([first])
    assert not state.should_hold(follower, 0)
    n = state.clip(follower, 0, 476)
    plan = state.plans["b"]
    assert plan.injections and n == plan.injections[0].stop
    assert plan.injections[0].num_tokens > 300
    assert plan.exact_limit == plan.injections[0].stop
    assert state.exact_limit("b") == plan.exact_limit and state.exact_limit("a") is None


def test_admission_that_cannot_fit_its_jump_is_refused_and_preemption_replans():
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    doc = _tokens(7, 600)
    owner = _req("a", _tokens(8, 20) + doc + [1])
    _schedule(state, owner, 2048)
    state.take_commands()
    state.begin_step([])
    f = _req("b", _tokens(9, 40) + doc + [2])
    need = -(-(40 + 600) // B)
    assert state.clip(f, 0, 500, free_blocks=need - 1) == 0
    assert "b" not in state.plans                         # dropped: nothing stays pinned
    assert all(state.index.get(d).refs == 0 for d in state.index)
    stop = state.clip(f, 0, 500, free_blocks=need)
    assert "b" in state.plans and stop == state.plans["b"].injections[0].stop
    state.drop("b")                                      # preemption
    assert "b" not in state.plans and all(state.index.get(d).refs == 0 for d in state.index)
    assert state.clip(f, 0, 500) == stop                 # re-admission plans afresh


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


def test_tenants_never_reuse_each_others_runs():
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=0)
    doc = _tokens(11, 500)
    _schedule(state, _req("a", _tokens(12, 20) + doc + [1], salt="tenant-a"), 2048)
    state.take_commands()
    state.begin_step([])
    other = _req("b", _tokens(13, 30) + doc + [2], salt="tenant-b")
    assert not state.should_hold(other, 0)
    state.clip(other, 0, 531)
    assert state.plans["b"].injections == []
    same = _req("c", _tokens(14, 30) + doc + [3], salt="tenant-a")
    state.clip(same, 0, 531)
    assert state.plans["c"].injections


def test_reuse_order_puts_requests_that_can_reuse_now_first_and_nothing_starves():
    from vllm_ext import sequence as seqmod

    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    doc_a, doc_b = _tokens(1, 400), _tokens(2, 400)
    owner = _req("a0", _tokens(3, 30) + doc_a + [5])
    state.begin_step([])
    _schedule(state, owner, 2048)                     # doc_a's chunks are indexed now
    state.take_commands()
    b0 = _req("b0", _tokens(4, 30) + doc_b + [5])      # fresh document, first in line
    a1 = _req("a1", _tokens(5, 50) + doc_a + [6])      # can borrow doc_a now
    b1 = _req("b1", _tokens(6, 50) + doc_b + [6])      # doc_b is not indexed yet
    a2 = _req("a2", _tokens(7, 20) + doc_a + [7])
    resumed = _req("p", _tokens(8, 100))
    resumed.num_computed_tokens = 64                    # vLLM resumes it: keeps the front
    assert state.reusable_now(a1) > 300 and state.reusable_now(b0) == 0
    order = state.admission_order([resumed, b0, a1, b1, a2], lambda r: r.num_computed_tokens > 0)
    assert [r.request_id for r in order] == ["p", "a1", "a2", "b0", "b1"]
    assert state.bypassed == {"b0": 1, "b1": 1}
    # vLLM's order where nothing can be reused, and with order="fcfs"
    assert state.admission_order([b0, b1], lambda r: False) is None
    fcfs = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32,
                         order="fcfs")
    assert fcfs.admission_order([b0, a1], lambda r: False) is None
    # a request pushed back MAX_BYPASS times goes first
    state.bypassed["b0"] = seqmod.MAX_BYPASS
    order = state.admission_order([a1, b1, b0], lambda r: False)
    assert [r.request_id for r in order] == ["b0", "a1", "b1"]
    # only the first ORDER_WINDOW requests are reordered; finishing forgets the count
    many = [_req(f"x{i}", _tokens(100 + i, 40)) for i in range(seqmod.ORDER_WINDOW)]
    assert state.admission_order(many + [a1], lambda r: False) is None
    state.finish("b0")
    assert "b0" not in state.bypassed
    # prompt-logprob requests are never planned, so they do not jump ahead
    a1.sampling_params.prompt_logprobs = 1
    assert state.reusable_now(a1) == 0


def test_scheduler_rewrites_only_the_window_of_vllms_fcfs_queue():
    from types import SimpleNamespace

    from vllm.v1.core.sched.request_queue import FCFSRequestQueue
    from vllm.v1.request import RequestStatus

    from vllm_ext import sequence as seqmod
    from vllm_ext.scheduler import DedupScheduler

    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=32)
    doc = _tokens(1, 400)
    owner = _req("a0", _tokens(3, 30) + doc + [5])
    state.begin_step([])
    _schedule(state, owner, 2048)
    state.take_commands()
    fresh = [_req(f"x{i}", _tokens(100 + i, 40)) for i in range(seqmod.ORDER_WINDOW - 1)]
    follower = _req("a1", _tokens(5, 50) + doc + [6])
    tail = [_req(f"t{i}", _tokens(200 + i, 40)) for i in range(3)]
    for r in fresh + [follower] + tail:
        r.status = RequestStatus.WAITING
    queue = FCFSRequestQueue(fresh + [follower] + tail)
    sched = SimpleNamespace(waiting=queue)
    DedupScheduler._reorder_waiting(sched, state)
    assert sched.waiting is queue                      # rewritten in place
    assert [r.request_id for r in queue] == \
        ["a1"] + [r.request_id for r in fresh] + [r.request_id for r in tail]


def test_back_to_back_runs_are_jumped_together():
    """k = 0: a run that starts where the previous one ends (here the follower's own exact
    start, then the document from its source) is jumped in the same step; before, no step
    stopped between the two runs and the second one was computed, not reused."""
    state = SequenceState(block_size=B, bytes_per_token=8, store_bytes=10**8, k=0)
    doc = _tokens(11, 400)
    src = _req("s", _tokens(12, 30) + doc + [5])
    _schedule(state, src, 2048)
    state.take_commands()
    state.begin_step([])
    tgt = _req("t", _tokens(13, 45) + doc + [6])
    while tgt.num_computed_tokens < len(tgt.prompt_token_ids):
        to = state.jump(tgt)
        if to is not None:
            tgt.num_computed_tokens = to
        _schedule(state, tgt, 2048)
        state.take_commands()
        state.begin_step([tgt])
    state.finish("t")
    x = _req("x", tgt.prompt_token_ids + _tokens(14, 40))
    _schedule(state, x, 2048)
    inj = list(state.plans["x"].injections)
    assert len(inj) == 2 and inj[0].end == inj[1].stop    # back to back
    assert x.num_computed_tokens == inj[0].stop
    hits, reused = state.hits, state.tokens_reused
    state.take_commands()
    assert state.jump(x) == inj[1].end
    x.num_computed_tokens = inj[1].end
    _schedule(state, x, 2048)
    assert len(state.take_commands().injects) == 2
    assert state.hits == hits + 2
    assert state.tokens_reused == reused + inj[0].num_tokens + inj[1].num_tokens

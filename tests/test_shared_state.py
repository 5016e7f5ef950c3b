"""SharedState without an engine: borrows to the slot (or to whole blocks), placeholders
only over blocks the reader computes nothing in, source holds released on every path, pool
reuse evicting chunks, tenants apart, recurring chunks protected."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import request as _req
from tests.fakes import tokens as _tokens
from vllm_ext.sequence import MAX_BYPASS
from vllm_ext.shared import SharedState

B = 32


class FakePool:
    """Reference counts of a block pool, and per-request tables (placeholders = None)."""

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.tables: dict[str, list[int | None]] = {}

    def hold(self, ids):
        for i in ids:
            self.refs[i] = self.refs.get(i, 0) + 1

    def release(self, ids):
        for i in ids:
            assert self.refs.get(i, 0) > 0, f"release of unheld block {i}"
            self.refs[i] -= 1

    def num_evictable(self, ids):
        return sum(self.refs.get(i, 0) == 0 for i in ids)

    def place_borrow(self, rid, start, end):   # VerifiedKVCacheManager.place_borrow's rule
        t = self.tables.setdefault(rid, [])
        if not start // B <= len(t) <= -(-start // B):
            return False
        t.extend([None] * max(0, end // B - len(t)))
        return True

    def held(self) -> int:
        return sum(self.refs.values())

    def num_request_blocks(self, rid):
        return len(self.tables.get(rid, ()))

    free = 10_000  # what num_free_blocks reports (tests set it)

    def num_free_blocks(self):
        return self.free

    usable = 10_000  # what num_usable_blocks reports (tests set it)

    def num_usable_blocks(self):
        return self.usable




class Engine:
    """Steps requests through a SharedState the way DedupScheduler does."""

    def __init__(self, k=32, min_inject=32, admission="group", edges="slot"):
        self.pool = FakePool()
        self.state = SharedState(block_size=B, bytes_per_token=8, k=k, pool=self.pool,
                                 min_inject=min_inject, admission=admission, edges=edges)
        self.next_block = 1

    def step(self, req, budget=4096):
        st, pool = self.state, self.pool
        st.begin_step([])
        to = st.jump(req)          # the scheduler applies the jump
        if to is not None:
            req.num_computed_tokens = to
        n = min(budget, len(req.prompt_token_ids) - req.num_computed_tokens)
        n = st.clip(req, req.num_computed_tokens, n)
        req.num_computed_tokens += n
        t = pool.tables.setdefault(req.request_id, [])
        while len(t) * B < req.num_computed_tokens:     # vLLM allocates what is computed
            t.append(self.next_block)
            self.next_block += 1
        st.after_schedule(req, n, [b if b is not None else 0 for b in t])
        return n

    def run(self, req):
        while req.num_computed_tokens < len(req.prompt_token_ids):
            self.step(req)


def test_bad_options_are_refused_at_start():
    with pytest.raises(ValueError, match="edges must be one of slot, block, got 'blocks'"):
        Engine(edges="blocks")
    with pytest.raises(ValueError, match="admission must be group or gate"):
        Engine(admission="late")


def test_block_edges_borrow_the_whole_blocks_inside_the_run_and_count_the_edges():
    e = Engine(edges="block")
    doc = _tokens(1, 600)
    a, b = _req("a", _tokens(2, 37) + doc + [5]), _req("b", _tokens(3, 50) + doc + [6])
    e.run(a)
    e.step(b)                                   # planned, computes up to the first stop
    plan = e.state.plans["b"]
    (bp,) = plan.injections
    assert bp.stop % B == 0 and bp.end % B == 0 and bp.stop == b.num_computed_tokens
    assert bp.stop >= 50 + 32 and bp.num_tokens >= 400
    assert bp.delta == 50 - 37 and bp.src == bp.stop - bp.delta
    # the source blocks are a's blocks of the source positions, and they are held
    a_blocks = e.pool.tables["a"]
    first = bp.src // B
    assert bp.blocks == a_blocks[first:first + len(bp.blocks)]
    assert all(e.pool.refs[x] == 1 for x in bp.blocks)
    e.run(b)
    assert e.state.hits == 1 and e.state.tokens_reused == bp.num_tokens
    assert e.state.edge_tokens == bp.edge_tokens > 0
    assert None in e.pool.tables["b"]
    assert e.state.exact_limit("b") == bp.stop


def test_slot_edges_borrow_the_run_to_the_slot_and_own_only_the_edge_blocks():
    """The borrow starts at the run's k-th token and ends at the planned end, mid-block;
    the reader's blocks holding those positions are its own (it computes tokens in them),
    every block in between is a placeholder, and nothing at the edges is computed."""
    e = Engine(k=32)
    doc = _tokens(1, 600)
    a, b = _req("a", _tokens(2, 37) + doc + [5]), _req("b", _tokens(3, 55) + doc + [6])
    e.run(a)
    (inj,) = e.state._injections(_req("probe", b.prompt_token_ids), 0)
    e.step(b)
    (bp,) = e.state.plans["b"].injections
    assert (bp.stop, bp.end) == (inj.stop, inj.end) == (b.num_computed_tokens, bp.end)
    assert bp.stop % B and bp.end % B                       # this case is misaligned at both
    assert bp.holes == bp.end // B - -(-bp.stop // B) and bp.edge_tokens == 0
    assert bp.edge_slots == bp.num_tokens - bp.holes * B > 0
    first = bp.src // B                                     # source blocks of every position
    assert bp.blocks == e.pool.tables["a"][first:(bp.src + bp.num_tokens - 1) // B + 1]
    e.run(b)
    t = e.pool.tables["b"]
    assert [i for i, x in enumerate(t) if x is None] == \
        list(range(-(-bp.stop // B), bp.end // B))
    assert t[bp.stop // B] is not None and t[bp.end // B] is not None
    assert e.state.tokens_reused == bp.num_tokens and e.state.edge_tokens == 0
    assert e.state.edge_slots == bp.edge_slots
    assert e.state.exact_limit("b") == bp.stop
    block = Engine(k=32, edges="block")                      # the same run, rounded inwards
    block.run(_req("a", a.prompt_token_ids))
    block.run(_req("b", b.prompt_token_ids))
    assert block.state.tokens_reused + block.state.edge_tokens == bp.num_tokens
    assert block.state.tokens_reused < bp.num_tokens


def test_back_to_back_slot_borrows_share_the_block_they_meet_in():
    """With k = 0 two runs from different sources meet mid-block: that block holds only
    borrowed positions, so it is a placeholder too, and nothing is computed between. (``c``
    computes d2 first, so ``a`` borrows it and is the source of d1 and the seam only.)"""
    e = Engine(k=0)
    d1, d2 = _tokens(70, 300), _tokens(71, 300)
    e.run(_req("c", _tokens(73, 45) + d2 + [6]))
    e.run(_req("a", _tokens(72, 20) + d1 + d2 + [5]))
    b = _req("b", _tokens(74, 33) + d1 + d2 + [7])
    e.run(b)
    runs = e.state.active["b"]
    assert len(runs) == 2 and runs[0].end == runs[1].stop
    t = e.pool.tables["b"]
    holes = [i for i, x in enumerate(t) if x is None]
    assert holes == list(range(-(-runs[0].stop // B), runs[1].end // B))
    assert sum(r.holes for r in runs) == len(holes)


def test_every_step_after_the_jump_sends_the_borrow_with_the_last_token_slot():
    e = Engine()
    doc = _tokens(4, 500)
    a, b = _req("a", _tokens(5, 20) + doc + [5]), _req("b", _tokens(6, 70) + doc + _tokens(7, 40))
    e.run(a)
    e.state.take_borrows()
    e.step(b)
    assert e.state.take_borrows() == []          # before the jump nothing is borrowed
    e.step(b)
    (bw,) = e.state.take_borrows()
    pos = b.num_computed_tokens - 1
    assert bw.slot == e.pool.tables["b"][pos // B] * B + pos % B
    (seg,) = bw.segments
    assert seg[0] == e.state.active["b"][0].stop and seg[2] == e.state.active["b"][0].delta


def test_holds_are_released_on_finish_and_on_preemption_then_replanned():
    e = Engine()
    doc = _tokens(8, 500)
    a, b = _req("a", _tokens(9, 30) + doc + [5]), _req("b", _tokens(10, 60) + doc + [6])
    e.run(a)
    e.step(b)
    assert e.pool.held() > 0
    e.state.drop("b")                            # preemption
    assert e.pool.held() == 0 and "b" not in e.state.plans
    b.num_computed_tokens = 0
    e.pool.tables.pop("b")
    e.run(b)
    assert e.state.hits >= 1      # the document again (and b's own earlier chunks)
    e.state.finish("b")
    assert e.pool.held() == 0


def test_pool_reuse_evicts_the_chunks_that_lived_in_the_block():
    e = Engine()
    doc = _tokens(11, 500)
    a = _req("a", _tokens(12, 30) + doc + [5])
    e.run(a)
    n = len(e.state.index)
    victim = e.pool.tables["a"][5]
    e.state.on_reuse([victim])
    assert e.state.shared_evictions >= 1 and len(e.state.index) < n
    assert all(victim not in e.state.index.get(d).payload.blocks for d in e.state.index)
    assert victim not in e.state.block_chunks
    # a later request does not borrow across the hole
    b = _req("b", _tokens(13, 61) + doc + [6])
    e.run(b)
    for bp in e.state.active.get("b", []):
        assert victim not in bp.blocks


def test_tenants_never_borrow_each_others_runs():
    e = Engine()
    doc = _tokens(14, 500)
    a = _req("a", _tokens(15, 30) + doc + [5], salt="tenant-a")
    b = _req("b", _tokens(16, 45) + doc + [6], salt="tenant-b")
    c = _req("c", _tokens(17, 45) + doc + [6], salt="tenant-a")
    e.run(a)
    e.run(b)
    assert "b" not in e.state.active and e.pool.held() == 0
    e.run(c)
    assert e.state.active.get("c")


def test_chunks_seen_in_two_prompts_are_protected():
    e = Engine()
    doc = _tokens(18, 500)
    a = _req("a", _tokens(19, 30) + doc + [5])
    e.run(a)
    blk = e.pool.tables["a"][4]
    assert not e.state.protected(blk)
    e.state.chunks(_req("b", _tokens(20, 44) + doc + [7]))   # a second prompt contains it
    assert e.state.protected(blk)


@pytest.mark.parametrize("admission", ["gate", "group"])
def test_admission_counts_the_free_sources_it_takes(admission):
    e = Engine(admission=admission)
    doc = _tokens(21, 800)
    a = _req("a", _tokens(22, 30) + doc + [5])
    e.run(a)                                       # a is decoding (running)
    b = _req("b", _tokens(23, 60) + doc + [6])
    e.state.begin_step([a])
    assert e.state.clip(b, 0, 4096, free_blocks=3) == 0   # ~25 free source blocks needed
    assert "b" not in e.state.plans and e.pool.held() == 0
    e.state.begin_step([a])
    assert e.state.clip(b, 0, 4096, free_blocks=1000) > 0
    assert e.pool.held() > 0


def test_promised_blocks_of_running_prompts_are_kept_free():
    """A running request's remaining prompt blocks and one decode block each are promised:
    a new request is admitted only if its own blocks (+1) fit beside them."""
    e = Engine()
    c = _req("c", _tokens(30, 2000))
    e.step(c, budget=512)                          # ~16 of its 63 blocks allocated
    rest = 63 - len(e.pool.tables["c"])
    assert 0 < rest < 63
    d = _req("d", _tokens(31, 300))                # 10 blocks, + 1 for decode
    e.state.begin_step([c])
    assert e.state.promised() == rest + 1
    assert e.state.clip(d, 0, 4096, free_blocks=rest + 1 + 10) == 0
    e.state.begin_step([c])
    assert e.state.clip(d, 0, 4096, free_blocks=rest + 1 + 11) > 0
    gate = Engine(admission="gate")                # the gate alone passes it
    gate.step(_req("c", _tokens(30, 2000)), budget=512)
    gate.state.begin_step([c])
    assert gate.state.clip(_req("d", _tokens(31, 300)), 0, 4096, free_blocks=rest + 11) > 0


def test_nothing_running_admits_whatever_the_promise():
    e = Engine()
    e.state.begin_step([])
    assert e.state.clip(_req("d", _tokens(31, 300)), 0, 4096, free_blocks=2) > 0


def _group(e, doc):
    """A running request and three waiting prompts that contain ``doc``."""
    x = _req("x", _tokens(40, 100))
    e.run(x)
    waiting = [_req(f"f{i}", _tokens(41 + i, 60 + 10 * i) + doc + [i]) for i in range(3)]
    return x, waiting


def test_group_hold_waits_until_a_first_occurrence_and_its_followers_fit():
    e = Engine()
    doc = _tokens(50, 800)
    x, waiting = _group(e, doc)
    f1 = waiting[0]
    e.pool.free = 30       # f1 alone (28 blocks) fits, not with its two followers
    e.state.begin_step([x], waiting)
    assert e.state.should_hold(f1, 0)
    assert e.state.stats()["shared_group_held"] == 1
    e.pool.free = 60
    e.state.begin_step([x], waiting)
    assert not e.state.should_hold(f1, 0)
    e.pool.free = 30       # a prompt without followers is never group-held
    e.state.begin_step([x], [f1, _req("y", _tokens(60, 900))])
    assert not e.state.should_hold(f1, 0)


def test_group_hold_caps_a_group_that_is_not_a_documents_readers():
    """Followers that each contain a 200-token piece of the first occurrence's 800-token
    run borrow fewer blocks than it holds (a RAG prompt's passages): the group goes once
    half the usable pool is free."""
    e = Engine()
    doc = _tokens(52, 800)
    x = _req("x", _tokens(40, 100))
    e.run(x)
    waiting = [_req("f0", _tokens(41, 60) + doc + [0])] + [
        _req(f"r{i}", _tokens(70 + i, 40) + doc[200 * i:200 * i + 200] + [i]) for i in (1, 2)]
    e.pool.usable = 40                             # half: 20
    e.state.begin_step([x], waiting)
    e.pool.free = 20 + e.state.promised() - 1
    assert e.state.should_hold(waiting[0], 0)
    e.pool.free += 1
    e.state.begin_step([x], waiting)
    assert not e.state.should_hold(waiting[0], 0)


def test_group_hold_waits_for_a_whole_document_group_larger_than_half_the_pool():
    """A document and its readers (the source's 28 blocks and its two followers' own: 50
    in all) larger than half the pool waits for all of it; its held steps count only
    while the first occurrence alone (28 blocks) would fit."""
    e = Engine()
    doc = _tokens(52, 800)
    x, waiting = _group(e, doc)
    e.pool.usable = 54                             # half: 27
    e.state.begin_step([x], waiting)
    promised = e.state.promised()
    e.pool.free = 28 + promised                    # over half the pool: not enough
    assert e.state.should_hold(waiting[0], 0)
    e.pool.free = 49 + promised
    e.state.begin_step([x], waiting)
    assert e.state.should_hold(waiting[0], 0)
    e.pool.free = 50 + promised
    e.state.begin_step([x], waiting)
    assert not e.state.should_hold(waiting[0], 0)
    e.pool.free = 20 + promised                    # it alone does not fit: not counted
    for _ in range(MAX_BYPASS + 5):
        e.state.begin_step([x], waiting)
        assert e.state.should_hold(waiting[0], 0)
    assert e.state.group_steps["f0"] == 2          # the two holds above, where it fit
    e.pool.free = 30 + promised                    # it alone fits: counted
    for _ in range(MAX_BYPASS - 2):
        e.state.begin_step([x], waiting)
        assert e.state.should_hold(waiting[0], 0)
    e.state.begin_step([x], waiting)
    assert not e.state.should_hold(waiting[0], 0)  # counted MAX_BYPASS steps: it goes
    e.pool.usable = 49                             # the group no longer fits the pool:
    e.state.finish("f0")                           # capped at half (24)
    e.state.begin_step([x], waiting)
    e.pool.free = 24 + promised
    assert not e.state.should_hold(waiting[0], 0)


def test_group_hold_never_starves():
    e = Engine()
    doc = _tokens(51, 800)
    x, waiting = _group(e, doc)
    e.pool.free = 30
    e.state.begin_step([], waiting)                # nothing running: nothing would free
    assert not e.state.should_hold(waiting[0], 0)
    for _ in range(MAX_BYPASS):
        e.state.begin_step([x], waiting)
        assert e.state.should_hold(waiting[0], 0)
    e.state.begin_step([x], waiting)
    assert not e.state.should_hold(waiting[0], 0)  # held MAX_BYPASS steps: it goes
    gate = Engine(admission="gate")
    x, waiting = _group(gate, doc)
    gate.pool.free = 30
    gate.state.begin_step([x], waiting)
    assert not gate.state.should_hold(waiting[0], 0)


def test_admission_option_is_checked():
    with pytest.raises(ValueError, match="admission must be group or gate"):
        SharedState(block_size=B, bytes_per_token=8, k=32, pool=FakePool(), admission="x")


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_leaves_no_hold_behind(seed):
    rng = np.random.default_rng(seed)
    e = Engine()
    docs = [_tokens(100 + i, int(rng.integers(100, 600))) for i in range(4)]
    live = []
    for i in range(40):
        r = _req(f"r{i}", _tokens(1000 + i, int(rng.integers(5, 90))) + docs[rng.integers(4)]
                 + _tokens(2000 + i, 7), salt=None if rng.random() < 0.8 else "x")
        live.append(r)
        for q in list(live):
            e.step(q, budget=int(rng.integers(16, 300)))
            if q.num_computed_tokens >= len(q.prompt_token_ids) or rng.random() < 0.05:
                e.state.finish(q.request_id)     # finished or aborted
                live.remove(q)
        free = [b for b in range(1, e.next_block) if e.pool.refs.get(b, 0) == 0]
        if free and rng.random() < 0.2:          # the pool reuses a free block
            e.state.on_reuse([int(rng.choice(free))])
    for q in live:
        e.state.finish(q.request_id)
    assert e.pool.held() == 0 and not e.state.holds and not e.state.active
    assert e.state.hits > 0

"""dedup.planner: which prompt tokens reuse stored chunks, where prefill stops, what is injected."""

from __future__ import annotations

import numpy as np
import pytest

from dedup.hashing import Chunk, token_digest
from dedup.index import DedupIndex
from dedup.planner import ChunkSource, Injection, borrow_range, placeholder_blocks, plan_injections


def _chunks(tokens, cuts):
    """Chunks at given cut points (a stand-in for chunk_runs with known boundaries)."""
    bounds = [0, *cuts, len(tokens)]
    return [Chunk(a, b, token_digest(tokens[a:b])) for a, b in zip(bounds, bounds[1:])]


def _store(index, tokens, chunks, source):
    for c in chunks:
        index.insert(c.digest, np.asarray(tokens[c.start:c.end]), ChunkSource(source, c.start), 1)


rng = np.random.default_rng(0)
DOC = rng.integers(3, 1000, 200).tolist()


def test_document_at_another_offset_is_one_run_with_k_recomputed():
    idx = DedupIndex(10**6)
    src = [1] * 30 + DOC + [2] * 5
    _store(idx, src, _chunks(src, [30, 80, 130, 180, 230]), "A")
    new = [9] * 70 + DOC + [4] * 10
    chunks = _chunks(new, [70, 120, 170, 220, 270])
    (inj,) = plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=16, min_inject=8)
    assert (inj.run_start, inj.stop, inj.end) == (70, 86, 270)
    assert sum(p.length for p in inj.pieces) == 270 - 86
    assert all(p.dst - p.src == 40 for p in inj.pieces)  # moved from offset 30 to 70
    assert inj.pieces[0].offset == 16


def test_runs_split_where_sources_are_not_contiguous_and_collisions_are_not_used():
    idx = DedupIndex(10**6)
    a, b = DOC[:100], DOC[100:]
    _store(idx, a, _chunks(a, [50]), "A")
    _store(idx, b, _chunks(b, [50]), "B")
    # a forged entry: right digest, wrong tokens -> collision, never used
    forged = [5] * 40
    idx.insert(token_digest(forged), np.asarray([6] * 40), ChunkSource("X", 0), 1)
    new = [7] * 10 + a + b + forged + [8] * 5
    chunks = _chunks(new, [10, 60, 110, 160, 210, 250])
    injs = plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=0, min_inject=8)
    assert [(i.stop, i.end) for i in injs] == [(10, 110), (110, 210)]
    assert idx.stats()["collisions"] == 1


def test_start_and_last_token_bounds():
    idx = DedupIndex(10**6)
    _store(idx, DOC, _chunks(DOC, [50, 100, 150]), "A")
    new = list(DOC)  # the whole prompt is stored; the last token must still be computed
    chunks = _chunks(new, [50, 100, 150])
    (inj,) = plan_injections(new, chunks, idx, start=50, max_end=len(new) - 1, k=0, min_inject=8)
    assert inj.stop == 51 and inj.end == len(new) - 1  # the last chunk, cut at max_end
    assert inj.pieces[-1].length == 49 and sum(p.length for p in inj.pieces) == 199 - 51


def test_short_runs_are_not_worth_a_stop():
    idx = DedupIndex(10**6)
    _store(idx, DOC, _chunks(DOC, [20]), "A")
    new = [3] * 50 + DOC[:20] + [4] * 50
    chunks = _chunks(new, [50, 70])
    assert plan_injections(new, chunks, idx, start=0, max_end=119, k=0, min_inject=32) == []


def test_negative_k_is_refused():
    with pytest.raises(ValueError, match="k must be >= 0"):
        plan_injections(DOC, [], DedupIndex(10), start=0, max_end=10, k=-1)


def test_chunk_straddling_an_exact_prefix_hit_stays_in_its_run():
    idx = DedupIndex(10**6)
    _store(idx, DOC, _chunks(DOC, [50, 100, 150]), "A")
    chunks = _chunks(DOC, [50, 100, 150])
    # 70 tokens already computed exactly (e.g. a prefix hit ending inside chunk [50, 100))
    (inj,) = plan_injections(DOC, chunks, idx, start=70, max_end=199, k=32, min_inject=8)
    assert (inj.run_start, inj.stop, inj.end) == (50, 82, 199)
    (inj0,) = plan_injections(DOC, chunks, idx, start=70, max_end=199, k=0, min_inject=8)
    assert inj0.stop == 71 and inj0.pieces[0].offset == 21



def test_tail_recomputes_the_end_of_each_run():
    idx = DedupIndex(10**6)
    src = [1] * 30 + DOC + [2] * 5
    _store(idx, src, _chunks(src, [30, 80, 130, 180, 230]), "A")
    new = [9] * 70 + DOC + [4] * 10
    chunks = _chunks(new, [70, 120, 170, 220, 270])
    base = plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=16, min_inject=8)
    (inj,) = plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=16, min_inject=8, tail=24)
    assert (inj.run_start, inj.stop, inj.end) == (70, 86, base[0].end - 24)
    assert sum(p.length for p in inj.pieces) == inj.end - inj.stop
    assert max(p.dst + p.length for p in inj.pieces) == inj.end
    # a tail that leaves less than min_inject drops the run; negative tails are refused
    assert plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=16, min_inject=8,
                           tail=inj.end - inj.stop + 24 - 7) == []
    with pytest.raises(ValueError, match="tail"):
        plan_injections(new, chunks, idx, start=0, max_end=len(new) - 1, k=16, tail=-1)


def _inj(stop, end):
    return Injection(run_start=stop - 32, stop=stop, end=end)


def test_borrow_range_slot_edges_keep_the_run_and_block_edges_round_inwards():
    assert borrow_range(_inj(45, 300), 32, 32, "slot") == (45, 300)
    assert borrow_range(_inj(45, 300), 32, 32, "block") == (64, 288)
    assert borrow_range(_inj(45, 70), 32, 32, "slot") is None        # under min_tokens
    assert borrow_range(_inj(45, 90), 32, 32, "slot") == (45, 90)    # no whole block in it
    assert borrow_range(_inj(45, 90), 32, 32, "block") is None
    with pytest.raises(ValueError, match="edges"):
        borrow_range(_inj(45, 300), 32, 32, "slots")


def test_placeholder_blocks_count_blocks_no_computed_position_falls_in():
    B = 32
    assert placeholder_blocks([(45, 300)], B) == [300 // B - 2]      # blocks 2..8
    assert placeholder_blocks([(64, 288)], B) == [7]
    assert placeholder_blocks([(45, 90)], B) == [0]
    # back to back at 300 (block 9 holds only borrowed positions if the second run
    # passes its end); with tokens computed between, the next run starts its own block
    assert placeholder_blocks([(45, 300), (300, 500)], B) == [7, 500 // B - 9]
    assert placeholder_blocks([(45, 300), (301, 500)], B) == [7, 500 // B - 10]
    assert placeholder_blocks([(45, 300), (300, 310)], B) == [7, 0]

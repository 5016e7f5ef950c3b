"""Tests for dedup.index.DedupIndex."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dedup.hashing as hashing
from dedup.index import DedupIndex


def d(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_insert_lookup_verified_hit_and_miss():
    idx = DedupIndex(1000)
    assert idx.insert(d(1), [1, 2, 3], "payload-1", 100)
    assert d(1) in idx and len(idx) == 1 and idx.bytes_held == 100
    e = idx.lookup(d(1), np.array([1, 2, 3]))
    assert e is not None and e.payload == "payload-1" and e.nbytes == 100
    assert idx.lookup(d(2), [1, 2, 3]) is None
    s = idx.stats()
    assert s["lookups"] == 2 and s["hits"] == 1 and s["verified_hits"] == 1
    assert s["collisions"] == 0 and s["insertions"] == 1 and s["entries"] == 1
    assert s["bytes_held"] == 100


def test_stored_tokens_are_a_readonly_copy():
    idx = DedupIndex(10)
    toks = np.array([4, 5, 6], dtype=np.int32)
    idx.insert(d(1), toks, None, 1)
    toks[0] = 99
    assert idx.lookup(d(1), [4, 5, 6]) is not None
    with pytest.raises(ValueError):
        idx.get(d(1)).tokens[0] = 1


def test_forced_collision_is_rejected_and_counted(monkeypatch):
    """Monkeypatch the digest so two different token lists share a digest."""
    monkeypatch.setattr(hashing.xxhash, "xxh3_128_digest", lambda data, seed=0: b"\x00" * 16)
    a, b = [1, 2, 3, 4], [9, 9, 9, 9]
    da, db = hashing.token_digest(a), hashing.token_digest(b)
    assert da == db  # forced collision
    monkeypatch.undo()
    assert xxhash.xxh3_128_digest(b"x") != b"\x00" * 16

    idx = DedupIndex(1000)
    assert idx.insert(da, a, "A", 10)
    assert idx.lookup(db, b) is None  # never shared
    assert idx.insert(db, b, "B", 10) is False  # never overwrites
    assert idx.lookup(da, a).payload == "A"
    s = idx.stats()
    assert s["collisions"] == 2 and s["hits"] == 2 and s["verified_hits"] == 1
    assert len(idx) == 1


def test_reinsert_same_tokens_keeps_payload():
    idx = DedupIndex(100)
    assert idx.insert(d(1), [1], "first", 10)
    assert idx.insert(d(1), [1], "second", 10)
    assert idx.get(d(1)).payload == "first"
    assert idx.stats()["insertions"] == 1 and idx.bytes_held == 10


def test_lru_eviction_order_and_callback():
    evicted = []
    idx = DedupIndex(300, on_evict=lambda dg, p: evicted.append((dg, p)))
    for i in range(3):
        assert idx.insert(d(i), [i], f"p{i}", 100)
    assert idx.lookup(d(0), [0]) is not None  # 0 becomes MRU: order 1, 2, 0
    assert idx.lru_order() == [d(1), d(2), d(0)]
    assert idx.insert(d(3), [3], "p3", 100)
    assert evicted == [(d(1), "p1")]
    assert idx.insert(d(4), [4], "p4", 200)
    assert evicted == [(d(1), "p1"), (d(2), "p2"), (d(0), "p0")]
    assert set(idx) == {d(3), d(4)}
    assert idx.stats()["evictions"] == 3 and idx.bytes_held == 300
    idx.check_invariants()


def test_pinned_entries_survive_and_insert_fails_cleanly():
    evicted = []
    idx = DedupIndex(300, on_evict=lambda dg, p: evicted.append(dg))
    for i in range(3):
        idx.insert(d(i), [i], i, 100)
    idx.acquire(d(0))
    idx.acquire(d(1))
    idx.acquire(d(1))
    # needs 200 free, only 100 unpinned: refuse without evicting anything
    assert idx.insert(d(9), [9], 9, 200) is False
    assert evicted == [] and len(idx) == 3
    assert idx.insert(d(9), [9], 9, 100)
    assert evicted == [d(2)]
    idx.acquire(d(9))
    assert idx.release(d(1)) == 1
    assert idx.insert(d(10), [10], 10, 100) is False  # d(1) still pinned once
    assert idx.release(d(9)) == 0
    assert idx.release(d(1)) == 0  # d(1) is now the MRU unpinned entry
    assert idx.insert(d(10), [10], 10, 100)
    assert evicted == [d(2), d(9)]  # d(9) released earlier => LRU
    assert d(0) in idx and d(1) in idx
    idx.check_invariants()


def test_too_large_item_refused():
    idx = DedupIndex(100)
    assert idx.insert(d(1), [1], None, 101) is False
    assert idx.insert(d(1), [1], None, 100) is True
    assert len(idx) == 1


def test_remove_acquire_release_errors():
    idx = DedupIndex(100)
    idx.insert(d(1), [1], "x", 10)
    idx.acquire(d(1))
    with pytest.raises(ValueError, match="pinned"):
        idx.remove(d(1))
    idx.release(d(1))
    with pytest.raises(ValueError, match="ref count"):
        idx.release(d(1))
    assert idx.remove(d(1)).payload == "x"
    assert len(idx) == 0 and idx.bytes_held == 0 and idx.token_bytes == 0
    with pytest.raises(KeyError):
        idx.acquire(d(1))
    with pytest.raises(KeyError):
        idx.remove(d(1))


@pytest.mark.parametrize("budget", [-1, 1.5, "10", None])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget_bytes"):
        DedupIndex(budget)


def test_bad_insert_args():
    idx = DedupIndex(100)
    with pytest.raises(ValueError, match="nbytes"):
        idx.insert(d(1), [1], None, -1)
    with pytest.raises(ValueError, match="tokens"):
        idx.insert(d(1), [1, -2], None, 1)
    with pytest.raises(ValueError, match="tokens"):
        idx.lookup(d(1), [0.5])
    with pytest.raises(ValueError, match="digest"):
        idx.insert("abc", [1], None, 1)


def test_random_operations_keep_invariants():
    rng = random.Random(1234)
    evicted: list[bytes] = []
    idx = DedupIndex(1000, on_evict=lambda dg, p: evicted.append(dg))
    refs: dict[bytes, int] = {}
    for _ in range(4000):
        op = rng.random()
        k = d(rng.randrange(40))
        if op < 0.5:
            before = set(idx)
            ok = idx.insert(k, [rng.randrange(3)], None, rng.randrange(0, 400))
            if not ok:
                assert set(idx) == before or k in before
        elif op < 0.7 and k in idx:
            idx.acquire(k)
            refs[k] = refs.get(k, 0) + 1
        elif op < 0.9 and refs.get(k):
            idx.release(k)
            refs[k] -= 1
        else:
            e = idx.get(k)
            if e is not None:
                idx.lookup(k, e.tokens)
        assert idx.bytes_held <= 1000
        for key, r in refs.items():
            if r:
                assert key in idx and idx.get(key).refs == r
    idx.check_invariants()
    assert len(evicted) == idx.stats()["evictions"] > 0


class IndexMachine(RuleBasedStateMachine):
    """Stateful model check against a simple reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = 500
        self.evicted: list[bytes] = []
        self.idx = DedupIndex(self.budget, on_evict=lambda dg, p: self.evicted.append(dg))
        self.model: dict[bytes, tuple[int, int]] = {}  # digest -> (nbytes, refs)
        self.order: list[bytes] = []  # unpinned, LRU first

    @rule(k=st.integers(0, 15), n=st.integers(0, 300))
    def insert(self, k, n):
        key = d(k)
        self.evicted.clear()
        ok = self.idx.insert(key, [k], None, n)
        if key in self.model:
            assert ok
            if key in self.order:
                self.order.remove(key)
                self.order.append(key)
            return
        held = sum(v[0] for v in self.model.values())
        free_able = sum(self.model[o][0] for o in self.order)
        fits = n <= self.budget and held + n - self.budget <= free_able
        assert ok == fits
        if ok:
            expect = []
            while held + n > self.budget:
                victim = self.order.pop(0)
                held -= self.model.pop(victim)[0]
                expect.append(victim)
            assert self.evicted == expect
            self.model[key] = (n, 0)
            self.order.append(key)
        else:
            assert self.evicted == []

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def acquire(self, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.idx.acquire(key)
        n, r = self.model[key]
        self.model[key] = (n, r + 1)
        if key in self.order:
            self.order.remove(key)

    @precondition(lambda self: any(r for _, r in self.model.values()))
    @rule(data=st.data())
    def release(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, v in self.model.items() if v[1])))
        self.idx.release(key)
        n, r = self.model[key]
        self.model[key] = (n, r - 1)
        if r == 1:
            self.order.append(key)

    @rule(k=st.integers(0, 15))
    def lookup(self, k):
        key = d(k)
        e = self.idx.lookup(key, [k])
        assert (e is not None) == (key in self.model)
        if key in self.order:
            self.order.remove(key)
            self.order.append(key)

    @invariant()
    def consistent(self):
        self.idx.check_invariants()
        assert self.idx.bytes_held <= self.budget
        assert set(self.idx) == set(self.model)
        assert self.idx.lru_order() == self.order


IndexMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
TestIndexMachine = IndexMachine.TestCase

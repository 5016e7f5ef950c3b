"""The sequence-mode worker store without an engine: faults are counted, never raised.

Fake attention layers write keys/values into a plain ``[slots, heads, dim]`` cache, the
way ``unified_kv_cache_update`` calls ``do_kv_cache_update`` for each layer."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_ext.kv_store import WorkerKVStore
from vllm_ext.rope import RotaryParams

B, H, D = 32, 2, 64


def _layers(n=2, slots=256):
    def write(layer, key, value, kv_cache, slot_mapping):
        kv_cache[0, slot_mapping] = key
        kv_cache[1, slot_mapping] = value

    out = {}
    for i in range(n):
        impl = SimpleNamespace(do_kv_cache_update=write)
        out[f"l{i}"] = SimpleNamespace(impl=impl, kv_cache=torch.zeros(2, slots, H, D))
    return out


def _step(store, layers, slots, captures=(), injects=()):
    store.begin_step([], list(injects), list(captures))
    key = torch.randn(len(slots), H, D)
    for layer in layers.values():
        layer.impl.do_kv_cache_update(layer, key, key + 1, layer.kv_cache,
                                      torch.tensor(slots))
    store.end_step()
    return key


def test_capture_then_inject_round_trips_with_zero_delta():
    layers = _layers()
    store = WorkerKVStore(RotaryParams(D, 1e4), B)
    store.install(layers)
    key = _step(store, layers, list(range(40)), captures=[(b"c", list(range(8, 24)), 8)])
    store.begin_step([], [(list(range(100, 116)), [(b"c", 0, 16, 0)])], [])
    for layer in layers.values():
        assert torch.equal(layer.kv_cache[0, 100:116], key[8:24])
    assert store.take_failed_blocks() == set()


def test_capture_outside_the_step_and_inject_of_a_missing_chunk_are_faults():
    layers = _layers()
    store = WorkerKVStore(RotaryParams(D, 1e4), B)
    store.install(layers)
    _step(store, layers, list(range(40)), captures=[(b"gone", list(range(30, 60)), 30)])
    assert store.faults["capture_not_in_step"] >= 1 and b"gone" not in store.k
    store.begin_step([], [(list(range(64, 96)), [(b"gone", 0, 32, 5)])], [])
    assert store.faults["inject_missing_chunk"] == 1
    assert store.take_failed_blocks() == {2}
    assert store.take_failed_blocks() == set()

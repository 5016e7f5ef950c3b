"""Key re-rotation on the path production uses: the worker store captures keys through a
layer's KV write and injects them at another position with ``rope.rotation`` and
``rope.rotate``, exactly as ``WorkerKVStore._inject`` does in sequence mode."""

from __future__ import annotations

import pytest
import torch

from vllm_ext.kv_store import WorkerKVStore
from vllm_ext.rope import RotaryParams, UnsupportedPositionalEncoding, rerotate, rotate, rotation

N = 48


@pytest.fixture(scope="module")
def tiny_hf(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _layer0_keys(model, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Post-RoPE layer-0 keys [n, kv_heads, head_dim], computed the way the model does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m, cfg = model.model, model.config
    with torch.no_grad():
        h = m.layers[0].input_layernorm(m.embed_tokens(torch.tensor([tokens])))
        k = m.layers[0].self_attn.k_proj(h).view(1, len(tokens), -1, cfg.head_dim).transpose(1, 2)
        cos, sin = m.rotary_emb(h, torch.tensor([positions]))
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k[0].transpose(0, 1)


class _Impl:
    """A backend whose KV write stores plain keys and values (slot-indexed)."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        kv_cache[0, slot_mapping] = key
        kv_cache[1, slot_mapping] = value


class _Layer:
    def __init__(self, heads: int, head_dim: int, slots: int = 1024) -> None:
        self.impl = _Impl()
        self.kv_cache = torch.zeros(2, slots, heads, head_dim)


def _store(params, keys: dict[str, torch.Tensor], digest=b"d"):
    """A store with one chunk captured from ``keys`` (layer name -> [n, heads, dim]) at
    slots 0..n-1, values ``keys + 1``, through each layer's wrapped KV write."""
    layers = {name: _Layer(*k.shape[1:]) for name, k in keys.items()}
    store = WorkerKVStore(params, block_size=32)
    store.install(layers)
    n = next(iter(keys.values())).shape[0]
    store.begin_step([], [], [(digest, list(range(n)), 0)])
    for name, layer in layers.items():
        layer.impl.do_kv_cache_update(layer, keys[name], keys[name] + 1, layer.kv_cache,
                                      torch.arange(n))
    store.end_step()
    return store, layers


def _inject(store, pieces, at: int = 500):
    n = sum(p[2] for p in pieces)
    store.begin_step([], [(list(range(at, at + n)), pieces)], [])
    store.end_step()
    return slice(at, at + n)


@pytest.mark.parametrize("delta", [1, 37, 500, -20])
def test_injected_layer0_keys_match_keys_computed_at_the_new_position(tiny_hf, delta):
    params = RotaryParams.from_hf_config(tiny_hf.config)
    tokens = torch.randint(3, 2000, (N,), generator=torch.Generator().manual_seed(0)).tolist()
    p0 = 100
    at_p = _layer0_keys(tiny_hf, tokens, list(range(p0, p0 + N)))
    at_new = _layer0_keys(tiny_hf, tokens, list(range(p0 + delta, p0 + delta + N)))
    store, layers = _store(params, {"l0": at_p})
    where = _inject(store, [(b"d", 0, N, delta)])
    moved, values = layers["l0"].kv_cache[0, where], layers["l0"].kv_cache[1, where]
    assert (moved - at_new).norm() / at_new.norm() < 1e-5
    # Without re-rotation the keys are far off (the test can fail).
    assert (at_p - at_new).norm() / at_new.norm() > 0.05
    assert torch.equal(values, at_p + 1)  # values are position-free: copied as stored


def test_pieces_with_their_own_deltas_match_one_piece_at_a_time():
    params = RotaryParams(head_dim=64, theta=10000.0)
    k = torch.randn(N, 2, 64, generator=torch.Generator().manual_seed(1))
    store, layers = _store(params, {"l0": k})
    cache = layers["l0"].kv_cache[0]
    both = _inject(store, [(b"d", 0, 20, 7), (b"d", 20, 28, -3)], at=200)
    first = _inject(store, [(b"d", 0, 20, 7)], at=300)
    second = _inject(store, [(b"d", 20, 28, -3)], at=400)
    assert torch.equal(cache[both], torch.cat([cache[first], cache[second]]))
    # rope.rerotate (the kernels' torch reference) agrees with the store's path
    assert torch.allclose(cache[both], rerotate(k, torch.tensor([7] * 20 + [-3] * 28), params),
                          atol=1e-6)
    # a zero delta next to a non-zero one leaves those keys bit-identical
    mixed = _inject(store, [(b"d", 0, 10, 0), (b"d", 10, 5, 9)], at=600)
    assert torch.equal(cache[mixed][:10], k[:10])
    # no delta at all: the stored keys are written unchanged
    assert torch.equal(cache[_inject(store, [(b"d", 0, N, 0)], at=700)], k)


def test_every_layer_is_rotated_and_written_through_its_own_write():
    params = RotaryParams(head_dim=64, theta=10000.0)
    g = torch.Generator().manual_seed(2)
    keys = {f"l{i}": torch.randn(N, 2, 64, generator=g) for i in range(3)}
    store, layers = _store(params, keys)
    where = _inject(store, [(b"d", 0, N, 11)])
    cos, sin = rotation(11, N, params)
    for name, layer in layers.items():
        assert torch.allclose(layer.kv_cache[0, where], rotate(keys[name], cos, sin), atol=1e-6)


def test_rotation_by_minus_delta_undoes_delta():
    params = RotaryParams(head_dim=64, theta=100000.0)
    k = torch.randn(5, 2, 64)
    d = torch.tensor([0, 1, 2, 3, 400])
    there = rotate(k, *rotation(d, 5, params))
    assert torch.allclose(rotate(there, *rotation(-d, 5, params)), k, atol=1e-5)


def test_smollm2_theta_is_read_from_the_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, rope_theta=100000.0)
    assert RotaryParams.from_hf_config(cfg).theta == 100000.0


@pytest.mark.parametrize("change,needle", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "scaled RoPE"),
    (dict(partial_rotary_factor=0.5), "partial rotary"),
])
def test_unsupported_rope_variants_are_refused(change, needle):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, **change)
    with pytest.raises(UnsupportedPositionalEncoding, match=needle):
        RotaryParams.from_hf_config(cfg)


def test_non_llama_models_are_refused():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedPositionalEncoding, match="not handled"):
        RotaryParams.from_hf_config(GPT2Config())

"""Key re-rotation: keys computed at position p and re-rotated by d equal keys computed at p + d."""

from __future__ import annotations

import pytest
import torch

from vllm_ext.rope import RotaryParams, UnsupportedPositionalEncoding, rerotate


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


@pytest.mark.parametrize("delta", [1, 37, 500, -20])
def test_rerotated_layer0_keys_match_keys_at_new_position(tiny_hf, delta):
    params = RotaryParams.from_hf_config(tiny_hf.config)
    tokens = torch.randint(3, 2000, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    p0 = 100
    at_p = _layer0_keys(tiny_hf, tokens, list(range(p0, p0 + 48)))
    at_new = _layer0_keys(tiny_hf, tokens, list(range(p0 + delta, p0 + delta + 48)))
    moved = rerotate(at_p, delta, params)
    rel = (moved - at_new).norm() / at_new.norm()
    assert rel < 1e-5, rel
    # Without re-rotation the keys are far off (the test can fail).
    assert (at_p - at_new).norm() / at_new.norm() > 0.05


def test_rerotation_accepts_per_token_deltas(tiny_hf):
    params = RotaryParams.from_hf_config(tiny_hf.config)
    k = torch.randn(5, 2, params.head_dim)
    d = torch.tensor([0, 1, 2, 3, 4])
    out = rerotate(k, d, params)
    for i in range(5):
        assert torch.allclose(out[i], rerotate(k[i:i + 1], int(d[i]), params)[0], atol=1e-6)
    assert torch.allclose(rerotate(rerotate(k, 7, params), -7, params), k, atol=1e-5)


def test_rerotation_of_all_layers_at_once_matches_layer_by_layer(tiny_hf):
    """The store re-rotates ``[layers, n, heads, head_dim]`` in one call."""
    params = RotaryParams.from_hf_config(tiny_hf.config)
    k = torch.randn(3, 6, 2, params.head_dim)
    d = torch.tensor([5, 5, 5, -2, -2, 0])
    out = rerotate(k, d, params)
    for layer in range(3):
        assert torch.equal(out[layer], rerotate(k[layer], d, params))
    assert torch.equal(out[:, 5], k[:, 5])  # a zero delta leaves keys bit-identical


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

"""Re-rotating cached keys to new positions (RoPE), for sequence mode.

vLLM 0.32's Llama applies ``rotary_emb(positions, q, k)`` before the attention layer writes
the KV cache (``model_executor/models/llama.py: LlamaAttention.forward``), so cached keys
are post-RoPE. A key computed at position p and reused at p + d is rotated by d * inv_freq
on each (x_i, x_{i + rot/2}) pair (neox layout, ``inv_freq = 1 / theta^(2i/rot)`` as in
``model_executor/layers/rotary_embedding/base.py``); values are position-free.

``WorkerKVStore._inject`` (``vllm_ext.kv_store``) computes ``rotation`` once per injection
and applies ``rotate`` layer by layer. Only plain RoPE over the whole head is handled. Partial rotary, scaled RoPE (linear,
dynamic, yarn, llama3, ...) and non-neox layouts are refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedPositionalEncoding(ValueError):
    pass


@dataclass(frozen=True)
class RotaryParams:
    head_dim: int
    theta: float

    @classmethod
    def from_hf_config(cls, cfg) -> "RotaryParams":
        """Read the rotary settings of a HF config; refuse what re-rotation does not cover."""
        arch = (getattr(cfg, "architectures", None) or ["?"])[0]
        if getattr(cfg, "model_type", "") not in ("llama", "qwen2", "mistral", "qwen3"):
            raise UnsupportedPositionalEncoding(
                f"sequence mode re-rotates neox-style RoPE keys of Llama-family models; "
                f"{arch} (model_type={getattr(cfg, 'model_type', None)!r}) is not handled")
        params = dict(getattr(cfg, "rope_parameters", None) or {})
        scaling = getattr(cfg, "rope_scaling", None) or {}
        rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type not in (None, "default"):
            raise UnsupportedPositionalEncoding(
                f"sequence mode does not handle scaled RoPE ({rope_type!r}) of {arch}")
        if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise UnsupportedPositionalEncoding(f"partial rotary embeddings of {arch} "
                                                "are not handled")
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
        if theta is None:
            raise UnsupportedPositionalEncoding(f"{arch} config has no rope_theta")
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(head_dim=int(head_dim), theta=float(theta))

    def inv_freq(self) -> torch.Tensor:
        i = torch.arange(0, self.head_dim, 2, dtype=torch.float64)
        return 1.0 / (self.theta ** (i / self.head_dim))


def rotation(delta: torch.Tensor | int, n: int, params: RotaryParams):
    """``(cos, sin)``, each ``[n, 1, head_dim/2]`` float32, of the angle ``delta *
    inv_freq`` (computed in float64) for ``n`` tokens (``delta``: an int or ``[n]``)."""
    d = torch.as_tensor(delta).to("cpu", torch.float64).reshape(-1)
    if d.numel() == 1:
        d = d.expand(n)
    angle = d[:, None] * params.inv_freq()[None, :]           # [n, head_dim/2]
    return (torch.cos(angle).to(torch.float32)[:, None, :],
            torch.sin(angle).to(torch.float32)[:, None, :])


def rotate(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 keys ``[..., n, heads, head_dim]`` turned by ``(cos, sin)`` (neox pairs
    ``(x_i, x_{i + half})``), written into ``out`` (float32, same shape) when given."""
    half = keys.shape[-1] // 2
    x1, x2 = keys[..., :half], keys[..., half:]
    if out is None:
        out = torch.empty_like(keys)
    torch.mul(x1, cos, out=out[..., :half]).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out[..., half:]).addcmul_(x1, sin)
    return out


def rerotate(keys: torch.Tensor, delta: torch.Tensor | int, params: RotaryParams) -> torch.Tensor:
    """Keys ``[..., n, heads, head_dim]`` rotated at positions p, returned as if rotated
    at p + delta (``delta``: an int or ``[n]`` integer tensor; leading dims, e.g. layers,
    share it), in ``keys.dtype``: ``rotation`` then ``rotate``, as the store does per layer
    (the torch reference of ``vllm_ext.kernels`` uses it)."""
    cos, sin = rotation(delta, keys.shape[-3], params)
    return rotate(keys.to(torch.float32), cos.to(keys.device), sin.to(keys.device)) \
        .to(keys.dtype)

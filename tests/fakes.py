"""Stand-ins shared by the engine-free tests: scheduler-side requests and random tokens."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def request(rid: str, tokens: list[int], salt: str | None = None) -> SimpleNamespace:
    """The attributes of a vLLM ``Request`` that sequence and shared state read."""
    return SimpleNamespace(request_id=rid, prompt_token_ids=tokens, num_computed_tokens=0,
                           sampling_params=SimpleNamespace(prompt_logprobs=None),
                           cache_salt=salt, lora_request=None)


def tokens(seed: int, n: int) -> list[int]:
    """``n`` random token ids in [3, 2000), reproducible by ``seed``."""
    return np.random.default_rng(seed).integers(3, 2000, size=n).tolist()

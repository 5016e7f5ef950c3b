"""Request block hasher backed by ``dedup.hashing.block_hashes`` (vLLM 0.32).

Extends: ``vllm.v1.core.kv_cache_utils.get_request_block_hasher`` (the function vLLM's
``EngineCore`` builds and every ``Request`` calls as ``request._block_hasher`` whenever
tokens are appended, see ``Request.update_block_hashes``).

Same chaining semantics as vLLM: one hash per full block, block i's hash covers every
token of blocks 0..i, so identical prefixes share and nothing else does. The per-request
salt is vLLM's ``cache_salt`` (plus the LoRA name), so tenants never share a block.
Requests with multimodal inputs keep vLLM's own hasher: their block keys include image
hashes that token ids alone do not carry.
"""

from __future__ import annotations

from collections.abc import Callable

from dedup.hashing import block_hashes

from .tenant import tenant_key
from .version import check_vllm_version

check_vllm_version()


def make_request_block_hasher(block_size: int, ignore_tokens: bool = False) -> Callable:
    """A drop-in for vLLM's request block hasher: returns the hashes of the request's
    full blocks that are not in ``request.block_hashes`` yet.

    ``ignore_tokens`` is for tests only: every token is hashed as 0, so any two prompts
    of the same length collide block for block and only verification keeps them apart.
    """

    def request_block_hasher(request) -> list[bytes]:
        start = len(request.block_hashes) * block_size
        if start + block_size > request.num_tokens:
            return []
        parent = request.block_hashes[-1] if request.block_hashes else None
        tokens = request.all_token_ids[start:]
        if ignore_tokens:
            tokens = [0] * len(tokens)
        return block_hashes(tokens, block_size, salt=tenant_key(request), parent=parent)

    return request_block_hasher


def adopt_request(request, hasher: Callable) -> bool:
    """Switch ``request`` to ``hasher`` and rehash it from scratch (before any lookup).
    Returns False, leaving vLLM's hashes, for multimodal requests."""
    if request.mm_features:
        return False
    request._block_hasher = hasher
    request.block_hashes = []
    request.block_hashes.extend(hasher(request))
    return True

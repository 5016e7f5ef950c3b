"""Tenant keys: the namespace a request's cached KV lives in (engine-free).

A request's tenant is its ``cache_salt`` plus its LoRA adapter name. Prefix blocks
(``vllm_ext.hasher``, ``vllm_ext.kv_manager``) and sequence-mode chunks
(``vllm_ext.sequence``) are keyed by it, so a tenant never reuses, or learns of, another
tenant's KV. Imports neither vLLM nor torch: it reads two attributes of the request it is
given (``vllm_ext.contract`` lists them).
"""

from __future__ import annotations


def tenant_key(request) -> bytes:
    """``b""`` for the default tenant, else ``salt NUL lora_name`` encoded (never empty)."""
    salt = request.cache_salt or ""
    lora = request.lora_request.lora_name if request.lora_request is not None else ""
    return f"{salt}\x00{lora}".encode() if (salt or lora) else b""

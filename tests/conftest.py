"""Shared fixtures: one vLLM engine alive at a time, reused across tests."""

from __future__ import annotations

import pytest

from vllm_ext.launch import apply_cpu_env

apply_cpu_env()  # as vllm_ext.LLM and kvdedup serve do; engines started directly inherit it


class EnginePool:
    """Keeps at most one engine alive; asking for another configuration stops the current one."""

    def __init__(self) -> None:
        self.key = None
        self.llm = None

    def get(self, key: str, **kwargs):
        if key != self.key:
            self.close()
            import vllm_ext

            self.llm = vllm_ext.LLM(**kwargs)
            self.key = key
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            import vllm_ext

            vllm_ext.shutdown(self.llm)
        self.llm, self.key = None, None


@pytest.fixture(scope="session")
def engines():
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def tiny_model():
    from vllm_ext.models import ensure_model

    return str(ensure_model("tiny"))

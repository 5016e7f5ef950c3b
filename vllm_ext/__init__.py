"""kvdedup's vLLM integration (vLLM 0.32, out of tree): the only package that imports vLLM.

Public API (imported lazily so ``import vllm_ext`` stays cheap and engine-free):
``LLM(model, dedup="prefix", ...)`` -> ``vllm.LLM``; ``dedup_stats(llm)`` -> dict;
``shutdown(llm)``; ``engine_kwargs(dedup, ...)``; ``resolve_model(name)``;
``SamplingParams`` (vLLM's, re-exported so drivers need not import vLLM themselves).
"""

_EXPORTS = {"LLM": "launch", "dedup_stats": "launch", "shutdown": "launch", "engine_kwargs": "launch",
            "DEDUP_MODES": "launch", "resolve_model": "models", "ensure_model": "models"}

__all__ = [*_EXPORTS, "SamplingParams"]


def __getattr__(name):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name == "SamplingParams":
        return importlib.import_module("vllm").SamplingParams
    raise AttributeError(name)

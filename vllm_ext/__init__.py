"""kvdedup's vLLM integration (vLLM 0.32, out of tree).

Public API (imported lazily so ``import vllm_ext`` stays cheap):
``LLM(model, dedup="prefix", ...)`` -> ``vllm.LLM``; ``dedup_stats(llm)`` -> dict;
``engine_kwargs(dedup, ...)``; ``resolve_model(name)``.
"""

_EXPORTS = {"LLM": "launch", "dedup_stats": "launch", "shutdown": "launch", "engine_kwargs": "launch",
            "DEDUP_MODES": "launch", "resolve_model": "models", "ensure_model": "models"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(name)

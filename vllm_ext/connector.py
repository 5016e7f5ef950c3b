"""kvdedup's KV connector (vLLM 0.32, ``KVConnectorBase_V1``, experimental upstream API).

Load it out of tree with ``--kv-transfer-config '{"kv_connector": "DedupConnector",
"kv_connector_module_path": "vllm_ext.connector", "kv_role": "kv_both",
"kv_connector_extra_config": {"mode": "prefix"}}'`` (``vllm_ext.launch`` builds this).

In ``prefix`` mode it moves no KV: sharing happens inside vLLM's block pool, verified by
``DedupScheduler``, which also puts each step's ``StepStats`` in
``SchedulerStats.kv_connector_stats["kvdedup"]``. The connector class is how vLLM's loggers
read that dict: ``build_kv_connector_stats`` and
``build_prom_metrics`` (extend the classmethods of the same names) turn it into the log
line and the ``kvdedup_*`` Prometheus series on ``/metrics``. In the default multi-process
engine this object exists once per process role (scheduler side, worker side); per-step
data travels only through ``KVConnectorMetadata``, never module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from .metrics import COUNTERS
from .version import check_vllm_version

check_vllm_version()

GAUGES = ("logical_blocks", "physical_blocks", "dedup_ratio", "bytes_saved", "num_running",
          "store_bytes", "store_entries", "borrowed_blocks", "shared_bytes_saved",
          "held_source_blocks")


@dataclass
class DedupConnectorStats(KVConnectorStats):
    """``data = {"kvdedup": <StepStats dict>}``; aggregating keeps the newest snapshot
    (counters inside are cumulative, gauges are point-in-time)."""

    data: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        mine, theirs = self.data.get("kvdedup"), other.data.get("kvdedup")
        if theirs and (not mine or theirs["step"] >= mine["step"]):
            self.data = dict(other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        s = self.data.get("kvdedup") or {}
        q = s.get("prefix_queries", 0)
        return {"logical_blocks": s.get("logical_blocks", 0),
                "physical_blocks": s.get("physical_blocks", 0),
                "dedup_ratio": s.get("dedup_ratio", 1.0),
                "prefix_hit_rate": round(s.get("prefix_hits", 0) / q, 4) if q else 0.0,
                "verified_hits": s.get("verified_hits", 0),
                "collisions": s.get("collisions", 0),
                "sequence_hits": s.get("sequence_hits", 0),
                "borrowed_blocks": s.get("borrowed_blocks", 0)}

    def is_empty(self) -> bool:
        return not self.data.get("kvdedup")


class DedupPromMetrics(KVConnectorPromMetrics):
    """``kvdedup_<gauge>`` gauges and ``kvdedup_<counter>_total`` counters per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._gauges = {k: self._gauge_cls(f"kvdedup_{k}", f"kvdedup {k} (latest step)",
                                           labelnames=labelnames) for k in GAUGES}
        self._counters = {k: self._counter_cls(f"kvdedup_{k}", f"kvdedup {k} (cumulative)",
                                               labelnames=labelnames) for k in COUNTERS}
        self._last: dict[int, dict[str, int]] = {}
        for labels in per_engine_labelvalues.values():  # every series exists from the start
            for metric in (*self._gauges.values(), *self._counters.values()):
                metric.labels(*labels)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        s = transfer_stats_data.get("kvdedup")
        if not s:
            return
        labels = self.per_engine_labelvalues[engine_idx]
        for k, g in self._gauges.items():
            g.labels(*labels).set(s[k])
        last = self._last.setdefault(engine_idx, {})
        for k, c in self._counters.items():
            delta = s[k] - last.get(k, 0)
            if delta > 0:
                c.labels(*labels).inc(delta)
            last[k] = s[k]


@dataclass
class DedupConnectorMetadata(KVConnectorMetadata):
    """Per-step commands from the scheduler to the workers (empty in prefix mode).
    Sequence mode, for the KV store: chunks to evict, KV to inject (slots and stored pieces
    ``(digest, offset, length, position delta)``), chunks to capture (digest, slots).
    Shared mode, for the attention backend: ``borrows`` (``vllm_ext.shared.Borrow``)."""

    evicts: list = field(default_factory=list)
    injects: list = field(default_factory=list)
    captures: list = field(default_factory=list)
    borrows: list = field(default_factory=list)


class DedupConnector(KVConnectorBase_V1):
    """Carries kvdedup's metrics; in sequence mode, its worker side runs the KV store."""

    def __init__(self, vllm_config, role, kv_cache_config=None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self._sequence = extra.get("mode") == "sequence"
        self._store = None
        self._pending: DedupConnectorMetadata | None = None
        self.hold = None    # scheduler side, sequence mode: DedupScheduler sets both
        self.finish = None
        if self._sequence and role == KVConnectorRole.WORKER:
            from .kv_store import WorkerKVStore
            from .rope import RotaryParams

            self._store = WorkerKVStore(RotaryParams.from_hf_config(
                vllm_config.model_config.hf_config), vllm_config.cache_config.block_size)
            self._vllm_config = vllm_config

    # scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """No external tokens. Sequence mode: None (vLLM skips the request this step and
        admits the ones behind it) while the request waits for another request to compute
        its reusable chunks (``SequenceState.should_hold``, set as ``self.hold``)."""
        if self.hold is not None and self.hold(request, num_computed_tokens):
            return None, False
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        return None

    def request_finished(self, request, block_ids):
        """Sequence mode: forget the request's plan and chunks (``SequenceState.finish``,
        set as ``self.finish``). Blocks are freed by vLLM as usual (returns False)."""
        if self.finish is not None:
            self.finish(request.request_id)
        return False, None

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        """Empty here; ``DedupScheduler`` fills in the step's sequence commands."""
        return DedupConnectorMetadata()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return DedupConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return DedupPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches) -> None:
        if self._store is not None:
            self._store.install(self._vllm_config.compilation_config.static_forward_context)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if self._store is None:
            return
        meta = self._get_connector_metadata()
        self._store.begin_step(meta.evicts, meta.injects, meta.captures)

    def step_borrows(self) -> list:
        """Worker side, shared mode: this step's borrows (empty outside a step)."""
        if not self.has_connector_metadata():
            return []
        return self._get_connector_metadata().borrows

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Sequence mode: blocks whose injection failed (vLLM recomputes them, as the
        connector config sets ``kv_load_failure_policy="recompute"``)."""
        return self._store.take_failed_blocks() if self._store is not None else set()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        if self._store is not None:
            self._store.end_step()

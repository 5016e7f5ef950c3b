"""kvdedup's ``vllm.stat_logger_plugins`` entry point (vLLM 0.32, ``StatLoggerBase``).

The server loads it for every engine; it stays silent unless kvdedup stats arrive in
``SchedulerStats.kv_connector_stats`` (put there by ``DedupScheduler``).
"""

from __future__ import annotations

import logging

from vllm.v1.metrics.loggers import StatLoggerBase

from .version import check_vllm_version

check_vllm_version()
logger = logging.getLogger("kvdedup")


class DedupStatLogger(StatLoggerBase):
    """``vllm.stat_logger_plugins`` entry point (extends vLLM 0.32's ``StatLoggerBase``).

    Keeps the latest kvdedup snapshot seen in ``SchedulerStats.kv_connector_stats`` and
    logs a one-line dedup summary at vLLM's logging interval. Inert for stock engines.
    """

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self.latest: dict | None = None
        self._logged_step = -1

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        data = getattr(scheduler_stats, "kv_connector_stats", None) or {}
        snap = data.get("kvdedup")
        if snap:
            self.latest = snap

    def log(self) -> None:
        s = self.latest
        if not s or s["step"] == self._logged_step:
            return
        self._logged_step = s["step"]
        hit = s["prefix_hits"] / s["prefix_queries"] if s["prefix_queries"] else 0.0
        logger.info("kvdedup engine %d: blocks logical=%d physical=%d ratio=%.2f "
                    "saved=%.1f MiB prefix hit=%.1f%% verified=%d collisions=%d "
                    "sequence hits=%d borrowed tokens=%d", self.engine_index,
                    s["logical_blocks"], s["physical_blocks"], s["dedup_ratio"],
                    s["bytes_saved"] / 2**20, 100 * hit, s["verified_hits"], s["collisions"],
                    s["sequence_hits"], s.get("borrowed_tokens", 0))

    def log_engine_initialized(self) -> None:
        pass

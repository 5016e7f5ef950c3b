"""Per-step dedup metrics and where they go (vLLM 0.32).

One snapshot per engine step (``StepStats``), made by ``DedupScheduler`` in the engine
core process, and published four ways:

(a) log line and (b) Prometheus: ``DedupScheduler.update_from_output`` puts the snapshot in
    the step's ``SchedulerStats.kv_connector_stats["kvdedup"]``; vLLM's ``LoggingStatLogger``
    prints it ("KV Transfer metrics: ...") through ``DedupConnector.build_kv_connector_stats``
    and its Prometheus logger feeds ``DedupPromMetrics``.
(c) ``--dedup-trace PATH``: one JSON object per step, appended line-buffered.
(d) ``StatsBoard``: a small file-backed array the engine core rewrites every step and
    ``vllm_ext.dedup_stats(llm)`` reads, so offline stats work whether the engine core
    runs in-process or in its own process.

Engine-free: imports numpy only (the records, board and trace are read in processes that
never load vLLM). The ``vllm.stat_logger_plugins`` entry point, which subclasses a vLLM
class, is ``vllm_ext.stat_logger``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields

import numpy as np


@dataclass
class StepStats:
    """Dedup state after one scheduler step (counters are cumulative since start)."""

    step: int = 0
    time: float = 0.0                # seconds since the engine started, at the step's end
    start: float = 0.0               # the same clock when the step's schedule() began
    num_running: int = 0
    num_waiting: int = 0
    logical_blocks: int = 0          # sum of running requests' block-table lengths
    physical_blocks: int = 0         # distinct blocks referenced by any request
    peak_physical_blocks: int = 0
    peak_logical_blocks: int = 0
    dedup_ratio: float = 1.0         # logical / physical (1.0 when nothing is held)
    bytes_saved: int = 0             # (logical - physical) * bytes per block
    prefix_queries: int = 0          # tokens looked up at admission
    prefix_hits: int = 0             # tokens admitted as verified hits
    verified_hits: int = 0           # blocks verified and shared
    collisions: int = 0              # blocks whose hash hit but tokens differed
    preemptions: int = 0
    sequence_hits: int = 0           # runs reused at another offset (sequence mode)
    sequence_tokens_reused: int = 0  # tokens whose KV was injected (sequence mode)
    store_bytes: int = 0             # KV bytes held by the sequence store
    store_entries: int = 0
    store_evictions: int = 0
    sequence_held: int = 0           # requests that waited for another to compute their runs
    scheduled_tokens: int = 0        # tokens computed by the model (prefill + decode)
    prefill_tokens: int = 0          # prompt tokens computed (not hit, not injected)
    borrowed_runs: int = 0           # runs borrowed from the pool (shared mode)
    borrowed_tokens: int = 0         # tokens whose KV was borrowed, not held (shared mode)
    shared_edge_tokens: int = 0      # run tokens computed to align a borrow to blocks
    shared_edge_slots: int = 0       # borrowed tokens in the reader's own (edge) blocks
    shared_group_held: int = 0       # first occurrences that waited for room for their followers
    borrowed_blocks: int = 0         # placeholders in running requests' block tables
    held_source_blocks: int = 0      # distinct source blocks held for borrowers
    shared_bytes_saved: int = 0      # (borrowed blocks - sources kept only for them) * bytes
    faults: int = 0                  # kvdedup failures recovered by recomputing KV

    def to_dict(self) -> dict:
        return asdict(self)


FIELDS = [f.name for f in fields(StepStats)]
COUNTERS = ("prefix_queries", "prefix_hits", "verified_hits", "collisions", "preemptions",
            "sequence_hits", "sequence_tokens_reused", "store_evictions", "sequence_held",
            "scheduled_tokens", "prefill_tokens", "borrowed_runs", "borrowed_tokens",
            "shared_edge_tokens", "shared_edge_slots", "shared_group_held", "faults")


class StatsBoard:
    """A fixed-layout float64 array in a file: one writer (the engine core), any readers.

    Each write stores every field of a ``StepStats`` then bumps a sequence number, so a
    reader that sees the same sequence before and after its read got one whole snapshot.
    """

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        n = len(FIELDS) + 1
        if create:
            np.zeros(n, dtype=np.float64).tofile(path)
        self._arr = np.memmap(path, dtype=np.float64, mode="r+" if create else "r", shape=(n,))

    def write(self, s: StepStats) -> None:
        self._arr[1:] = [getattr(s, k) for k in FIELDS]
        self._arr[0] += 1

    def read(self) -> dict:
        for _ in range(100):
            seq = float(self._arr[0])
            vals = self._arr[1:].tolist()
            if float(self._arr[0]) == seq:
                break
        out = dict(zip(FIELDS, vals))
        for k, v in out.items():
            if k not in ("time", "start", "dedup_ratio"):
                out[k] = int(v)
        return out


class TraceWriter:
    """Appends one JSON line per step to ``path`` (line-buffered: nothing lost on a crash)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, s: StepStats) -> None:
        self._f.write(json.dumps(s.to_dict(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._f.close()


class StepRecorder:
    """Builds the step snapshot and hands it to the board, trace and connector."""

    def __init__(self, board_path: str | None, trace_path: str | None) -> None:
        self.t0 = time.monotonic()
        self.current = StepStats()
        self.board = StatsBoard(board_path, create=True) if board_path else None
        self.trace = TraceWriter(trace_path) if trace_path else None

    def now(self) -> float:
        """Seconds since the recorder (the engine) started: the clock of ``time``/``start``."""
        return round(time.monotonic() - self.t0, 6)

    def record(self, s: StepStats, step_logical: int = 0, step_physical: int = 0) -> None:
        """Publish ``s`` (its ``start`` set by the caller, ``time`` now); peaks also take the
        occupancy seen mid-step (after allocation, before finished requests freed blocks)."""
        prev = self.current
        s.time = self.now()
        s.peak_physical_blocks = max(prev.peak_physical_blocks, s.physical_blocks, step_physical)
        s.peak_logical_blocks = max(prev.peak_logical_blocks, s.logical_blocks, step_logical)
        self.current = s
        if self.board is not None:
            self.board.write(s)
        if self.trace is not None:
            self.trace.write(s)

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()


def read_board(path: str) -> dict:
    return StatsBoard(path).read()


def __getattr__(name: str):
    """``vllm_ext.metrics:DedupStatLogger`` was the stat-logger entry point before the
    logger moved to ``vllm_ext.stat_logger``; installs made before then still name it
    here (``pip install -e .`` refreshes the entry point)."""
    if name == "DedupStatLogger":
        from .stat_logger import DedupStatLogger

        return DedupStatLogger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

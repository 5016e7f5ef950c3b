"""Experiment result schema (single source of truth), loading and validation.

Layout of a results directory ``OUT/`` written by the experiments runner::

    OUT/runs/<run_id>.json     one object per run (schema: RUN_FIELDS)
    OUT/runs.parquet           one row per run, the scalar fields (PARQUET_FIELDS)
    OUT/summary.json           free-form summary of the sweep (any JSON object)
    OUT/traces/<run_id>.jsonl  one object per engine step (schema: TRACE_FIELDS)

Run JSON fields (``scope`` says when a field is required: ``all`` runs,
``offline``/``online`` runs with ``status == "ok"`` of that kind; metric
fields may be ``null`` when the metric is unavailable, e.g. ``hit_rate`` for
the ``vllm`` arm without prefix caching):

Identity (scope ``all``)
    run_id (str, equals the file stem), kind ("offline"|"online"),
    arm ("vllm"|"vllm-apc"|"prefix"|"sequence"), use_case (str),
    workload_file (str), num_blocks (int, KV capacity in blocks),
    block_size (int, tokens), num_requests (int), rep (int), model (str),
    config_id (str: hash of the engine config *excluding the arm and the swept
    num_blocks*; runs with a different model or config_id are not mixed in one
    report unless ``--allow-mixed``), status ("ok"|"failed"),
    error (str|null), env (dict: versions, cpu, git_commit, threads).
Offline metrics (scope ``offline``)
    elapsed_s, request_throughput (req/s), total_token_throughput (tok/s,
    input+output), output_throughput (tok/s), total_input_tokens,
    total_output_tokens, peak_physical_blocks, mean_physical_blocks,
    peak_logical_blocks, mean_dedup_ratio, hit_rate (prefix hit tokens /
    prefix query tokens), preemptions, trace (path of the step trace relative
    to OUT, or null).
Online metrics (scope ``online``)
    request_rate (req/s offered), burstiness, duration_s, completed, failed,
    ``{mean,median,p90,p95,p99}_{ttft,tpot,itl,e2el}_ms`` (vllm bench serve
    names), mean_normalized_latency_s, p95_normalized_latency_s (E2E latency /
    output tokens, s/token), goodput (req/s meeting the SLO),
    slo_normalized_latency_s, and per-request lists (JSON only, not parquet)
    ttfts_ms, itls_ms (flattened), e2els_ms, output_lens; optional (newer runs):
    ok_requests, the positions of the successful requests among the run's
    requests, aligned with ttfts_ms (read by analysis/repeats.py).

Trace JSONL (one object per engine step): step, time (s since start),
num_running, num_waiting, logical_blocks, physical_blocks, dedup_ratio,
bytes_saved, prefix_queries, prefix_hits, verified_hits, collisions,
preemptions (queries/hits/collisions/preemptions are cumulative counters).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import AnalysisError

__all__ = [
    "FieldSpec",
    "RUN_FIELDS",
    "PARQUET_FIELDS",
    "LIST_FIELDS",
    "TRACE_FIELDS",
    "KINDS",
    "ARMS",
    "STATUSES",
    "BASELINE_ARM",
    "validate_run",
    "load_run",
    "load_trace",
    "load_results",
    "check_homogeneous",
    "resolve_workload",
    "ResultSet",
]

KINDS = ("offline", "online")
ARMS = ("vllm", "vllm-apc", "prefix", "sequence", "shared")
STATUSES = ("ok", "failed")
#: Arm that ratios are computed against.
BASELINE_ARM = "vllm-apc"


@dataclass(frozen=True)
class FieldSpec:
    """One run-JSON field: name, type, when required, nullability, meaning."""

    name: str
    type: str  # "str" | "int" | "float" | "dict" | "list"
    scope: str  # "all" | "offline" | "online"
    nullable: bool
    doc: str


def _f(name, typ, scope, nullable, doc):
    return FieldSpec(name, typ, scope, nullable, doc)


_IDENTITY = [
    _f("run_id", "str", "all", False, "unique run id; equals the JSON file stem"),
    _f("kind", "str", "all", False, "offline | online"),
    _f("arm", "str", "all", False, "vllm | vllm-apc | prefix | sequence | shared"),
    _f("use_case", "str", "all", False, "workload / use-case name"),
    _f("workload_file", "str", "all", False, "workload JSONL path"),
    _f("num_blocks", "int", "all", False, "KV capacity in blocks"),
    _f("block_size", "int", "all", False, "KV block size in tokens"),
    _f("num_requests", "int", "all", False, "requests in the run"),
    _f("rep", "int", "all", False, "repetition index"),
    _f("model", "str", "all", False, "model name/path"),
    _f("config_id", "str", "all", False, "hash of the engine config excluding arm and num_blocks"),
    _f("status", "str", "all", False, "ok | failed"),
    _f("error", "str", "all", True, "error message of a failed run, else null"),
    _f("env", "dict", "all", False, "versions, cpu, git_commit, threads"),
]
_OFFLINE = [
    _f("elapsed_s", "float", "offline", True, "wall time of the batch, s"),
    _f("request_throughput", "float", "offline", True, "requests/s"),
    _f("total_token_throughput", "float", "offline", True, "input+output tokens/s"),
    _f("output_throughput", "float", "offline", True, "output tokens/s"),
    _f("total_input_tokens", "int", "offline", True, "prompt tokens"),
    _f("total_output_tokens", "int", "offline", True, "generated tokens"),
    _f("peak_physical_blocks", "float", "offline", True, "peak distinct KV blocks held"),
    _f("mean_physical_blocks", "float", "offline", True, "mean distinct KV blocks held"),
    _f("peak_logical_blocks", "float", "offline", True, "peak KV blocks referenced"),
    _f("mean_dedup_ratio", "float", "offline", True, "mean logical/physical over steps"),
    _f("hit_rate", "float", "offline", True, "prefix hit tokens / prefix query tokens"),
    _f("preemptions", "int", "offline", True, "preemptions during the run"),
    _f("trace", "str", "offline", True, "step trace path relative to OUT, or null"),
]
_ONLINE = [
    _f("request_rate", "float", "online", True, "offered requests/s (inf = all at once)"),
    _f("burstiness", "float", "online", True, "gamma arrival shape (1 = Poisson)"),
    _f("duration_s", "float", "online", True, "benchmark duration, s"),
    _f("completed", "int", "online", True, "completed requests"),
    _f("failed", "int", "online", True, "failed requests"),
]
for _m in ("ttft", "tpot", "itl", "e2el"):
    for _s in ("mean", "median", "p90", "p95", "p99"):
        _ONLINE.append(_f(f"{_s}_{_m}_ms", "float", "online", True, f"{_s} {_m.upper()}, ms"))
_ONLINE += [
    _f("mean_normalized_latency_s", "float", "online", True, "mean E2E/output tokens, s/token"),
    _f("p95_normalized_latency_s", "float", "online", True, "p95 E2E/output tokens, s/token"),
    _f("goodput", "float", "online", True, "requests/s meeting the SLO"),
    _f("slo_normalized_latency_s", "float", "online", True, "normalized-latency SLO, s/token"),
    _f("ttfts_ms", "list", "online", False, "per-request TTFT, ms (JSON only)"),
    _f("itls_ms", "list", "online", False, "all inter-token latencies, flattened, ms (JSON only)"),
    _f("e2els_ms", "list", "online", False, "per-request E2E latency, ms (JSON only)"),
    _f("output_lens", "list", "online", False, "per-request generated tokens (JSON only)"),
]

#: All run-JSON fields, in documentation order.
RUN_FIELDS: tuple[FieldSpec, ...] = tuple(_IDENTITY + _OFFLINE + _ONLINE)
#: Per-request list fields: in the JSON only, never in runs.parquet.
LIST_FIELDS = tuple(f.name for f in RUN_FIELDS if f.type == "list")
#: Columns of runs.parquet (flat scalar fields; ``env`` is not a column).
PARQUET_FIELDS = tuple(f.name for f in RUN_FIELDS if f.type not in ("list", "dict"))
#: Fields of one step-trace JSONL object.
TRACE_FIELDS = (
    "step", "time", "num_running", "num_waiting", "logical_blocks", "physical_blocks",
    "dedup_ratio", "bytes_saved", "prefix_queries", "prefix_hits", "verified_hits",
    "collisions", "preemptions",
)
#: Trace fields added later (kept when present; older traces lack them).
OPTIONAL_TRACE_FIELDS = ("scheduled_tokens", "prefill_tokens", "sequence_tokens_reused")
_ENUMS = {"kind": KINDS, "arm": ARMS, "status": STATUSES}
ENV_KEYS = ("versions", "cpu", "git_commit", "threads")


def _type_ok(value: Any, typ: str) -> bool:
    if typ == "str":
        return isinstance(value, str)
    if typ == "dict":
        return isinstance(value, dict)
    if typ == "list":
        return isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if typ == "int":
        return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    return True


def _required(spec: FieldSpec, run: dict) -> bool:
    if spec.scope == "all":
        return True
    return run.get("status") == "ok" and run.get("kind") == spec.scope


def validate_run(run: Any, where: str) -> dict:
    """Validate one run object; return it (ints normalised) or raise.

    The error names ``where`` (the file) and lists every missing field by
    name, then every field with a wrong type or value.
    """
    if not isinstance(run, dict):
        raise AnalysisError(f"{where}: expected a JSON object, got {type(run).__name__}")
    missing = [s.name for s in RUN_FIELDS if _required(s, run) and s.name not in run]
    bad = []
    for s in RUN_FIELDS:
        if s.name not in run:
            continue
        v = run[s.name]
        if v is None:
            if not s.nullable:
                bad.append(f"{s.name} (null, expected {s.type})")
            continue
        if not _type_ok(v, s.type):
            bad.append(f"{s.name} (expected {s.type}, got {type(v).__name__} {v!r:.40})")
        elif s.name in _ENUMS and v not in _ENUMS[s.name]:
            bad.append(f"{s.name} ({v!r} not one of {', '.join(_ENUMS[s.name])})")
    if missing or bad:
        parts = []
        if missing:
            parts.append(f"missing fields: {', '.join(missing)}")
        if bad:
            parts.append(f"bad fields: {'; '.join(bad)}")
        raise AnalysisError(f"{where}: " + "; ".join(parts))
    out = dict(run)
    for s in RUN_FIELDS:
        if s.type == "int" and out.get(s.name) is not None:
            out[s.name] = int(out[s.name])
    return out


def load_run(path: Path) -> dict:
    """Read and validate ``runs/<run_id>.json``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AnalysisError(f"cannot read {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{path}: unreadable JSON ({exc.msg} at line {exc.lineno})") from None
    run = validate_run(obj, str(path))
    if run["run_id"] != path.stem:
        raise AnalysisError(f"{path}: run_id {run['run_id']!r} does not match the file name")
    return run


def load_trace(path: Path) -> pd.DataFrame:
    """Read a step trace JSONL into a DataFrame (columns: TRACE_FIELDS, plus those
    OPTIONAL_TRACE_FIELDS every line has)."""
    if not path.is_file():
        raise AnalysisError(f"trace file not found: {path}")
    rows = []
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnalysisError(f"{path}:{lineno}: unreadable JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise AnalysisError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in TRACE_FIELDS if k not in obj]
            if missing:
                raise AnalysisError(f"{path}:{lineno}: missing fields: {', '.join(missing)}")
            rows.append({k: obj[k] for k in (*TRACE_FIELDS, *OPTIONAL_TRACE_FIELDS)
                         if k in obj})
    if not rows:
        raise AnalysisError(f"trace file {path} is empty")
    extra = [k for k in OPTIONAL_TRACE_FIELDS if all(k in r for r in rows)]
    return pd.DataFrame(rows, columns=[*TRACE_FIELDS, *extra])


def resolve_workload(workload_file: str, root: Path) -> Path | None:
    """Find a run's workload file: as given, then relative to OUT and OUT's parent."""
    p = Path(workload_file)
    cands = [p] if p.is_absolute() else [p, root / p, root.parent / p]
    for c in cands:
        if c.is_file():
            return c
    return None


def check_homogeneous(runs: list[dict], allow_mixed: bool) -> list[str]:
    """Refuse runs that differ in model or config_id (unless allowed).

    Returns notes for the report (empty when homogeneous).
    """
    notes = []
    for key in ("model", "config_id"):
        values: dict[str, list[str]] = {}
        for r in runs:
            values.setdefault(str(r[key]), []).append(r["run_id"])
        if len(values) > 1:
            desc = "; ".join(
                f"{v!r} ({len(ids)} runs, e.g. {ids[0]})" for v, ids in sorted(values.items())
            )
            msg = f"runs differ in {key}: {desc}"
            if not allow_mixed:
                raise AnalysisError(msg + " -- refusing to mix them (use --allow-mixed)")
            notes.append(msg)
    return notes


@dataclass
class ResultSet:
    """A loaded, validated results directory."""

    root: Path
    runs: list[dict]
    summary: dict | None
    notes: list[str] = field(default_factory=list)
    workloads: dict[str, Path | None] = field(default_factory=dict)

    @property
    def ok_runs(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "ok"]

    @property
    def failed_runs(self) -> list[dict]:
        return [r for r in self.runs if r["status"] != "ok"]

    def frame(self, kind: str | None = None) -> pd.DataFrame:
        """Scalar fields of the ok runs (optionally of one kind) as a DataFrame."""
        rows = [
            {k: r.get(k) for k in PARQUET_FIELDS}
            for r in self.ok_runs
            if kind is None or r["kind"] == kind
        ]
        return pd.DataFrame(rows, columns=list(PARQUET_FIELDS))

    def trace_path(self, run: dict) -> Path | None:
        t = run.get("trace")
        if not t:
            default = self.root / "traces" / f"{run['run_id']}.jsonl"
            return default if default.is_file() else None
        p = Path(t)
        return p if p.is_absolute() else self.root / p


def _check_parquet(root: Path, run_ids: set[str]) -> list[str]:
    p = root / "runs.parquet"
    if not p.exists():
        return ["runs.parquet not found (run JSONs used)"]
    try:
        df = pd.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported
        return [f"runs.parquet unreadable ({type(exc).__name__}); run JSONs used"]
    if "run_id" not in df.columns:
        return ["runs.parquet has no run_id column; run JSONs used"]
    pq = set(map(str, df["run_id"]))
    if pq != run_ids:
        return [
            f"runs.parquet disagrees with runs/ ({len(pq - run_ids)} extra, "
            f"{len(run_ids - pq)} missing run ids); run JSONs used"
        ]
    return []


def load_results(
    root: str | Path, allow_mixed: bool = False, allow_missing_workloads: bool = False
) -> ResultSet:
    """Load and validate a results directory.

    Raises :class:`AnalysisError` for a missing/empty ``runs/``, unreadable
    or incomplete run JSON (naming the file and fields), duplicate run ids,
    mixed model/config_id (unless ``allow_mixed``), an unreadable
    ``summary.json``, or an unknown workload file (unless
    ``allow_missing_workloads``).
    """
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"results directory not found: {root}")
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise AnalysisError(f"{root}: missing runs/ directory (not a results directory?)")
    files = sorted(runs_dir.glob("*.json"))
    if not files:
        raise AnalysisError(f"{runs_dir}: no run JSON files")
    runs = [load_run(f) for f in files]

    summary = None
    notes: list[str] = []
    sp = root / "summary.json"
    if sp.exists():
        try:
            summary = json.loads(sp.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise AnalysisError(f"{sp}: unreadable JSON ({exc})") from None
    else:
        notes.append("summary.json not found")
    notes += _check_parquet(root, {r["run_id"] for r in runs})
    notes += check_homogeneous(runs, allow_mixed)

    workloads: dict[str, Path | None] = {}
    for r in runs:
        wf = r["workload_file"]
        if wf in workloads:
            continue
        workloads[wf] = resolve_workload(wf, root)
        if workloads[wf] is None:
            msg = f"unknown workload file {wf!r} (run {r['run_id']}; looked as given, under {root} and {root.parent})"
            if not allow_missing_workloads:
                raise AnalysisError(msg + " -- use --allow-missing-workloads to report anyway")
            notes.append(msg)
    return ResultSet(root=root, runs=runs, summary=summary, notes=notes, workloads=workloads)

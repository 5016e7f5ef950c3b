"""Loading and validating experiment results directories.

The run-record schema (``RUN_FIELDS``, ``TRACE_FIELDS``, arms, the baseline arm) lives in
``experiments.schema``, which the runner writes by; it is re-exported here for readers.
Every error is an :class:`analysis.AnalysisError` naming the file (and line or field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import AnalysisError
from experiments import schema
from experiments.schema import (ARMS, BASELINE_ARM, ENV_KEYS, KINDS, LIST_FIELDS,
                                OPTIONAL_TRACE_FIELDS, PARQUET_FIELDS, RUN_FIELDS, STATUSES,
                                TRACE_FIELDS, FieldSpec)

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
    "ENV_KEYS",
    "OPTIONAL_TRACE_FIELDS",
]


def validate_run(run: Any, where: str) -> dict:
    """``experiments.schema.validate_run``, its error as an :class:`AnalysisError`."""
    try:
        return schema.validate_run(run, where)
    except schema.SchemaError as exc:
        raise AnalysisError(str(exc)) from None


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

"""The workload file format: JSON Lines plus a ``.meta.json`` sidecar.

One request per line, a JSON object with at least::

    {"prompt_token_ids": [int, ...],   # non-empty, non-negative ints
     "output_len": int,                # reference output length (>= 1)
     "arrival_time": float | null,     # seconds from the start, or null (send at once)
     "session_id": str | null,         # multi-turn sessions share one id
     "source": str}                    # provenance of this request (dataset:file:row ...)

Any further keys (e.g. ``turn``) are kept in :attr:`Request.extra`. The sidecar
``FILE.meta.json`` (``FILE`` including its ``.jsonl`` suffix) holds provenance:
dataset, version, tokenizer, filters, generator parameters, seed and the shareable
fractions computed by :mod:`experiments.workloads.sharing`.

Every reader error is a :class:`WorkloadError` whose message names the file and the
line, so a CLI can print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

FORMAT_NAME = "kvdedup-workload"
FORMAT_VERSION = 1
REQUIRED_FIELDS = ("prompt_token_ids", "output_len", "arrival_time", "session_id", "source")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (provenance of archives and tokenizers in ``.meta.json``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class WorkloadError(ValueError):
    """Bad workload input (file, row, dataset name, parameter); the message says where."""


@dataclass
class Request:
    """One request of a workload."""

    prompt_token_ids: list[int]
    output_len: int
    arrival_time: float | None = None
    session_id: str | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {
            "prompt_token_ids": list(self.prompt_token_ids),
            "output_len": int(self.output_len),
            "arrival_time": self.arrival_time,
            "session_id": self.session_id,
            "source": self.source,
        }
        for k, v in self.extra.items():
            if k not in d:
                d[k] = v
        return d


@dataclass
class Workload:
    """A loaded workload: its requests, its metadata (``{}`` without a sidecar) and path."""

    requests: list[Request]
    meta: dict[str, Any]
    path: Path | None = None


def meta_path(path: str | os.PathLike) -> Path:
    """The sidecar path of a workload file: ``FILE.meta.json``."""
    p = Path(path)
    return p.with_name(p.name + ".meta.json")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_record(obj: Any, where: str) -> Request:
    """Check one decoded JSON line and turn it into a :class:`Request`.

    ``where`` (``"FILE:LINE"``) prefixes every error message.
    """
    if not isinstance(obj, dict):
        raise WorkloadError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in obj]
    if missing:
        raise WorkloadError(f"{where}: missing field(s) {', '.join(missing)}")
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not ids:
        raise WorkloadError(f"{where}: prompt_token_ids must be a non-empty list of ints")
    for i, t in enumerate(ids):
        if not _is_int(t) or t < 0:
            raise WorkloadError(
                f"{where}: prompt_token_ids[{i}] = {t!r} is not a non-negative int")
    out = obj["output_len"]
    if not _is_int(out) or out < 1:
        raise WorkloadError(f"{where}: output_len must be an int >= 1, got {out!r}")
    at = obj["arrival_time"]
    if at is not None:
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
            raise WorkloadError(f"{where}: arrival_time must be null or a finite number >= 0, got {at!r}")
        at = float(at)
    sid = obj["session_id"]
    if sid is not None and not isinstance(sid, str):
        raise WorkloadError(f"{where}: session_id must be null or a string, got {sid!r}")
    src = obj["source"]
    if not isinstance(src, str):
        raise WorkloadError(f"{where}: source must be a string, got {src!r}")
    extra = {k: v for k, v in obj.items() if k not in REQUIRED_FIELDS}
    return Request(ids, out, at, sid, src, extra)


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read the sidecar of workload ``path``; ``{}`` when there is none."""
    mp = meta_path(path)
    if not mp.exists():
        return {}
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkloadError(f"{mp}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise WorkloadError(f"{mp}: expected a JSON object")
    return meta


def load_workload(path: str | os.PathLike) -> Workload:
    """Load and validate a workload file (and its sidecar, if present).

    Raises :class:`WorkloadError` naming the file and line for a missing file, bad
    JSON, a missing field, a non-int token, a bad value, or an empty workload.
    """
    p = Path(path)
    if not p.exists():
        raise WorkloadError(f"{p}: no such workload file")
    if not p.is_file():
        raise WorkloadError(f"{p}: not a file")
    requests: list[Request] = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise WorkloadError(f"{p}:{lineno}: not valid UTF-8") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkloadError(f"{p}:{lineno}: bad JSON ({e.msg} at column {e.colno})") from None
            requests.append(validate_record(obj, f"{p}:{lineno}"))
    if not requests:
        raise WorkloadError(f"{p}: workload is empty (no requests)")
    return Workload(requests, load_meta(p), p)


def write_workload(path: str | os.PathLike, requests: Iterable[Request], meta: dict[str, Any]) -> Path:
    """Write ``requests`` as JSON Lines and ``meta`` as the sidecar, atomically each."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    requests = list(requests)
    if not requests:
        raise WorkloadError(f"{p}: refusing to write an empty workload")
    tmp = p.with_name(f".{p.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")
    os.replace(tmp, p)
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    full.update(meta)
    mp = meta_path(p)
    tmp = mp.with_name(f".{mp.name}.tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, mp)
    return p

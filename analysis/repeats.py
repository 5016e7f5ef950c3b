"""Online latency split by content repetition: first occurrences vs repeats.

Sequence mode helps a request only when its shared text was sent before. Workload
generators name each request's shared documents in ``source`` (``kind:doc68:instr6``,
``kind:doc24,doc38,doc271``); in the order an online run sends requests, a request is

* ``first``  when none of its documents was sent before,
* ``repeat`` when all of them were,
* ``partial`` when some were,
* ``unknown`` when its source names no documents.

Per-request TTFT and E2E of a run (``ttfts_ms`` / ``e2els_ms``, one entry per successful
request, and ``ok_requests``, their positions among the run's requests) are grouped by
that label. The run's i-th request is workload request ``i % len(workload)`` (the online
client cycles the workload). Runs written before ``ok_requests`` existed are used only
when they had no failed request (then the lists are in request order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis import AnalysisError

_DOC = re.compile(r"^doc\w*$")
LABELS = ("first", "partial", "repeat", "unknown")
REPEAT_COLUMNS = ("use_case", "num_blocks", "arm", "request_rate", "label", "runs", "requests",
                  "median_ttft_ms", "p90_ttft_ms", "median_e2el_ms")


def documents(source: str | None) -> tuple[str, ...]:
    """Document ids named by a workload ``source`` (the field after the kind)."""
    if not source:
        return ()
    parts = str(source).split(":")
    if len(parts) < 2:
        return ()
    ids = tuple(parts[1].split(","))
    return ids if all(_DOC.match(i) for i in ids) else ()


def occurrence_labels(sources: Sequence[str | None]) -> list[str]:
    """One label per request, in sending order (see the module docstring)."""
    seen: set[str] = set()
    out = []
    for src in sources:
        docs = documents(src)
        if not docs:
            out.append("unknown")
            continue
        known = sum(d in seen for d in docs)
        out.append("repeat" if known == len(docs) else "first" if known == 0 else "partial")
        seen.update(docs)
    return out


def run_labels(run: dict, sources: Sequence[str | None]) -> list[str] | None:
    """Labels of a run's successful requests, aligned with its ``ttfts_ms``; None when
    they cannot be aligned (failed requests and no ``ok_requests``)."""
    if not sources:
        raise AnalysisError("workload has no requests")
    n = int(run.get("num_requests") or 0)
    ok = run.get("ok_requests")
    if ok is None:
        if run.get("failed"):
            return None
        ok = range(len(run.get("ttfts_ms") or ()))
    labels = occurrence_labels([sources[i % len(sources)] for i in range(max(n, len(ok)))])
    return [labels[i] for i in ok]


def repeat_table(runs: Sequence[dict], sources_of) -> pd.DataFrame:
    """Median/p90 TTFT and median E2E per (use case, KV capacity, arm, rate, label) over
    online runs (every swept key: runs of different cells are never pooled).
    ``sources_of(run)`` returns the run's workload sources (or None to skip the run)."""
    rows: dict[tuple, dict] = {}
    for run in runs:
        ttfts = run.get("ttfts_ms") or []
        sources = sources_of(run)
        if not ttfts or not sources:
            continue
        labels = run_labels(run, sources)
        if labels is None or len(labels) != len(ttfts):
            continue
        e2e = run.get("e2els_ms") or [float("nan")] * len(ttfts)
        for lab, t, e in zip(labels, ttfts, e2e):
            key = (run.get("use_case"), run.get("num_blocks"), run.get("arm"),
                   run.get("request_rate"), lab)
            acc = rows.setdefault(key, {"runs": set(), "ttft": [], "e2e": []})
            acc["runs"].add(run.get("run_id"))
            acc["ttft"].append(t)
            acc["e2e"].append(e)
    out = [{**dict(zip(REPEAT_COLUMNS[:5], k)), "runs": len(v["runs"]), "requests": len(v["ttft"]),
            "median_ttft_ms": float(np.median(v["ttft"])),
            "p90_ttft_ms": float(np.percentile(v["ttft"], 90)),
            "median_e2el_ms": float(np.nanmedian(v["e2e"]))} for k, v in rows.items()]
    df = pd.DataFrame(out, columns=list(REPEAT_COLUMNS))
    if df.empty:
        return df
    order = {lab: i for i, lab in enumerate(LABELS)}
    df["_o"] = df["label"].map(order)
    df = df.sort_values(["use_case", "num_blocks", "request_rate", "arm", "_o"])
    return df.drop(columns="_o").reset_index(drop=True)

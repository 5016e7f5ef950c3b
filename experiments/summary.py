"""Summaries of runs: one implementation for the runner (``summary.json``, the printed
table) and for ``analysis.report`` (tables, figures, checklist). Engine-free.

Invariants:

* A *cell* is one point of a sweep: the run's kind and every key the runner sweeps
  (``CELL_KEYS``: use case, KV capacity, and the request count offline or the offered
  rate online). Runs of different cells are never pooled.
* Within a cell, each arm's repetitions are described by median, min, max and n over the
  values present (``None``, NaN and non-numbers are skipped, not counted).
* A ratio is ``median(arm) / median(baseline arm)`` of the same metric in the same cell;
  it is None when the baseline has no value there, or its median is 0 or not finite.
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from experiments.schema import ARMS, BASELINE_ARM

CELL_KEYS = {"offline": ("use_case", "num_blocks", "num_requests"),
             "online": ("use_case", "num_blocks", "request_rate")}


def table_keys(kind: str) -> list[str]:
    """The columns that identify a row of a summary table: the cell keys, then the arm."""
    return [*CELL_KEYS[kind], "arm"]


def _key_value(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def cell_key(run: dict) -> tuple:
    """``(kind, *swept keys)`` of a run."""
    return (run["kind"], *(_key_value(run.get(k)) for k in CELL_KEYS[run["kind"]]))


def cell_name(key: tuple) -> str:
    """``offline/summarization/64 blocks/32 requests`` or ``online/.../2 req/s``."""
    kind, uc, nb, last = key
    tail = f"{last} requests" if kind == "offline" else f"{float(last):g} req/s"
    return f"{kind}/{uc}/{nb} blocks/{tail}"


def _sort_key(values: Sequence[Any]) -> tuple:
    return tuple((v is None, v) for v in values)


def arm_rank(arm: str) -> int:
    """Position of an arm in ``ARMS`` (unknown arms last)."""
    return ARMS.index(arm) if arm in ARMS else len(ARMS)


def describe(values: Iterable[Any]) -> dict | None:
    """``{"median", "min", "max", "n"}`` over the numeric values present, or None."""
    vals = [float(v) for v in values if isinstance(v, numbers.Real) and not isinstance(v, bool)
            and not math.isnan(float(v))]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarize_groups(rows: Iterable[dict], keys: Sequence[str], metrics: Sequence[str],
                     ratio_metrics: Sequence[str] = (),
                     baseline: str = BASELINE_ARM) -> list[dict]:
    """Group ``rows`` by ``keys`` (which name the arm as ``"arm"`` when ratios are wanted).

    Returns, sorted by the keys (arms in ``ARMS`` order), one dict per group: ``key``
    (key name -> value), ``n`` (rows in the group), ``stats`` (metric -> ``describe``) and
    ``ratios`` (each of ``ratio_metrics`` -> ratio of medians vs ``baseline`` in the same
    cell, i.e. the same values of every key but ``arm``)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(_key_value(r.get(k)) for k in keys), []).append(r)
    arm_at = list(keys).index("arm") if "arm" in keys else None

    def cell(key: tuple) -> tuple:
        return key if arm_at is None else key[:arm_at] + key[arm_at + 1:]

    out = []
    for key, rs in groups.items():
        out.append({"key": dict(zip(keys, key)), "n": len(rs),
                    "stats": {m: describe(r.get(m) for r in rs) for m in metrics}})
    base = {cell(tuple(g["key"].values())): g["stats"] for g in out
            if arm_at is not None and g["key"]["arm"] == baseline}
    for g in out:
        b = base.get(cell(tuple(g["key"].values())), {})
        g["ratios"] = {m: _ratio(g["stats"].get(m), b.get(m)) for m in ratio_metrics}

    def order(g: dict) -> tuple:
        vals = list(g["key"].values())
        arm = vals.pop(arm_at) if arm_at is not None else ""
        return (_sort_key(vals), arm_rank(arm), arm)

    return sorted(out, key=order)


def _ratio(mine: dict | None, base: dict | None) -> float | None:
    if not mine or not base or not base["median"] or not math.isfinite(base["median"]):
        return None
    return mine["median"] / base["median"]


def flat_rows(groups: list[dict], with_ratios: Sequence[str] = ()) -> list[dict]:
    """``summarize_groups`` output as flat rows: keys, ``n_reps``, ``<m>_median/_min/_max``
    (NaN when absent) and ``<m>_ratio_vs_<baseline>`` for the metrics in ``with_ratios``."""
    rows = []
    for g in groups:
        row = {**g["key"], "n_reps": g["n"]}
        for m, st in g["stats"].items():
            for part in ("median", "min", "max"):
                row[f"{m}_{part}"] = st[part] if st else math.nan
            if m in with_ratios:
                r = g["ratios"].get(m)
                row[f"{m}_ratio_vs_{BASELINE_ARM}"] = math.nan if r is None else r
        rows.append(row)
    return rows


def generated_tokens(run: dict) -> int | None:
    """Tokens a run generated: offline ``total_output_tokens``, online the sum of
    ``output_lens`` (None when unknown)."""
    if run["kind"] == "online":
        lens = run.get("output_lens")
        return int(sum(lens)) if lens else None
    v = run.get("total_output_tokens")
    return None if v is None else int(v)

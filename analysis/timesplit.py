"""Where an offline run's time goes: steps that computed prompt tokens vs decode-only steps.

Input: step traces with the cumulative ``prefill_tokens`` and ``scheduled_tokens``
counters (kvdedup >= this version). A step's duration is the time between its trace line
and the previous one; a step is a *prefill step* when it computed at least one prompt
token (it may also carry decodes), otherwise a *decode step*.

The split turns the compute-bound limit of sequence mode, 1/(1-f), into an Amdahl bound
that leaves decode time alone: if reuse removed a fraction f of the baseline's prefill-step
time and nothing else, the speedup would be

    T_base / (T_base_prefill * (1 - f) + T_base_decode)

It is an estimate: mixed steps count as prefill, and prefill cost is taken as linear in
tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from analysis.results import BASELINE_ARM, ResultSet, load_trace

SPLIT_COLUMNS = ("use_case", "arm", "run_id", "elapsed_s", "prefill_step_s", "decode_step_s",
                 "prefill_tokens", "decode_tokens", "reused_fraction")


def split_trace(df: pd.DataFrame) -> dict | None:
    """Seconds and tokens of prefill steps and decode-only steps; None without counters."""
    if "prefill_tokens" not in df or "scheduled_tokens" not in df or len(df) < 2:
        return None
    dt = df["time"].diff().fillna(0.0)
    dp = df["prefill_tokens"].diff().fillna(df["prefill_tokens"].iloc[0])
    ds = df["scheduled_tokens"].diff().fillna(df["scheduled_tokens"].iloc[0])
    pre = dp > 0
    return {"prefill_step_s": float(dt[pre].sum()), "decode_step_s": float(dt[~pre].sum()),
            "prefill_tokens": int(dp.sum()), "decode_tokens": int((ds - dp).sum())}


def split_table(rs: ResultSet) -> pd.DataFrame:
    """One row per ok offline run whose trace has the counters."""
    rows = []
    for r in rs.ok_runs:
        path = rs.trace_path(r)
        if r["kind"] != "offline" or path is None or not path.is_file():
            continue
        sp = split_trace(load_trace(path))
        if sp is None:
            continue
        rows.append({"use_case": r["use_case"], "arm": r["arm"], "run_id": r["run_id"],
                     "elapsed_s": r.get("elapsed_s"),
                     "reused_fraction": r.get("reused_fraction") or 0.0, **sp})
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def amdahl_bounds(table: pd.DataFrame, arms: Iterable[str] = ("sequence",)) -> pd.DataFrame:
    """Per use case and arm: median f, 1/(1-f), and the decode-aware bound (module doc)
    computed from the medians of the baseline's prefill-step and decode-step seconds."""
    out = []
    for uc, g in table.groupby("use_case", sort=True):
        base = g[g["arm"] == BASELINE_ARM]
        if base.empty:
            continue
        bp, bd = base["prefill_step_s"].median(), base["decode_step_s"].median()
        for arm in arms:
            a = g[g["arm"] == arm]
            if a.empty:
                continue
            f = float(a["reused_fraction"].median())
            bound = (bp + bd) / (bp * (1 - f) + bd) if bp + bd > 0 else float("nan")
            out.append({"use_case": uc, "arm": arm, "f": round(f, 3),
                        "limit_1_over_1_minus_f": round(1 / (1 - f), 3) if f < 1 else None,
                        f"{BASELINE_ARM}_prefill_step_s": round(bp, 1),
                        f"{BASELINE_ARM}_decode_step_s": round(bd, 1),
                        "decode_aware_bound": round(bound, 3)})
    return pd.DataFrame(out)

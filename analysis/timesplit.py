"""Where an offline run's time goes: steps that computed prompt tokens vs decode-only steps.

Input: step traces with the cumulative ``prefill_tokens`` and ``scheduled_tokens``
counters. A step's duration is ``time - start``, from the start of its ``schedule()`` to
the end of its ``update_from_output`` (traces that record ``start``); in older traces it
is the time since the previous line, and the first line's is its ``time`` itself, which
offline traces count from the warm-up's last step (an upper bound: it includes the gap
before the batch arrived). Either way the first measured step, usually the largest
prefill, is counted. A step is a *prefill step* when it computed at least one prompt
token (it may also carry decodes), otherwise a *decode step*. Steps are counted too:
prefill steps, decode steps that scheduled a token, and the mean requests running in
those (``num_running``): on a CPU a decode step costs about the same whatever its rows, so
how many requests share a step is what a smaller KV footprint buys.

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
from experiments.summary import CELL_KEYS

CELL = list(CELL_KEYS["offline"])
SPLIT_COLUMNS = (*CELL, "arm", "run_id", "elapsed_s", "prefill_step_s", "decode_step_s",
                 "prefill_tokens", "decode_tokens", "prefill_steps", "decode_steps",
                 "running_per_decode_step", "reused_fraction")


def step_seconds(df: pd.DataFrame) -> pd.Series:
    """Each step's duration (module docstring): ``time - start``, or for traces without
    ``start`` the time since the previous line (the first line's time since the origin)."""
    if "start" in df:
        return (df["time"] - df["start"]).clip(lower=0.0)
    return df["time"].diff().fillna(df["time"].iloc[0])


def split_trace(df: pd.DataFrame) -> dict | None:
    """Seconds, tokens and counts of prefill steps and decode-only steps, and the mean
    requests running in a decode step (NaN without ``num_running``); None without the
    token counters."""
    if "prefill_tokens" not in df or "scheduled_tokens" not in df or len(df) < 2:
        return None
    dt = step_seconds(df)
    dp = df["prefill_tokens"].diff().fillna(df["prefill_tokens"].iloc[0])
    ds = df["scheduled_tokens"].diff().fillna(df["scheduled_tokens"].iloc[0])
    pre = dp > 0
    dec = ~pre & (ds > 0)
    running = (float(df.loc[dec, "num_running"].mean())
               if "num_running" in df and dec.any() else float("nan"))
    return {"prefill_step_s": float(dt[pre].sum()), "decode_step_s": float(dt[~pre].sum()),
            "prefill_tokens": int(dp.sum()), "decode_tokens": int((ds - dp).sum()),
            "prefill_steps": int(pre.sum()), "decode_steps": int(dec.sum()),
            "running_per_decode_step": running}


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
        rows.append({**{k: r[k] for k in CELL}, "arm": r["arm"], "run_id": r["run_id"],
                     "elapsed_s": r.get("elapsed_s"),
                     "reused_fraction": r.get("reused_fraction") or 0.0, **sp})
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def amdahl_bounds(table: pd.DataFrame, arms: Iterable[str] = ("sequence",)) -> pd.DataFrame:
    """Per cell (every swept key present in ``table``) and arm: median f, 1/(1-f), and the
    decode-aware bound (module doc) from the medians of the baseline's prefill-step and
    decode-step seconds in the same cell."""
    out = []
    keys = [k for k in CELL if k in table]
    for cell, g in table.groupby(keys, sort=True):
        cell = cell if isinstance(cell, tuple) else (cell,)
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
            out.append({**dict(zip(keys, cell)), "arm": arm, "f": round(f, 3),
                        "limit_1_over_1_minus_f": round(1 / (1 - f), 3) if f < 1 else None,
                        f"{BASELINE_ARM}_prefill_step_s": round(bp, 1),
                        f"{BASELINE_ARM}_decode_step_s": round(bd, 1),
                        "decode_aware_bound": round(bound, 3)})
    return pd.DataFrame(out)

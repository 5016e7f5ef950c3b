"""analysis.timesplit: prefill vs decode step time from a trace, and the decode-aware bound."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.timesplit import amdahl_bounds, split_trace


def _trace(steps):
    """steps: (seconds, prompt tokens, all tokens) per step -> cumulative trace frame."""
    t = p = s = 0
    rows = []
    for i, (dt, dp, ds) in enumerate(steps):
        t, p, s = t + dt, p + dp, s + ds
        rows.append({"step": i, "time": t, "prefill_tokens": p, "scheduled_tokens": s})
    return pd.DataFrame(rows)


def test_split_counts_steps_with_prompt_tokens_as_prefill():
    trace = _trace([(0.0, 0, 0), (3.0, 2000, 2000), (2.0, 500, 510),
                    (0.5, 0, 10), (0.5, 0, 10), (0.0, 0, 0)])
    sp = split_trace(trace)
    running = sp.pop("running_per_decode_step")
    assert sp == {"prefill_step_s": 5.0, "decode_step_s": 1.0,
                  "prefill_tokens": 2500, "decode_tokens": 30,
                  "prefill_steps": 2, "decode_steps": 2}   # steps that schedule nothing: neither
    assert running != running                             # NaN: the trace has no num_running
    trace["num_running"] = [0, 8, 9, 10, 6, 0]
    assert split_trace(trace)["running_per_decode_step"] == 8.0
    assert split_trace(pd.DataFrame({"time": [0.0, 1.0]})) is None  # old trace: no counters


def test_decode_aware_bound_leaves_decode_time_alone():
    table = pd.DataFrame([
        {"use_case": "u", "arm": "vllm-apc", "prefill_step_s": 90.0, "decode_step_s": 10.0,
         "reused_fraction": 0.0},
        {"use_case": "u", "arm": "sequence", "prefill_step_s": 30.0, "decode_step_s": 10.0,
         "reused_fraction": 0.75},
    ])
    (row,) = amdahl_bounds(table).to_dict("records")
    assert row["limit_1_over_1_minus_f"] == 4.0
    assert row["decode_aware_bound"] == pytest.approx(100 / (90 * 0.25 + 10), abs=1e-3)


def test_first_measured_step_is_counted():
    """The first step after the warm-up (often the whole prefill) keeps its duration."""
    rows = pd.DataFrame([
        {"step": 5, "start": 0.01, "time": 3.01, "prefill_tokens": 1994, "scheduled_tokens": 1994},
        {"step": 6, "start": 3.02, "time": 3.52, "prefill_tokens": 1994, "scheduled_tokens": 2002},
        {"step": 7, "start": 3.53, "time": 4.03, "prefill_tokens": 1994, "scheduled_tokens": 2010},
    ])
    sp = split_trace(rows)
    assert sp["prefill_step_s"] == pytest.approx(3.0)
    assert sp["decode_step_s"] == pytest.approx(1.0)
    # a trace without ``start``: the first step counts from the trace's origin
    sp = split_trace(rows.drop(columns="start"))
    assert sp["prefill_step_s"] == pytest.approx(3.01)
    assert sp["decode_step_s"] == pytest.approx(1.02)

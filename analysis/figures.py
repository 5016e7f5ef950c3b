"""Matplotlib figures for experiment reports (Agg backend, PNG + PDF + CSV).

Every ``*_figure`` function writes ``NAME.png``, ``NAME.pdf`` and
``NAME.csv`` (the plotted data) into ``out_dir`` and returns the three paths.
Points are medians over repetitions; error bars span min..max.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.results import ARMS  # noqa: E402
from experiments.summary import flat_rows, summarize_groups  # noqa: E402

__all__ = [
    "ARM_STYLE",
    "slug",
    "aggregate",
    "memory_figure",
    "use_case_figure",
    "latency_figure",
    "cdf_figure",
    "trace_figure",
]

#: Fixed colour/marker per arm so every figure reads the same.
ARM_STYLE = {
    "vllm": {"color": "#7f7f7f", "marker": "s", "label": "vLLM (no APC)"},
    "vllm-apc": {"color": "#1f77b4", "marker": "o", "label": "vLLM + APC"},
    "prefix": {"color": "#ff7f0e", "marker": "^", "label": "kvdedup prefix"},
    "sequence": {"color": "#2ca02c", "marker": "D", "label": "kvdedup sequence"},
    "shared": {"color": "#d62728", "marker": "*", "label": "kvdedup shared"},
    "shared-lru": {"color": "#9467bd", "marker": "v", "label": "shared, LRU eviction"},
    "shared-fcfs": {"color": "#8c564b", "marker": "P", "label": "shared, FCFS admission"},
    "shared-gate": {"color": "#e377c2", "marker": "X", "label": "shared, gate-only admission"},
    "shared-k32": {"color": "#bcbd22", "marker": "h", "label": "shared, k = 32"},
    "shared-block-edges": {"color": "#17becf", "marker": "s", "label": "shared, block edges"},
}
_CDF_POINTS = 400
_MAX_CDF_COLUMNS = 4

plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.grid": True, "grid.alpha": 0.3})


def slug(text: str) -> str:
    """File-name-safe version of a label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def _arms_in(df: pd.DataFrame) -> list[str]:
    present = set(df["arm"])
    return [a for a in ARMS if a in present]


def _style(arm: str) -> dict:
    return ARM_STYLE.get(arm, {"color": "black", "marker": "x", "label": arm})


def aggregate(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Median, min, max and count over reps of ``metrics`` per ``keys`` cell
    (``experiments.summary``, as the tables)."""
    return pd.DataFrame(flat_rows(summarize_groups(df.to_dict("records"), list(keys), metrics)))


def _save(fig, data: pd.DataFrame, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.pdf", out_dir / f"{name}.csv"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    data.to_csv(paths[2], index=False)
    return paths


def _errorbar_line(ax, x, med, lo, hi, arm: str) -> None:
    st = _style(arm)
    yerr = np.vstack([np.asarray(med) - np.asarray(lo), np.asarray(hi) - np.asarray(med)])
    ax.errorbar(x, med, yerr=yerr, color=st["color"], marker=st["marker"], label=st["label"],
                capsize=3, linewidth=1.5, markersize=5)


def _legend_below(fig, axes) -> None:
    handles, labels = {}, {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    labels = list(handles)
    if labels:
        fig.legend([handles[k] for k in labels], labels, loc="lower center",
                   ncol=min(len(labels), 5), frameon=False, bbox_to_anchor=(0.5, -0.01))


def _natural(text: str) -> list:
    """Sort key that orders embedded numbers by value ("r8" before "r12")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _with_cases(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with a ``case`` column (a panel or bar group): the use case, plus the request
    count where a use case ran with several (never pooled); and the keys identifying a case."""
    out = df.copy()
    out["case"] = out["use_case"].astype(str)
    if "num_requests" not in out:
        return out, ["use_case", "case"]
    multi = out.groupby("use_case")["num_requests"].transform("nunique") > 1
    out.loc[multi, "case"] = (out.loc[multi, "case"] + ", "
                              + out.loc[multi, "num_requests"].astype(str) + " requests")
    return out, ["use_case", "num_requests", "case"]


def memory_figure(df: pd.DataFrame, out_dir: Path, name: str = "throughput_vs_kv_blocks") -> list[Path]:
    """Throughput (req/s, tok/s) vs KV capacity, one column per use case (and request count)."""
    metrics = [("request_throughput", "Throughput (requests/s)"),
               ("total_token_throughput", "Throughput (tokens/s, in+out)")]
    df, case_keys = _with_cases(df)
    agg = aggregate(df, [*case_keys, "arm", "num_blocks"], [m for m, _ in metrics])
    cases = sorted(agg["case"].unique())
    fig, axes = plt.subplots(2, len(cases), figsize=(4.2 * len(cases) + 0.6, 6.4),
                             squeeze=False, sharex="col")
    for j, uc in enumerate(cases):
        sub = agg[agg["case"] == uc]
        for i, (m, ylabel) in enumerate(metrics):
            ax = axes[i, j]
            for arm in _arms_in(sub):
                a = sub[sub["arm"] == arm].sort_values("num_blocks")
                _errorbar_line(ax, a["num_blocks"], a[f"{m}_median"], a[f"{m}_min"],
                               a[f"{m}_max"], arm)
            ax.set_ylim(bottom=0)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(f"use case: {uc}")
            else:
                ax.set_xlabel("KV cache capacity (blocks)")
    fig.suptitle("Offline throughput vs KV cache capacity (median, bars: min-max over reps)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _legend_below(fig, axes)
    return _save(fig, agg, out_dir, name)


def use_case_figure(df: pd.DataFrame, out_dir: Path, name: str = "throughput_by_use_case") -> list[Path]:
    """Grouped bars per arm for each use case (and request count) at its largest KV capacity."""
    metrics = [("request_throughput", "Throughput (requests/s)"),
               ("total_token_throughput", "Throughput (tokens/s, in+out)")]
    df, case_keys = _with_cases(df)
    full = df[df["num_blocks"] == df.groupby("case")["num_blocks"].transform("max")]
    agg = aggregate(full, [*case_keys, "num_blocks", "arm"], [m for m, _ in metrics])
    cases = sorted(agg["case"].unique(), key=_natural)
    arms = _arms_in(agg)
    width = 0.8 / max(len(arms), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.6 + len(cases) * (0.5 + 0.45 * len(arms))), 7.0),
                             squeeze=False)
    x = np.arange(len(cases))
    for i, (m, ylabel) in enumerate(metrics):
        ax = axes[i, 0]
        for k, arm in enumerate(arms):
            a = agg[agg["arm"] == arm].set_index("case").reindex(cases)
            med = a[f"{m}_median"].to_numpy()
            err = np.vstack([med - a[f"{m}_min"].to_numpy(), a[f"{m}_max"].to_numpy() - med])
            st = _style(arm)
            xs = x + (k - (len(arms) - 1) / 2) * width
            ax.bar(xs, med, width, color=st["color"], label=st["label"])
            ok = np.isfinite(med)
            if ok.any():
                ax.errorbar(xs[ok], med[ok], yerr=err[:, ok], fmt="none", ecolor="black",
                            capsize=3, linewidth=1)
        caps = agg.groupby("case")["num_blocks"].first().reindex(cases)
        ax.set_xticks(x, [f"{uc}\n({int(c)} blocks)" for uc, c in zip(cases, caps)])
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(axis="x", visible=False)
    fig.suptitle("Offline throughput per use case at its largest KV capacity run "
                 "(median, bars: min-max)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _legend_below(fig, axes)
    return _save(fig, agg, out_dir, name)


_LATENCY_PANELS = [
    ("mean_normalized_latency_s", "Mean normalized latency (s/token)", True),
    ("p95_normalized_latency_s", "P95 normalized latency (s/token)", True),
    ("median_ttft_ms", "TTFT p50 (ms)", False),
    ("p99_ttft_ms", "TTFT p99 (ms)", False),
    ("median_tpot_ms", "TPOT p50 (ms)", False),
    ("p99_tpot_ms", "TPOT p99 (ms)", False),
]


def latency_figure(df: pd.DataFrame, out_dir: Path, name: str, title: str) -> list[Path]:
    """Latency metrics vs offered request rate, one line per arm, SLO line dashed."""
    finite = df[np.isfinite(pd.to_numeric(df["request_rate"], errors="coerce"))]
    metrics = [m for m, _, _ in _LATENCY_PANELS] + ["slo_normalized_latency_s", "goodput"]
    agg = aggregate(finite, ["arm", "request_rate"], metrics)
    slo = pd.to_numeric(finite["slo_normalized_latency_s"], errors="coerce").dropna()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for (m, ylabel, is_norm), ax in zip(_LATENCY_PANELS, axes.T.ravel()):
        for arm in _arms_in(agg):
            a = agg[agg["arm"] == arm].sort_values("request_rate")
            _errorbar_line(ax, a["request_rate"], a[f"{m}_median"], a[f"{m}_min"],
                           a[f"{m}_max"], arm)
        if is_norm and len(slo):
            ax.axhline(float(slo.median()), color="red", linestyle="--", linewidth=1.2,
                       label=f"SLO ({float(slo.median()):.3g} s/token)")
        ax.set_ylabel(ylabel)
        ax.set_xlabel("Offered request rate (requests/s)")
        ax.set_ylim(bottom=0)
    fig.suptitle(title + " (median over reps, bars: min-max)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _legend_below(fig, axes)
    return _save(fig, agg, out_dir, name)


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(values[np.isfinite(values)])
    if len(v) == 0:
        return v, v
    p = np.arange(1, len(v) + 1) / len(v)
    if len(v) > _CDF_POINTS:  # keep the curve shape, drop points
        keep = np.unique(np.linspace(0, len(v) - 1, _CDF_POINTS).round().astype(int))
        v, p = v[keep], p[keep]
    return v, p


def _pick_rates(rates: Sequence[float]) -> list[float]:
    rates = sorted(rates)
    if len(rates) <= _MAX_CDF_COLUMNS:
        return rates
    idx = np.unique(np.linspace(0, len(rates) - 1, _MAX_CDF_COLUMNS).round().astype(int))
    return [rates[i] for i in idx]


def cdf_figure(runs: list[dict], out_dir: Path, name: str, title: str) -> list[Path]:
    """CDFs of TTFT and inter-token latency per arm (reps pooled), a column per rate."""
    rates = _pick_rates(sorted({float(r["request_rate"]) for r in runs}))
    fig, axes = plt.subplots(2, len(rates), figsize=(3.8 * len(rates) + 0.8, 6.4), squeeze=False)
    rows = []
    for j, rate in enumerate(rates):
        at = [r for r in runs if float(r["request_rate"]) == rate]
        for i, (field, label) in enumerate([("ttfts_ms", "TTFT (ms)"), ("itls_ms", "Inter-token latency (ms)")]):
            ax = axes[i, j]
            for arm in [a for a in ARMS if any(r["arm"] == a for r in at)]:
                vals = np.concatenate(
                    [np.asarray(r[field], dtype=float) for r in at if r["arm"] == arm] or [np.array([])]
                )
                x, p = _ecdf(vals)
                if len(x) == 0:
                    continue
                st = _style(arm)
                ax.step(x, p, where="post", color=st["color"], label=st["label"], linewidth=1.5)
                rows += [{"request_rate": rate, "metric": field, "arm": arm, "value_ms": xv,
                          "cdf": pv} for xv, pv in zip(x, p)]
            ax.set_xlabel(label)
            ax.set_ylim(0, 1.02)
            if j == 0:
                ax.set_ylabel("Fraction of requests" if i == 0 else "Fraction of tokens")
            if i == 0:
                ax.set_title(f"rate {rate:g} req/s" if np.isfinite(rate) else "rate inf (burst)")
    fig.suptitle(title + " (all reps pooled)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _legend_below(fig, axes)
    data = pd.DataFrame(rows, columns=["request_rate", "metric", "arm", "value_ms", "cdf"])
    return _save(fig, data, out_dir, name)


def trace_figure(traces: dict[str, tuple[str, pd.DataFrame]], out_dir: Path, name: str,
                 title: str) -> list[Path]:
    """Physical vs logical KV blocks (one panel per arm) and dedup ratio over time.

    ``traces`` maps arm -> (run_id, trace DataFrame).
    """
    arms = [a for a in ARMS if a in traces] + [a for a in traces if a not in ARMS]
    n = len(arms)
    fig, axes = plt.subplots(n + 1, 1, figsize=(9, 2.1 * n + 2.8), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [1.0] * n + [1.3]})
    ax_r = axes[n, 0]
    rows = []
    ymax = max(float(pd.to_numeric(tr["logical_blocks"]).max()) for _, tr in traces.values())
    for ax, arm in zip(axes[:n, 0], arms):
        run_id, tr = traces[arm]
        st = _style(arm)
        t = pd.to_numeric(tr["time"], errors="coerce")
        ax.fill_between(t, 0, tr["logical_blocks"], step="post", color=st["color"], alpha=0.2,
                        linewidth=0, label="logical (referenced)")
        ax.step(t, tr["physical_blocks"], where="post", color=st["color"], linewidth=1.6,
                label="physical (distinct)")
        ax.set_ylim(0, ymax * 1.08 if ymax > 0 else 1)
        ax.set_ylabel("KV blocks")
        ax.set_title(f"{st['label']} (run {run_id})", fontsize=9, loc="left")
        ax.legend(fontsize=8, loc="upper right", framealpha=0.8)
        ax_r.step(t, tr["dedup_ratio"], where="post", color=st["color"], linewidth=1.6,
                  label=st["label"])
        part = tr[["step", "time", "logical_blocks", "physical_blocks", "dedup_ratio"]].copy()
        part.insert(0, "run_id", run_id)
        part.insert(0, "arm", arm)
        rows.append(part)
    ax_r.set_ylabel("Dedup ratio\n(logical / physical)")
    ax_r.set_xlabel("Time since start (s)")
    lo, hi = ax_r.get_ylim()
    ax_r.set_ylim(min(0.95, lo), max(hi, 1.05))
    ax_r.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35),
                ncol=min(n, 4), frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    data = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
    return _save(fig, data, out_dir, name)

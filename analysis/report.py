"""Experiment report: summary tables, evaluation checklist, figures, Markdown + HTML.

:func:`build_report` loads a results directory (:mod:`analysis.results`),
writes the figures whose data exists (:mod:`analysis.figures`) and the tables
as CSV, then ``report.md`` and ``report.html`` (a small built-in Markdown
subset converter, no extra dependency).  Figures that cannot be made are
listed with the reason.

Tables hold, per cell, the median over repetitions with ``[min-max]``, the
number of reps, and for key metrics the ratio of medians vs ``vllm-apc`` in
the same cell (``median(arm) / median(vllm-apc)``).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from analysis import AnalysisError
from analysis import figures as F
from analysis.audit import find_workload_meta, read_workload
from analysis.results import ARMS, BASELINE_ARM, ENV_KEYS, ResultSet, load_results, load_trace
from analysis.repeats import repeat_table
from analysis.timesplit import amdahl_bounds, split_table
from experiments.summary import (cell_key, cell_name, flat_rows, generated_tokens,
                                 summarize_groups, table_keys)

__all__ = [
    "OFFLINE_METRICS",
    "ONLINE_METRICS",
    "RATIO_METRICS",
    "summary_table",
    "evaluation_checklist",
    "markdown_to_html",
    "build_report",
]

OFFLINE_KEYS = table_keys("offline")  # every swept key, then the arm
ONLINE_KEYS = table_keys("online")
OFFLINE_METRICS = [
    "request_throughput", "total_token_throughput", "output_throughput", "elapsed_s",
    "peak_physical_blocks", "peak_logical_blocks", "mean_dedup_ratio", "hit_rate", "preemptions",
]
ONLINE_METRICS = [
    "mean_normalized_latency_s", "p95_normalized_latency_s", "median_ttft_ms", "p99_ttft_ms",
    "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "goodput", "completed",
    "failed",
]
#: Metrics that get a "ratio of medians vs vllm-apc" column.
RATIO_METRICS = [
    "request_throughput", "total_token_throughput", "peak_physical_blocks",
    "mean_normalized_latency_s", "p95_normalized_latency_s", "median_ttft_ms", "median_tpot_ms",
    "goodput",
]


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def summary_table(df: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per-cell median/min/max/n over reps plus ``<m>_ratio_vs_vllm-apc`` for the
    ``RATIO_METRICS`` (``experiments.summary``: the runner's implementation).

    The ratio is ``median(arm) / median(vllm-apc)`` in the same cell (all
    keys but ``arm``); NaN when the baseline is absent or its median is 0.
    """
    metrics = [m for m in metrics if m in df.columns]
    ratios = [m for m in metrics if m in RATIO_METRICS]
    groups = summarize_groups(df.to_dict("records"), list(keys), metrics, ratios)
    return pd.DataFrame(flat_rows(groups, ratios))


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "inf" if isinstance(x, float) and x == math.inf else "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    ax = abs(float(x))
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.3g}"
    if float(x).is_integer() and ax >= 100:
        return str(int(x))
    return f"{x:.4g}"


def _md_summary(agg: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> str:
    """Markdown rendering: one column per metric, ``median [min-max]``."""
    metrics = [m for m in metrics if f"{m}_median" in agg.columns]
    header = list(keys) + ["reps"]
    for m in metrics:
        header.append(m)
        if f"{m}_ratio_vs_{BASELINE_ARM}" in agg.columns:
            header.append(f"{m} / {BASELINE_ARM}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in agg.iterrows():
        cells = [_fmt(r[k]) if not isinstance(r[k], str) else r[k] for k in keys]
        cells.append(str(int(r["n_reps"])))
        for m in metrics:
            med, lo, hi = r[f"{m}_median"], r[f"{m}_min"], r[f"{m}_max"]
            cells.append("n/a" if not np.isfinite(med) else
                         (_fmt(med) if lo == hi else f"{_fmt(med)} [{_fmt(lo)}-{_fmt(hi)}]"))
            rc = f"{m}_ratio_vs_{BASELINE_ARM}"
            if rc in agg.columns:
                cells.append("n/a" if not np.isfinite(r[rc]) else f"{r[rc]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Checklist
# --------------------------------------------------------------------------


@dataclass
class CheckItem:
    """One evaluation-checklist line."""

    name: str
    ok: bool
    detail: str


def _md_frame(df: pd.DataFrame) -> str:
    """A plain markdown table of a DataFrame (cells through ``_fmt``)."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "---|" * len(df.columns)
    body = ["| " + " | ".join(v if isinstance(v, str) else _fmt(v) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def evaluation_checklist(rs: ResultSet, made: set[str]) -> list[CheckItem]:
    """Checklist items; ``made`` holds the names of the figure kinds produced."""
    runs = rs.ok_runs
    items: list[CheckItem] = []
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault(cell_key(r), []).append(r)

    missing = []
    for key, rr in sorted(cells.items(), key=lambda kv: str(kv[0])):
        arms = {r["arm"] for r in rr}
        if BASELINE_ARM not in arms:
            missing.append(f"{cell_name(key)} lacks {BASELINE_ARM}")
    items.append(CheckItem(f"baseline present ({BASELINE_ARM}, stock vLLM with prefix caching, "
                           "in every cell)", not missing and bool(cells),
                           _short(missing) if missing else f"{len(cells)} cells"))

    prov = []
    prov_ok = True
    for wf, path in sorted(rs.workloads.items()):
        if path is None:
            prov_ok = False
            prov.append(f"{wf}: workload not found")
            continue
        meta = find_workload_meta(path)
        prov_ok &= meta is not None
        prov.append(f"{wf}: meta.json {'found' if meta else 'NOT found'}")
    items.append(CheckItem("workload provenance (meta.json found)", prov_ok, "; ".join(prov)))

    few = []
    for key in sorted(cells, key=str):
        by_arm: dict[str, int] = {}
        for r in cells[key]:
            by_arm[r["arm"]] = by_arm.get(r["arm"], 0) + 1
        few += [f"{cell_name(key)}/{a}: {n}" for a, n in sorted(by_arm.items()) if n < 3]
    items.append(CheckItem("repetitions >= 3 per cell", not few and bool(cells),
                           ("too few: " + _short(few)) if few else "all cells have >= 3 reps"))

    dist = []
    if "memory" in made or "use_case" in made:
        dist.append("offline: min-max over reps as error bars")
    if "cdf" in made:
        dist.append("online: TTFT/ITL CDFs")
    has_online = any(r["kind"] == "online" for r in runs)
    dist_ok = bool(dist) and (not has_online or "cdf" in made)
    items.append(CheckItem("distributions shown", dist_ok, "; ".join(dist) or "no distribution figure"))

    no_env = []
    for r in runs:
        env = r.get("env") or {}
        lack = [k for k in ENV_KEYS if env.get(k) in (None, "", {}, [])]
        if lack:
            no_env.append(f"{r['run_id']} ({', '.join(lack)})")
    items.append(CheckItem("environment recorded (" + ", ".join(ENV_KEYS) + ")", not no_env,
                           ("missing: " + _short(no_env)) if no_env else f"all {len(runs)} ok runs"))

    uneq = []
    unknown = []
    for key, rr in sorted(cells.items(), key=lambda kv: str(kv[0])):
        per_arm: dict[str, set] = {}
        for r in rr:
            g = generated_tokens(r)
            if g is None:
                unknown.append(r["run_id"])
            else:
                per_arm.setdefault(r["arm"], set()).add(g)
        if len(set().union(*per_arm.values()) if per_arm else set()) > 1:
            uneq.append(cell_name(key) + ": " + ", ".join(
                f"{a}={sorted(v)}" for a, v in sorted(per_arm.items())))
    detail = ("differ: " + _short(uneq, 4)) if uneq else "equal in every cell"
    if unknown:
        detail += f"; unknown for {_short(unknown, 3)}"
    items.append(CheckItem("generated token counts equal across arms", not uneq and not unknown, detail))

    failed = rs.failed_runs
    items.append(CheckItem("no failed runs", not failed,
                           _short([f"{r['run_id']}: {r.get('error')}" for r in failed], 4)
                           if failed else f"{len(rs.runs)} runs ok"))
    return items


# --------------------------------------------------------------------------
# Markdown -> HTML (the subset this module writes)
# --------------------------------------------------------------------------


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)",
                 lambda m: f'<img alt="{m.group(1)}" src="{m.group(2)}" style="max-width:100%">', out)
    out = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return out


def markdown_to_html(md: str, title: str = "report") -> str:
    """Convert headings, paragraphs, ``-`` lists, pipe tables, images, links,
    inline code and bold to a standalone HTML page."""
    body: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush() -> None:
        if para:
            body.append("<p>" + _inline(" ".join(para)) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if m:
            flush()
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body.append("<table>")
            for k, row in enumerate(rows):
                if k == 1 and all(re.fullmatch(r":?-+:?", c) for c in row):
                    continue
                tag = "th" if k == 0 else "td"
                body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in row) + "</tr>")
            body.append("</table>")
        elif re.match(r"^\s*[-*]\s+", line):
            flush()
            body.append("<ul>")
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                body.append("<li>" + _inline(re.sub(r"^\s*[-*]\s+", "", lines[i])) + "</li>")
                i += 1
            body.append("</ul>")
        elif not line.strip():
            flush()
            i += 1
        else:
            para.append(line.strip())
            i += 1
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "th{background:#f0f0f0}code{background:#f4f4f4;padding:0 3px}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------
# Report assembly
# --------------------------------------------------------------------------


@dataclass
class _Figures:
    made: dict[str, list[Path]] = field(default_factory=dict)  # name -> files
    kinds: set[str] = field(default_factory=set)
    skipped: list[str] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, title: str, paths: list[Path]) -> None:
        name = paths[0].stem
        self.made[name] = paths
        self.titles[name] = title
        self.kinds.add(kind)


def _groups(runs: list[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def _make_figures(rs: ResultSet, fig_dir: Path) -> _Figures:
    figs = _Figures()
    off = rs.frame("offline")
    if off.empty:
        figs.skipped += ["throughput vs KV blocks: no successful offline runs",
                         "throughput per use case: no successful offline runs"]
    else:
        figs.add("memory", "Throughput vs KV cache capacity", F.memory_figure(off, fig_dir))
        figs.add("use_case", "Throughput per use case at full capacity",
                 F.use_case_figure(off, fig_dir))

    online = [r for r in rs.ok_runs if r["kind"] == "online"]
    if not online:
        figs.skipped += ["latency vs request rate: no successful online runs",
                         "TTFT / inter-token latency CDFs: no successful online runs"]
    multi_nb = len({r["num_blocks"] for r in online}) > 1
    for (uc, nb), rr in _groups(online, ["use_case", "num_blocks"]).items():
        tag = f"{uc}" + (f"_{nb}blocks" if multi_nb else "")
        label = f"{uc}, {nb} KV blocks"
        df = pd.DataFrame([{k: r.get(k) for k in r if not isinstance(r.get(k), (list, dict))}
                           for r in rr])
        finite = np.isfinite(pd.to_numeric(df["request_rate"], errors="coerce"))
        if not finite.all():
            figs.skipped.append(f"latency vs request rate ({label}): {int((~finite).sum())} runs "
                                "with an infinite/missing request rate are not plotted "
                                "(they are in the tables and CDFs)")
        if finite.any():
            figs.add("latency", f"Latency vs request rate ({label})",
                     F.latency_figure(df, fig_dir, f"latency_vs_rate__{F.slug(tag)}",
                                      f"Online latency vs offered rate: {label}"))
        else:
            figs.skipped.append(f"latency vs request rate ({label}): no finite request rates")
        with_lists = [r for r in rr if r.get("ttfts_ms") or r.get("itls_ms")]
        if with_lists:
            figs.add("cdf", f"TTFT and inter-token latency CDFs ({label})",
                     F.cdf_figure(with_lists, fig_dir, f"latency_cdf__{F.slug(tag)}",
                                  f"Latency distributions: {label}"))
        else:
            figs.skipped.append(f"latency CDFs ({label}): per-request lists are empty")

    traced, missing = [], []
    for r in rs.ok_runs:
        p = rs.trace_path(r)
        if p is None:
            continue
        (traced if p.is_file() else missing).append(r)
    for r in missing:
        figs.skipped.append(f"trace of run {r['run_id']}: file {rs.trace_path(r)} not found")
    if not traced:
        figs.skipped.append("KV blocks over time: no step traces found")
    for (kind, uc), rr in _groups(traced, ["kind", "use_case"]).items():
        nb = max(r["num_blocks"] for r in rr)
        rr = [r for r in rr if r["num_blocks"] == nb]
        if kind == "online":  # one cell: the largest capacity, then rate / request count
            rate = max(float(r["request_rate"]) for r in rr)
            rr = [r for r in rr if float(r["request_rate"]) == rate]
            cell_note = f", {rate:g} req/s"
        else:
            nr = max(r["num_requests"] for r in rr)
            rr = [r for r in rr if r["num_requests"] == nr]
            cell_note = f", {nr} requests"
        chosen: dict[str, tuple[str, pd.DataFrame]] = {}
        for r in sorted(rr, key=lambda r: (r["rep"], r["run_id"])):
            if r["arm"] not in chosen:
                chosen[r["arm"]] = (r["run_id"], load_trace(rs.trace_path(r)))
        figs.add("trace", f"KV blocks and dedup ratio over time ({kind}, {uc})",
                 F.trace_figure(chosen, fig_dir, f"kv_blocks_over_time__{kind}_{F.slug(uc)}",
                                f"KV blocks over time: {kind}, {uc}, {nb} blocks capacity"
                                f"{cell_note} (first rep per arm)"))
    return figs


def _sources(path: Path | None) -> list[str | None] | None:
    """The ``source`` of each request of a workload file (None when it is unreadable)."""
    if path is None:
        return None
    try:
        return [getattr(r, "source", None) for r in read_workload(path)]
    except AnalysisError:
        return None


def build_report(
    results: str | Path,
    out_dir: str | Path | None = None,
    allow_mixed: bool = False,
    allow_missing_workloads: bool = False,
) -> Path:
    """Write figures, tables and ``report.md``/``report.html``; return the output dir."""
    rs = load_results(results, allow_mixed=allow_mixed,
                      allow_missing_workloads=allow_missing_workloads)
    if not rs.ok_runs:
        raise AnalysisError(f"{rs.root}: all {len(rs.runs)} runs failed; nothing to report")
    out = Path(out_dir) if out_dir is not None else rs.root / "report"
    fig_dir, tab_dir = out / "figures", out / "tables"
    try:
        fig_dir.mkdir(parents=True, exist_ok=True)
        tab_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnalysisError(f"cannot create output directory {out}: {exc}") from None

    figs = _make_figures(rs, fig_dir)

    tables: list[tuple[str, str]] = []
    off = rs.frame("offline")
    if not off.empty:
        t = summary_table(off, OFFLINE_KEYS, OFFLINE_METRICS)
        t.to_csv(tab_dir / "offline_summary.csv", index=False)
        tables.append(("Offline runs", _md_summary(t, OFFLINE_KEYS, OFFLINE_METRICS)))
    on = rs.frame("online")
    if not on.empty:
        t = summary_table(on, ONLINE_KEYS, ONLINE_METRICS)
        t.to_csv(tab_dir / "online_summary.csv", index=False)
        tables.append(("Online runs", _md_summary(t, ONLINE_KEYS, ONLINE_METRICS)))

    online_runs = [r for r in rs.ok_runs if r["kind"] == "online"]
    sources = {wf: _sources(rs.workloads.get(wf))  # each workload file read once
               for wf in {r["workload_file"] for r in online_runs}}
    rep = repeat_table(online_runs, lambda r: sources[r["workload_file"]])
    if not rep.empty and set(rep["label"]) - {"unknown"}:
        rep.to_csv(tab_dir / "online_repeats.csv", index=False)
        tables.append(("Online latency: first occurrences vs repeats (see analysis/repeats.py)",
                       _md_frame(rep.round({c: 0 for c in rep.columns
                                            if c.endswith("_ms")}))))

    split = split_table(rs)
    if not split.empty:
        split.to_csv(tab_dir / "time_split.csv", index=False)
        bounds = amdahl_bounds(split)
        tables.append(("Where the time goes (offline step traces)",
                       _md_frame(split.round(3))))
        if not bounds.empty:
            bounds.to_csv(tab_dir / "sequence_bounds.csv", index=False)
            tables.append(("Sequence mode: f, 1/(1-f) and the decode-aware bound "
                           "(see analysis/timesplit.py)", _md_frame(bounds)))

    quality = rs.root / "quality" / "summary.md"   # experiments.quality guard's, if run
    if quality.is_file():
        body = quality.read_text(encoding="utf-8").split("\n", 1)[-1].strip()
        tables.append(("Quality guard (experiments.quality guard; quality/summary.md)",
                       body.replace("\n## ", "\n#### ")))

    checklist = evaluation_checklist(rs, figs.kinds)
    pd.DataFrame([c.__dict__ for c in checklist]).to_csv(tab_dir / "checklist.csv", index=False)

    md = _render_markdown(rs, out, figs, tables, checklist)
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(markdown_to_html(md, "kvdedup report"), encoding="utf-8")
    return out


def _render_markdown(rs: ResultSet, out: Path, figs: _Figures,
                     tables: list[tuple[str, str]], checklist: list[CheckItem]) -> str:
    ok = rs.ok_runs
    first = ok[0]
    lines = [
        "# kvdedup experiment report",
        "",
        f"Results: `{rs.root}` -- {len(rs.runs)} runs ({len(ok)} ok, {len(rs.failed_runs)} failed); "
        f"kinds: {', '.join(sorted({r['kind'] for r in ok}))}; "
        f"arms: {', '.join(a for a in ARMS if any(r['arm'] == a for r in ok))}; "
        f"use cases: {', '.join(sorted({r['use_case'] for r in ok}))}.",
        "",
        f"Model: `{first['model']}`, config_id: `{first['config_id']}`, "
        f"block size: {', '.join(str(b) for b in sorted({r['block_size'] for r in ok}))} tokens.",
        "",
    ]
    if rs.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in rs.notes] + [""]
    lines += ["## Evaluation checklist", ""]
    lines += [f"- **{'PASS' if c.ok else 'FAIL'}** {c.name}: {c.detail}" for c in checklist]
    lines += ["", "## Figures", ""]
    for name, paths in figs.made.items():
        rel = [p.relative_to(out).as_posix() for p in paths]
        lines += [f"### {figs.titles[name]}", "", f"![{figs.titles[name]}]({rel[0]})", "",
                  f"Files: [PNG]({rel[0]}), [PDF]({rel[1]}), [data CSV]({rel[2]})", ""]
    if figs.skipped:
        lines += ["### Skipped figures", ""] + [f"- {s}" for s in figs.skipped] + [""]
    lines += ["## Tables", "",
              "Cells: median over reps, `[min-max]` when reps differ; "
              f"`/ {BASELINE_ARM}` columns: ratio of medians vs {BASELINE_ARM} in the same cell. "
              "CSV versions are in `tables/`.", ""]
    for title, md in tables:
        lines += [f"### {title}", "", md, ""]
    if rs.failed_runs:
        lines += ["## Failed runs", ""] + [
            f"- `{r['run_id']}` ({r['arm']}, {r['use_case']}): {r.get('error')}"
            for r in rs.failed_runs] + [""]
    return "\n".join(lines)

"""Tests for analysis.results / analysis.report / analysis.figures on synthetic results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import AnalysisError
from analysis.__main__ import main
from analysis.report import build_report, markdown_to_html, summary_table
from analysis.results import PARQUET_FIELDS, RUN_FIELDS, load_results, validate_run

# Offline request throughput per (arm, num_blocks) and rep: the tests recompute
# medians / ratios of medians from these by hand.
OFFLINE_RPS = {
    ("vllm-apc", 64): [1.0, 1.2, 1.1],
    ("vllm-apc", 128): [2.0, 2.6, 2.2],
    ("prefix", 64): [1.5, 1.4, 1.9],
    ("prefix", 128): [3.0, 3.3, 2.9],
}
RATES = [1.0, 2.0, 4.0]
ENV = {"versions": {"vllm": "0.32.0"}, "cpu": "test-cpu", "git_commit": "abc123", "threads": 4}


def _base(run_id, kind, arm, nb, rep, use_case="summarization", **over):
    run = {
        "run_id": run_id, "kind": kind, "arm": arm, "use_case": use_case,
        "workload_file": "workloads/summ.jsonl", "num_blocks": nb, "block_size": 16,
        "num_requests": 8, "rep": rep, "model": "tiny-model", "config_id": "cfg1",
        "status": "ok", "error": None, "env": ENV,
    }
    run.update(over)
    return run


def _offline(arm, nb, rep, rps, **over):
    rid = f"off-{arm}-{nb}-r{rep}"
    run = _base(rid, "offline", arm, nb, rep, **over)
    run.update({
        "elapsed_s": 8 / rps, "request_throughput": rps, "total_token_throughput": rps * 300.0,
        "output_throughput": rps * 50.0, "total_input_tokens": 2000, "total_output_tokens": 400,
        "peak_physical_blocks": nb * (0.5 if arm == "prefix" else 0.9),
        "mean_physical_blocks": nb * 0.4, "peak_logical_blocks": nb * 0.9,
        "mean_dedup_ratio": 1.8 if arm == "prefix" else 1.0, "hit_rate": 0.5,
        "preemptions": 0, "trace": f"traces/{rid}.jsonl",
    })
    return run


def _online(arm, rate, rep):
    rid = f"on-{arm}-{rate:g}-r{rep}"
    run = _base(rid, "online", arm, 128, rep)
    slow = 1.0 if arm == "vllm-apc" else 0.7
    rng = np.random.default_rng(int(rate * 10) + rep + (0 if arm == "prefix" else 100))
    ttfts = list(rng.gamma(2.0, 20.0 * rate * slow, size=8))
    itls = list(rng.gamma(3.0, 5.0 * slow, size=8 * 49))
    run.update({
        "request_rate": rate, "burstiness": 1.0, "duration_s": 8 / rate, "completed": 8,
        "failed": 0, "goodput": rate * (0.9 if arm == "prefix" else 0.8),
        "mean_normalized_latency_s": 0.02 * rate * slow + 0.001 * rep,
        "p95_normalized_latency_s": 0.04 * rate * slow + 0.001 * rep,
        "slo_normalized_latency_s": 0.1,
        "ttfts_ms": ttfts, "itls_ms": itls, "e2els_ms": [t + 49 * 15 for t in ttfts],
        "output_lens": [50] * 8,
    })
    for m, base in (("ttft", 40.0), ("tpot", 15.0), ("itl", 15.0), ("e2el", 800.0)):
        for s, f in (("mean", 1.0), ("median", 0.9), ("p90", 1.5), ("p95", 1.8), ("p99", 2.5)):
            run[f"{s}_{m}_ms"] = base * f * rate * slow + rep
    return run


def _trace_lines(nb, arm, n=40):
    out = []
    for s in range(n):
        logical = int(nb * 0.9 * math.sin(math.pi * s / n) + 1)
        physical = max(1, int(logical * (0.55 if arm == "prefix" else 1.0)))
        out.append({
            "step": s, "time": s * 0.05, "num_running": 4, "num_waiting": max(0, 4 - s),
            "logical_blocks": logical, "physical_blocks": physical,
            "dedup_ratio": logical / physical, "bytes_saved": (logical - physical) * 1024,
            "prefix_queries": 100 * s, "prefix_hits": 50 * s, "verified_hits": 50 * s,
            "collisions": 0, "preemptions": 0,
        })
    return out


def make_results(root: Path, online: bool = True, traces: bool = True, meta: bool = True) -> Path:
    """Write a synthetic results directory; return its path."""
    (root / "runs").mkdir(parents=True)
    (root / "traces").mkdir()
    wl = root / "workloads"
    wl.mkdir()
    (wl / "summ.jsonl").write_text(json.dumps({
        "prompt_token_ids": [1, 2, 3], "output_len": 50, "arrival_time": None,
        "session_id": None, "source": "synthetic"}) + "\n")
    if meta:
        (wl / "summ.jsonl.meta.json").write_text(json.dumps({"name": "summ"}))
    runs = []
    for (arm, nb), vals in OFFLINE_RPS.items():
        for rep, rps in enumerate(vals):
            run = _offline(arm, nb, rep, rps)
            if not traces:
                run["trace"] = None
            runs.append(run)
            if traces:
                with (root / run["trace"]).open("w") as fh:
                    for line in _trace_lines(nb, arm):
                        fh.write(json.dumps(line) + "\n")
    if online:
        runs += [_online(arm, rate, rep) for arm in ("vllm-apc", "prefix")
                 for rate in RATES for rep in range(3)]
    for run in runs:
        (root / "runs" / f"{run['run_id']}.json").write_text(json.dumps(run))
    pd.DataFrame([{k: r.get(k) for k in PARQUET_FIELDS} for r in runs]).to_parquet(
        root / "runs.parquet")
    (root / "summary.json").write_text(json.dumps({"runs": len(runs)}))
    return root


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    root = make_results(tmp_path_factory.mktemp("res") / "OUT")
    out = build_report(root)
    return root, out


# ---------------------------------------------------------------- schema


def test_schema_lists_every_documented_field():
    names = {f.name for f in RUN_FIELDS}
    for f in ("run_id", "config_id", "hit_rate", "p99_itl_ms", "mean_normalized_latency_s",
              "ttfts_ms", "output_lens", "trace", "env"):
        assert f in names
    assert "itls_ms" not in PARQUET_FIELDS and "env" not in PARQUET_FIELDS


def test_validator_names_missing_fields():
    run = _offline("prefix", 64, 0, 1.0)
    del run["hit_rate"], run["model"]
    with pytest.raises(AnalysisError, match=r"x\.json: missing fields: model, hit_rate"):
        validate_run(run, "x.json")


def test_validator_rejects_bad_enum_and_type():
    run = _offline("prefix", 64, 0, 1.0)
    run.update(arm="magic", num_blocks="many")
    with pytest.raises(AnalysisError, match=r"arm .*not one of.*num_blocks \(expected int"):
        validate_run(run, "r.json")


def test_failed_run_needs_only_identity():
    run = _base("f1", "offline", "prefix", 64, 0, status="failed", error="OOM")
    assert validate_run(run, "f1.json")["status"] == "failed"


# ---------------------------------------------------------------- tables


def test_offline_medians_and_ratio_vs_apc(full_report):
    _, out = full_report
    t = pd.read_csv(out / "tables" / "offline_summary.csv")
    for (arm, nb), vals in OFFLINE_RPS.items():
        row = t[(t["arm"] == arm) & (t["num_blocks"] == nb)].iloc[0]
        assert row["request_throughput_median"] == pytest.approx(float(np.median(vals)))
        assert row["request_throughput_min"] == pytest.approx(min(vals))
        assert row["request_throughput_max"] == pytest.approx(max(vals))
        assert row["n_reps"] == 3
    row = t[(t["arm"] == "prefix") & (t["num_blocks"] == 64)].iloc[0]
    # hand-computed: median(1.5, 1.4, 1.9) / median(1.0, 1.2, 1.1) = 1.5 / 1.1
    assert row["request_throughput_ratio_vs_vllm-apc"] == pytest.approx(1.5 / 1.1)
    row = t[(t["arm"] == "prefix") & (t["num_blocks"] == 128)].iloc[0]
    assert row["total_token_throughput_ratio_vs_vllm-apc"] == pytest.approx(3.0 / 2.2)
    base = t[t["arm"] == "vllm-apc"]
    assert (base["request_throughput_ratio_vs_vllm-apc"] == 1.0).all()
    md = (out / "report.md").read_text()
    assert "1.5 [1.4-1.9]" in md and f"{1.5 / 1.1:.3f}" in md


def test_online_table_ratio(full_report):
    _, out = full_report
    t = pd.read_csv(out / "tables" / "online_summary.csv")
    row = t[(t["arm"] == "prefix") & (t["request_rate"] == 2.0)].iloc[0]
    # mean_normalized_latency_s = 0.02*rate*slow + 0.001*rep -> median rep 1
    apc = 0.02 * 2.0 * 1.0 + 0.001
    pre = 0.02 * 2.0 * 0.7 + 0.001
    assert row["mean_normalized_latency_s_median"] == pytest.approx(pre)
    assert row["mean_normalized_latency_s_ratio_vs_vllm-apc"] == pytest.approx(pre / apc)


def test_summary_table_without_baseline_gives_nan():
    df = pd.DataFrame({"use_case": ["a"] * 2, "num_blocks": [1, 1], "arm": ["prefix"] * 2,
                       "request_throughput": [1.0, 3.0]})
    t = summary_table(df, ["use_case", "num_blocks", "arm"], ["request_throughput"])
    assert t["request_throughput_median"].iloc[0] == 2.0
    assert np.isnan(t["request_throughput_ratio_vs_vllm-apc"].iloc[0])


# ---------------------------------------------------------------- figures & report


def test_every_figure_has_png_pdf_csv(full_report):
    _, out = full_report
    figs = out / "figures"
    stems = {p.stem for p in figs.iterdir()}
    expected = {"throughput_vs_kv_blocks", "throughput_by_use_case",
                "latency_vs_rate__summarization", "latency_cdf__summarization",
                "kv_blocks_over_time__offline_summarization"}
    assert expected <= stems
    for stem in stems:
        for ext in ("png", "pdf", "csv"):
            p = figs / f"{stem}.{ext}"
            assert p.is_file() and p.stat().st_size > 0, p
    mem = pd.read_csv(figs / "throughput_vs_kv_blocks.csv")
    assert len(mem) == 4 and set(mem["arm"]) == {"vllm-apc", "prefix"}
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert "<table>" in (out / "report.html").read_text()


def test_checklist_contents(full_report):
    _, out = full_report
    md = (out / "report.md").read_text()
    assert "**PASS** baseline present (vllm-apc" in md
    assert "**PASS** workload provenance" in md
    assert "**PASS** repetitions >= 3 per cell" in md
    assert "**PASS** distributions shown" in md
    assert "**PASS** environment recorded" in md
    assert "**PASS** generated token counts equal across arms" in md


def test_offline_only_skips_latency_figures(tmp_path):
    root = make_results(tmp_path / "OUT", online=False, traces=False, meta=False)
    out = build_report(root, out_dir=tmp_path / "rep")
    stems = {p.stem for p in (out / "figures").iterdir()}
    assert stems == {"throughput_vs_kv_blocks", "throughput_by_use_case"}
    md = (out / "report.md").read_text()
    assert "latency vs request rate: no successful online runs" in md
    assert "KV blocks over time: no step traces found" in md
    assert "**FAIL** workload provenance" in md


def test_unequal_generated_tokens_flagged(tmp_path):
    root = make_results(tmp_path / "OUT", online=False, traces=False)
    p = root / "runs" / "off-prefix-64-r0.json"
    run = json.loads(p.read_text())
    run["total_output_tokens"] = 399
    p.write_text(json.dumps(run))
    md = (build_report(root) / "report.md").read_text()
    assert "**FAIL** generated token counts equal across arms" in md
    assert "prefix=[399, 400]" in md


# ---------------------------------------------------------------- bad input


def test_mixed_config_refused_then_allowed(tmp_path, capsys):
    root = make_results(tmp_path / "OUT", online=False, traces=False)
    p = root / "runs" / "off-prefix-64-r0.json"
    run = json.loads(p.read_text())
    run["config_id"] = "cfg2"
    p.write_text(json.dumps(run))
    with pytest.raises(AnalysisError, match=r"config_id: 'cfg1' \(11 runs.*'cfg2' \(1 runs, e\.g\. off-prefix-64-r0\)"):
        load_results(root)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: runs differ in config_id") and "Traceback" not in err
    out = build_report(root, allow_mixed=True)
    assert "runs differ in config_id" in (out / "report.md").read_text()


def test_mixed_model_refused(tmp_path):
    root = make_results(tmp_path / "OUT", online=False, traces=False)
    p = root / "runs" / "off-vllm-apc-128-r2.json"
    run = json.loads(p.read_text())
    run["model"] = "other-model"
    p.write_text(json.dumps(run))
    with pytest.raises(AnalysisError, match="runs differ in model: 'other-model'"):
        load_results(root)


def test_missing_runs_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "missing runs/ directory" in capsys.readouterr().err
    (tmp_path / "empty" / "runs").mkdir()
    with pytest.raises(AnalysisError, match="no run JSON files"):
        load_results(tmp_path / "empty")
    with pytest.raises(AnalysisError, match="results directory not found"):
        load_results(tmp_path / "nope")


def test_unreadable_and_partial_run_json(tmp_path):
    root = make_results(tmp_path / "OUT", online=False, traces=False)
    bad = root / "runs" / "off-prefix-64-r1.json"
    bad.write_text("{not json")
    with pytest.raises(AnalysisError, match=r"off-prefix-64-r1\.json: unreadable JSON"):
        load_results(root)
    run = _offline("prefix", 64, 1, 1.4)
    for k in ("elapsed_s", "total_output_tokens", "env"):
        del run[k]
    bad.write_text(json.dumps(run))
    with pytest.raises(AnalysisError,
                       match=r"off-prefix-64-r1\.json: missing fields: env, elapsed_s, total_output_tokens"):
        load_results(root)


def test_unknown_workload_file(tmp_path):
    root = make_results(tmp_path / "OUT", online=False, traces=False)
    (root / "workloads" / "summ.jsonl").unlink()
    with pytest.raises(AnalysisError, match="unknown workload file 'workloads/summ.jsonl'"):
        load_results(root)
    out = build_report(root, allow_missing_workloads=True)
    assert "workload not found" in (out / "report.md").read_text()


def test_bad_trace_line_named(tmp_path):
    root = make_results(tmp_path / "OUT", online=False)
    p = root / "traces" / "off-prefix-128-r0.jsonl"
    p.write_text(p.read_text() + '{"step": 99}\n')
    with pytest.raises(AnalysisError, match=r"off-prefix-128-r0\.jsonl:41: missing fields: time"):
        build_report(root)


def test_markdown_to_html_subset():
    h = markdown_to_html("# T\n\n- **a** `b`\n\n| x | y |\n|---|---|\n| 1 | 2 |\n\n![c](f.png)\n")
    assert "<h1>T</h1>" in h and "<li><strong>a</strong> <code>b</code></li>" in h
    assert "<th>x</th>" in h and "<td>2</td>" in h and 'src="f.png"' in h


def test_online_repeats_table_when_sources_name_documents(tmp_path):
    root = make_results(tmp_path / "OUT")
    lines = [json.dumps({"prompt_token_ids": [1, 2, 3], "output_len": 50, "arrival_time": None,
                         "session_id": None, "source": f"mi:doc{i // 2}:instr{i}"})
             for i in range(8)]
    (root / "workloads" / "summ.jsonl").write_text("\n".join(lines) + "\n")
    out = build_report(root)
    table = pd.read_csv(out / "tables" / "online_repeats.csv")
    assert set(table["label"]) == {"first", "repeat"}
    assert (table.groupby(["arm", "request_rate"])["requests"].sum() == 8 * 3).all()
    assert "first occurrences vs repeats" in (out / "report.md").read_text()


def test_no_repeats_table_without_documents(full_report):
    _, out = full_report
    assert not (out / "tables" / "online_repeats.csv").exists()


def test_two_request_counts_are_two_cells_in_report_and_runner_summary(tmp_path):
    """offline-throughput sweeps num_requests: a cell per count, never one median over both."""
    from experiments.runner import summarize

    root = make_results(tmp_path / "OUT", online=False, traces=False)
    rps = {32: {"vllm-apc": [1.0, 1.1, 1.2], "prefix": [1.5, 1.6, 1.7]},
           64: {"vllm-apc": [2.0, 2.1, 2.2], "prefix": [2.2, 2.4, 2.6]}}
    for p in (root / "runs").glob("*.json"):
        p.unlink()
    runs = []
    for nr, arms in rps.items():
        for arm, vals in arms.items():
            for rep, v in enumerate(vals):
                run = _offline(arm, 64, rep, v, num_requests=nr, total_output_tokens=50 * nr,
                               trace=None)
                run["run_id"] = f"off-{arm}-n{nr}-r{rep}"
                runs.append(run)
                (root / "runs" / f"{run['run_id']}.json").write_text(json.dumps(run))
    pd.DataFrame([{k: r.get(k) for k in PARQUET_FIELDS} for r in runs]).to_parquet(
        root / "runs.parquet")
    out = build_report(root)
    t = pd.read_csv(out / "tables" / "offline_summary.csv")
    assert len(t) == 4 and (t["n_reps"] == 3).all()
    for nr, arms in rps.items():
        row = t[(t["arm"] == "prefix") & (t["num_requests"] == nr)].iloc[0]
        ratio = np.median(arms["prefix"]) / np.median(arms["vllm-apc"])
        assert row["request_throughput_ratio_vs_vllm-apc"] == pytest.approx(ratio)
    md = (out / "report.md").read_text()
    assert "**PASS** generated token counts equal across arms" in md
    assert "**PASS** repetitions >= 3 per cell" in md
    mem = pd.read_csv(out / "figures" / "throughput_vs_kv_blocks.csv")
    assert sorted(mem["num_requests"]) == [32, 32, 64, 64] and (mem["n_reps"] == 3).all()
    # the runner's summary.json: the same cells, the same numbers
    s = summarize(runs)
    assert [(c["num_requests"], c["comparable"]) for c in s["cells"]] == [(32, True), (64, True)]
    for c in s["cells"]:
        row = t[(t["arm"] == "prefix") & (t["num_requests"] == c["num_requests"])].iloc[0]
        pre = c["arms"]["prefix"]
        assert pre["request_throughput"]["median"] == row["request_throughput_median"]
        assert pre["ratio_vs_vllm_apc"] == pytest.approx(row["request_throughput_ratio_vs_vllm-apc"])


def test_checklist_fails_a_cell_without_the_baseline():
    from types import SimpleNamespace

    from analysis.report import evaluation_checklist

    run = {"kind": "offline", "use_case": "u", "num_blocks": 8, "num_requests": 2,
           "arm": "shared", "status": "ok", "run_id": "r0", "env": {}}
    rs = SimpleNamespace(ok_runs=[run], runs=[run], failed_runs=[], workloads={})
    first = evaluation_checklist(rs, set())[0]
    assert not first.ok and "lacks vllm-apc" in first.detail


def test_every_arm_has_its_own_figure_style():
    from analysis.figures import ARM_STYLE
    from experiments.schema import ARMS

    assert set(ARMS) <= set(ARM_STYLE)
    styles = [(ARM_STYLE[a]["color"], ARM_STYLE[a]["marker"]) for a in ARMS]
    assert len(set(styles)) == len(styles)


def test_use_case_bars_order_numbers_by_value(tmp_path, monkeypatch):
    """Bar groups named with numbers (readers per document) are ordered r8 before r12."""
    import matplotlib.axes

    from analysis.figures import use_case_figure

    rows = [{"use_case": uc, "num_requests": 32, "num_blocks": 128, "arm": arm, "rep": 0,
             "request_throughput": 1.0, "total_token_throughput": 10.0}
            for uc in ("mil-r12", "mil-r8", "mil-r4") for arm in ("vllm-apc", "shared")]
    labels: list = []
    real = matplotlib.axes.Axes.set_xticks

    def spy(ax, ticks, lab=None, **kw):
        labels.append([str(x).split("\n")[0] for x in (lab or [])])
        return real(ax, ticks, lab, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks", spy)
    paths = use_case_figure(pd.DataFrame(rows), tmp_path)
    assert labels[0] == ["mil-r4", "mil-r8", "mil-r12"]
    assert all(p.exists() for p in paths)

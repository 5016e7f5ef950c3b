"""Tests of the experiment harness (experiments/{config,runner,offline,online}.py).

Engine tests use the tiny model and start as few engines as possible: one offline sweep
of 2 arms x 1 capacity x 8 requests (2 engines), then the same command again (resume:
no engine), and one server for the online client.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import runner
from experiments.__main__ import main as cli_main
from experiments.config import ConfigError, load_config, parse_config
from experiments.online import (RequestResult, arrival_times, compute_metrics, run_client,
                                trace_counters,
                                server_command, start_server, stop_server, free_port)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir() -> str:
    from vllm_ext.models import resolve_model

    return resolve_model("tiny")


@pytest.fixture(scope="module")
def workload(tmp_path_factory, tiny_dir) -> Path:
    out = tmp_path_factory.mktemp("wl") / "shared-template.jsonl"
    subprocess.run([sys.executable, "-m", "experiments.workloads", "generate", "shared-template",
                    "--out", str(out), "--tokenizer", tiny_dir, "--template-tokens", "128",
                    "--num-requests", "8", "--max-prompt-tokens", "384", "--quiet"],
                   cwd=REPO, check=True, capture_output=True)
    return out


def write_cfg(tmp: Path, workload: Path, **over) -> Path:
    cfg = {"name": "t", "kind": "offline", "model": "tiny", "arms": ["vllm", "prefix"],
           "reps": 1, "engine": {"max_model_len": 1024, "max_num_seqs": 16,
                                 "max_num_batched_tokens": 1024},
           "workloads": [{"use_case": "shared-template", "file": str(workload)}],
           "num_blocks": [64], "num_requests": [8]}
    cfg.update(over)
    p = tmp / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# ----------------------------------------------------------------------------- no engine
def test_bad_inputs_exit_2_without_engine(tmp_path, workload, capsys, monkeypatch):
    started = []
    monkeypatch.setattr(runner, "execute", lambda *a, **k: started.append(a))
    cfg = write_cfg(tmp_path, workload)
    # unknown arm
    assert cli_main(["run", str(cfg), "--arms", "vllm", "bogus", "--out", str(tmp_path / "o")]) == 2
    assert "error: unknown arm 'bogus'" in capsys.readouterr().err
    # bad sequence-mode options
    bad_seq = write_cfg(tmp_path, workload, sequence={"k": -1})
    assert cli_main(["run", str(bad_seq), "--out", str(tmp_path / "o")]) == 2
    assert "sequence.k must be an int >= 0" in capsys.readouterr().err
    cfg = write_cfg(tmp_path, workload)
    # missing workload
    cfg2 = write_cfg(tmp_path, tmp_path / "nope.jsonl")
    assert cli_main(["run", str(cfg2), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.jsonl" in err
    # capacity too small for one request
    cfg3 = write_cfg(tmp_path, workload, num_blocks=[3])
    assert cli_main(["run", str(cfg3), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: capacity too small" in err and "num_blocks 3" in err
    # the pool less vLLM's null block must hold one sequence of max_model_len (1024 / 32 + 1)
    cfg3 = write_cfg(tmp_path, workload, num_blocks=[32])
    assert cli_main(["run", str(cfg3), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "num_blocks 32 is below what vLLM needs for max_model_len 1024" in err
    assert "max_model_len to <= 992" in err
    # more requests than the workload has
    cfg4 = write_cfg(tmp_path, workload, num_requests=[99])
    assert cli_main(["run", str(cfg4), "--out", str(tmp_path / "o")]) == 2
    assert "num_requests 99" in capsys.readouterr().err
    # unknown use case
    assert cli_main(["run", str(cfg), "--use-cases", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: unknown use case(s) nope" in err and "has shared-template" in err
    # missing config
    assert cli_main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert started == [] and not (tmp_path / "o" / "runs").exists()


def test_use_cases_selects_workloads(tmp_path, workload, capsys):
    cfg = write_cfg(tmp_path, workload, workloads=[
        {"use_case": "shared-template", "file": str(workload)},
        {"use_case": "copy", "file": str(workload)}])
    assert cli_main(["run", str(cfg), "--use-cases", "copy", "--dry-run",
                     "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr()
    listed = out.out + out.err
    assert "offline_copy_" in listed and "shared-template" not in listed


def test_num_blocks_overrides_capacities(tmp_path, workload, capsys):
    cfg = write_cfg(tmp_path, workload)
    assert cli_main(["run", str(cfg), "--num-blocks", "96", "64", "--dry-run",
                     "--out", str(tmp_path / "o")]) == 0
    listed = "".join(capsys.readouterr())
    assert "_b96_" in listed and "_b64_" in listed
    assert cli_main(["run", str(cfg), "--num-blocks", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--num-blocks: expected integers >= 1, got 0" in capsys.readouterr().err


def test_crashed_run_is_recorded_and_sweep_goes_on(tmp_path, workload, capsys, monkeypatch):
    calls = []

    def boom(spec, out, timeout_s):
        calls.append(spec["run_id"])
        if spec["arm"] == "vllm":
            raise RuntimeError("run exited with status 1: engine exploded")
        return {"elapsed_s": 1.0, "request_throughput": 8.0, "total_token_throughput": 9.0,
                "output_throughput": 1.0, "total_input_tokens": 8, "total_output_tokens": 1,
                "peak_physical_blocks": 1.0, "mean_physical_blocks": 1.0,
                "peak_logical_blocks": 1.0, "mean_dedup_ratio": 1.0, "hit_rate": 0.5,
                "preemptions": 0}

    monkeypatch.setattr(runner, "_run_offline_child", boom)
    monkeypatch.setattr("vllm_ext.models.resolve_model", lambda m: "/nonexistent-model")
    out = tmp_path / "o"
    rc = cli_main(["run", str(write_cfg(tmp_path, workload)), "--out", str(out), "--no-progress"])
    assert rc == 1 and len(calls) == 2
    failed = json.loads((out / "runs" / "offline_shared-template_vllm_b64_n8_rep0.json").read_text())
    assert failed["status"] == "failed" and "engine exploded" in failed["error"]
    from analysis.results import load_results

    assert len(load_results(out).runs) == 2  # failed runs are valid records too
    # the failed run is retried on the next invocation, the ok one is not
    calls.clear()
    cli_main(["run", str(write_cfg(tmp_path, workload)), "--out", str(out), "--no-progress"])
    assert calls == ["offline_shared-template_vllm_b64_n8_rep0"]


def test_server_start_failure_stops_sweep_with_exit_2(tmp_path, workload, capsys, monkeypatch):
    from experiments import online

    def fail(spec):
        raise online.ServerError("server exited with status 1 before it was ready; log x, "
                                 "last lines:\nValueError: bad flag")

    monkeypatch.setattr(online, "run_online", fail)
    monkeypatch.setattr("vllm_ext.models.resolve_model", lambda m: "/nonexistent-model")
    cfg = write_cfg(tmp_path, workload, kind="online", online={"request_rates": [1.0, 2.0]})
    out = tmp_path / "o"
    assert cli_main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: server for run" in err and "ValueError: bad flag" in err
    assert len(list((out / "runs").glob("*.json"))) == 1  # recorded, then stopped


def test_config_validation_and_ids(tmp_path, workload):
    base = yaml.safe_load(write_cfg(tmp_path, workload).read_text())
    cfg = parse_config(base)
    assert cfg.config_id() == parse_config({**base, "arms": ["prefix"], "num_blocks": [99]}).config_id()
    assert cfg.config_id() != parse_config({**base, "engine": {"max_num_seqs": 8}}).config_id()
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({**base, "bogus": 1})
    with pytest.raises(ConfigError, match="set by the runner"):
        parse_config({**base, "engine": {"enable_prefix_caching": True}})
    # the shipped configs all load (and their quick variants)
    for p in sorted((REPO / "experiments" / "configs").glob("*.yaml")):
        load_config(p)
        load_config(p, quick=True)


def test_config_base_merges_under_the_file(tmp_path, workload):
    base_file = write_cfg(tmp_path, workload)  # engine, workloads, sequence from here
    raw = yaml.safe_load(base_file.read_text())
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": base_file.name, "sequence": {"k": 128},
                                     "engine": {"max_num_seqs": 8}}))
    cfg = load_config(child)
    assert cfg.name == "child"  # the file's own name, not the base's
    assert cfg.sequence["k"] == 128 and cfg.engine["max_num_seqs"] == 8
    assert cfg.engine["max_model_len"] == raw["engine"]["max_model_len"]  # kept from the base
    assert [w.file for w in cfg.workloads] == [w.file for w in load_config(base_file).workloads]
    # the shipped k = 128 variants differ from their bases only in k and name
    for name, base in (("shared-capacity-k128", "shared-capacity"),
                       ("shared-memory-k128", "shared-memory")):
        v, b = load_config(name), load_config(base)
        assert v.sequence["k"] == 128 and b.sequence["k"] == 32 and v.name == name
        assert v.engine == b.engine and v.num_blocks == b.num_blocks
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "missing.yaml").write_text("base: no-such-config\n")
    with pytest.raises(ConfigError, match="base: config file not found: no-such-config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("base: [a, b]\n")
    with pytest.raises(ConfigError, match="base must be a config path or name"):
        load_config(tmp_path / "bad.yaml")


def test_plan_interleaves_arms(tmp_path, workload):
    cfg = parse_config({**yaml.safe_load(write_cfg(tmp_path, workload).read_text()),
                        "arms": ["vllm", "vllm-apc", "prefix"], "reps": 3})
    order = [(r["rep"], r["arm"]) for r in runner.plan(cfg)]
    assert order == [(rep, a) for rep in range(3) for a in ("vllm", "vllm-apc", "prefix")]
    assert len({r["run_id"] for r in runner.plan(cfg)}) == 9


def test_arrivals_and_metrics():
    a = arrival_times(10_000, rate=5.0, burstiness=1.0, duration_s=200.0, seed=1)
    assert 800 < len(a) < 1200 and a == sorted(a) and a[-1] <= 200.0
    gaps = [y - x for x, y in zip(a, a[1:])]
    assert abs(sum(gaps) / len(gaps) - 0.2) < 0.03
    bursty = arrival_times(10_000, rate=5.0, burstiness=0.2, duration_s=200.0, seed=1)
    bg = [y - x for x, y in zip(bursty, bursty[1:])]
    cv = lambda g: (sum((x - sum(g) / len(g)) ** 2 for x in g) / len(g)) ** 0.5 / (sum(g) / len(g))
    assert cv(bg) > 1.5 * cv(gaps)
    assert len(arrival_times(7, 1.0, 1.0, 1e6, 0)) == 7  # bounded by max_requests
    assert arrival_times(3, math.inf, 1.0, 10, 0) == [0.0, 0.0, 0.0]
    rs = [RequestResult(10, 4, True, "", 0, 0.1, 0.4, [0.1, 0.1, 0.1], 4),
          RequestResult(10, 4, True, "", 0, 0.2, 2.2, [1.0, 0.5, 0.5], 4),
          RequestResult(10, 4, False, "HTTP 400: too long")]
    m = compute_metrics(rs, duration_s=2.0, slo_s=0.2)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["mean_tpot_ms"] == pytest.approx((100.0 + 2000.0 / 3) / 2)
    assert m["mean_normalized_latency_s"] == pytest.approx((0.1 + 0.55) / 2)
    assert m["goodput"] == pytest.approx(0.5)  # one of two meets 0.2 s/token, over 2 s
    assert len(m["itls_ms"]) == 6 and m["output_lens"] == [4, 4]
    rs2 = [RequestResult(10, 4, False, "HTTP 400: too long"), *rs[:2]]
    assert compute_metrics(rs2, duration_s=2.0, slo_s=0.2)["ok_requests"] == [1, 2]


def test_summary_refuses_different_token_counts():
    def run(arm, toks, rps):
        return {"run_id": f"{arm}", "kind": "offline", "arm": arm, "use_case": "u",
                "num_blocks": 10, "num_requests": 2, "rep": 0, "status": "ok",
                "total_output_tokens": toks, "request_throughput": rps}
    s = runner.summarize([run("vllm-apc", 10, 1.0), run("prefix", 10, 2.0)])
    assert s["cells"][0]["arms"]["prefix"]["ratio_vs_vllm_apc"] == pytest.approx(2.0)
    s = runner.summarize([run("vllm-apc", 10, 1.0), run("prefix", 11, 2.0)])
    assert not s["cells"][0]["comparable"]
    assert s["cells"][0]["arms"]["prefix"]["ratio_vs_vllm_apc"] is None


def test_server_command_is_loopback_and_per_arm(tiny_model):
    stock = server_command(tiny_model, "vllm", {"block_size": 32, "enforce_eager": True}, 50, 8000)
    assert stock[stock.index("--host") + 1] == "127.0.0.1"
    assert "--no-enable-prefix-caching" in stock and "--enforce-eager" in stock
    assert stock[stock.index("--num-gpu-blocks-override") + 1] == "50"
    apc = server_command(tiny_model, "vllm-apc", {}, 50, 8000)
    assert "--enable-prefix-caching" in apc
    kv = json.loads(apc[apc.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"]["mode"] == "observe"
    pre = server_command(tiny_model, "prefix", {}, 50, 8000)
    kv = json.loads(pre[pre.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"]["mode"] == "prefix"
    seq = server_command(tiny_model, "sequence", {}, 50, 8000, sequence={"k": 16})
    kv = json.loads(seq[seq.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"] == {"k": 16, "mode": "sequence"}


# ----------------------------------------------------------------------------- engine
@pytest.mark.engine
def test_offline_sweep_and_resume(tmp_path, workload, capsys):
    from analysis.results import RUN_FIELDS, load_results
    import pandas as pd

    cfg = write_cfg(tmp_path, workload)
    out = tmp_path / "out"
    rc = cli_main(["run", str(cfg), "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    files = sorted((out / "runs").glob("*.json"))
    assert len(files) == 2
    rs = load_results(out)  # schema validation by the analysis side
    runs = {r["arm"]: r for r in rs.runs}
    for r in runs.values():
        assert r["status"] == "ok", r["error"]
        for f in RUN_FIELDS:
            if f.scope in ("all", "offline"):
                assert f.name in r, f.name
        assert r["num_requests"] == 8 and r["num_blocks"] == 64 and r["block_size"] == 32
        assert r["reference_output_lens_match"] is True
        assert r["request_throughput"] > 0 and r["peak_physical_blocks"] > 0
        trace = out / r["trace"]
        rows = [json.loads(x) for x in trace.read_text().splitlines()]
        assert rows and rows[0]["time"] >= 0
        assert {"step", "physical_blocks", "prefix_hits"} <= set(rows[0])
        assert set(r["env"]) >= {"versions", "cpu", "git_commit", "threads"}
    assert runs["vllm"]["total_output_tokens"] == runs["prefix"]["total_output_tokens"]
    assert runs["vllm"]["config_id"] == runs["prefix"]["config_id"]
    assert runs["vllm"]["hit_rate"] == 0
    assert runs["prefix"]["hit_rate"] > 0
    assert len(pd.read_parquet(out / "runs.parquet")) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"][0]["comparable"] is True
    assert "req/s" in printed and "prefix" in printed
    # resume: nothing is rerun
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert cli_main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "0 runs now" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == mtimes


@pytest.mark.server
def test_online_client_against_live_server(tmp_path, workload, tiny_dir):
    from experiments.workloads import load_workload

    reqs = load_workload(workload).requests[:4]
    port = free_port()
    cmd = server_command(tiny_dir, "prefix", {"block_size": 32, "dtype": "float32",
                                             "max_model_len": 512, "enforce_eager": True,
                                             "max_num_seqs": 8, "seed": 0}, 100, port)
    srv = start_server(cmd, port, tmp_path / "server.log", timeout_s=240)
    try:
        prompts = [r.prompt_token_ids for r in reqs] + [[5] * 600]  # last: > max_model_len
        max_tokens = [8] * len(prompts)
        arr = arrival_times(len(prompts), rate=50.0, burstiness=1.0, duration_s=10.0, seed=0)
        results, duration = run_client(srv.base_url, prompts, max_tokens, arr, timeout_s=120)
        m = compute_metrics(results, duration, slo_s=10.0)
        assert m["failed"] == 1 and m["completed"] == len(reqs)
        assert not results[-1].success and results[-1].error
        for r in results[:-1]:
            assert r.success and 0 < r.ttft_s <= r.e2e_s
            assert r.output_tokens == 8
        assert all(t <= e for t, e in zip(m["ttfts_ms"], m["e2els_ms"]))
        # the server keeps serving after the failed request
        again, _ = run_client(srv.base_url, prompts[:1], [4], [0.0], timeout_s=60)
        assert again[0].success and again[0].output_tokens == 4
        assert srv.proc.poll() is None
    finally:
        stop_server(srv)
    assert srv.proc.poll() is not None


def test_server_that_fails_to_start_reports_log_tail(tmp_path):
    from experiments.online import ServerError

    port = free_port()
    cmd = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    with pytest.raises(ServerError, match="boom: bad flag"):
        start_server(cmd, port, tmp_path / "s.log", timeout_s=30)


def test_online_trace_counters_read_the_last_step(tmp_path):
    """An online run reports the engine's cumulative counters from its trace's last step
    (a partly written last line is skipped) and the peak physical blocks."""
    trace = tmp_path / "t.jsonl"
    rows = [{"step": 1, "physical_blocks": 40, "borrowed_runs": 1, "store_evictions": 0},
            {"step": 2, "physical_blocks": 90, "borrowed_runs": 3, "store_evictions": 2},
            {"step": 3, "physical_blocks": 70, "borrowed_runs": 5, "store_evictions": 7}]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4, "phys')
    got = trace_counters(str(trace))
    assert got == {"borrowed_runs": 5, "store_evictions": 7, "peak_physical_blocks": 90}
    assert trace_counters(str(tmp_path / "missing.jsonl")) == {} and trace_counters(None) == {}


def test_overhead_subtracts_the_kernels_kvdedup_hands_rows_to():
    """experiments.overhead: kvdedup's attention wrapper is its forward less vLLM's
    backend forward, vLLM's kernel called from kvdedup's files and kvdedup's kernel; the
    scheduler's own time is its methods less vLLM's."""
    from experiments.overhead import own_time

    ours = ("/r/vllm_ext/attention.py", 178, "forward")
    vbackend = ("/v/vllm/v1/attention/backends/cpu_attn.py", 344, "forward")
    stats = {
        ours: (10, 10, 0.5, 8.0, {}),
        vbackend: (2, 2, 0.05, 0.75, {ours: (2, 2, 0.05, 0.75)}),
        ("/v/vllm/_custom_ops.py", 3907, "cpu_attention_with_kv_cache"):
            (9, 9, 3.8, 3.8, {ours: (7, 7, 3.1, 3.1), vbackend: (2, 2, 0.7, 0.7)}),
        ("/r/vllm_ext/kernels.py", 111, "borrowed_attention"): (8, 8, 3.0, 3.14, {}),
        ("/r/vllm_ext/scheduler.py", 162, "schedule"): (3, 3, 0.1, 0.575, {}),
        ("/r/vllm_ext/scheduler.py", 210, "update_from_output"): (3, 3, 0.1, 0.191, {}),
        ("/v/vllm/v1/core/sched/scheduler.py", 591, "schedule"): (3, 3, 0.1, 0.4, {}),
        ("/v/vllm/v1/core/sched/scheduler.py", 2026, "update_from_output"): (3, 3, 0.1, 0.15, {}),
    }
    got = own_time(stats)
    assert got["attention_wrapper_s"] == pytest.approx(8.0 - 0.75 - 3.1 - 3.14)
    assert got["scheduler_s"] == pytest.approx(0.575 + 0.191 - 0.4 - 0.15)
    assert got["stock_kernel_s"] == pytest.approx(3.8) and got["kvdedup_kernel_s"] == 3.14
    # stock vLLM (kvdedup's backend not installed): no wrapper time at all
    del stats[ours], stats[("/r/vllm_ext/kernels.py", 111, "borrowed_attention")]
    assert own_time(stats)["attention_wrapper_s"] == 0.0


def test_overhead_refuses_bad_input(tmp_path, capsys):
    from experiments.overhead import main as overhead_main

    assert overhead_main([str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err

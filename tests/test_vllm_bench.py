"""vLLM's serving benchmark on kvdedup workloads: dataset conversion, arguments, arrival
schedule, metric definitions, request functions, and the agreement table."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import numpy as np
import pytest

from experiments.workloads import Request, write_workload

TEXTS = ["The cat sat on the mat. " * 6, "A long article about rivers and their deltas. " * 9,
         "Summarize: the committee met on 3 May and voted 7 to 2.", "short"]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from experiments.vllm_bench import get_tokenizer

    return get_tokenizer(tiny_model)


def _workload(tmp_path, tok, tiny_model, texts=TEXTS):
    reqs = [Request(list(tok(t).input_ids), 3 + i, None, None, f"t:{i}") for i, t in enumerate(texts)]
    return write_workload(tmp_path / "wl.jsonl", reqs, {"tokenizer": {"path": tiny_model}}), reqs


def test_convert_round_trips_through_vllms_custom_dataset(tmp_path, tok, tiny_model):
    from vllm.benchmarks.datasets.datasets import CustomDataset

    from experiments.vllm_bench import convert

    wl, reqs = _workload(tmp_path, tok, tiny_model)
    meta = convert(wl, tmp_path / "custom.jsonl", num_prompts=3)
    assert meta["tokenizer"] == tiny_model and meta["num_prompts"] == 3
    rows = [json.loads(x) for x in (tmp_path / "custom.jsonl").read_text().splitlines()]
    assert [r["output_tokens"] for r in rows] == [3, 4, 5]
    assert [list(tok(r["prompt"]).input_ids) for r in rows] == [r.prompt_token_ids for r in reqs[:3]]
    # vLLM's own reader, as `--dataset-name custom` uses it, sees the same requests in order
    ds = CustomDataset(dataset_path=str(tmp_path / "custom.jsonl"), disable_shuffle=True)
    got = ds.sample(tokenizer=tok, num_requests=3, output_len=-1, skip_chat_template=True)
    assert [s.prompt_len for s in got] == [len(r.prompt_token_ids) for r in reqs[:3]]
    assert [s.expected_output_len for s in got] == [3, 4, 5]


def test_convert_rejects_ids_that_do_not_round_trip(tmp_path, tok, tiny_model):
    from experiments.vllm_bench import BenchError, convert, to_custom_rows

    word = next(w for w in ("the", "cat", "and", "mat") if len(tok(w).input_ids) == 1)
    pieces = [i for ch in word for i in tok(ch).input_ids]   # same text, other tokens
    assert len(pieces) > 1
    bad = Request(pieces, 2, None, None, "split")
    good = Request(list(tok(TEXTS[0]).input_ids), 2, None, None, "ok")
    with pytest.raises(BenchError, match=r"1 of 2 prompts .*requests \[2\]"):
        to_custom_rows([good, bad], tok)
    wl, _ = _workload(tmp_path, tok, tiny_model)
    with pytest.raises(BenchError, match="--num-prompts 9"):
        convert(wl, tmp_path / "c.jsonl", num_prompts=9)
    with pytest.raises(BenchError, match=".jsonl"):
        convert(wl, tmp_path / "c.json")


def test_bench_argv_is_accepted_by_vllms_parser():
    from experiments.vllm_bench import bench_argv, vllm_parser

    a = vllm_parser().parse_args(bench_argv("http://127.0.0.1:1", "d.jsonl", 7, 0.5, 0.8, 3,
                                            "res", "r.json", extra=["--num-warmups", "1"]))
    assert (a.dataset_name, a.dataset_path, a.num_prompts, a.request_rate) == ("custom", "d.jsonl", 7, 0.5)
    assert (a.burstiness, a.seed, a.custom_output_len, a.temperature) == (0.8, 3, -1, 0.0)
    assert a.skip_chat_template and a.disable_shuffle and a.ignore_eos and a.save_detailed
    assert (a.backend, a.endpoint, a.result_filename, a.num_warmups) == ("vllm", "/v1/completions", "r.json", 1)


def test_vllm_arrivals_are_vllms_schedule_without_waiting():
    from experiments.bench_agreement import vllm_arrivals

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = vllm_arrivals(10, 0.5, 1.0, seed=0)
    assert (np.random.get_state()[1] == before).all()        # global numpy state restored
    assert a == sorted(a) and a[0] > 0 and a[-1] == pytest.approx(10 / 0.5)  # vLLM rescales
    assert vllm_arrivals(10, 0.5, 1.0, seed=0) == a != vllm_arrivals(10, 0.5, 1.0, seed=1)
    assert np.allclose(vllm_arrivals(10, 1.0, 1.0, seed=0), np.array(a) / 2)
    assert vllm_arrivals(3, float("inf"), 1.0, seed=0) == [0.0, 0.0, 0.0]


def test_kvdedup_metrics_match_vllms_calculate_metrics():
    """Same per-request records -> same TTFT/TPOT/ITL/E2E percentiles and throughputs."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics

    from experiments.online import RequestResult, compute_metrics

    rng = np.random.default_rng(0)
    ours, theirs = [], []
    for i in range(23):
        n = int(rng.integers(1, 40))
        itl = list(rng.uniform(0.01, 0.2, n - 1))
        ttft = float(rng.uniform(0.1, 3.0))
        ok = i != 5
        ours.append(RequestResult(100, n, success=ok, ttft_s=ttft, e2e_s=ttft + sum(itl),
                                  itls_s=itl, output_tokens=n, error="" if ok else "x"))
        theirs.append(RequestFuncOutput(success=ok, ttft=ttft, latency=ttft + sum(itl), itl=itl,
                                        output_tokens=n, prompt_len=100, start_time=i * 0.5))
    m = compute_metrics(ours, 30.0, slo_s=1.0)
    v, _ = calculate_metrics([], theirs, 30.0, None, [99.0], {})
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert m[f"median_{name}_ms"] == pytest.approx(getattr(v, f"median_{name}_ms"))
        assert m[f"mean_{name}_ms"] == pytest.approx(getattr(v, f"mean_{name}_ms"))
        assert m[f"p99_{name}_ms"] == pytest.approx(dict(getattr(v, f"percentiles_{name}_ms"))[99.0])
    assert (m["completed"], m["failed"]) == (v.completed, v.failed) == (22, 1)
    assert m["request_throughput"] == pytest.approx(v.request_throughput)
    assert m["output_throughput"] == pytest.approx(v.output_throughput)


def _sse_server(n_tokens: int, delay_s: float):
    """A loopback server streaming ``n_tokens`` completion chunks then a usage chunk."""
    from aiohttp import web

    async def completions(request):
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n_tokens):
            await asyncio.sleep(delay_s)
            chunk = {"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                          "completion_tokens": n_tokens}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return f"http://127.0.0.1:{port}", loop


def test_both_request_functions_give_the_same_records():
    from experiments.online import run_client

    url, loop = _sse_server(n_tokens=6, delay_s=0.05)
    try:
        recs = {f: run_client(url, [[1, 2, 3], [4, 5]], [6, 6], [0.0, 0.1], 30, request_func=f)[0]
                for f in ("kvdedup", "vllm")}
    finally:
        loop.call_soon_threadsafe(loop.stop)
    for f, rs in recs.items():
        for r in rs:
            assert r.success and r.output_tokens == 6 and len(r.itls_s) == 5, f
            assert 0.04 < r.ttft_s < 1.0 and r.e2e_s == pytest.approx(r.ttft_s + sum(r.itls_s)), f


def test_agreement_pairs_ratios_by_rep():
    from experiments.bench_agreement import agreement, format_table

    def rows_of(**clients):
        return [{"client": c.replace("_", "-"), "rep": rep, "median_ttft_ms": v}
                for c, vals in clients.items() for rep, v in enumerate(vals)]

    rows = rows_of(vllm_bench=[100, 200, 400], kvdedup=[110, 180, 400], vllm_func=[150, 300, 600])
    t = {r["client"]: r for r in agreement(rows, metrics=("median_ttft_ms",))}
    k = t["kvdedup"]
    assert (k["reps"], k["median"], k["min"], k["max"]) == (3, 180, 110, 400)
    assert (k["ratio_min"], k["ratio_median"], k["ratio_max"]) == pytest.approx((0.9, 1.0, 1.1))
    assert k["agree"] and t["vllm-bench"]["ratio_median"] == 1.0 and "agree" not in t["vllm-bench"]
    f = t["vllm-func"]                    # 1.5x every rep: a consistent difference
    assert f["ratio_min"] == f["ratio_max"] == 1.5 and not f["agree"]
    shifted = rows_of(vllm_bench=[100, 200, 400], kvdedup=[103, 206, 412])
    assert agreement(shifted, metrics=("median_ttft_ms",), tol=0.05)[0]["agree"]      # within tol
    assert not agreement(shifted, metrics=("median_ttft_ms",), tol=0.01)[0]["agree"]  # consistent 3%
    # ... unless vLLM's benchmark against itself (A/A) varies that much from run to run
    aa = shifted + rows_of(vllm_bench_2=[90, 210, 440])
    assert agreement(aa, metrics=("median_ttft_ms",), tol=0.01)[0]["agree"]
    table = format_table(list(t.values()))
    assert "1.000 [0.900-1.100] ok" in table and "1.500 [1.500-1.500] DIFF" in table


@pytest.mark.server
def test_vllm_bench_run_against_kvdedup_serve(tmp_path, tok, tiny_model, engines):
    """`experiments vllm-bench run`: vLLM's benchmark, unchanged, on a converted workload
    against `kvdedup serve tiny`; vLLM's per-request token counts are the workload's, and
    kvdedup's client (either request function) gets the same output counts."""
    from experiments.__main__ import main
    from experiments.online import (SERVED_MODEL_NAME, free_port, run_client, start_server,
                                    stop_server)
    from vllm_ext.cli import serve_command

    engines.close()  # one engine at a time on this machine
    wl, reqs = _workload(tmp_path, tok, tiny_model)
    port = free_port()
    cmd = serve_command("tiny", "prefix", None, ["--port", str(port), "--max-model-len", "512",
                                                 "--served-model-name", SERVED_MODEL_NAME,
                                                 "--num-gpu-blocks-override", "64",
                                                 "--enforce-eager"])
    srv = start_server(cmd, port, tmp_path / "server.log", timeout_s=300)
    try:
        assert main(["vllm-bench", "run", str(wl), "--base-url", srv.base_url, "--result-dir",
                     str(tmp_path / "res"), "--request-rate", "4"]) == 0
        ids = [r.prompt_token_ids for r in reqs]
        outs = [r.output_len for r in reqs]
        recs = {f: run_client(srv.base_url, ids, outs,
                              [0.0] * 4, 120, request_func=f)[0] for f in ("kvdedup", "vllm")}
    finally:
        stop_server(srv)
    (res_file,) = [p for p in (tmp_path / "res").glob("*.json") if not p.name.endswith("meta.json")]
    res = json.loads(res_file.read_text())
    assert (res["completed"], res["failed"]) == (4, 0)
    assert res["input_lens"] == [len(i) for i in ids] and res["output_lens"] == outs
    for f, rs in recs.items():
        assert [r.output_tokens for r in rs] == outs and all(r.success for r in rs), f

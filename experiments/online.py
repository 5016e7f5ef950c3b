"""One online latency run: an OpenAI-compatible server per arm on 127.0.0.1 and a
streaming client with Poisson (or gamma-burst) arrivals.

* Server: :func:`server_command` is the ONE place that says how a server is launched:
  ``kvdedup serve``'s command (``vllm_ext.cli.serve_command``) for the arm's mode.
  :func:`start_server` waits for ``/health`` and, if the server dies or does not come up
  in time, raises :class:`ServerError` with the tail of its log.
* Client: ``/v1/completions`` with token-id prompts, ``stream=True``, ``max_tokens`` = the
  reference output length, ``ignore_eos`` (vLLM extra body), temperature 0. Per request:
  TTFT (first streamed chunk), ITLs (between chunks), E2E, output tokens (from the final
  ``usage`` chunk). ``run_client(request_func="vllm")`` sends the same payload through
  vLLM's benchmark request function instead (``experiments.bench_agreement`` compares them). A request fails on an HTTP error, a broken stream or its timeout; the
  client never waits longer than the last arrival + ``request_timeout_s``.
* Arrivals: inter-arrival gaps ~ Gamma(shape=burstiness, mean=1/rate) (burstiness 1 =
  Poisson), drawn for ``duration_s`` seconds (at most ``max_requests``), seeded so every
  arm of a repetition sees the same arrival times. Workload requests are used in order,
  cycled if needed. ``warmup_requests`` short requests of random in-vocabulary tokens go
  first, one at a time, and are excluded.
* Metrics use the names of ``vllm bench serve``; normalized latency (the study's) is E2E /
  output tokens; goodput counts completed requests with normalized latency <= the SLO.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SERVED_MODEL_NAME = "kvdedup-model"


class ServerError(RuntimeError):
    """The server did not start (message includes the tail of its log)."""


# ----------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_dir: str, arm: str, engine: dict, num_blocks: int, port: int,
                   trace: str | None = None, sequence: dict | None = None) -> list[str]:
    """The command line of a server for ``arm``: ``kvdedup serve``'s (``vllm_ext.cli``)."""
    from experiments.config import arm_engine_kwargs
    from vllm_ext.cli import engine_flags, serve_command

    mode, arm_kw = arm_engine_kwargs(arm, sequence)
    options = arm_kw.pop("dedup_options", None)
    kw: dict[str, Any] = {"gpu_memory_utilization": 0.3, **engine, **arm_kw,
                          "num_gpu_blocks_override": int(num_blocks)}
    flags = ["--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1",
             "--port", str(port), *engine_flags(kw)]
    return serve_command(model_dir, mode, trace, flags, options)


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path
    base_url: str = ""

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.port}"


def log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def start_server(cmd: list[str], port: int, log_path: Path, timeout_s: float = 300.0,
                 env: dict[str, str] | None = None) -> Server:
    """Start ``cmd`` (its own process group, output to ``log_path``, this process's
    environment plus ``env``) and wait for health."""
    from vllm_ext.launch import apply_cpu_env

    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {})}
    apply_cpu_env(env)
    repo = str(Path(__file__).resolve().parent.parent)
    logf = open(log_path, "w", encoding="utf-8")
    logf.write("$ " + " ".join(cmd) + "\n")
    logf.flush()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=repo,
                            start_new_session=True)
    logf.close()
    srv = Server(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with status {proc.returncode} before it was "
                              f"ready; log {log_path}, last lines:\n{log_tail(log_path)}")
        try:
            with urllib.request.urlopen(srv.base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return srv
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    stop_server(srv)
    raise ServerError(f"server not ready after {timeout_s:.0f} s; log {log_path}, last "
                      f"lines:\n{log_tail(log_path)}")


def stop_server(srv: Server, grace_s: float = 30.0) -> None:
    """SIGINT the server's process group, then SIGKILL it if it lingers."""
    if srv.proc.poll() is not None:
        return
    try:
        os.killpg(srv.proc.pid, signal.SIGINT)
        srv.proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        srv.proc.wait(timeout=30)


# ----------------------------------------------------------------------------- client
@dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    success: bool = False
    error: str = ""
    send_time: float = 0.0          # s since the benchmark start (scheduled arrival)
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    output_tokens: int = 0


def arrival_times(n_max: int, rate: float, burstiness: float, duration_s: float,
                  seed: int) -> list[float]:
    """Arrival times (s) within ``duration_s``, at most ``n_max`` (at least 1)."""
    if math.isinf(rate):
        return [0.0] * n_max
    rng = np.random.default_rng(seed)
    theta = 1.0 / (rate * burstiness)
    out, t = [], 0.0
    while len(out) < n_max:
        t += float(rng.gamma(burstiness, theta))
        if t > duration_s and out:
            break
        out.append(min(t, duration_s))
    return out


async def _one(session, url: str, payload: dict, res: RequestResult, timeout_s: float) -> None:
    import aiohttp

    st = time.perf_counter()
    last = st
    try:
        async with session.post(url, json=payload,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                body = (await resp.text())[:300]
                res.error = f"HTTP {resp.status}: {body}"
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        continue
                    obj = json.loads(data)
                    if obj.get("error"):
                        res.error = str(obj["error"])[:300]
                        return
                    now = time.perf_counter()
                    if obj.get("choices"):
                        if res.ttft_s == 0.0:
                            res.ttft_s = now - st
                        else:
                            res.itls_s.append(now - last)
                        last = now
                    usage = obj.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        res.output_tokens = int(usage["completion_tokens"])
            res.e2e_s = last - st
            if res.ttft_s == 0.0:
                res.error = "no tokens streamed"
                return
            if res.output_tokens == 0:
                res.output_tokens = len(res.itls_s) + 1
            res.success = True
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout_s:.0f} s"
    except Exception as e:  # noqa: BLE001 - any client failure is a failed request
        res.error = f"{type(e).__name__}: {e}"[:300]


async def _one_vllm(session, url: str, payload: dict, res: RequestResult,
                    timeout_s: float) -> None:
    """The same request through vLLM's benchmark request function
    (``vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions``)."""
    from vllm.benchmarks.lib.endpoint_request_func import (RequestFuncInput,
                                                            async_request_openai_completions)

    inp = RequestFuncInput(prompt=payload["prompt"], api_url=url,
                           prompt_len=len(payload["prompt"]), output_len=payload["max_tokens"],
                           model=payload["model"], ignore_eos=payload["ignore_eos"],
                           extra_body={"temperature": payload["temperature"]})
    try:
        out = await asyncio.wait_for(async_request_openai_completions(inp, session), timeout_s)
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout_s:.0f} s"
        return
    res.success, res.error = out.success, (out.error or "")[:300]
    res.ttft_s, res.itls_s, res.e2e_s = out.ttft, list(out.itl), out.latency
    res.output_tokens = int(out.output_tokens or len(out.itl) + 1)


REQUEST_FUNCS = {"kvdedup": _one, "vllm": _one_vllm}


async def _run_client(base_url: str, prompts: Sequence[list[int]], max_tokens: Sequence[int],
                      arrivals: Sequence[float], timeout_s: float,
                      warmup: Sequence[list[int]] = (),
                      request_func: str = "kvdedup") -> tuple[list[RequestResult], float]:
    import aiohttp

    url = base_url + "/v1/completions"
    one = REQUEST_FUNCS[request_func]

    def payload(p, m):
        return {"model": SERVED_MODEL_NAME, "prompt": list(p), "max_tokens": int(m),
                "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        for w in warmup:
            r = RequestResult(len(w), 4)
            await _one(session, url, payload(w, 4), r, timeout_s)
        results = [RequestResult(len(p), int(m)) for p, m in zip(prompts, max_tokens)]
        t0 = time.perf_counter()
        tasks = []
        for p, m, at, res in zip(prompts, max_tokens, arrivals, results):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            res.send_time = at
            tasks.append(asyncio.create_task(one(session, url, payload(p, m), res, timeout_s)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return results, duration


def run_client(base_url: str, prompts, max_tokens, arrivals, timeout_s: float = 300.0,
               warmup=(), request_func: str = "kvdedup") -> tuple[list[RequestResult], float]:
    """Send the requests at their arrival times; return (results, benchmark duration s).
    ``request_func``: ``kvdedup`` (:func:`_one`) or ``vllm`` (vLLM's benchmark request
    function, same payload; same per-request records either way)."""
    return asyncio.run(_run_client(base_url, prompts, max_tokens, arrivals, timeout_s, warmup,
                                   request_func))


def _pcts(vals_ms: list[float], name: str) -> dict:
    out = {}
    arr = np.asarray(vals_ms, dtype=float)
    for s in ("mean", "median", "p90", "p95", "p99"):
        key = f"{s}_{name}_ms"
        if arr.size == 0:
            out[key] = None
        elif s == "mean":
            out[key] = float(arr.mean())
        elif s == "median":
            out[key] = float(np.median(arr))
        else:
            out[key] = float(np.percentile(arr, int(s[1:])))
    return out


def compute_metrics(results: list[RequestResult], duration_s: float, slo_s: float) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft_s * 1e3 for r in ok]
    e2els = [r.e2e_s * 1e3 for r in ok]
    itls = [x * 1e3 for r in ok for x in r.itls_s]
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    norm = [r.e2e_s / r.output_tokens for r in ok if r.output_tokens > 0]
    good = sum(1 for x in norm if x <= slo_s)
    m: dict[str, Any] = {"duration_s": duration_s, "completed": len(ok),
                         "failed": len(results) - len(ok)}
    m.update(_pcts(ttfts, "ttft"))
    m.update(_pcts(tpots, "tpot"))
    m.update(_pcts(itls, "itl"))
    m.update(_pcts(e2els, "e2el"))
    m["mean_normalized_latency_s"] = float(np.mean(norm)) if norm else None
    m["p95_normalized_latency_s"] = float(np.percentile(norm, 95)) if norm else None
    m["goodput"] = good / duration_s if duration_s > 0 else None
    m["slo_normalized_latency_s"] = slo_s
    m["ttfts_ms"] = ttfts
    m["itls_ms"] = itls
    m["e2els_ms"] = e2els
    m["output_lens"] = [r.output_tokens for r in ok]
    m["ok_requests"] = [i for i, r in enumerate(results) if r.success]
    m["request_throughput"] = len(ok) / duration_s if duration_s > 0 else None
    m["output_throughput"] = sum(r.output_tokens for r in ok) / duration_s if duration_s > 0 else None
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    m["errors"] = errors
    return m


def plan_requests(workload_requests, online: dict, rate: float, seed: int):
    """(prompts, max_tokens, arrivals) of one run: deterministic in (workload, rate, seed)."""
    arr = arrival_times(int(online["max_requests"]), rate, float(online["burstiness"]),
                        float(online["duration_s"]), seed)
    n = len(arr)
    reqs = [workload_requests[i % len(workload_requests)] for i in range(n)]
    return [r.prompt_token_ids for r in reqs], [r.output_len for r in reqs], arr


def warmup_prompts(workload_requests, n: int, length: int = 40) -> list[list[int]]:
    import random

    vocab = sorted({t for r in workload_requests for t in r.prompt_token_ids[:256]})
    rng = random.Random(4321)
    return [[rng.choice(vocab) for _ in range(length)] for _ in range(n)]


def run_online(spec: dict) -> dict:
    """One online run (fresh server) described by ``spec`` (see the runner) -> metrics."""
    from experiments.workloads import load_workload

    wl = load_workload(spec["workload_file"])
    online = spec["online"]
    prompts, max_tokens, arrivals = plan_requests(wl.requests, online, spec["request_rate"],
                                                  spec["seed"])
    port = free_port()
    cmd = server_command(spec["model_dir"], spec["arm"], spec["engine"], spec["num_blocks"],
                         port, trace=spec.get("trace"), sequence=spec.get("sequence"))
    from experiments.config import arm_engine_kwargs
    from vllm_ext.launch import dedup_env

    mode, _ = arm_engine_kwargs(spec["arm"], spec.get("sequence"))
    srv = start_server(cmd, port, Path(spec["log"]), online["server_start_timeout_s"],
                       env=dedup_env(mode))
    try:
        results, duration = run_client(srv.base_url, prompts, max_tokens, arrivals,
                                       online["request_timeout_s"],
                                       warmup_prompts(wl.requests, online["warmup_requests"]))
        alive = srv.proc.poll() is None
    finally:
        stop_server(srv)
    m = compute_metrics(results, duration, online["slo_normalized_latency_s"])
    m.update({"request_rate": spec["request_rate"], "burstiness": online["burstiness"],
              "num_requests": len(results),
              "total_input_tokens": sum(len(p) for p in prompts),
              "total_output_tokens": sum(m["output_lens"]), "server_alive_at_end": alive})
    m.update(trace_counters(spec.get("trace")))
    return m


def trace_counters(path) -> dict:
    """The engine's cumulative counters at its last traced step (``vllm_ext.metrics.COUNTERS``:
    borrowed runs, source evictions, preemptions ...), warm-up requests included, plus the
    peak physical blocks; empty when the server wrote no trace."""
    from experiments.offline import read_jsonl
    from vllm_ext.metrics import COUNTERS

    rows = read_jsonl(Path(path)) if path else []   # skips a partly written last line
    if not rows:
        return {}
    out = {k: rows[-1][k] for k in COUNTERS if k in rows[-1]}
    out["peak_physical_blocks"] = max(r.get("physical_blocks", 0) for r in rows)
    return out

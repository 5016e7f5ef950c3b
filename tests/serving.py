"""Start ``kvdedup serve`` on loopback for the server tests (tiny model), and read
``/metrics``."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus series over its labels; fails if the series is absent."""
    vals = [float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)]
    assert vals, f"{name} not in /metrics"
    return sum(vals)


@contextmanager
def serve(tmp: Path, mode: str, extra: list[str]):
    """``(base_url, process, trace_path)`` of a tiny-model server in ``mode``; stopped
    with SIGINT (killed after 60 s) on exit."""
    import requests

    port = free_port()
    log, trace = tmp / "server.log", tmp / "trace.jsonl"
    cmd = [sys.executable, "-m", "vllm_ext.cli", "serve", "tiny", "--dedup", mode,
           "--dedup-trace", str(trace), "--port", str(port), "--enforce-eager", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
    try:
        yield base, proc, trace
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

"""``kvdedup serve`` on loopback: concurrent completions, /metrics, bad input, clean stop."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests import serving
from tests.serving import metric as _metric

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    engines.close()  # one engine at a time on this machine
    with serving.serve(tmp_path_factory.mktemp("server"), "sequence",
                       ["--max-model-len", "512", "--num-gpu-blocks-override", "64"]) as srv:
        yield srv


def test_concurrent_completions_share_and_metrics_return_to_zero(server):
    import openai
    import requests

    base, proc, trace = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 2000, size=128).tolist()
    prompts = [shared + rng.integers(3, 2000, size=10).tolist() for _ in range(6)]

    def complete(p):
        return client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})

    client.completions.create(model=model, prompt=prompts[0], max_tokens=2, temperature=0)
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(complete, prompts))
    assert [o.usage.completion_tokens for o in outs] == [8] * 6
    # sharing under concurrency changes no output: the same prompts one at a time
    assert [o.choices[0].text for o in outs] == [complete(p).choices[0].text for p in prompts]
    time.sleep(1.0)
    text = requests.get(base + "/metrics", timeout=10).text
    assert _metric(text, "kvdedup_prefix_hits_total") >= 6 * 128
    assert _metric(text, "kvdedup_verified_hits_total") >= 6 * 4
    assert _metric(text, "kvdedup_collisions_total") == 0
    assert _metric(text, "kvdedup_physical_blocks") == 0, "blocks still held after the load"
    lines = trace.read_text().splitlines()
    assert len(lines) > 3 and '"prefix_hits"' in lines[-1]


def test_sequence_hits_in_metrics_and_trace(server):
    import json

    import openai
    import requests

    base, _, trace = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    rng = np.random.default_rng(11)
    doc = rng.integers(3, 2000, size=300).tolist()
    for head in (rng.integers(3, 2000, size=20).tolist(), rng.integers(3, 2000, size=57).tolist()):
        client.completions.create(model=model, prompt=head + doc + [4, 5], max_tokens=2)
    time.sleep(1.0)
    text = requests.get(base + "/metrics", timeout=10).text
    assert _metric(text, "kvdedup_sequence_hits_total") >= 1
    assert _metric(text, "kvdedup_sequence_tokens_reused_total") >= 100
    last = json.loads(trace.read_text().splitlines()[-1])
    assert last["sequence_hits"] >= 1


def test_serve_command_for_each_mode():
    from vllm_ext.cli import serve_command

    off = serve_command("tiny", "off", None, ["--no-enable-prefix-caching"])
    assert "--scheduler-cls" not in off and off[-1] == "--no-enable-prefix-caching"
    pre = serve_command("tiny", "prefix", "t.jsonl", ["--port", "9"])
    cfg = json.loads(pre[pre.index("--kv-transfer-config") + 1])
    assert cfg["kv_connector_extra_config"]["mode"] == "prefix"
    assert cfg["kv_connector_extra_config"]["trace"].endswith("t.jsonl")
    assert "--enable-prefix-caching" in pre and pre[-2:] == ["--port", "9"]
    with pytest.raises(ValueError, match="set by --dedup prefix"):
        serve_command("tiny", "prefix", None, ["--scheduler-cls", "x.Y"])
    with pytest.raises(ValueError, match="needs kvdedup's scheduler"):
        serve_command("tiny", "off", "t.jsonl", [])
    from vllm_ext.cli import parse_options

    assert parse_options(["k=16", "store_bytes=1000"]) == {"k": 16, "store_bytes": 1000}
    with pytest.raises(ValueError, match="expects k=INT"):
        parse_options(["k=-3"])
    seq = serve_command("tiny", "sequence", None, [], {"k": 8})
    assert json.loads(seq[seq.index("--kv-transfer-config") + 1])[
        "kv_connector_extra_config"] == {"k": 8, "mode": "sequence"}


@pytest.mark.parametrize("prompt", [[], [5] * 600])
def test_bad_request_gets_clear_error_and_server_keeps_serving(server, prompt):
    import openai

    base, proc, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=prompt, max_tokens=4)
    msg = str(err.value).lower()
    assert ("at least one prompt" in msg) if not prompt else ("maximum" in msg)
    ok = client.completions.create(model=model, prompt=[11, 12, 13], max_tokens=4)
    assert ok.usage.completion_tokens == 4
    assert proc.poll() is None


def test_unknown_dedup_value_exits_with_clear_error():
    r = subprocess.run([sys.executable, "-m", "vllm_ext.cli", "serve", "tiny", "--dedup", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_server_stops_cleanly(server):
    _, proc, _ = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0

"""``kvdedup serve --dedup shared`` on loopback: 200 concurrent requests whose documents
recur at shifted offsets, with borrowed tokens and physical blocks in /metrics."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests import serving

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    engines.close()  # one engine at a time on this machine
    with serving.serve(tmp_path_factory.mktemp("server-shared"), "shared",
                       ["--max-model-len", "768", "--num-gpu-blocks-override", "96",
                        # k = 32: 360-token documents leave whole blocks to borrow after
                        # the recomputed head (the default, 128, leaves half as many runs)
                        "--dedup-option", "k=32"]) as srv:
        yield srv


def test_200_concurrent_requests_borrow_documents_with_no_error(server):
    import openai
    import requests

    base, proc, trace = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0,
                           timeout=600)
    model = client.models.list().data[0].id
    rng = np.random.default_rng(3)
    docs = [rng.integers(3, 2000, size=360).tolist() for _ in range(4)]
    prompts = [rng.integers(3, 2000, size=int(rng.integers(5, 120))).tolist()
               + docs[i % 4] + rng.integers(3, 2000, size=6).tolist() for i in range(200)]

    def complete(p):
        return client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})

    with ThreadPoolExecutor(64) as pool:
        outs = list(pool.map(complete, prompts))
    assert [o.usage.completion_tokens for o in outs] == [8] * 200
    time.sleep(1.0)
    text = requests.get(base + "/metrics", timeout=10).text
    assert serving.metric(text, "kvdedup_borrowed_runs_total") >= 100
    assert serving.metric(text, "kvdedup_borrowed_tokens_total") >= 100 * 200
    assert serving.metric(text, "kvdedup_physical_blocks") == 0, "blocks held after the load"
    assert serving.metric(text, "kvdedup_held_source_blocks") == 0
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert max(s["borrowed_blocks"] for s in steps) > 0
    assert max(s["peak_physical_blocks"] for s in steps) <= 96
    assert proc.poll() is None

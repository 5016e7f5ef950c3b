"""The audit's prefix prediction matches what the engine reports on the same workload.

Requests run one at a time in file order on a pool large enough never to evict, which is
exactly the audit's model (unbounded cache, vLLM's block rules, last prompt token always
computed). Both count hit tokens per request; they must agree exactly. (A difference would
come from eviction or from requests admitted together, which this replay rules out.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("kind,extra", [
    ("shared-template", ["--template-tokens", "100"]),
    ("multi-turn", ["--turns", "3"]),
])
def test_audit_prefix_prediction_matches_engine(engines, tiny_model, tmp_path, kind, extra):
    from vllm import SamplingParams

    import vllm_ext
    from analysis.audit import prefix_hit_tokens, read_workload

    wl = tmp_path / f"{kind}.jsonl"
    subprocess.run([sys.executable, "-m", "experiments.workloads", "generate", kind,
                    "--out", str(wl), "--tokenizer", tiny_model, "--num-requests", "12",
                    "--max-prompt-tokens", "700", "--max-model-len", "1024", "--quiet", *extra],
                   check=True)
    reqs = read_workload(wl)
    predicted = prefix_hit_tokens(reqs, 32)
    llm = engines.get("prefix-big", model="tiny", dedup="prefix", num_gpu_blocks_override=1024,
                      max_model_len=1024, enforce_eager=True, seed=0)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    measured = []
    for r in reqs:
        before = vllm_ext.dedup_stats(llm)["prefix_hits"]
        llm.generate([{"prompt_token_ids": r.prompt_token_ids, "cache_salt": str(wl)}], sp,
                     use_tqdm=False)
        measured.append(vllm_ext.dedup_stats(llm)["prefix_hits"] - before)
    assert sum(predicted) > 0
    assert measured == predicted

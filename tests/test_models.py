"""Built-in models: the tiny test model is byte-identical when rebuilt; SmolLM2 answers sensibly."""

from __future__ import annotations

import hashlib

import pytest

from vllm_ext import models


def _digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_tiny_model_rebuild_is_byte_identical(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv("KVDEDUP_CACHE", str(tmp_path))
    fresh = models.ensure_model("tiny")
    assert fresh.parent == tmp_path / "models"
    assert _digests(fresh) == _digests(models.Path(tiny_model))


def test_resolve_model_accepts_dirs_and_hub_ids(tmp_path):
    assert models.resolve_model(str(tmp_path)) == str(tmp_path.resolve())
    assert models.resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ValueError, match="does not exist"):
        models.resolve_model("./no/such/dir")
    with pytest.raises(ValueError, match="unknown built-in model"):
        models.ensure_model("gpt5")


def test_cli_prints_model_dir_last(capsys, tiny_model):
    assert models.main(["tiny"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == tiny_model


@pytest.mark.engine
@pytest.mark.real_model
def test_smollm2_knows_the_capital_of_france(engines):
    from vllm import SamplingParams

    llm = engines.get("smollm2", model="smollm2", dedup="prefix", max_model_len=512,
                      num_gpu_blocks_override=64, enforce_eager=True, seed=0)
    out = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                   SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text

"""One mode-to-arguments mapping, one option whitelist, one CPU setting (no engine)."""

from __future__ import annotations

import json

import pytest

from vllm_ext.cli import given_flags, parse_options, serve_command
from vllm_ext.launch import (CPU_ENV, DEDUP_MODES, DEDUP_OPTIONS, OPTION_CHOICES, apply_cpu_env,
                             check_options, dedup_engine_args, engine_kwargs, mode_options)


@pytest.mark.parametrize("mode", DEDUP_MODES)
def test_offline_and_server_arguments_agree(mode, tiny_model):
    kw = engine_kwargs(mode, dedup_options={"k": 8} if mode == "sequence" else None)
    cmd = serve_command(tiny_model, mode, None, [], {"k": 8} if mode == "sequence" else None)
    flags = given_flags(cmd)
    for name in ("scheduler_cls", "enable_prefix_caching", "prefix_caching_hash_algo",
                 "block_size", "dtype"):
        assert (name in kw) == (name in flags), name
    if mode != "off":
        served = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
        assert served["kv_connector_extra_config"] == kw["kv_transfer_config"].kv_connector_extra_config
        assert cmd[cmd.index("--scheduler-cls") + 1] == kw["scheduler_cls"]


def test_a_mode_never_overrides_what_the_caller_set():
    assert dedup_engine_args("prefix", {"prefix_caching_hash_algo": "sha256"}).keys() == \
        {"enable_prefix_caching", "scheduler_cls", "kv_transfer_config"}
    assert "enable_prefix_caching" not in dedup_engine_args("sequence",
                                                            {"enable_prefix_caching": False})
    with pytest.raises(ValueError, match="set by --dedup observe"):
        engine_kwargs("observe", scheduler_cls="x.Y")
    with pytest.raises(ValueError, match="do not pass enable_prefix_caching=False"):
        serve_command("tiny", "prefix", None, ["--no-enable-prefix-caching"])


def test_one_option_whitelist_for_cli_and_configs():
    from experiments.config import ConfigError, _sequence_options

    ints = [k for k in DEDUP_OPTIONS if k not in OPTION_CHOICES]
    assert parse_options([f"{k}=1" for k in ints] + ["eviction=lru"]) == \
        {**dict.fromkeys(ints, 1), "eviction": "lru"}
    assert check_options({"k": 0}) == {"k": 0}
    assert parse_options(["order=fcfs"]) == {"order": "fcfs"}
    for bad in (["bogus=1"], ["k=x"], ["eviction=fifo"], ["order=lifo"]):
        with pytest.raises(ValueError):
            parse_options(bad)
    with pytest.raises(ConfigError, match="unknown sequence option"):
        _sequence_options({"bogus": 1}, "cfg")
    with pytest.raises(ConfigError, match="eviction must be frequency or lru"):
        _sequence_options({"eviction": "fifo"}, "cfg")
    both = {"k": 8, "store_bytes": 99, "eviction": "lru"}
    assert mode_options("sequence", both) == {"k": 8, "store_bytes": 99}
    assert mode_options("shared", both) == {"k": 8, "eviction": "lru"}


def test_cpu_env_is_a_default_not_an_override():
    env = {}
    apply_cpu_env(env)
    assert env == CPU_ENV
    env = {k: "7" for k in CPU_ENV}
    apply_cpu_env(env)
    assert set(env.values()) == {"7"}


def test_shared_mode_refuses_to_start_off_cpu(monkeypatch):
    """Its attention backend overrides CPU_ATTN only: elsewhere it must not start."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from vllm_ext.scheduler import DedupScheduler

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    fake = SimpleNamespace(dedup_mode="shared", connector=object(), has_mamba_layers=False,
                           block_size=32, _bytes_per_block=32 * 64)
    with pytest.raises(ValueError, match="CPU attention backend only"):
        DedupScheduler._init_reuse(fake, {})

"""kvdedup's vLLM contract (``vllm_ext.contract``) against the installed vLLM, no engine."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from vllm_ext import contract
from vllm_ext.contract import USES, Use, check

KINDS = {"module", "class", "callable", "attribute", "source"}


def test_every_name_kvdedup_relies_on_is_where_the_contract_says():
    moved = check()
    assert not moved, "vLLM names that moved:\n  " + "\n  ".join(moved)


def test_entries_are_complete():
    for u in USES:
        assert u.kind in KINDS and u.used_by and u.why, u
        if any(part.startswith("_") and not part.startswith("__")
               for part in u.name.split(".")):
            assert u.private, f"{u.module}:{u.name} is private: say why no public hook serves"


def test_a_moved_name_is_reported():
    sched = "vllm.v1.core.sched.scheduler"
    moved = check((Use(sched, "Scheduler._gone", "callable", "t", "t"),
                   Use(sched, "Scheduler.gone_attr", "attribute", "t", "t"),
                   Use(sched, "Scheduler._preempt_request", "callable", "t", "t",
                       params=("req",)),
                   Use(sched, "Scheduler.schedule", "source", "t", "t", contains="no such"),
                   Use("vllm.no_such_module", "", "module", "t", "t")))
    assert len(moved) == 5
    assert "Scheduler._gone: not found" in moved[0]
    assert "do not start with ['req']" in moved[2]


def _overrides(cls):
    """(base, name) of every method ``cls`` defines that a vLLM base class also defines
    (the methods ``@dataclass`` generates excepted)."""
    generated = {"__init__", "__repr__", "__eq__"} if dataclasses.is_dataclass(cls) else set()
    for name, fn in vars(cls).items():
        if name in generated or not (callable(fn) or isinstance(fn, classmethod)):
            continue
        for base in cls.__mro__[1:]:
            if base.__module__.startswith("vllm.") and name in vars(base):
                yield base, name
                break


@pytest.mark.parametrize("where,cls", [
    ("vllm_ext.scheduler", "DedupScheduler"), ("vllm_ext.kv_manager", "VerifiedKVCacheManager"),
    ("vllm_ext.connector", "DedupConnector"), ("vllm_ext.connector", "DedupConnectorStats"),
    ("vllm_ext.connector", "DedupPromMetrics"), ("vllm_ext.stat_logger", "DedupStatLogger"),
    ("vllm_ext.attention", "SharedCPUAttentionImpl"),
    ("vllm_ext.attention", "SharedCPUAttentionBackend"),
    ("vllm_ext.block_pool", "SharedBlockPool")])
def test_every_vllm_method_kvdedup_overrides_is_in_the_contract(where, cls):
    import importlib

    klass = getattr(importlib.import_module(where), cls)
    listed = {(u.module, u.name) for u in USES if u.kind == "callable"}
    missing = []
    for base, name in _overrides(klass):
        if (inspect.getmodule(base).__name__, f"{base.__name__}.{name}") not in listed:
            missing.append(f"{base.__module__}.{base.__name__}.{name}")
    assert not missing, f"{cls} overrides vLLM methods the contract does not list: {missing}"


def test_version_gate_reads_the_contract_when_bypassed(monkeypatch):
    from vllm_ext import version

    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.99.0")
    version.check_vllm_version.cache_clear()
    try:
        monkeypatch.delenv(version.BYPASS_ENV, raising=False)
        with pytest.raises(version.UnsupportedVLLMError, match="supports vLLM 0.32"):
            version.check_vllm_version()
        monkeypatch.setenv(version.BYPASS_ENV, "1")
        assert version.check_vllm_version() == "0.99.0"      # the contract holds here
        version.check_vllm_version.cache_clear()
        monkeypatch.setattr(contract, "check", lambda: ["vllm.x:Y: not found"])
        with pytest.raises(version.UnsupportedVLLMError, match="vllm.x:Y: not found"):
            version.check_vllm_version()
    finally:
        version.check_vllm_version.cache_clear()


def test_plugin_warns_instead_of_failing(monkeypatch, caplog):
    from vllm_ext import plugin, version

    monkeypatch.setattr(version, "installed_vllm_version", lambda: "0.99.0")
    monkeypatch.delenv(version.BYPASS_ENV, raising=False)
    version.check_vllm_version.cache_clear()
    try:
        plugin.register()  # no exception: a stock engine still starts
    finally:
        version.check_vllm_version.cache_clear()
    assert "refuse to load" in caplog.text


def test_a_module_written_twice_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vllm:\n  - {name: LLM, kind: class, used_by: t, why: t}\n"
                 "vllm:\n  - {name: LLM, kind: class, used_by: t, why: t}\n")
    with pytest.raises(ValueError, match="repeated keys"):
        contract.load(p)

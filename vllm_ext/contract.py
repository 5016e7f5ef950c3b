"""kvdedup's contract with vLLM's internals: every vLLM name it relies on, checked.

The list is data, ``contract.yaml`` next to this module (written against vLLM 0.32): per
vLLM module, one entry per name saying what must hold (``kind``; for callables the
leading parameter names, which matter where kvdedup calls positionally or overrides;
optionally a snippet the source must contain, for behaviour kvdedup depends on), which
kvdedup module relies on it and why, and, for names outside vLLM's documented extension
points, why no public one serves (``private``).

:func:`check` imports the vLLM modules named there (nothing else: no engine, no model)
and returns one line per entry that no longer holds. ``tests/test_vllm_contract.py``
fails with that list; ``vllm_ext.version`` runs it when ``KVDEDUP_ALLOW_ANY_VLLM=1`` lets
another vLLM release through. To record a new use, add an entry to ``contract.yaml``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Use:
    module: str                 # vLLM module, e.g. "vllm.v1.core.sched.scheduler"
    name: str                   # dotted inside the module: "Scheduler._preempt_request"
    kind: str                   # "module" | "class" | "callable" | "attribute" | "source"
    used_by: str                # kvdedup module(s)
    why: str                    # what kvdedup does with it
    private: str = ""           # why no public extension point serves ("" = public)
    params: tuple[str, ...] = ()  # callable: leading parameter names (after self/cls)
    contains: str = ""          # "source": a snippet the callable's source must contain


CONTRACT_FILE = Path(__file__).with_name("contract.yaml")


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, except that a repeated key is an error, not the last one wins
    (a module written twice would otherwise drop its first entries)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"line {node.start_mark.line + 1}: repeated keys {repeated}")
        return super().construct_mapping(node, deep)


def load(path: Path = CONTRACT_FILE) -> tuple[Use, ...]:
    """The entries of ``contract.yaml`` (vLLM module -> list of entries), in file order;
    a repeated module, or an entry with a key ``Use`` does not have, is an error."""
    raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506
    keys = set(Use.__dataclass_fields__) - {"module"}
    uses = []
    for module, entries in raw.items():
        for e in entries:
            if set(e) - keys:
                raise ValueError(f"{path}: {module}:{e.get('name')}: unknown keys "
                                 f"{sorted(set(e) - keys)}")
            uses.append(Use(module=module, **{**e, "params": tuple(e.get("params", ()))}))
    return tuple(uses)


USES: tuple[Use, ...] = load()


def _resolve(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split(".") if name else ():
        obj = getattr(obj, part)
    return obj


def _assigned_in_source(cls: type, attr: str) -> bool:
    """``self.<attr> =`` or ``self.<attr>: ...`` in a vLLM class of ``cls``'s MRO."""
    pat = re.compile(rf"self\.{re.escape(attr)}\s*(:|=(?!=))")
    for klass in cls.__mro__:
        if not klass.__module__.startswith("vllm"):
            continue
        try:
            if pat.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _has_attribute(cls: type, attr: str) -> bool:
    if hasattr(cls, attr) or attr in getattr(cls, "__dataclass_fields__", {}):
        return True
    if any(attr in getattr(k, "__annotations__", {}) for k in cls.__mro__):
        return True
    return _assigned_in_source(cls, attr)


def check_use(use: Use) -> str | None:
    """None when ``use`` holds in the installed vLLM, else what moved."""
    where = f"{use.module}:{use.name}" if use.name else use.module
    head, _, attr = use.name.rpartition(".")
    try:
        if use.kind == "attribute":
            owner = _resolve(use.module, head)
            ok = _has_attribute(owner, attr) if isinstance(owner, type) else hasattr(owner, attr)
            return None if ok else f"{where}: attribute not found"
        obj = _resolve(use.module, use.name)
    except (ImportError, AttributeError) as exc:
        return f"{where}: not found ({type(exc).__name__}: {exc})"
    if use.kind == "module":
        return None
    if use.kind == "class":
        return None if isinstance(obj, type) else f"{where}: not a class"
    if not callable(obj):
        return f"{where}: not callable"
    if use.kind == "source":
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError) as exc:
            return f"{where}: source unavailable ({exc})"
        return None if use.contains in src else f"{where}: no longer contains {use.contains!r}"
    if use.kind != "callable":
        return f"{where}: unknown kind {use.kind!r}"
    try:
        names = [p for p in inspect.signature(obj).parameters if p not in ("self", "cls")]
    except (TypeError, ValueError) as exc:
        return f"{where}: no signature ({exc})"
    if tuple(names[: len(use.params)]) != use.params:
        return f"{where}: parameters {names} do not start with {list(use.params)}"
    return None


def check(uses: tuple[Use, ...] = USES) -> list[str]:
    """One line per use that no longer holds (empty: the installed vLLM fits)."""
    return [p for p in map(check_use, uses) if p is not None]

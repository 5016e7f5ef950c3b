"""The workload study's real datasets: hub, local files, or the study's pickles.

Four use cases, as in the study ("Characterizing LLM serving workloads" style):

=============== ======================================= ===================================
name            hub id (config, split)                  prompt -> reference output
=============== ======================================= ===================================
alpaca          tatsu-lab/alpaca (train)                instruction [+ blank line + input]
                                                        -> output
sharegpt        Aeala/ShareGPT_Vicuna_unfiltered        first human turn -> first gpt turn
sharegpt-chat   same                                    every assistant turn: whole history
                                                        re-sent ("User: ..\\nAssistant: ..")
cnn_dailymail   ccdv/cnn_dailymail (3.0.0, train)       article -> highlights
dolly-qa        databricks/databricks-dolly-15k (train) category containing "qa":
                                                        instruction [+ blank line + context]
                                                        -> response
=============== ======================================= ===================================

Local files (``--data-files``): ``.json`` (a JSON array, or JSON Lines), ``.jsonl``,
``.parquet``, or a directory written by ``datasets.Dataset.save_to_disk``. Local JSON
and parquet are read here row by row (not via ``datasets``) so that a malformed row is
reported with its file and row number. The hub is reached with
``datasets.load_dataset`` only when no local source is given.

The study's pickles (``--pickle``) are replayed as they are (already tokenized):

* pairs: ``[(input_ids, output_ids), ...]`` -> prompt = input_ids,
  output_len = len(output_ids);
* chat: ``[[("human", ids), ("gpt", ids), ...], ...]`` -> one session per
  conversation; each gpt turn is a request whose prompt is the concatenation of all
  earlier turns' ids (no role tokens are added: the ids are used as given).

Pickles are read with a restricted unpickler (plain containers, ints, numpy arrays).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .build import RawRequest, Unit
from .format import WorkloadError


@dataclass(frozen=True)
class RealDataset:
    """How to load and convert one real dataset."""

    name: str
    hub_id: str
    hub_config: str | None
    split: str
    convert: Callable[[dict, str], list[RawRequest] | None]
    licence: str
    fields: str
    summary: str
    multi_turn: bool = False


# ---------------------------------------------------------------- row helpers

def _field(row: dict, key: str, where: str, allow_missing: bool = False) -> str:
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected an object, got {type(row).__name__}")
    if key not in row or row[key] is None:
        if allow_missing:
            return ""
        raise WorkloadError(f"{where}: missing field {key!r}")
    v = row[key]
    if not isinstance(v, str):
        raise WorkloadError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _join(first: str, second: str) -> str:
    first, second = first.strip(), second.strip()
    return f"{first}\n\n{second}" if second else first


def _alpaca(row: dict, where: str) -> list[RawRequest] | None:
    prompt = _join(_field(row, "instruction", where), _field(row, "input", where, True))
    out = _field(row, "output", where)
    if not prompt or not out.strip():
        return None
    return [RawRequest(prompt, out, None, f"alpaca:{where}")]


def _dolly(row: dict, where: str) -> list[RawRequest] | None:
    cat = _field(row, "category", where)
    if "qa" not in cat:
        return None
    prompt = _join(_field(row, "instruction", where), _field(row, "context", where, True))
    out = _field(row, "response", where)
    if not prompt or not out.strip():
        return None
    return [RawRequest(prompt, out, None, f"dolly-qa:{where}", {"category": cat})]


def _cnn(row: dict, where: str) -> list[RawRequest] | None:
    art, hl = _field(row, "article", where), _field(row, "highlights", where)
    if not art.strip() or not hl.strip():
        return None
    return [RawRequest(art.strip(), hl, None, f"cnn_dailymail:{where}")]


USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "assistant", "bing", "bard", "model"}


def _messages(row: dict, where: str) -> list[tuple[str, str]]:
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected an object, got {type(row).__name__}")
    conv = row.get("conversations")
    if not isinstance(conv, list):
        raise WorkloadError(f"{where}: missing or non-list field 'conversations'")
    msgs = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("from"), str) or not isinstance(m.get("value"), str):
            raise WorkloadError(f"{where}: conversations[{i}] needs string fields 'from' and 'value'")
        msgs.append((m["from"].lower(), m["value"]))
    return msgs


def _sharegpt_first(row: dict, where: str) -> list[RawRequest] | None:
    msgs = _messages(row, where)
    if len(msgs) < 2 or msgs[0][0] not in USER_ROLES or msgs[1][0] not in ASSISTANT_ROLES:
        return None
    if not msgs[0][1].strip() or not msgs[1][1].strip():
        return None
    return [RawRequest(msgs[0][1], msgs[1][1], None, f"sharegpt:{where}")]


def role_prefix(role: str) -> str:
    """Plain-text role prefix used for all multi-turn prompts (no chat template)."""
    if role in USER_ROLES:
        return "User"
    if role in ASSISTANT_ROLES:
        return "Assistant"
    return role.capitalize() or "System"


def chat_units(messages: list[tuple[str, str]], session_id: str, source: str) -> list[RawRequest]:
    """One request per assistant message; its prompt re-sends the whole history.

    The history is rendered as ``"User: text\\nAssistant: text\\n...User: text\\nAssistant:"``.
    """
    units, history = [], ""
    turn = 0
    for role, text in messages:
        text = text.strip()
        if role in ASSISTANT_ROLES and history and text:
            units.append(RawRequest(history + "Assistant:", text, session_id,
                                    f"{source}:turn{turn}", {"turn": turn}))
            turn += 1
        history += f"{role_prefix(role)}: {text}\n"
    return units


def _sharegpt_chat(row: dict, where: str) -> list[RawRequest] | None:
    msgs = _messages(row, where)
    sid = row.get("id") if isinstance(row.get("id"), str) else where
    return chat_units(msgs, f"sharegpt:{sid}", f"sharegpt-chat:{where}") or None


_SHAREGPT_FIELDS = "id, conversations: [{from: human|gpt, value}]"
REAL_DATASETS: dict[str, RealDataset] = {
    "alpaca": RealDataset(
        "alpaca", "tatsu-lab/alpaca", None, "train", _alpaca, "CC BY-NC 4.0",
        "instruction, input, output (text)",
        "text generation: Alpaca 52K, instruction+input -> output"),
    "sharegpt": RealDataset(
        "sharegpt", "Aeala/ShareGPT_Vicuna_unfiltered", None, "train", _sharegpt_first,
        "unclear (scraped ChatGPT conversations; OpenAI terms apply)", _SHAREGPT_FIELDS,
        "conversation: ShareGPT first human turn -> first gpt reply"),
    "sharegpt-chat": RealDataset(
        "sharegpt-chat", "Aeala/ShareGPT_Vicuna_unfiltered", None, "train", _sharegpt_chat,
        "unclear (scraped ChatGPT conversations; OpenAI terms apply)", _SHAREGPT_FIELDS,
        "conversation: ShareGPT multi-turn, each reply re-sends the history (sessions)",
        multi_turn=True),
    "cnn_dailymail": RealDataset(
        "cnn_dailymail", "ccdv/cnn_dailymail", "3.0.0", "train", _cnn, "Apache-2.0",
        "id, article, highlights", "summarization: CNN/DailyMail 3.0.0 article -> highlights"),
    "dolly-qa": RealDataset(
        "dolly-qa", "databricks/databricks-dolly-15k", None, "train", _dolly, "CC BY-SA 3.0",
        "instruction, context, response, category",
        "QA: Dolly 15k, categories containing 'qa', instruction+context -> response"),
}


def get_real(name: str) -> RealDataset:
    if name not in REAL_DATASETS:
        raise WorkloadError(f"unknown dataset {name!r}")
    return REAL_DATASETS[name]


# ---------------------------------------------------------------- local files

def _rows_json(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WorkloadError(f"{path}: bad JSON ({e})") from None
        for i, row in enumerate(data):
            yield f"{path}:row{i}", row
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            try:
                yield f"{path}:line{lineno}", json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise WorkloadError(f"{path}:line{lineno}: bad JSON ({e})") from None


def _rows_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise WorkloadError(f"{path}: cannot read parquet ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row{i}", row


def _rows_saved(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise WorkloadError(f"{path}: cannot load a saved dataset ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    for i, row in enumerate(ds):
        yield f"{path}:row{i}", row


def iter_local_rows(paths: list[str | Path]) -> Iterator[tuple[str, Any]]:
    """Rows of local data files as ``(where, row)``; ``where`` is ``FILE:rowN``/``lineN``."""
    for p in map(Path, paths):
        if not p.exists():
            raise WorkloadError(f"{p}: no such data file")
        if p.is_dir():
            yield from _rows_saved(p)
        elif p.suffix == ".parquet":
            yield from _rows_parquet(p)
        elif p.suffix in (".json", ".jsonl"):
            yield from _rows_json(p)
        else:
            raise WorkloadError(f"{p}: unsupported data file type (use .json, .jsonl, .parquet "
                                "or a save_to_disk directory)")


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub can be opened (a quick offline check)."""
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def iter_hub_rows(ds: RealDataset) -> Iterator[tuple[str, Any]]:
    """Rows from the hub via ``datasets.load_dataset`` (needs network or an HF cache).

    When the hub is unreachable, ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are set
    before ``datasets`` is imported, so a locally cached copy is used without the
    library's retry loop, and a missing one fails at once.
    """
    if "HF_HUB_OFFLINE" not in os.environ and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    try:
        data = datasets.load_dataset(ds.hub_id, ds.hub_config, split=ds.split)
    except Exception as e:  # noqa: BLE001 - offline gives many different errors
        raise WorkloadError(
            f"{ds.hub_id}: cannot load from the hub ({type(e).__name__}: {str(e)[:200]}); "
            "pass --data-files with local JSON/JSONL/parquet files instead") from None
    for i, row in enumerate(data):
        yield f"{ds.hub_id}:{ds.split}:row{i}", row


def load_real_units(name: str, data_files: list[str] | None = None) -> tuple[list[Unit], dict]:
    """Units of dataset ``name`` from local files (if given) or the hub, plus provenance."""
    ds = get_real(name)
    rows = iter_local_rows(data_files) if data_files else iter_hub_rows(ds)
    units, skipped, total = [], 0, 0
    for where, row in rows:
        total += 1
        u = ds.convert(row, where)
        if u:
            units.append(u)
        else:
            skipped += 1
    origin = ", ".join(map(str, data_files)) if data_files else ds.hub_id
    if total == 0:
        raise WorkloadError(f"{origin}: dataset is empty (no rows)")
    prov = {"dataset": ds.name, "hub_id": ds.hub_id, "hub_config": ds.hub_config,
            "split": ds.split, "licence": ds.licence, "fields": ds.fields,
            "local_files": [str(Path(p).resolve()) for p in data_files] if data_files else None,
            "rows_read": total, "rows_skipped_by_dataset_filter": skipped}
    return units, prov


# ---------------------------------------------------------------- pickles

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "tuple"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _ids(x: Any, where: str) -> list[int]:
    if hasattr(x, "tolist"):
        x = x.tolist()
    if not isinstance(x, (list, tuple)):
        raise WorkloadError(f"{where}: token ids must be a list of ints, got {type(x).__name__}")
    for i, t in enumerate(x):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise WorkloadError(f"{where}: token [{i}] = {t!r} is not a non-negative int")
    return list(x)


def _is_chat(item: Any) -> bool:
    return (isinstance(item, (list, tuple)) and len(item) > 0 and isinstance(item[0], (list, tuple))
            and len(item[0]) == 2 and isinstance(item[0][0], str))


def load_pickle_units(path: str | Path, fmt: str = "auto", name: str = "pickle") -> tuple[list[Unit], dict]:
    """Units from a study pickle (pairs or chat format, see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise WorkloadError(f"{p}: no such pickle file")
    try:
        with open(p, "rb") as f:
            data = _SafeUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - pickle raises many types
        raise WorkloadError(f"{p}: cannot read pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, (list, tuple)):
        raise WorkloadError(f"{p}: expected a list of requests, got {type(data).__name__}")
    if not data:
        raise WorkloadError(f"{p}: dataset is empty (no rows)")
    if fmt == "auto":
        fmt = "chat" if _is_chat(data[0]) else "pairs"
    units: list[Unit] = []
    for i, item in enumerate(data):
        where = f"{p}:row{i}"
        if fmt == "pairs":
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise WorkloadError(f"{where}: expected (input_ids, output_ids)")
            inp, out = _ids(item[0], where + ":input"), _ids(item[1], where + ":output")
            units.append([RawRequest(inp, len(out), None, f"{name}:{where}")])
        elif fmt == "chat":
            if not isinstance(item, (list, tuple)):
                raise WorkloadError(f"{where}: expected a list of (role, ids) turns")
            history: list[int] = []
            unit: Unit = []
            for j, turn in enumerate(item):
                if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and isinstance(turn[0], str)):
                    raise WorkloadError(f"{where}: turn {j} is not a (role, ids) pair")
                ids = _ids(turn[1], f"{where}:turn{j}")
                if turn[0].lower() in ASSISTANT_ROLES and history:
                    unit.append(RawRequest(list(history), len(ids), f"{name}:{p.name}:{i}",
                                           f"{name}:{where}:turn{len(unit)}", {"turn": len(unit)}))
                history.extend(ids)
            if unit:
                units.append(unit)
        else:
            raise WorkloadError(f"unknown pickle format {fmt!r} (auto, pairs, chat)")
    prov = {"dataset": name, "pickle": str(p.resolve()), "pickle_format": fmt, "rows_read": len(data),
            "pretokenized": True}
    return units, prov

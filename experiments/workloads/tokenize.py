"""Tokenizer loading for workloads.

``load_tokenizer(path)`` accepts any directory containing ``tokenizer.json`` (loaded
with ``tokenizers.Tokenizer.from_file``, fast) or, failing that, anything
``transformers.AutoTokenizer`` can load. The workloads command line supplies the default
(SmolLM2-135M-Instruct, ``cli.default_tokenizer_dir``); this module imports nothing of
kvdedup's engine side.

Prompts are encoded with the tokenizer's special tokens (``add_special_tokens=True``,
as vLLM does for a text prompt); reference outputs without them. No chat template is
applied anywhere: multi-turn text uses plain ``User:``/``Assistant:`` prefixes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .format import WorkloadError, file_sha256


class WorkloadTokenizer:
    """A thin wrapper giving one interface over ``tokenizers`` and ``transformers``."""

    def __init__(self, backend: Any, kind: str, path: Path, name: str, sha256: str | None):
        self._backend = backend
        self.kind = kind
        self.path = path
        self.name = name
        self.sha256 = sha256

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text."""
        if not texts:
            return []
        if self.kind == "tokenizers":
            encs = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return [list(e.ids) for e in encs]
        out = self._backend(list(texts), add_special_tokens=add_special_tokens)
        return [list(x) for x in out["input_ids"]]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def decode(self, ids: Sequence[int]) -> str:
        if self.kind == "tokenizers":
            return self._backend.decode(list(ids), skip_special_tokens=True)
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def max_model_len(self) -> int | None:
        """``max_position_embeddings`` from a ``config.json`` next to the tokenizer, if any."""
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return None
        try:
            v = json.loads(cfg.read_text()).get("max_position_embeddings")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        return int(v) if isinstance(v, int) and v > 0 else None

    def describe(self) -> dict[str, Any]:
        """Provenance for ``.meta.json``."""
        return {"name": self.name, "path": str(self.path), "backend": self.kind,
                "tokenizer_json_sha256": self.sha256, "add_special_tokens_prompt": True}


def load_tokenizer(path: str | Path) -> WorkloadTokenizer:
    """Load the tokenizer in directory (or ``tokenizer.json`` file) ``path``."""
    d = Path(path).expanduser()
    if not d.exists():
        raise WorkloadError(f"{d}: tokenizer directory does not exist")
    tj = d / "tokenizer.json" if d.is_dir() else d
    if tj.is_file() and tj.name.endswith(".json"):
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise WorkloadError(f"{tj}: cannot load tokenizer ({e})") from None
        base = tj.parent
        return WorkloadTokenizer(tok, "tokenizers", base.resolve(), base.name, file_sha256(tj))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as e:  # noqa: BLE001
        raise WorkloadError(f"{d}: no tokenizer.json and transformers cannot load it ({e})") from None
    return WorkloadTokenizer(tok, "transformers", d.resolve(), d.name, None)

"""The per-case row schema (``rows.jsonl``) shared by the simulator and the engine.

One row per (case, arm). ``arm`` is ``full`` (the reference: full prefill of the target,
its greedy output and teacher-forced log-probs), ``floor:<name>`` (a neutral change of
the prompt), ``sim:<rule>`` (reuse simulated with the HF model) or ``<mode>:<rule>``
(reuse in the engine, e.g. ``sequence:k=32``). Every non-reference row carries the
metrics of ``metrics.score`` against its case's reference of the same backend.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cases import Case


def case_fields(c: Case) -> dict:
    return {"case_id": c.case_id, "split": c.split, "domain": c.domain, "kind": c.kind,
            "target_len": len(c.target), "source_len": len(c.source), **c.info}


def ref_row(base: dict, ref: dict, backend: str = "sim") -> dict:
    return {**base, "arm": "full", "backend": backend, "tokens": ref["tokens"], "text": ref["text"],
            "lp": ref["lp"], "top1": ref["top1"], "answer": ref.get("answer"),
            "greedy_is_top1": sum(int(a == b) for a, b in zip(ref["top1"], ref["tokens"])) / max(1, len(ref["tokens"])),
            **({"rougeL_answer": _answer_score(ref)} if ref.get("answer") else {})}


def _answer_score(ref: dict) -> float:
    from .metrics import rouge_l

    return rouge_l(ref["text"], ref["answer"])


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not JSON ({e}); remove the line or the file") from None
    return rows


def done_by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """case id -> arm -> row (the last one written wins)."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["case_id"], {})[r["arm"]] = r
    return out


def append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

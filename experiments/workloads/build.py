"""Turn raw (text) requests into a tokenized, filtered, sampled workload.

Every loader (real datasets, study pickles, stand-ins) yields *units*: a unit is one
single-turn request or all turns of one session, each turn a :class:`RawRequest`.
:func:`build_requests` then

1. shuffles the units with ``seed`` when a number of requests is asked for (a random
   sample, as the workload study and vLLM's benchmarks do), else keeps file order;
2. tokenizes prompts (with special tokens) and reference outputs (without) in
   batches; a unit without a reference output draws ``output_len`` from a
   :class:`~experiments.workloads.lengths.LengthDist`;
3. optionally truncates prompts to ``max_prompt_tokens``;
4. filters as the study did: keep a request only if
   ``prompt_len + output_len < max_model_len`` (and both >= 1); in a session the
   first dropped turn drops the rest (later turns re-send its history);
5. stops at ``num_requests``; optionally assigns Poisson arrival times.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .format import Request, WorkloadError
from .lengths import LengthDist

BATCH_UNITS = 256


@dataclass
class RawRequest:
    """A request before tokenization.

    ``prompt`` is text or already tokenized ids; ``output`` is the reference text, a
    length, or ``None`` (draw from the workload's length distribution).
    """

    prompt: str | list[int]
    output: str | int | None
    session_id: str | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


Unit = list[RawRequest]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times of ``n`` requests of a Poisson process with ``rate`` per second."""
    if rate <= 0:
        raise WorkloadError(f"--request-rate must be > 0, got {rate}")
    rng = np.random.default_rng([seed, 0xA77])
    return [round(float(t), 6) for t in np.cumsum(rng.exponential(1.0 / rate, size=n))]


def build_requests(units: Iterable[Unit], tokenizer: Any, *, num_requests: int | None = None,
                   seed: int = 0, max_model_len: int | None = None,
                   max_prompt_tokens: int | None = None, length_dist: LengthDist | None = None,
                   origin: str = "dataset", progress: bool = True) -> tuple[list[Request], dict]:
    """Tokenize, filter and sample ``units``; returns the requests and filter counts.

    Raises :class:`WorkloadError` (naming ``origin``) when nothing survives.
    """
    units = [u for u in units if u]
    if not units:
        raise WorkloadError(f"{origin}: dataset is empty (no usable rows)")
    if num_requests is not None and num_requests < 1:
        raise WorkloadError(f"--num-requests must be >= 1, got {num_requests}")
    order = list(range(len(units)))
    if num_requests is not None:
        np.random.default_rng([seed, 0x5A]).shuffle(order)
    len_rng = np.random.default_rng([seed, 0x1E])
    dropped: Counter = Counter()
    out: list[Request] = []
    target = num_requests if num_requests is not None else sum(len(u) for u in units)
    bar = tqdm(total=target, desc=f"tokenizing {origin}", unit="req", disable=not progress,
               leave=False)
    for start in range(0, len(order), BATCH_UNITS):
        if num_requests is not None and len(out) >= num_requests:
            break
        batch = [units[i] for i in order[start:start + BATCH_UNITS]]
        flat = [r for u in batch for r in u]
        texts = [r.prompt for r in flat if isinstance(r.prompt, str)]
        outs = [r.output for r in flat if isinstance(r.output, str)]
        if tokenizer is None and (texts or outs):
            raise WorkloadError(f"{origin}: text rows need a tokenizer")
        t_ids = iter(tokenizer.encode_batch(texts, True) if texts else [])
        o_ids = iter(tokenizer.encode_batch(outs, False) if outs else [])
        for unit in batch:
            for r in unit:
                ids = list(next(t_ids)) if isinstance(r.prompt, str) else list(r.prompt)
                if isinstance(r.output, str):
                    olen = len(next(o_ids))
                elif r.output is None:
                    if length_dist is None:
                        raise WorkloadError(f"{r.source}: no reference output and no length distribution")
                    olen = length_dist.sample(len_rng, 1)[0]
                else:
                    olen = int(r.output)
                r._tok = (ids, olen)  # type: ignore[attr-defined]
            for pos, r in enumerate(unit):
                ids, olen = r._tok  # type: ignore[attr-defined]
                del r._tok  # type: ignore[attr-defined]
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    ids = ids[:max_prompt_tokens]
                    dropped["truncated_prompt (kept)"] += 1
                reason = None
                if not ids:
                    reason = "empty_prompt"
                elif olen < 1:
                    reason = "empty_output"
                elif max_model_len is not None and len(ids) + olen >= max_model_len:
                    reason = "prompt_plus_output_ge_max_model_len"
                if reason:
                    dropped[reason] += 1
                    rest = len(unit) - pos - 1
                    if rest:
                        dropped["later_turns_of_dropped_session"] += rest
                    break
                if num_requests is not None and len(out) >= num_requests:
                    break
                out.append(Request(ids, olen, None, r.session_id, r.source, dict(r.extra)))
                bar.update(1)
    bar.close()
    if not out:
        raise WorkloadError(f"{origin}: no request survived the filters ({dict(dropped)})")
    return out, {"dropped": dict(dropped), "units_available": len(units)}


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-serialisable object (cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def apply_arrivals(requests: Sequence[Request], rate: float | None, seed: int) -> None:
    """Set Poisson arrival times in file order (``rate`` requests/s), or leave null."""
    if rate is None:
        return
    for r, t in zip(requests, poisson_arrivals(len(requests), rate, seed)):
        r.arrival_time = t

"""Redundancy audit of a workload file: how much prompt KV could be shared.

No engine is started.  For a workload (JSONL, one request per line) this module
measures, with requests taken in file order and an *unbounded* cache, the
fraction of prompt tokens (and full KV blocks) that could be shared under three
sharing rules:

``prefix`` (a)
    vLLM automatic prefix caching (APC) semantics.  Each full block gets a
    chained hash (``dedup.hashing.block_hashes``: block *i* covers tokens of
    blocks ``0..i``).  A request hits its leading run of full blocks whose
    chained hash an earlier request already produced (the first occurrence
    computes).  Like vLLM 0.32 ``KVCacheManager.get_computed_blocks``, the hit
    is capped at ``max_cache_hit_length = num_prompt_tokens - 1`` and rounded
    down to whole blocks (``max_cache_hit_length // block_size`` blocks), so
    the last prompt token is always computed: an exact repeat of a
    block-aligned prompt hits all of its blocks but the last.
``block`` (b)
    Position-independent fixed blocks: the prompt is cut into full blocks at
    offsets ``0, B, 2B, ...`` and each block is hashed on its own tokens
    (xxh3-128 of the int32 token bytes).  A block is shareable when an earlier
    request or an earlier block of the same prompt had the same content.
``run`` (c)
    Content-defined runs (``dedup.hashing.chunk_runs``) with
    position-independent digests; a run is shareable when an earlier request
    or an earlier run of the same prompt had the same digest.  Runs do not
    depend on the block size.

Partial trailing blocks are never shareable under (a) and (b) (KV blocks are
shared only when full).  Fractions are over *all* prompt tokens.  Generated
tokens are ignored by the fractions (their content is unknown offline), which
matches the engine for workloads whose prompts do not contain earlier
requests' model outputs.

The module also holds the small JSONL workload reader used by the audit
(format: ``prompt_token_ids``, ``output_len``, ``arrival_time``,
``session_id``, ``source`` per line, optional sidecar ``FILE.meta.json``).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import xxhash

from analysis import AnalysisError
from analysis.borrow import shared_footprints
from analysis.packing import rule_bounds
from analysis.schedule_lp import lp_min_steps
from analysis.simulate import RequestFootprint, simulate_kv_blocks, SIMULATION_MODEL
from dedup.planner import check_edges
from experiments.workloads.format import Request, WorkloadError, load_workload

__all__ = [
    "WorkloadRequest",
    "read_workload",
    "find_workload_meta",
    "prefix_hit_tokens",
    "fixed_block_digests",
    "audit_requests",
    "audit_workload",
    "format_audit_table",
]

#: Largest token id accepted (token ids are hashed as int32 for rule (b)).



# --------------------------------------------------------------------------
# Workload reader
# --------------------------------------------------------------------------


# Workloads are read by the project's one loader (experiments.workloads.format), so the
# audit accepts exactly what experiments run; its errors become AnalysisError here.
WorkloadRequest = Request


def read_workload(path: str | Path) -> list[Request]:
    """Read a workload JSONL file with ``experiments.workloads.format.load_workload``.

    Raises :class:`AnalysisError` naming the file (and line) when the file is
    missing, empty, not JSON, or a request is malformed.
    """
    try:
        return load_workload(path).requests
    except WorkloadError as exc:
        raise AnalysisError(str(exc)) from None


def find_workload_meta(path: str | Path) -> Path | None:
    """Return the sidecar meta file of a workload, or None if there is none.

    Both ``FILE.meta.json`` (``w.jsonl.meta.json``) and the suffix-replaced
    form (``w.meta.json``) are accepted, in that order.
    """
    p = Path(path)
    for cand in (p.with_name(p.name + ".meta.json"), p.with_suffix(".meta.json")):
        if cand.is_file():
            return cand
    return None


def _read_meta(path: Path) -> dict | None:
    meta = find_workload_meta(path)
    if meta is None:
        return None
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AnalysisError(f"unreadable workload meta file {meta}: {exc}") from None
    if not isinstance(data, dict):
        raise AnalysisError(f"workload meta file {meta} must hold a JSON object")
    return data


# --------------------------------------------------------------------------
# Hashing helpers
# --------------------------------------------------------------------------


def _hashing():
    """Import ``dedup.hashing`` lazily with a clear error if it is missing."""
    try:
        from dedup import hashing
    except ImportError as exc:  # pragma: no cover - depends on the tree state
        raise AnalysisError(f"dedup.hashing is not importable: {exc}") from None
    return hashing


def _tokens_of(req: Any) -> list[int]:
    """Prompt token ids of a WorkloadRequest, a dict, or a plain sequence."""
    if isinstance(req, WorkloadRequest):
        return list(req.prompt_token_ids)
    if isinstance(req, dict):
        if "prompt_token_ids" not in req:
            raise AnalysisError("request dict has no 'prompt_token_ids'")
        return list(req["prompt_token_ids"])
    if hasattr(req, "prompt_token_ids"):
        return list(req.prompt_token_ids)
    if isinstance(req, (list, tuple, np.ndarray)):
        return [int(t) for t in req]
    raise AnalysisError(f"cannot read prompt tokens from {type(req).__name__}")


def _output_len_of(req: Any) -> int:
    if isinstance(req, WorkloadRequest):
        return req.output_len
    if isinstance(req, dict):
        return int(req.get("output_len", 0))
    return int(getattr(req, "output_len", 0))


def _check_block_size(block_size: Any) -> int:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise AnalysisError(f"block size must be a positive int, got {block_size!r}")
    return int(block_size)


def fixed_block_digests(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Position-independent digests of the full blocks of ``tokens``.

    Block ``i`` covers ``tokens[i*B:(i+1)*B]`` and its digest depends only on
    those tokens (xxh3-128 of their int32 little-endian bytes).
    """
    b = _check_block_size(block_size)
    arr = np.asarray(tokens, dtype="<i4")
    n_full = len(arr) // b
    return [xxhash.xxh3_128_digest(arr[i * b : (i + 1) * b].tobytes()) for i in range(n_full)]


def _chained_hashes(tokens: list[int], block_size: int) -> list[bytes]:
    hashes = list(_hashing().block_hashes(tokens, block_size))
    if len(hashes) != len(tokens) // block_size:
        raise AnalysisError(
            f"dedup.hashing.block_hashes returned {len(hashes)} hashes for "
            f"{len(tokens)} tokens at block size {block_size} (expected {len(tokens) // block_size})"
        )
    return hashes


def _effective_chunk_params(chunk_kwargs: dict) -> dict:
    """chunk_runs' min/avg/max lengths actually used (its defaults + overrides)."""
    params = {}
    try:
        sig = inspect.signature(_hashing().chunk_runs)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signature
        sig = None
    for name in ("min_len", "avg_len", "max_len"):
        if name in chunk_kwargs:
            params[name] = chunk_kwargs[name]
        elif sig is not None and name in sig.parameters:
            default = sig.parameters[name].default
            params[name] = None if default is inspect.Parameter.empty else default
    return params


def _runs(tokens: list[int], chunk_kwargs: dict) -> list[tuple[int, int, bytes]]:
    """(start, end, digest) of the content-defined runs of ``tokens``."""
    try:
        chunks = _hashing().chunk_runs(tokens, **chunk_kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, AnalysisError):
            raise
        raise AnalysisError(f"chunk_runs rejected parameters {chunk_kwargs}: {exc}") from None
    return [(int(c.start), int(c.end), bytes(c.digest)) for c in chunks]


# --------------------------------------------------------------------------
# (a) prefix rule, vLLM APC semantics
# --------------------------------------------------------------------------


def _prefix_hits_from_hashes(hashes: list[bytes], num_tokens: int, block_size: int, seen: set) -> int:
    """Hit tokens of one request given its chained hashes (mirrors vLLM 0.32).

    ``max_cache_hit_length = num_tokens - 1``; at most
    ``max_cache_hit_length // block_size`` leading blocks are looked up and the
    walk stops at the first miss.
    """
    max_cache_hit_length = num_tokens - 1
    hit_blocks = 0
    for h in hashes[: max_cache_hit_length // block_size]:
        if h not in seen:
            break
        hit_blocks += 1
    return hit_blocks * block_size


def prefix_hit_tokens(workload_requests: Iterable[Any], block_size: int) -> list[int]:
    """Per request, the prefix-cache hit tokens vLLM 0.32 should report.

    Assumes an unbounded cache, prefix caching enabled, no cache salt/LoRA,
    and requests run one at a time in the given order (each request's full
    prompt blocks are cached before the next request is looked up).  Blocks
    containing generated tokens are not modelled; they only matter when a
    later prompt contains an earlier request's *model output*.

    ``workload_requests`` items may be :class:`WorkloadRequest`, dicts with
    ``prompt_token_ids``, or plain token sequences.
    """
    b = _check_block_size(block_size)
    seen: set[bytes] = set()
    out: list[int] = []
    for req in workload_requests:
        toks = _tokens_of(req)
        hashes = _chained_hashes(toks, b)
        out.append(_prefix_hits_from_hashes(hashes, len(toks), b, seen))
        seen.update(hashes)
    return out


# --------------------------------------------------------------------------
# Audit of all three rules + simulation
# --------------------------------------------------------------------------


def _frac(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _audit_block_size(
    prompts: list[list[int]],
    outputs: list[int],
    block_size: int,
    concurrency: int,
    run_spans: list[list[tuple[int, int, bytes]]],
    shared_kwargs: dict,
    num_blocks: Sequence[int] = (),
    lp: bool = False,
) -> dict:
    """All per-block-size numbers: prefix, block and shared rules + simulation (+ the
    packing bound at each of ``num_blocks``, and with ``lp`` the co-residency LP's for the
    prefix, shared and run rules)."""
    b = block_size
    total_tokens = sum(len(t) for t in prompts)
    total_full_blocks = sum(len(t) // b for t in prompts)

    seen_prefix: set[bytes] = set()
    seen_block: set[bytes] = set()
    prefix_hit_tok = 0
    prefix_hit_blocks = 0
    block_hit_blocks = 0
    footprints = {"none": [], "prefix": [], "block": [], "run": []}

    for toks, out_len, spans in zip(prompts, outputs, run_spans):
        n = len(toks)
        chained = _chained_hashes(toks, b)
        hits = _prefix_hits_from_hashes(chained, n, b, seen_prefix)
        prefix_hit_tok += hits
        prefix_hit_blocks += hits // b
        seen_prefix.update(chained)

        fixed = fixed_block_digests(toks, b)
        for d in fixed:
            if d in seen_block:
                block_hit_blocks += 1
            else:
                seen_block.add(d)

        footprints["none"].append(RequestFootprint(n, out_len, ()))
        footprints["prefix"].append(RequestFootprint(n, out_len, tuple((h, b) for h in chained)))
        footprints["block"].append(RequestFootprint(n, out_len, tuple((d, b) for d in fixed)))
        footprints["run"].append(
            RequestFootprint(n, out_len, tuple((d, e - s) for s, e, d in spans))
        )

    footprints["shared"], borrowed = shared_footprints(prompts, outputs, b, **shared_kwargs)
    block_hit_tok = block_hit_blocks * b
    sim = {
        rule: simulate_kv_blocks(fps, b, concurrency, token_granular=(rule == "run"))
        for rule, fps in footprints.items()
    }
    return {
        "block_size": b,
        "total_prompt_tokens": total_tokens,
        "total_full_blocks": total_full_blocks,
        "prefix": {
            "shareable_tokens": prefix_hit_tok,
            "shareable_blocks": prefix_hit_blocks,
            "shareable_fraction": _frac(prefix_hit_tok, total_tokens),
            "shareable_block_fraction": _frac(prefix_hit_blocks, total_full_blocks),
        },
        "block": {
            "shareable_tokens": block_hit_tok,
            "shareable_blocks": block_hit_blocks,
            "distinct_blocks": len(seen_block),
            "shareable_fraction": _frac(block_hit_tok, total_tokens),
            "shareable_block_fraction": _frac(block_hit_blocks, total_full_blocks),
        },
        "shared": dict(borrowed, borrowed_fraction=_frac(borrowed["borrowed_tokens"],
                                                           total_tokens)),
        "simulation": sim,
        "packing": {str(n): _bounds(footprints, b, n, lp) for n in num_blocks},
    }


def _bounds(footprints: dict, block_size: int, num_blocks: int, lp: bool) -> dict:
    out = rule_bounds(footprints, block_size, num_blocks)
    if lp:
        for rule in ("prefix", "shared", "run"):
            r = lp_min_steps(footprints[rule], block_size, num_blocks,
                             token_granular=(rule == "run"))
            out[rule].update(lp_steps=r["lp_steps"], lp_exact=r["exact"])
    return out


def _audit_runs(run_spans: list[list[tuple[int, int, bytes]]], total_tokens: int) -> dict:
    seen: set[bytes] = set()
    shareable_tok = 0
    shareable_runs = 0
    n_runs = 0
    for spans in run_spans:
        for s, e, d in spans:
            n_runs += 1
            if d in seen:
                shareable_tok += e - s
                shareable_runs += 1
            else:
                seen.add(d)
    return {
        "shareable_tokens": shareable_tok,
        "shareable_runs": shareable_runs,
        "num_runs": n_runs,
        "distinct_runs": len(seen),
        "shareable_fraction": _frac(shareable_tok, total_tokens),
    }


def audit_requests(
    requests: Sequence[Any],
    block_sizes: Sequence[int] = (16,),
    concurrency: int = 16,
    chunk_kwargs: dict | None = None,
    k: int = 32,
    min_inject: int = 32,
    num_blocks: Sequence[int] = (),
    edges: str = "slot",
    lp: bool = False,
) -> dict:
    """Audit already-loaded requests; see :func:`audit_workload` for the keys. ``k``,
    ``min_inject`` and ``edges`` are shared mode's settings for the ``shared`` rule; for
    each pool size in ``num_blocks`` the result has each rule's lower bound on engine
    steps (``analysis.packing``; with ``lp`` also ``lp_steps``, the co-residency LP's
    bound for the prefix, shared and run rules, ``analysis.schedule_lp``)."""
    if not requests:
        raise AnalysisError("no requests to audit")
    if not block_sizes:
        raise AnalysisError("at least one block size is required")
    sizes = [_check_block_size(b) for b in block_sizes]
    if len(set(sizes)) != len(sizes):
        raise AnalysisError(f"duplicate block sizes: {sizes}")
    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise AnalysisError(f"concurrency must be a positive int, got {concurrency!r}")
    ckw = {k: v for k, v in (chunk_kwargs or {}).items() if v is not None}
    for n in num_blocks:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise AnalysisError(f"num_blocks must be positive ints, got {n!r}")

    prompts = [_tokens_of(r) for r in requests]
    outputs = [_output_len_of(r) for r in requests]
    total_tokens = sum(len(t) for t in prompts)
    run_spans = [_runs(t, ckw) for t in prompts]
    for i, (toks, spans) in enumerate(zip(prompts, run_spans)):
        if any(not (0 <= s < e <= len(toks)) for s, e, _ in spans):
            raise AnalysisError(f"dedup.hashing.chunk_runs returned a bad span for request {i}")
    runs = _audit_runs(run_spans, total_tokens)

    try:
        check_edges(edges)
    except ValueError as e:
        raise AnalysisError(str(e)) from None
    shared_kwargs = {"k": k, "min_inject": min_inject, "chunk_kwargs": ckw, "edges": edges}
    per_bs = {
        str(b): _audit_block_size(prompts, outputs, b, concurrency, run_spans, shared_kwargs,
                                  num_blocks, lp)
        for b in sizes
    }
    first = per_bs[str(sizes[0])]
    return {
        "num_requests": len(prompts),
        "total_prompt_tokens": total_tokens,
        "total_output_tokens": sum(outputs),
        "block_size": sizes[0],
        "block_sizes": sizes,
        "concurrency": concurrency,
        "prefix_block_fraction": first["prefix"]["shareable_fraction"],
        "fixed_block_fraction": first["block"]["shareable_fraction"],
        "chunk_run_fraction": runs["shareable_fraction"],
        "runs": dict(runs, chunk_params=_effective_chunk_params(ckw)),
        "per_block_size": per_bs,
        "simulation_model": SIMULATION_MODEL,
    }


def audit_workload(
    path: str | Path,
    block_sizes: Sequence[int] = (16,),
    concurrency: int = 16,
    chunk_kwargs: dict | None = None,
    k: int = 32,
    min_inject: int = 32,
    num_blocks: Sequence[int] = (),
    edges: str = "slot",
    lp: bool = False,
) -> dict:
    """Audit a workload file.

    Returns a JSON-serialisable dict with (among others) the keys
    ``prefix_block_fraction``, ``fixed_block_fraction`` and
    ``chunk_run_fraction`` (fractions of all prompt tokens in shareable
    chained prefix blocks, fixed blocks and chunk runs at the first block
    size; the workload meta's token-level ``*_shareable_fraction`` measure
    something else, hence other names), ``per_block_size`` (tokens, blocks and the KV-occupancy
    simulation for every block size), ``runs`` and ``meta`` (the sidecar
    ``FILE.meta.json`` contents or null).
    """
    reqs = read_workload(path)
    result = {"workload": str(path)}
    result.update(audit_requests(reqs, block_sizes, concurrency, chunk_kwargs, k, min_inject,
                                 num_blocks, edges, lp))
    meta_path = find_workload_meta(path)
    result["meta_file"] = None if meta_path is None else str(meta_path)
    result["meta"] = _read_meta(Path(path))
    return result


def _pct(x: float) -> str:
    return f"{100.0 * x:6.2f}%"


def format_audit_table(result: dict) -> str:
    """Human-readable tables for an :func:`audit_workload` result."""
    lines = [
        f"workload: {result.get('workload', '-')}"
        f"  (meta: {result.get('meta_file') or 'not found'})",
        f"requests: {result['num_requests']}  prompt tokens: {result['total_prompt_tokens']}"
        f"  output tokens: {result['total_output_tokens']}",
        "",
        "Shareable prompt tokens (file order, unbounded cache):",
        f"{'block':>6} | {'prefix (APC)':>22} | {'fixed blocks':>22} | {'content runs':>22}",
        f"{'size':>6} | {'tokens':>13} {'frac':>8} | {'tokens':>13} {'frac':>8} | {'tokens':>13} {'frac':>8}",
        "-" * 84,
    ]
    runs = result["runs"]
    for bs, r in result["per_block_size"].items():
        lines.append(
            f"{bs:>6} | {r['prefix']['shareable_tokens']:>13} {_pct(r['prefix']['shareable_fraction']):>8}"
            f" | {r['block']['shareable_tokens']:>13} {_pct(r['block']['shareable_fraction']):>8}"
            f" | {runs['shareable_tokens']:>13} {_pct(runs['shareable_fraction']):>8}"
        )
    lines += [
        "",
        "Shareable full KV blocks:",
        f"{'block':>6} | {'full blocks':>11} | {'prefix':>15} | {'fixed':>15}",
        "-" * 58,
    ]
    for bs, r in result["per_block_size"].items():
        lines.append(
            f"{bs:>6} | {r['total_full_blocks']:>11} | {r['prefix']['shareable_blocks']:>8}"
            f" {_pct(r['prefix']['shareable_block_fraction'])} | {r['block']['shareable_blocks']:>8}"
            f" {_pct(r['block']['shareable_block_fraction'])}"
        )
    lines.append(
        f"content runs: {runs['num_runs']} runs, {runs['shareable_runs']} shareable "
        f"(chunk_runs params: {runs['chunk_params']}; independent of block size)"
    )
    lines += [
        "",
        f"KV blocks held, {result['concurrency']} requests at a time (step model, see below):",
        f"{'block':>6} {'rule':>7} | {'peak log':>9} {'peak phys':>9} {'ratio':>6} |"
        f" {'mean log':>10} {'mean phys':>10} {'ratio':>6}",
        "-" * 76,
    ]
    for bs, r in result["per_block_size"].items():
        for rule, s in r["simulation"].items():
            lines.append(
                f"{bs:>6} {rule:>7} | {s['peak_logical_blocks']:>9} {s['peak_physical_blocks']:>9}"
                f" {s['peak_dedup_ratio']:>6.2f} | {s['mean_logical_blocks']:>10.1f}"
                f" {s['mean_physical_blocks']:>10.1f} {s['mean_dedup_ratio']:>6.2f}"
            )
    lines += ["", "model: " + result["simulation_model"]]
    bounds = [(bs, n, b) for bs, r in result["per_block_size"].items()
              for n, b in r.get("packing", {}).items()]
    if bounds:
        lines += ["", "Fewest engine steps any schedule needs at a pool of N blocks "
                  "(analysis.packing; measured: trace_steps of a run):",
                  f"{'block':>6} {'N':>6} | " + " ".join(f"{rule:>8}" for rule in bounds[0][2])
                  + " | prefix/shared", "-" * 76]
        for bs, n, b in bounds:
            ratio = b["prefix"]["min_steps"] / max(1, b["shared"]["min_steps"])
            lines.append(f"{bs:>6} {n:>6} | " + " ".join(f"{x['min_steps']:>8}" for x in b.values())
                         + f" | {ratio:>12.2f}")
    lps = [(bs, n, b) for bs, n, b in bounds if "lp_steps" in b["shared"]]
    if lps:
        lines += ["", "Fewest engine steps of any admission order, from which requests fit "
                  "side by side (analysis.schedule_lp; * = search budget hit, no bound):",
                  f"{'block':>6} {'N':>6} | {'prefix':>8} {'shared':>8} {'run':>8} |"
                  " prefix/shared prefix/run", "-" * 76]
        for bs, n, b in lps:
            p, q, r = (b[rule]["lp_steps"] for rule in ("prefix", "shared", "run"))
            ratios = " ".join(f"{p / x:>{w}.2f}" if p and x else f"{'-':>{w}}"
                              for x, w in ((q, 13), (r, 10)))
            lines.append(f"{bs:>6} {n:>6} | " + " ".join(f"{x if x else '*':>8}" for x in (p, q, r))
                         + f" | {ratios}")
        lines.append("run: the ideal plan, every distinct content run held once and never "
                     "recomputed, packed without padding")
    return "\n".join(lines)


"""The run-record schema (single source of truth): written by ``experiments.runner``,
read by ``analysis``. Engine-free (standard library only), so both sides import it.

Layout of a results directory ``OUT/`` written by the experiments runner::

    OUT/runs/<run_id>.json     one object per run (schema: RUN_FIELDS)
    OUT/runs.parquet           one row per run, the scalar fields (PARQUET_FIELDS)
    OUT/summary.json           free-form summary of the sweep (any JSON object)
    OUT/traces/<run_id>.jsonl  one object per engine step (schema: TRACE_FIELDS)

Run JSON fields (``scope`` says when a field is required: ``all`` runs,
``offline``/``online`` runs with ``status == "ok"`` of that kind; metric
fields may be ``null`` when the metric is unavailable, e.g. ``hit_rate`` for
the ``vllm`` arm without prefix caching):

Identity (scope ``all``)
    run_id (str, equals the file stem), kind ("offline"|"online"),
    arm ("vllm"|"vllm-apc"|"prefix"|"sequence"|"shared"|"shared-lru"|"shared-fcfs"|"shared-gate"|"shared-k32"|"shared-block-edges"),
    use_case (str),
    workload_file (str), num_blocks (int, KV capacity in blocks),
    block_size (int, tokens), num_requests (int), rep (int), model (str),
    config_id (str: hash of the engine config *excluding the arm and the swept
    num_blocks*; runs with a different model or config_id are not mixed in one
    report unless ``--allow-mixed``), status ("ok"|"failed"),
    error (str|null), env (dict: versions, cpu, git_commit, threads).
Offline metrics (scope ``offline``)
    elapsed_s, request_throughput (req/s), total_token_throughput (tok/s,
    input+output), output_throughput (tok/s), total_input_tokens,
    total_output_tokens, peak_physical_blocks, mean_physical_blocks,
    peak_logical_blocks, mean_dedup_ratio, hit_rate (prefix hit tokens /
    prefix query tokens), preemptions, trace (path of the step trace relative
    to OUT, or null).
Online metrics (scope ``online``)
    request_rate (req/s offered), burstiness, duration_s, completed, failed,
    ``{mean,median,p90,p95,p99}_{ttft,tpot,itl,e2el}_ms`` (vllm bench serve
    names), mean_normalized_latency_s, p95_normalized_latency_s (E2E latency /
    output tokens, s/token), goodput (req/s meeting the SLO),
    slo_normalized_latency_s, and per-request lists (JSON only, not parquet)
    ttfts_ms, itls_ms (flattened), e2els_ms, output_lens; optional (newer runs):
    ok_requests, the positions of the successful requests among the run's
    requests, aligned with ttfts_ms (read by analysis/repeats.py).

Trace JSONL (one object per engine step): step, time (s since start, at the
step's end), num_running, num_waiting, logical_blocks, physical_blocks,
dedup_ratio, bytes_saved, prefix_queries, prefix_hits, verified_hits,
collisions, preemptions (queries/hits/collisions/preemptions are cumulative
counters); optional (newer traces): start (when the step began, same clock),
scheduled_tokens, prefill_tokens, sequence_tokens_reused (cumulative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class SchemaError(ValueError):
    """A run record that does not match the schema (the message names the record)."""


KINDS = ("offline", "online")
#: ``shared-lru`` is shared mode with vLLM's own eviction order (the ablation of shared
#: mode's frequency-aware eviction); ``shared-fcfs`` shared mode in vLLM's admission order
#: (the ablation of its reuse-aware order); ``shared-gate`` shared mode admitting on the
#: gate alone (the ablation of promised blocks and the group hold); ``shared-k32`` shared
#: mode recomputing the first 32 tokens of each run (more reuse than the default k = 128,
#: outside the quality floor), whatever the config's k; ``shared-block-edges`` shared mode
#: borrowing only the whole reader blocks inside a run (the ablation of slot-granular edges).
ARMS = ("vllm", "vllm-apc", "prefix", "sequence", "shared", "shared-lru", "shared-fcfs",
        "shared-gate", "shared-k32", "shared-block-edges")
STATUSES = ("ok", "failed")
#: Arm that ratios are computed against.
BASELINE_ARM = "vllm-apc"


@dataclass(frozen=True)
class FieldSpec:
    """One run-JSON field: name, type, when required, nullability, meaning."""

    name: str
    type: str  # "str" | "int" | "float" | "dict" | "list"
    scope: str  # "all" | "offline" | "online"
    nullable: bool
    doc: str


def _f(name, typ, scope, nullable, doc):
    return FieldSpec(name, typ, scope, nullable, doc)


_IDENTITY = [
    _f("run_id", "str", "all", False, "unique run id; equals the JSON file stem"),
    _f("kind", "str", "all", False, "offline | online"),
    _f("arm", "str", "all", False, "vllm | vllm-apc | prefix | sequence | shared | shared-lru | shared-fcfs | shared-gate | shared-k32 | shared-block-edges"),
    _f("use_case", "str", "all", False, "workload / use-case name"),
    _f("workload_file", "str", "all", False, "workload JSONL path"),
    _f("num_blocks", "int", "all", False, "KV capacity in blocks"),
    _f("block_size", "int", "all", False, "KV block size in tokens"),
    _f("num_requests", "int", "all", False, "requests in the run"),
    _f("rep", "int", "all", False, "repetition index"),
    _f("model", "str", "all", False, "model name/path"),
    _f("config_id", "str", "all", False, "hash of the engine config excluding arm and num_blocks"),
    _f("status", "str", "all", False, "ok | failed"),
    _f("error", "str", "all", True, "error message of a failed run, else null"),
    _f("env", "dict", "all", False, "versions, cpu, git_commit, threads"),
]
_OFFLINE = [
    _f("elapsed_s", "float", "offline", True, "wall time of the batch, s"),
    _f("request_throughput", "float", "offline", True, "requests/s"),
    _f("total_token_throughput", "float", "offline", True, "input+output tokens/s"),
    _f("output_throughput", "float", "offline", True, "output tokens/s"),
    _f("total_input_tokens", "int", "offline", True, "prompt tokens"),
    _f("total_output_tokens", "int", "offline", True, "generated tokens"),
    _f("peak_physical_blocks", "float", "offline", True, "peak distinct KV blocks held"),
    _f("mean_physical_blocks", "float", "offline", True, "mean distinct KV blocks held"),
    _f("peak_logical_blocks", "float", "offline", True, "peak KV blocks referenced"),
    _f("mean_dedup_ratio", "float", "offline", True, "mean logical/physical over steps"),
    _f("hit_rate", "float", "offline", True, "prefix hit tokens / prefix query tokens"),
    _f("preemptions", "int", "offline", True, "preemptions during the run"),
    _f("reused_fraction", "float", "offline", True,
       "f: prompt tokens whose KV was reused at another offset / prompt tokens"),
    _f("median_ttft_s", "float", "offline", True, "median time to first token from submission, s"),
    _f("p99_ttft_s", "float", "offline", True, "p99 time to first token from submission, s"),
    _f("trace", "str", "offline", True, "step trace path relative to OUT, or null"),
]
_ONLINE = [
    _f("request_rate", "float", "online", True, "offered requests/s (inf = all at once)"),
    _f("burstiness", "float", "online", True, "gamma arrival shape (1 = Poisson)"),
    _f("duration_s", "float", "online", True, "benchmark duration, s"),
    _f("completed", "int", "online", True, "completed requests"),
    _f("failed", "int", "online", True, "failed requests"),
]
for _m in ("ttft", "tpot", "itl", "e2el"):
    for _s in ("mean", "median", "p90", "p95", "p99"):
        _ONLINE.append(_f(f"{_s}_{_m}_ms", "float", "online", True, f"{_s} {_m.upper()}, ms"))
_ONLINE += [
    _f("mean_normalized_latency_s", "float", "online", True, "mean E2E/output tokens, s/token"),
    _f("p95_normalized_latency_s", "float", "online", True, "p95 E2E/output tokens, s/token"),
    _f("goodput", "float", "online", True, "requests/s meeting the SLO"),
    _f("slo_normalized_latency_s", "float", "online", True, "normalized-latency SLO, s/token"),
    _f("ttfts_ms", "list", "online", False, "per-request TTFT, ms (JSON only)"),
    _f("itls_ms", "list", "online", False, "all inter-token latencies, flattened, ms (JSON only)"),
    _f("e2els_ms", "list", "online", False, "per-request E2E latency, ms (JSON only)"),
    _f("output_lens", "list", "online", False, "per-request generated tokens (JSON only)"),
]

#: All run-JSON fields, in documentation order.
RUN_FIELDS: tuple[FieldSpec, ...] = tuple(_IDENTITY + _OFFLINE + _ONLINE)
#: Per-request list fields: in the JSON only, never in runs.parquet.
LIST_FIELDS = tuple(f.name for f in RUN_FIELDS if f.type == "list")
#: Columns of runs.parquet (flat scalar fields; ``env`` is not a column).
PARQUET_FIELDS = tuple(f.name for f in RUN_FIELDS if f.type not in ("list", "dict"))
#: Fields of one step-trace JSONL object.
TRACE_FIELDS = (
    "step", "time", "num_running", "num_waiting", "logical_blocks", "physical_blocks",
    "dedup_ratio", "bytes_saved", "prefix_queries", "prefix_hits", "verified_hits",
    "collisions", "preemptions",
)
#: Trace fields added later (kept when present; older traces lack them).
OPTIONAL_TRACE_FIELDS = ("start", "scheduled_tokens", "prefill_tokens", "sequence_tokens_reused")
_ENUMS = {"kind": KINDS, "arm": ARMS, "status": STATUSES}
ENV_KEYS = ("versions", "cpu", "git_commit", "threads")


def _type_ok(value: Any, typ: str) -> bool:
    if typ == "str":
        return isinstance(value, str)
    if typ == "dict":
        return isinstance(value, dict)
    if typ == "list":
        return isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if typ == "int":
        return isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())
    return True


#: Offline fields added after runs were first recorded: validated when present, never
#: required (older result directories stay readable).
LATER_FIELDS = ("reused_fraction", "median_ttft_s", "p99_ttft_s")


def _required(spec: FieldSpec, run: dict) -> bool:
    if spec.name in LATER_FIELDS:
        return False
    if spec.scope == "all":
        return True
    return run.get("status") == "ok" and run.get("kind") == spec.scope


def validate_run(run: Any, where: str) -> dict:
    """Validate one run object; return it (ints normalised) or raise.

    The error names ``where`` (the file) and lists every missing field by
    name, then every field with a wrong type or value.
    """
    if not isinstance(run, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(run).__name__}")
    missing = [s.name for s in RUN_FIELDS if _required(s, run) and s.name not in run]
    bad = []
    for s in RUN_FIELDS:
        if s.name not in run:
            continue
        v = run[s.name]
        if v is None:
            if not s.nullable:
                bad.append(f"{s.name} (null, expected {s.type})")
            continue
        if not _type_ok(v, s.type):
            bad.append(f"{s.name} (expected {s.type}, got {type(v).__name__} {v!r:.40})")
        elif s.name in _ENUMS and v not in _ENUMS[s.name]:
            bad.append(f"{s.name} ({v!r} not one of {', '.join(_ENUMS[s.name])})")
    if missing or bad:
        parts = []
        if missing:
            parts.append(f"missing fields: {', '.join(missing)}")
        if bad:
            parts.append(f"bad fields: {'; '.join(bad)}")
        raise SchemaError(f"{where}: " + "; ".join(parts))
    out = dict(run)
    for s in RUN_FIELDS:
        if s.type == "int" and out.get(s.name) is not None:
            out[s.name] = int(out[s.name])
    return out

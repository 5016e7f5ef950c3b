"""Command line: ``python -m experiments {run,summarize,list}``.

    python -m experiments run CONFIG [--arms A B ..] [--use-cases U ..] [--out DIR] [--quick]
                                     [--reps N] [--num-blocks B ..] [--dry-run]
    python -m experiments summarize OUT      # rebuild runs.parquet + summary.json, print the table
    python -m experiments list               # the configs under experiments/configs/
    python -m experiments vllm-bench {convert,run,serve} ...   # vLLM's own serving benchmark
                                             # on a workload (see experiments/vllm_bench.py)

CONFIG is a YAML path or a name under experiments/configs/ (``quick``). Bad input
(unknown arm, missing workload, too-small capacity, bad config, server that does not
start in a check) prints ``error: ...`` and exits 2 before any engine starts. A run that
crashes is recorded as failed and the sweep goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.config import CONFIG_DIR, ConfigError, int_list, load_config
from experiments.schema import ARMS
from experiments.workloads import WorkloadError


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments",
                                 description="kvdedup experiments: offline throughput and online "
                                             f"latency sweeps over arms {', '.join(ARMS)}.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run (or resume) the sweep of a config")
    r.add_argument("config", help="YAML file or name under experiments/configs/")
    r.add_argument("--arms", nargs="+", metavar="ARM", help="arms to run (default: the config's)")
    r.add_argument("--out", type=Path, help="results directory (default results/<name>[-quick])")
    r.add_argument("--quick", action="store_true",
                   help="apply the config's 'quick' overrides (quick.yaml is quick already)")
    r.add_argument("--use-cases", nargs="+", metavar="USE_CASE",
                   help="run only these workloads of the config (by use_case name)")
    r.add_argument("--reps", type=int, help="override the number of repetitions")
    r.add_argument("--num-blocks", type=int, nargs="+", metavar="B",
                   help="override the swept KV capacities (blocks of engine.block_size tokens)")
    r.add_argument("--dry-run", action="store_true", help="check inputs, list the runs, start nothing")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    s = sub.add_parser("summarize", help="rebuild runs.parquet and summary.json of OUT")
    s.add_argument("out", type=Path)
    sub.add_parser("list", help="list the configs")
    sub.add_parser("vllm-bench", add_help=False,
                   help="vLLM's `vllm bench serve` on a workload (convert/run/serve; "
                        "`vllm-bench --help`)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vllm-bench"]:
        from experiments import vllm_bench

        return vllm_bench.main(argv[1:])
    args = make_parser().parse_args(argv)
    from experiments import runner

    try:
        if args.cmd == "list":
            for p in sorted(CONFIG_DIR.glob("*.yaml")):
                import yaml

                raw = yaml.safe_load(p.read_text()) or {}
                print(f"{p.stem:<28} {raw.get('kind', 'offline'):<8} {raw.get('description', '')}")
            return 0
        if args.cmd == "summarize":
            summary = runner.finalize(args.out)
            print(runner.format_table(summary))
            return 0
        cfg = load_config(args.config, quick=args.quick, arms=args.arms)
        if args.use_cases:
            names = [w.use_case for w in cfg.workloads]
            unknown = [u for u in args.use_cases if u not in names]
            if unknown:
                raise ConfigError(f"unknown use case(s) {', '.join(unknown)}; "
                                  f"{args.config} has {', '.join(names)}")
            cfg.workloads = [w for w in cfg.workloads if w.use_case in args.use_cases]
        if args.reps is not None:
            if args.reps < 1:
                raise ConfigError("--reps must be >= 1")
            cfg.reps = args.reps
        if args.num_blocks is not None:
            cfg.num_blocks = int_list(args.num_blocks, "--num-blocks")
        out = args.out or runner.default_out(cfg, args.quick)
        t0 = time.time()
        summary, done = runner.run_sweep(cfg, out, dry_run=args.dry_run,
                                         progress=not args.no_progress)
        if summary is None:
            return 0
        print(runner.format_table(summary))
        failed = [r for r in done if r["status"] != "ok"]
        print(f"\n{len(done)} runs now ({len(failed)} failed) in {time.time() - t0:.0f} s; "
              f"results in {out}")
        return 1 if failed else 0
    except (ConfigError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept (rerun the same command to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

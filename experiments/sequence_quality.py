"""Output quality of sequence-mode reuse vs full prefill, as a curve over k.

For each case (a SOURCE prompt and a TARGET prompt that contains the SOURCE's document(s)
in another context / at another offset):

1. Stock engine (dedup off, APC off), once for all cases: greedy continuation of TARGET
   (``max_new`` tokens, ``ignore_eos``) -> ``cont_ref``; teacher-forced
   ``prompt_logprobs=1`` on TARGET + cont_ref -> full-prefill log-prob of each cont token
   and the top-1 token at each cont position.
2. For each k, a FRESH sequence engine (empty store, APC on), cases in order: SOURCE
   (max_tokens=1, so its chunks are stored); TARGET + cont_ref with prompt_logprobs=1
   (teacher-forced under reuse); TARGET alone, greedy ``max_new`` tokens (reuse output).
   Tokens reused per request come from ``vllm_ext.dedup_stats`` deltas.

Metrics per case (only cont positions whose preceding token was computed, never injected,
are scored; a conservative check against every chunk digest sent to the engine so far):

* ``logprob_delta``: mean over cont tokens of (log p_reuse - log p_full), nats/token;
* ``top1_agreement``: fraction of cont positions whose top-1 token is the same;
* ``first_token_agree``: the reuse output's first token == cont_ref's first token;
* ``rougeL_f1``: ROUGE-L F1 (``rouge-score``, stemmed) of the reuse output text vs the
  full-prefill output text.

Completion-format prompts from the project's own generators; for chat-formatted cases,
several domains, a held-out split and the noise floor see ``python -m experiments.quality``.

Cases whose target reused 0 tokens are reported (``no_reuse_cases``) and left out of the
per-k means, which are over cases with reuse.

Outputs in ``--out``: ``cases.jsonl`` (one line per case per k, plus the k=None stock
reference lines), ``summary.json`` (env, per-k and per-workload aggregates),
``summary.md`` (the table, also printed).

    python -m experiments.sequence_quality --k 0 16 32 64 128 --cases 20 \\
        --out results/sequence-quality --model smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("multi-instruction", "multi-document")
DEFAULT_KS = (0, 16, 32, 64, 128)
BLOCK = 32


# ---------------------------------------------------------------------------- metrics
def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 with the maintained ``rouge-score`` package (stemmed, as for
    CNN/DailyMail); 1.0 when the texts are identical (also when both are empty)."""
    from experiments.quality.metrics import rouge_l

    return rouge_l(candidate, reference)


def mean_logprob_delta(reuse: Sequence[float], full: Sequence[float]) -> float:
    """Mean of (reuse - full) log-probs per token, nats/token (negative: reuse is worse)."""
    if len(reuse) != len(full):
        raise ValueError(f"length mismatch: {len(reuse)} vs {len(full)}")
    if not reuse:
        return float("nan")
    return float(np.mean(np.asarray(reuse, dtype=np.float64) - np.asarray(full, dtype=np.float64)))


def top1_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where the two top-1 token sequences agree."""
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    if not a:
        return float("nan")
    return sum(int(x == y) for x, y in zip(a, b)) / len(a)


# ------------------------------------------------------------------------------ cases
@dataclass
class Case:
    case_id: str
    workload: str
    source: list[int]
    target: list[int]
    info: dict = field(default_factory=dict)


def _generate_workload(kind: str, path: Path, n: int, seed: int, extra: list[str]) -> list:
    from experiments.workloads.cli import main as wl_main
    from experiments.workloads.format import load_workload

    path.parent.mkdir(parents=True, exist_ok=True)
    rc = wl_main(["generate", kind, "--out", str(path), "--num-requests", str(n), "--seed", str(seed),
                  "--quiet", *extra])
    if rc:
        raise SystemExit(f"workload generation failed ({kind}, rc={rc})")
    return load_workload(path).requests


def multi_instruction_cases(n: int, out: Path, seed: int = 0, max_prompt: int = 900) -> list[Case]:
    """Same article under two instructions: SOURCE = first-seen, TARGET = second-seen."""
    reqs = _generate_workload("multi-instruction", out / "workloads" / "multi-instruction.jsonl",
                              max(8 * n, 40), seed, ["--instructions", "2"])
    first: dict[str, Any] = {}
    done: set[str] = set()
    cases: list[Case] = []
    for r in reqs:
        doc = r.source.split(":")[1]
        if len(r.prompt_token_ids) > max_prompt or doc in done:
            continue
        if doc not in first:
            first[doc] = r
            continue
        s = first.pop(doc)
        done.add(doc)
        cases.append(Case(f"mi-{len(cases):02d}", "multi-instruction", list(s.prompt_token_ids),
                          list(r.prompt_token_ids),
                          {"source": s.source, "target": r.source, "doc": doc}))
        if len(cases) == n:
            break
    return cases


def _docs(tag: str) -> list[str]:
    return tag.split(":", 1)[1].split(",")


def multi_document_cases(n: int, out: Path, seed: int = 0, num_docs: int = 8,
                         docs_per_prompt: int = 3) -> list[Case]:
    """TARGET = a prompt of m of n articles; SOURCE = an earlier prompt sharing >= 2 of
    its articles with a different first article (so the shared ones sit at other offsets
    and are not an exact prefix)."""
    reqs = _generate_workload("multi-document", out / "workloads" / "multi-document.jsonl",
                              max(6 * n, 40), seed,
                              ["--num-docs", str(num_docs), "--docs-per-prompt", str(docs_per_prompt)])
    cases: list[Case] = []
    used_sources: dict[int, int] = {}
    for i, r in enumerate(reqs):
        dt = _docs(r.source)
        best, best_key = None, None
        for j in range(i):
            ds = _docs(reqs[j].source)
            if ds[0] == dt[0]:
                continue
            shared = len(set(ds) & set(dt))
            if shared < 2:
                continue
            moved = sum(1 for d in set(ds) & set(dt) if ds.index(d) != dt.index(d))
            key = (shared, moved, -used_sources.get(j, 0), -j)
            if best_key is None or key > best_key:
                best, best_key = j, key
        if best is None:
            continue
        used_sources[best] = used_sources.get(best, 0) + 1
        s = reqs[best]
        cases.append(Case(f"md-{len(cases):02d}", "multi-document", list(s.prompt_token_ids),
                          list(r.prompt_token_ids),
                          {"source": s.source, "target": r.source, "shared_docs": best_key[0],
                           "moved_docs": best_key[1]}))
        if len(cases) == n:
            break
    return cases


# ------------------------------------------------------------------------------ engine
def make_engine(model: str, dedup: str, max_model_len: int, blocks: int, k: int | None = None,
                store_bytes: int | None = None, retries: int = 1):
    """A vllm_ext engine (``experiments.quality.engine.make_engine``: configuration errors
    are raised at once; only start-up failures for lack of memory are retried)."""
    from experiments.quality.engine import make_engine as _make

    # inject_prompt_logprobs: teacher-forced scoring needs prompt logprobs under reuse
    # (off by default in sequence mode; only positions after the runs are scored).
    opts = None if dedup == "off" else {"k": k, "store_bytes": store_bytes, "inject_prompt_logprobs": True}
    return _make(model, "off" if dedup == "off" else "sequence", max_model_len, blocks, opts, retries=retries)


def _params(max_tokens: int, prompt_logprobs: int | None = None):
    from vllm import SamplingParams

    # teacher-forced requests are not detokenized: prompt-logprob entries of injected
    # positions carry placeholder token ids (-1) that a tokenizer cannot decode
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          prompt_logprobs=prompt_logprobs, detokenize=prompt_logprobs is None)


def _run(llm, prompts: list[list[int]], sp) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


def teacher_forced(out, start: int, tokens: Sequence[int]) -> tuple[list[float | None], list[int | None]]:
    """Log-prob of ``tokens`` (prompt positions start..) and the top-1 token at each
    (None where the engine returned no entry for the token, e.g. an injected position)."""
    from experiments.quality.engine import teacher_forced as _tf

    return _tf(out, start, tokens)


def _reused(llm) -> tuple[int, int]:
    import vllm_ext

    s = vllm_ext.dedup_stats(llm)
    return int(s["sequence_tokens_reused"]), int(s["sequence_hits"])


class DigestLog:
    """Every chunk digest sent to one engine: a superset of what its store can inject."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def risky_positions(self, tokens: Sequence[int]) -> np.ndarray:
        """Boolean mask of positions of ``tokens`` that a stored chunk could cover."""
        from dedup.hashing import chunk_runs

        mask = np.zeros(len(tokens), dtype=bool)
        for c in chunk_runs(np.asarray(tokens, dtype=np.int64)):
            if c.digest in self.seen:
                mask[c.start:c.end] = True
        return mask

    def add(self, tokens: Sequence[int]) -> None:
        from dedup.hashing import chunk_runs

        self.seen.update(c.digest for c in chunk_runs(np.asarray(tokens, dtype=np.int64)))


# ------------------------------------------------------------------------------ phases
def reference(llm, cases: list[Case], max_new: int) -> dict[str, dict]:
    """Stock full prefill: greedy continuation, then teacher-forced log-probs."""
    from tqdm import tqdm

    ref: dict[str, dict] = {}
    gens = _run(llm, [c.target for c in cases], _params(max_new))
    for c, g in zip(cases, gens):
        ref[c.case_id] = {"cont": list(g.outputs[0].token_ids), "text": g.outputs[0].text}
    for c in tqdm(cases, desc="reference (teacher-forced)", unit="case"):
        r = ref[c.case_id]
        tf = _run(llm, [c.target + r["cont"]], _params(1, prompt_logprobs=1))[0]
        r["lp"], r["top1"] = teacher_forced(tf, len(c.target), r["cont"])
        # sanity: a greedy continuation is the full-prefill argmax at (nearly) every step
        r["greedy_is_top1"] = top1_agreement(r["top1"], r["cont"])
    return ref


def reuse_run(llm, cases: list[Case], ref: dict[str, dict], k: int, max_new: int) -> list[dict]:
    from tqdm import tqdm

    log = DigestLog()
    rows = []
    for c in tqdm(cases, desc=f"k={k}", unit="case"):
        r = ref[c.case_id]
        L, cont = len(c.target), r["cont"]
        t0 = time.perf_counter()
        u0, h0 = _reused(llm)
        log.add(c.source)
        _run(llm, [c.source], _params(1))
        u1, h1 = _reused(llm)
        x = c.target + cont
        risky = log.risky_positions(x)
        log.add(x)
        tf = _run(llm, [x], _params(1, prompt_logprobs=1))[0]
        u2, h2 = _reused(llm)
        lp, top = teacher_forced(tf, L, cont)
        # cont token i is scored from the hidden state of position L+i-1: keep it only if
        # that position cannot have been injected
        valid = [i for i in range(len(cont))
                 if not risky[L + i - 1] and lp[i] is not None and r["lp"][i] is not None]
        log.add(c.target)
        gen = _run(llm, [c.target], _params(max_new))[0]
        u3, h3 = _reused(llm)
        out = list(gen.outputs[0].token_ids)
        row = {
            "case_id": c.case_id, "workload": c.workload, "k": k, **c.info,
            "source_len": len(c.source), "target_len": L,
            "source_reused_tokens": u1 - u0,
            "tf_reused_tokens": u2 - u1, "tf_hits": h2 - h1,
            "target_reused_tokens": u3 - u2, "target_hits": h3 - h2,
            "f": (u3 - u2) / L, "f_tf": (u2 - u1) / L,
            "scored_positions": len(valid), "excluded_positions": len(cont) - len(valid),
            "logprob_delta": mean_logprob_delta([lp[i] for i in valid], [r["lp"][i] for i in valid]),
            "logprob_reuse_mean": float(np.mean([lp[i] for i in valid])) if valid else float("nan"),
            "logprob_full_mean": float(np.mean([r["lp"][i] for i in valid])) if valid else float("nan"),
            "top1_agreement": top1_agreement([top[i] for i in valid], [r["top1"][i] for i in valid]),
            "first_token_agree": bool(out[:1] == cont[:1]),
            "exact_output_match": out == cont,
            "rougeL_f1": rouge_l_f1(gen.outputs[0].text, r["text"]),
            "output_text": gen.outputs[0].text, "ref_text": r["text"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        row["reused"] = row["target_reused_tokens"] > 0 or row["tf_reused_tokens"] > 0
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- summary
def _mean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def aggregate(rows: list[dict]) -> dict:
    """Means over the cases with reuse; no-reuse cases are counted and listed."""
    used = [r for r in rows if r["reused"]]
    deltas = [r["logprob_delta"] for r in used if not math.isnan(r["logprob_delta"])]
    return {
        "n_cases": len(rows),
        "n_cases_with_reuse": len(used),
        "no_reuse_cases": [r["case_id"] for r in rows if not r["reused"]],
        "mean_logprob_delta": _mean(deltas),
        "median_logprob_delta": float(statistics.median(deltas)) if deltas else None,
        "worst_logprob_delta": float(min(deltas)) if deltas else None,
        "first_token_agreement": _mean(float(r["first_token_agree"]) for r in used),
        "top1_agreement": _mean(r["top1_agreement"] for r in used),
        "rougeL_f1_mean": _mean(r["rougeL_f1"] for r in used),
        "rougeL_f1_median": float(statistics.median([r["rougeL_f1"] for r in used])) if used else None,
        "exact_output_match": _mean(float(r["exact_output_match"]) for r in used),
        "mean_f": _mean(r["f"] for r in used),
        "mean_f_tf": _mean(r["f_tf"] for r in used),
        "mean_f_all_cases": _mean(r["f"] for r in rows),
        "mean_target_reused_tokens": _mean(r["target_reused_tokens"] for r in used),
        "excluded_positions": sum(r["excluded_positions"] for r in rows),
    }


def summarize(rows: list[dict], ks: Sequence[int]) -> dict:
    per_k, per_wl = {}, {}
    for k in ks:
        rk = [r for r in rows if r["k"] == k]
        per_k[str(k)] = aggregate(rk)
        per_wl[str(k)] = {w: aggregate([r for r in rk if r["workload"] == w])
                          for w in sorted({r["workload"] for r in rk})}
    return {"per_k": per_k, "per_k_workload": per_wl}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(summary: dict) -> str:
    head = ("| k | workload | cases (reuse/all) | mean f (greedy) | mean f (teacher-forced) | logprob delta mean | median | worst "
            "| first-token agree | top-1 agree | ROUGE-L F1 | exact output |")
    lines = [head, "|" + "|".join(["---"] * 12) + "|"]
    for k, s in summary["per_k"].items():
        groups = [("all", s)] + list(summary["per_k_workload"][k].items())
        for name, g in groups:
            lines.append(
                f"| {k} | {name} | {g['n_cases_with_reuse']}/{g['n_cases']} | {_fmt(g['mean_f'], '.3f')} "
                f"| {_fmt(g['mean_f_tf'], '.3f')} | {_fmt(g['mean_logprob_delta'], '+.4f')} | {_fmt(g['median_logprob_delta'], '+.4f')} "
                f"| {_fmt(g['worst_logprob_delta'], '+.4f')} | {_fmt(g['first_token_agreement'], '.3f')} "
                f"| {_fmt(g['top1_agreement'], '.3f')} | {_fmt(g['rougeL_f1_mean'], '.3f')} "
                f"| {_fmt(g['exact_output_match'], '.3f')} |")
    return "\n".join(lines)


def environment(model: str) -> dict:
    try:
        from experiments.env import collect_env

        env = dict(collect_env())
    except Exception:  # noqa: BLE001 - the helper is optional
        from importlib import metadata

        env = {"versions": {}, "python": platform.python_version()}
        for p in ("vllm", "torch", "transformers"):
            try:
                env["versions"][p] = metadata.version(p)
            except metadata.PackageNotFoundError:
                pass
        try:
            env["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                                               capture_output=True, text=True).stdout.strip()
        except OSError:
            env["git_commit"] = None
    try:
        from vllm_ext.models import resolve_model

        env["model"] = {"name": model, "path": str(resolve_model(model))}
    except Exception:  # noqa: BLE001
        env["model"] = {"name": model}
    try:
        import vllm

        env.setdefault("versions", {})["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    return env


# -------------------------------------------------------------------------------- main
def run(cases: list[Case], model: str, ks: Sequence[int], out: Path, max_new: int = 32,
        store_bytes: int = 1 << 30, args: dict | None = None) -> dict:
    """Reference engine once, then one fresh sequence engine per k; writes the outputs."""
    import vllm_ext

    if not cases:
        raise SystemExit("no cases")
    out.mkdir(parents=True, exist_ok=True)
    longest = max(max(len(c.target), len(c.source)) for c in cases) + max_new + 1
    max_len = BLOCK * math.ceil(longest / BLOCK) + BLOCK
    per_seq = max_len // BLOCK
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    llm = make_engine(model, "off", max_len, blocks=max(8 * per_seq, 256))
    try:
        ref = reference(llm, cases, max_new)
    finally:
        vllm_ext.shutdown(llm)
        del llm
    timings["reference"] = round(time.perf_counter() - t0, 1)

    rows: list[dict] = []
    with open(out / "cases.jsonl", "w") as f:
        for c in cases:
            r = ref[c.case_id]
            f.write(json.dumps({"case_id": c.case_id, "workload": c.workload, "k": None, **c.info,
                                "target_len": len(c.target), "ref_text": r["text"],
                                "ref_logprob_mean": _mean(r["lp"]),
                                "greedy_is_top1": r["greedy_is_top1"]}) + "\n")
        for k in ks:
            t0 = time.perf_counter()
            llm = make_engine(model, "sequence", max_len, blocks=max(4 * per_seq, 128), k=k,
                              store_bytes=store_bytes)
            try:
                rk = reuse_run(llm, cases, ref, k, max_new)
                rk_store = vllm_ext.dedup_stats(llm)
            finally:
                vllm_ext.shutdown(llm)
                del llm
            timings[f"k={k}"] = round(time.perf_counter() - t0, 1)
            for r in rk:
                f.write(json.dumps(r) + "\n")
            f.flush()
            rows.extend(rk)
            print(f"k={k}: store evictions {rk_store.get('store_evictions')}, "
                  f"entries {rk_store.get('store_entries')}", flush=True)

    summary = {
        "env": environment(model),
        "args": args or {},
        "model": model, "ks": list(ks), "max_new_tokens": max_new, "store_bytes": store_bytes,
        "max_model_len": max_len,
        "cases": {w: sum(c.workload == w for c in cases) for w in sorted({c.workload for c in cases})},
        "reference_greedy_is_top1": _mean(r["greedy_is_top1"] for r in ref.values()),
        **summarize(rows, ks),
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    model, max_new = summary["model"], summary.get("max_new_tokens", 32)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = (f"# Sequence-mode quality vs full prefill ({model})\n\n"
          f"cases: {summary['cases']}; {max_new} greedy tokens; git {summary['env'].get('git_commit')}; "
          f"vllm {summary['env'].get('versions', {}).get('vllm')}\n\n"
          "logprob delta: teacher-forced mean log p of the full-prefill continuation, reuse minus "
          "full (nats/token); means over cases with reuse; f = fraction of target prompt tokens "
          "injected.\n\n" + table(summary) + "\n")
    (out / "summary.md").write_text(md)
    print(table(summary), flush=True)


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.sequence_quality",
        description="Quality of sequence-mode KV reuse vs stock full prefill over k (EPIC's "
                    "recomputed tokens per reused run): teacher-forced log-prob delta, first-token "
                    "and top-1 agreement, ROUGE-L of greedy outputs.")
    ap.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS),
                    help="k values, one fresh engine each (default: 0 16 32 64 128)")
    ap.add_argument("--cases", type=int, default=20,
                    help="cases per workload (default 20)")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                    help="workloads (default: both)")
    ap.add_argument("--out", type=Path, default=Path("results/sequence-quality"),
                    help="output directory (default results/sequence-quality)")
    ap.add_argument("--model", default="smollm2", help="model name or dir (default smollm2)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens (default 32)")
    ap.add_argument("--store-bytes", type=int, default=1 << 30, help="sequence store budget (default 1 GiB)")
    ap.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    ap.add_argument("--summarize-only", action="store_true",
                    help="rebuild summary.json/.md from an existing OUT/cases.jsonl (e.g. of an "
                         "interrupted run: only the k values it finished) and print the table")
    return ap


def resummarize(out: Path, model: str, args: dict | None = None) -> dict:
    """Summary of whatever ``out/cases.jsonl`` holds (k values in file order)."""
    lines = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines() if x.strip()]
    refs = [r for r in lines if r["k"] is None]
    rows = [r for r in lines if r["k"] is not None]
    ks = list(dict.fromkeys(r["k"] for r in rows))
    old = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    summary = {**{k: old[k] for k in ("args", "max_new_tokens", "store_bytes", "max_model_len",
                                      "timings_s") if k in old},
               "env": environment(model), "model": model, "ks": ks,
               "resummarized": True,
               "cases": {w: sum(r["workload"] == w for r in refs) for w in sorted({r["workload"] for r in refs})},
               "reference_greedy_is_top1": _mean(r["greedy_is_top1"] for r in refs),
               **summarize(rows, ks)}
    _write_summary(out, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.summarize_only:
        resummarize(args.out, args.model, {k: str(v) if isinstance(v, Path) else v
                                           for k, v in vars(args).items()})
        return 0
    if any(k < 0 for k in args.k):
        raise SystemExit("k must be >= 0")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    cases: list[Case] = []
    if "multi-instruction" in args.workloads:
        cases += multi_instruction_cases(args.cases, args.out, args.seed)
    if "multi-document" in args.workloads:
        cases += multi_document_cases(args.cases, args.out, args.seed)
    print(f"{len(cases)} cases: " + ", ".join(f"{w}={sum(c.workload == w for c in cases)}"
                                              for w in args.workloads), flush=True)
    run(cases, args.model, args.k, args.out, args.max_new_tokens, args.store_bytes,
        {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill probe for sequence mode: one request whose long document was stored from another.

For each of ``--docs`` documents (real text from a workload file): a SOURCE request
(instruction A + document) runs first, then the TARGET (a longer instruction B + the same
document + a question) is timed with 1 output token, under stock APC (exact prefix caching
cannot help: the document sits at another offset) and under sequence mode. Engines run
one at a time; medians over documents.

    python -m experiments.sequence_probe [--model smollm2] [--doc-tokens 1500] [--k 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _texts(path: str, n: int, length: int):
    """``n`` documents of ``length`` tokens, plus two heads and a tail from other text."""
    from experiments.workloads import load_workload

    ids = [t for r in load_workload(path).requests for t in r.prompt_token_ids]
    rest = ids[n * length:]
    if len(rest) < 103:
        raise SystemExit(f"error: {path} has too few tokens for {n} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(n)], rest[:20], rest[20:83], rest[83:103]


def run(arm: str, model: str, docs, k: int, head_a, head_b, tail):
    import vllm_ext
    from vllm_ext import SamplingParams

    mode = {"vllm-apc": "observe", "sequence": "sequence"}[arm]
    llm = vllm_ext.LLM(model, dedup=mode, enforce_eager=True, max_model_len=2048,
                       num_gpu_blocks_override=256, seed=0,
                       dedup_options={"k": k} if mode == "sequence" else None)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    times, reused = [], []
    for doc in docs:
        llm.generate([{"prompt_token_ids": head_a + doc}], sp, use_tqdm=False)
        before = vllm_ext.dedup_stats(llm)["sequence_tokens_reused"]
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": head_b + doc + tail}], sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        reused.append(vllm_ext.dedup_stats(llm)["sequence_tokens_reused"] - before)
    vllm_ext.shutdown(llm)
    return times, reused


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.sequence_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--workload", default=None, help="JSONL workload with real text "
                   "(default: the summarization stand-in under $KVDEDUP_CACHE/data/experiments)")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=1500)
    p.add_argument("--k", type=int, default=32)
    a = p.parse_args(argv)
    from dedup.paths import data_root
    from vllm_ext.models import resolve_model

    wl = a.workload or str(data_root() / "experiments/seq-standin-summarization.jsonl")
    resolve_model(a.model)
    docs, head_a, head_b, tail = _texts(wl, a.docs, a.doc_tokens)
    out = {}
    for arm in ("vllm-apc", "sequence"):
        t, r = run(arm, a.model, docs, a.k, head_a, head_b, tail)
        out[arm] = {"target_s": [round(x, 3) for x in t], "median_s": round(statistics.median(t), 3),
                    "tokens_reused": r}
    prompt = len(head_b) + a.doc_tokens + len(tail)
    f = statistics.median(out["sequence"]["tokens_reused"]) / prompt
    out["prompt_tokens"] = prompt
    out["f"] = round(f, 3)
    out["speedup"] = round(out["vllm-apc"]["median_s"] / out["sequence"]["median_s"], 2)
    out["compute_bound_limit"] = round(1 / (1 - f), 2) if f < 1 else None
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The evaluation in vLLM: reference and floors on a stock engine, reuse per mode and k.

* Stock engine (dedup off, prefix caching off): every target and floor variant, greedy
  (batched), then teacher-forced ``prompt_logprobs=1`` on prompt + the target's greedy
  continuation. Rows ``full`` and ``floor:<name>``.
* Per (mode, k), a fresh kvdedup engine (empty store): for each case in order, the
  stored copy's prompt (1 token), the target greedy (its tokens reused come from
  ``dedup_stats`` deltas: f), then the target + continuation teacher-forced (with
  ``inject_prompt_logprobs``). Each case has its own ``cache_salt``, so no case reuses
  another's KV (the simulator's setting). A continuation position is scored only if the
  token before it cannot have been injected (a conservative check against every chunk
  digest sent before). Rows ``<mode>:k=<k>[,tail=<t>]``.

Hold the engine lock: ``flock /tmp/kvdedup-engine.lock python -m experiments.quality engine ...``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Sequence

import numpy as np

from . import metrics, rows as rowsmod
from .cases import Case
from .rows import case_fields, ref_row

BLOCK = 32
# messages of start-up failures that another process's memory use can cause
TRANSIENT = ("out of memory", "cannot allocate memory", "engine core initialization failed",
             "resource temporarily unavailable", "std::bad_alloc")
CONFIG_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, AttributeError)


def make_engine(model: str, dedup: str, max_model_len: int, blocks: int, options: dict | None = None,
                retries: int = 1, wait_s: float = 30.0):
    """A ``vllm_ext`` engine. A configuration error (bad argument, unknown mode, missing
    model: ``CONFIG_ERRORS``) is raised at once. A start-up failure whose message points
    at memory (``TRANSIENT``; e.g. another agent's engine holds it) is retried up to
    ``retries`` times, ``wait_s`` apart; anything else is raised."""
    import vllm_ext

    kw: dict[str, Any] = dict(enforce_eager=True, max_model_len=max_model_len,
                              num_gpu_blocks_override=blocks, seed=0)
    if dedup == "off":
        kw["enable_prefix_caching"] = False
    else:
        kw["dedup_options"] = options or {}
    for attempt in range(retries + 1):
        try:
            return vllm_ext.LLM(model, dedup=dedup, **kw)
        except CONFIG_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - vLLM wraps start-up failures in RuntimeError
            msg = str(e).lower()
            if attempt == retries or not any(t in msg for t in TRANSIENT):
                raise
            print(f"engine start failed ({type(e).__name__}: {str(e)[:200]}); retry "
                  f"{attempt + 1}/{retries} in {wait_s:.0f} s", file=sys.stderr, flush=True)
            time.sleep(wait_s)


def _params(max_tokens: int, prompt_logprobs: int | None = None):
    from vllm import SamplingParams

    # teacher-forced requests are not detokenized: prompt-logprob entries of injected
    # positions carry placeholder token ids (-1) that a tokenizer cannot decode
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=prompt_logprobs,
                          detokenize=prompt_logprobs is None)


def _gen(llm, prompts: list[list[int]], sp, salt: str | None = None) -> list:
    ps = [{"prompt_token_ids": p, **({"cache_salt": salt} if salt else {})} for p in prompts]
    return llm.generate(ps, sp, use_tqdm=False)


def teacher_forced(out, start: int, tokens: Sequence[int]) -> tuple[list, list]:
    """Log-prob of ``tokens`` (prompt positions ``start..``) and the top-1 token at each
    (None where the engine returned no entry, e.g. an injected position)."""
    lps, tops = [], []
    for i, t in enumerate(tokens):
        d = out.prompt_logprobs[start + i]
        if not d or t not in d:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(float(d[t].logprob))
        tops.append(int(min(d.items(), key=lambda kv: kv[1].rank)[0]))
    return lps, tops


def _max_len(cases: list[Case], max_new: int) -> int:
    longest = max(max(len(c.target), len(c.source), *map(len, c.variants.values())) for c in cases)
    return BLOCK * math.ceil((longest + 2 * max_new + 1) / BLOCK) + BLOCK


def stock_arms(cases: list[Case], model: str, args, done: dict) -> list[dict]:
    """Reference and floor rows missing from ``done``, on one stock engine."""
    import vllm_ext
    from tqdm import tqdm

    jobs = [(c, arm) for c in cases for arm in ["full"] + [f"floor:{f}" for f in args.floors]
            if arm not in done.get(c.case_id, {})]
    if not jobs:
        return []
    max_len = _max_len(cases, args.max_new_tokens)
    llm = make_engine(model, "off", max_len, max(512, 8 * max_len // BLOCK), retries=args.engine_retries)
    out: list[dict] = []
    try:
        refs = {c.case_id: done[c.case_id]["full"] for c in cases if "full" in done.get(c.case_id, {})}
        for arm_kind in ("full", "floor"):
            todo = [(c, a) for c, a in jobs if (a == "full") == (arm_kind == "full")]
            for i in tqdm(range(0, len(todo), args.group), desc=f"stock {arm_kind}", unit="batch"):
                part = todo[i:i + args.group]
                prompts = [c.target if a == "full" else c.variants[a[6:]] for c, a in part]
                gens = _gen(llm, prompts, _params(args.max_new_tokens))
                conts = [list(g.outputs[0].token_ids) if a == "full" else refs[c.case_id]["tokens"]
                         for (c, a), g in zip(part, gens)]
                tfs = _gen(llm, [p + k for p, k in zip(prompts, conts)], _params(1, prompt_logprobs=1))
                for (c, a), p, k, g, tf in zip(part, prompts, conts, gens, tfs):
                    lp, top = teacher_forced(tf, len(p), k)
                    res = {"tokens": list(g.outputs[0].token_ids), "text": g.outputs[0].text,
                           "lp": lp, "top1": top, "answer": c.answer}
                    if a == "full":
                        refs[c.case_id] = res
                        row = ref_row(case_fields(c), res, backend="engine")
                    else:
                        row = {**case_fields(c), "arm": a, "backend": "engine",
                               **metrics.score(refs[c.case_id], res), "output_text": res["text"]}
                    out.append(row)
                    rowsmod.append(args.out / "rows.jsonl", [row])
    finally:
        vllm_ext.shutdown(llm)
    return out


def _risky(seen: set, tokens: Sequence[int], salt: bytes) -> np.ndarray:
    """Positions of ``tokens`` that a chunk sent before (``seen`` digests) could cover."""
    from dedup.hashing import chunk_runs

    mask = np.zeros(len(tokens), dtype=bool)
    for c in chunk_runs(np.asarray(tokens, dtype=np.int64), salt=salt):
        if c.digest in seen:
            mask[c.start:c.end] = True
    return mask


def _digests(tokens: Sequence[int], salt: bytes) -> set:
    from dedup.hashing import chunk_runs

    return {c.digest for c in chunk_runs(np.asarray(tokens, dtype=np.int64), salt=salt)}


def reuse_arm(cases: list[Case], model: str, mode: str, rule, args, refs: dict, done: dict) -> list[dict]:
    """Rows of arm ``<mode>:<rule>`` (a contiguous ``rules.Rule``: k, tail) missing from
    ``done``, on one fresh engine."""
    import vllm_ext
    from tqdm import tqdm

    arm, k = f"{mode}:{rule.name}", rule.k
    todo = [c for c in cases if arm not in done.get(c.case_id, {})]
    if not todo:
        return []
    max_len = _max_len(cases, args.max_new_tokens)
    llm = make_engine(model, mode, max_len, max(256, 4 * max_len // BLOCK),
                      {"k": k, "tail": rule.tail, "store_bytes": args.store_bytes,
                       "inject_prompt_logprobs": True},
                      retries=args.engine_retries)

    def reused() -> int:
        # tokens whose KV the mode took from elsewhere: <mode>_tokens_reused where the mode
        # reports its own counter (e.g. a shared mode), else sequence mode's
        st = vllm_ext.dedup_stats(llm)
        return int(st.get(f"{mode}_tokens_reused", st.get("sequence_tokens_reused", 0)))

    out = []
    try:
        for c in tqdm(todo, desc=arm, unit="case"):
            ref, salt = refs[c.case_id], f"{c.case_id}/{arm}"
            key = f"{salt}\x00".encode()
            L, cont = len(c.target), ref["tokens"]
            u0 = reused()
            _gen(llm, [c.source], _params(1), salt)
            seen = _digests(c.source, key)
            u1 = reused()
            gen = _gen(llm, [c.target], _params(args.max_new_tokens), salt)[0]
            seen |= _digests(c.target, key)
            u2 = reused()
            x = c.target + cont
            risky = _risky(seen, x, key)
            tf = _gen(llm, [x], _params(1, prompt_logprobs=1), salt)[0]
            u3 = reused()
            lp, top = teacher_forced(tf, L, cont)
            # cont token i is scored from position L+i-1: only if it cannot have been injected
            valid = [i for i in range(len(cont)) if not risky[L + i - 1] and lp[i] is not None
                     and ref["lp"][i] is not None]
            res = {"tokens": list(gen.outputs[0].token_ids), "text": gen.outputs[0].text, "lp": lp, "top1": top}
            row = {**case_fields(c), "arm": arm, "backend": "engine", "mode": mode, "k": k,
                   "rule": rule.name, "tail": rule.tail,
                   "f": (u2 - u1) / L, "f_tf": (u3 - u2) / L, "source_reused": u1 - u0,
                   "reused": u2 > u1 or u3 > u2, "excluded_positions": len(cont) - len(valid),
                   **metrics.score(ref, res, valid), "output_text": res["text"]}
            out.append(row)
            rowsmod.append(args.out / "rows.jsonl", [row])
    finally:
        vllm_ext.shutdown(llm)
    return out


def run_engine(cases: list[Case], model: str, args) -> None:
    import os

    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    done = rowsmod.done_by_case([r for r in rowsmod.load(args.out / "rows.jsonl") if r.get("backend") == "engine"])
    stock_arms(cases, model, args, done)
    done = rowsmod.done_by_case([r for r in rowsmod.load(args.out / "rows.jsonl") if r.get("backend") == "engine"])
    refs = {c.case_id: done[c.case_id]["full"] for c in cases}
    from .rules import Rule

    for mode in args.modes:
        for k in args.k:
            for tail in args.tail:
                reuse_arm(cases, model, mode, Rule(k=k, tail=tail), args, refs, done)

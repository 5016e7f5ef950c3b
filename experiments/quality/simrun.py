"""The evaluation on the HF simulator: reference, noise floors and reuse rules per case.

Per case: full prefill of the target gives the reference (greedy continuation and its
teacher-forced log-probs); each floor variant and each rule is read out against it. With
``kvdev`` the KV deviation of the stored copy (re-rotated, before any recompute) from
full prefill is saved per layer and position (``kvdev/<case>.npz``), and the deviation of
the whole cache after reuse under the first rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics, plans, rules
from .cases import Case
from .hfsim import Sim, kv_deviation
from .rows import case_fields, ref_row


def deviation_map(T: tuple, S: tuple, p0: plans.Plan, sim: Sim) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer deviation ``[layers, n]`` (keys, values) of the stored copy's KV,
    re-rotated to the target's positions, from the target's full-prefill KV; nan where
    the k=0 plan maps no stored token."""
    import torch

    from vllm_ext.rope import rerotate

    n = T[0].shape[2]
    pos = np.flatnonzero(p0.src_pos >= 0)
    dk = np.full((T[0].shape[0], n), np.nan, np.float32)
    dv = dk.copy()
    if pos.size:
        sp = torch.as_tensor(p0.src_pos[pos])
        k = rerotate(S[0][:, :, sp].transpose(1, 2), torch.as_tensor(pos) - sp, sim.rotary).transpose(1, 2)
        v = S[1][:, :, sp]
        kk, vv = kv_deviation((T[0][:, :, torch.as_tensor(pos)], T[1][:, :, torch.as_tensor(pos)]),
                              (k, v), np.arange(pos.size))
        dk[:, pos], dv[:, pos] = kk, vv
    return dk, dv


def run_case(sim: Sim, case: Case, rule_list: list[rules.Rule], floors: list[str], max_new: int,
             done: dict[str, dict], kvdev: Path | None = None) -> list[dict]:
    """Rows for the arms of ``case`` not in ``done`` (arm name -> row already written)."""
    rows: list[dict] = []
    base = case_fields(case)
    cT, lT = sim.prefill(case.target)
    if "full" in done:
        ref = done["full"]
    else:
        ref = sim.readout(cT, lT, None, max_new)
        ref["answer"] = case.answer
        rows.append(ref_row(base, ref))
    for fl in floors:
        if f"floor:{fl}" in done:
            continue
        c, lg = sim.prefill(case.variants[fl])
        out = sim.readout(c, lg, ref["tokens"], max_new)
        rows.append({**base, "arm": f"floor:{fl}", **metrics.score(ref, out), "output_text": out["text"]})
    todo = [r for r in rule_list if f"sim:{r.name}" not in done]
    if not todo and kvdev is None:
        return rows
    T = Sim.stacked(cT)
    srcs = {"source": case.source, **case.alt_sources}
    stacked: dict[str, tuple] = {}

    def src_kv(name: str) -> tuple:
        if name not in stacked:
            stacked[name] = Sim.stacked(sim.prefill(srcs[name])[0])
        return stacked[name]

    p0 = plans.plan(case.target, {"source": case.source}, 0)
    dk, dv = deviation_map(T, src_kv("source"), p0, sim)
    mapped = p0.src_pos >= 0
    oracle = np.full(len(case.target), -1.0)
    oracle[mapped] = ((dk + dv) / 2)[:, mapped].mean(axis=0)
    scores = {"l1": np.nan_to_num(dk[1], nan=-1.0), "oracle": oracle}
    for i, rule in enumerate(todo):
        name = "source"
        if rule.src == "closest":
            name = rules.closest(case.target, srcs)
        p = rules.select(rule, case.target, {name: srcs[name]}, scores, ref["tokens"])
        c, lg = sim.reuse(case.target, p, {name: src_kv(name)})
        out = sim.readout(c, lg, ref["tokens"], max_new)
        rows.append({**base, "arm": f"sim:{rule.name}", "rule": rule.name, "k": rule.k, "f": p.f,
                     "ranges": p.ranges, "contiguous": rule.contiguous, "stored_copy": name,
                     "reused": bool(p.f > 0), **metrics.score(ref, out), "output_text": out["text"]})
        if kvdev is not None and i == 0:
            post_k, post_v = kv_deviation(T, Sim.stacked(c), np.arange(len(case.target)))
            kvdev.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(kvdev / f"{case.case_id}.npz", dk=dk, dv=dv, src_pos=p0.src_pos,
                                run_start=np.asarray([inj.run_start for inj in p0.injections]),
                                run_end=np.asarray([inj.end for inj in p0.injections]),
                                post_k=post_k, post_v=post_v, post_src=p.src_pos, post_rule=rule.name)
    return rows


def run_sim(cases: list[Case], model_dir: str, args) -> None:
    """Every case's missing arms, appended to ``OUT/rows.jsonl`` case by case."""
    from tqdm import tqdm

    from . import rows as rowsmod

    sim = Sim(model_dir, args.threads)
    path = args.out / "rows.jsonl"
    done = rowsmod.done_by_case([r for r in rowsmod.load(path) if r.get("backend", "sim") == "sim"])
    kvdev = args.out / "kvdev" if args.kvdev else None
    for case in tqdm(cases, desc="sim cases", unit="case"):
        have = done.get(case.case_id, {})
        need_dev = kvdev is not None and not (kvdev / f"{case.case_id}.npz").exists()
        rule_list = list(args.rules)
        if need_dev and f"sim:{rule_list[0].name}" in have:
            have = {a: r for a, r in have.items() if a != f"sim:{rule_list[0].name}"}
        if all(f"floor:{f}" in have for f in args.floors) and "full" in have \
                and all(f"sim:{r.name}" in have for r in rule_list) and not need_dev:
            continue
        rowsmod.append(path, run_case(sim, case, rule_list, args.floors, args.max_new_tokens, have,
                                      kvdev if need_dev else None))

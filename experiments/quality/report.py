"""Summaries of ``rows.jsonl``: per-case distributions per arm, reuse against the floors.

``summarize(rows)`` -> dict (``summary.json``); ``markdown(summary)`` -> the tables
(``summary.md``); ``plot(summary, path)`` -> quality against f with the floors.
Every figure carries the number of cases behind it.
"""

from __future__ import annotations

import math
from typing import Iterable

from .metrics import describe, paired

METRICS = ("logprob_delta", "top1_agreement", "rougeL", "exact_match", "first_token_agree", "rougeL_answer")
GOAL_METRICS = ("logprob_delta", "top1_agreement", "rougeL")   # higher is better for all three


def _vals(rows: Iterable[dict], key: str) -> list:
    return [float(r[key]) if isinstance(r.get(key), bool) else r.get(key) for r in rows]


def group_stats(rows: list[dict]) -> dict:
    out = {"n_cases": len(rows)}
    for m in METRICS:
        out[m] = describe(_vals(rows, m))
    out["abs_logprob_delta"] = describe(abs(x) for x in _vals(rows, "logprob_delta") if x is not None)
    if any("f" in r for r in rows):
        out["f"] = describe(_vals(rows, "f"))
        out["n_reused"] = sum(bool(r.get("reused")) for r in rows)
    return out


def _arms(rows: list[dict]) -> list[str]:
    arms = list(dict.fromkeys(r["arm"] for r in rows if r["arm"] != "full"))
    return sorted(arms, key=lambda a: (not a.startswith("floor:"), a))


def summarize(rows: list[dict], floor_for_goal: str = "floor:ws") -> dict:
    """Per split: stats per arm (all domains and per domain), and each reuse arm against
    each floor, paired case by case (reuse minus floor; >= 0 means reuse moved the output
    no more than the floor did)."""
    out: dict = {"splits": {}, "goal_floor": floor_for_goal}
    for split in sorted({r["split"] for r in rows}):
        rs = [r for r in rows if r["split"] == split]
        ref = [r for r in rs if r["arm"] == "full"]
        s: dict = {"n_cases": len(ref), "domains": sorted({r["domain"] for r in ref}),
                   "reference": {"greedy_is_top1": describe(_vals(ref, "greedy_is_top1")),
                                 "rougeL_answer": describe(_vals(ref, "rougeL_answer")),
                                 "output_tokens": describe(len(r["tokens"]) for r in ref)},
                   "arms": {}, "by_domain": {}, "vs_floor": {}}
        for arm in _arms(rs):
            ra = [r for r in rs if r["arm"] == arm]
            s["arms"][arm] = group_stats(ra)
            s["by_domain"][arm] = {d: group_stats([r for r in ra if r["domain"] == d]) for d in s["domains"]}
        for arm in (a for a in s["arms"] if not a.startswith("floor:")):
            by_case = {r["case_id"]: r for r in rs if r["arm"] == arm}
            s["vs_floor"][arm] = {}
            for fl in (a for a in s["arms"] if a.startswith("floor:")):
                fc = {r["case_id"]: r for r in rs if r["arm"] == fl}
                ids = [c for c in by_case if c in fc]
                s["vs_floor"][arm][fl] = {m: paired([_num(by_case[c].get(m)) for c in ids],
                                                    [_num(fc[c].get(m)) for c in ids]) for m in GOAL_METRICS}
        out["splits"][split] = s
    return out


def _num(x):
    return float(x) if isinstance(x, (bool, int, float)) and x is not None else None


def _f(d: dict, key: str, spec: str) -> str:
    v = d.get(key)
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _dist(d: dict, spec: str) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{_f(d, 'median', spec)} [{_f(d, 'q1', spec)}, {_f(d, 'q3', spec)}] ({_f(d, 'mean', spec)})"


def markdown(summary: dict) -> str:
    lines = ["Per-case distributions: median [q1, q3] (mean); n = cases. Δ log p in nats/token "
             "(teacher-forced, arm minus full prefill); top-1 and ROUGE-L (rouge-score, stemmed) "
             "against full prefill's greedy output; f = share of the prompt reused.", ""]
    for split, s in summary["splits"].items():
        ref = s["reference"]
        lines += [f"## {split}: {s['n_cases']} cases ({', '.join(s['domains'])})", "",
                  f"Reference: greedy output tokens {_dist(ref['output_tokens'], '.0f')}; "
                  f"ROUGE-L against the task reference {_dist(ref['rougeL_answer'], '.3f')} "
                  f"(n={ref['rougeL_answer'].get('n', 0)}).", "",
                  "| arm | n | f | Δ log p | top-1 | ROUGE-L | exact | ROUGE-L vs task ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, g in s["arms"].items():
            lines.append(f"| {arm} | {g['n_cases']} | {_dist(g.get('f', {}), '.2f')} "
                         f"| {_dist(g['logprob_delta'], '+.4f')} | {_dist(g['top1_agreement'], '.3f')} "
                         f"| {_dist(g['rougeL'], '.3f')} | {_f(g['exact_match'], 'mean', '.2f')} "
                         f"| {_f(g['rougeL_answer'], 'mean', '.3f')} (n={g['rougeL_answer'].get('n', 0)}) |")
        fl = summary.get("goal_floor", "floor:ws")
        if s["vs_floor"]:
            lines += ["", f"Reuse minus {fl}, paired by case: mean difference [95% bootstrap], "
                          "share of cases where reuse is at least as close to full prefill "
                          "(≥ 0 everywhere = within the floor).", "",
                      "| arm | n | Δ log p | top-1 | ROUGE-L | within floor (means) |", "|---|---|---|---|---|---|"]
            for arm, v in s["vs_floor"].items():
                p = v.get(fl)
                if not p:
                    continue
                cells = []
                ok = []
                for m in GOAL_METRICS:
                    d = p[m]
                    if not d.get("n"):
                        cells.append("-")
                        continue
                    lo, hi = d["ci95_mean_diff"]
                    cells.append(f"{d['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] {d['share_a_ge_b']:.2f}")
                    ok.append(d["mean_diff"] >= 0)
                verdict = "yes" if ok and all(ok) else f"no ({sum(not x for x in ok)} of {len(ok)} above)"
                lines.append(f"| {arm} | {p['logprob_delta'].get('n', 0)} | " + " | ".join(cells) + f" | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path) -> None:
    """Δ log p and ROUGE-L means against median f, one panel pair per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(summary["splits"].items())
    fig, axes = plt.subplots(len(splits), 2, figsize=(10, 3.6 * len(splits)), squeeze=False)
    for row, (split, s) in zip(axes, splits):
        for ax, m in zip(row, ("logprob_delta", "rougeL")):
            for arm, g in s["arms"].items():
                if arm.startswith("floor:"):
                    ax.axhline(g[m]["mean"], ls="--", lw=1, color="grey")
                    ax.annotate(arm[6:], (0.0, g[m]["mean"]), fontsize=7, color="grey")
                elif g.get("f", {}).get("n"):
                    ax.scatter(g["f"]["mean"], g[m]["mean"], s=14)
                    ax.annotate(arm.split(":", 1)[1], (g["f"]["mean"], g[m]["mean"]), fontsize=6)
            ax.set_xlabel("mean f (share of prompt reused)")
            ax.set_ylabel(f"mean {m}")
            ax.set_title(f"{split} (n={s['n_cases']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Where reuse's error comes from: tables of the KV deviation maps (``sim --kvdev``).

Each ``OUT/kvdev/<case>.npz`` holds, for the k=0 plan, the relative L2 deviation of the
stored copy's KV (keys re-rotated) from the target's full-prefill KV, per layer and
target position (``dk``, ``dv``; nan where nothing is stored), the runs, and the
deviation of the whole cache after reuse under the first rule (``post_k``, ``post_v``),
which shows how the error spreads into the computed tokens after a run.

Writes ``OUT/kvdev.md`` and ``OUT/kvdev.json``: deviation by layer, by position in the
run, by the stored copy's instruction, and the correlation of a case's mean deviation
with its output movement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BINS = (0, 1, 4, 16, 32, 64, 128, 256, 512, 1 << 20)
LAYERS = (0, 1, 2, 4, 8, 15, 22, 29)


def position_in_run(src_pos: np.ndarray, run_start: np.ndarray, run_end: np.ndarray) -> np.ndarray:
    """For each target position: its offset from the start of its run, or -1."""
    out = np.full(src_pos.shape, -1, np.int64)
    for a, b in zip(run_start, run_end):
        out[a:b] = np.arange(b - a)
    return np.where(src_pos >= 0, out, -1)


def from_end(src_pos: np.ndarray, run_start: np.ndarray, run_end: np.ndarray) -> np.ndarray:
    out = np.full(src_pos.shape, -1, np.int64)
    for a, b in zip(run_start, run_end):
        out[a:b] = np.arange(b - a)[::-1]
    return np.where(src_pos >= 0, out, -1)


def _bin_table(values: list[np.ndarray], offsets: list[np.ndarray]) -> list[dict]:
    """Mean of ``values`` ([layers, n] per case) by offset bin: all layers and chosen ones."""
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = [v[:, (o >= lo) & (o < hi)] for v, o in zip(values, offsets)]
        sel = [s for s in sel if s.size]
        if not sel:
            continue
        cat = np.concatenate(sel, axis=1)
        rows.append({"bin": f"{lo}-{hi - 1}" if hi < 1 << 20 else f"{lo}+", "tokens": int(cat.shape[1]),
                     "cases": len(sel), "mean": float(np.nanmean(cat)),
                     "by_layer": {str(lay): float(np.nanmean(cat[lay])) for lay in LAYERS if lay < cat.shape[0]}})
    return rows


def analyze(out: Path) -> dict:
    files = sorted((out / "kvdev").glob("*.npz"))
    if not files:
        raise SystemExit(f"{out}/kvdev: no deviation maps (run sim with --kvdev)")
    rows = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[(r["case_id"], r["arm"])] = r
    ks, vs, starts, ends, per_case = [], [], [], [], []
    post_tail = []
    rules_seen = [str(np.load(f)["post_rule"]) for f in files]
    post_rule = max(set(rules_seen), key=rules_seen.count)   # post maps of one rule only
    for f in files:
        z = np.load(f)
        cid = f.stem
        dk, dv, src = z["dk"], z["dv"], z["src_pos"]
        off = position_in_run(src, z["run_start"], z["run_end"])
        ks.append(dk), vs.append(dv), starts.append(off)
        ends.append(from_end(src, z["run_start"], z["run_end"]))
        full = rows.get((cid, "full"), {})
        mapped = src >= 0
        # computed tokens after the last run: the rest of the prompt (question, template)
        last_end = int(z["run_end"].max()) if z["run_end"].size else len(src)
        after = np.arange(len(src)) >= last_end
        if after.any() and str(z["post_rule"]) == post_rule:
            post_tail.append((z["post_k"][:, after].mean(axis=1), z["post_v"][:, after].mean(axis=1)))
        deep = dk[dk.shape[0] // 2:]
        runs = [(int(a), int(b)) for a, b in zip(z["run_start"], z["run_end"])]
        rec_runs = {"run_tokens": [b - a for a, b in runs],
                    "deep_dk_run": [float(np.nanmean(deep[:, a:b])) for a, b in runs],
                    "deep_dk_first8": [float(np.nanmean(deep[:, a:min(b, a + 8)])) for a, b in runs],
                    "deep_dk_last4": [float(np.nanmean(deep[:, max(a, b - 4):b])) for a, b in runs]}
        rec = {**rec_runs, "case_id": cid, "split": full.get("split"), "post_rule": str(z["post_rule"]), "domain": full.get("domain"),
               "intent": full.get("intent"), "source_intent": full.get("source_intent"),
               "instr_tokens": full.get("instr_tokens"), "source_instr_tokens": full.get("source_instr_tokens"),
               "mapped_tokens": int(mapped.sum()),
               "mean_dk": float(np.nanmean(dk[:, mapped])) if mapped.any() else None,
               "mean_dv": float(np.nanmean(dv[:, mapped])) if mapped.any() else None,
               "tail_dk": float(z["post_k"][:, after].mean()) if after.any() else None}
        for arm in ("sim:k=0", "sim:k=32"):
            if (cid, arm) in rows:
                rec[f"logprob_delta[{arm}]"] = rows[(cid, arm)]["logprob_delta"]
        per_case.append(rec)
    L = ks[0].shape[0]
    by_layer = [{"layer": lay, "dk": float(np.nanmean(np.concatenate([k[lay][~np.isnan(k[lay])] for k in ks]))),
                 "dv": float(np.nanmean(np.concatenate([v[lay][~np.isnan(v[lay])] for v in vs]))),
                 "post_tail_dk": float(np.mean([t[0][lay] for t in post_tail])) if post_tail else None,
                 "post_tail_dv": float(np.mean([t[1][lay] for t in post_tail])) if post_tail else None}
                for lay in range(L)]
    corr = {}
    for key in ("mean_dk", "mean_dv", "tail_dk"):
        for arm in ("sim:k=0", "sim:k=32"):
            pairs = [(r[key], r.get(f"logprob_delta[{arm}]")) for r in per_case
                     if r.get(key) is not None and r.get(f"logprob_delta[{arm}]") is not None]
            if len(pairs) > 2:
                a, b = np.asarray(pairs).T
                corr[f"{key} vs Δlogp[{arm}]"] = {"n": len(pairs), "spearman": _spearman(a, b)}
    by_domain = {}
    for dom in sorted({str(r["domain"]) for r in per_case}):
        rs = [r for r in per_case if str(r["domain"]) == dom]
        cat = {k: [x for r in rs for x in r[k]] for k in ("run_tokens", "deep_dk_run", "deep_dk_first8", "deep_dk_last4")}
        by_domain[dom] = {"cases": len(rs), "runs": len(cat["run_tokens"]),
                          "median_run_tokens": float(np.median(cat["run_tokens"])) if cat["run_tokens"] else None,
                          **{k: float(np.nanmean(v)) if v else None for k, v in cat.items() if k != "run_tokens"}}
    return {"cases": len(files), "by_domain": by_domain, "post_rule": post_rule, "post_cases": len(post_tail), "by_layer": by_layer,
            "by_position": {"keys": _bin_table(ks, starts), "values": _bin_table(vs, starts)},
            "by_position_from_end": {"keys": _bin_table(ks, ends), "values": _bin_table(vs, ends)},
            "per_case": per_case, "correlations": corr}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def markdown(res: dict) -> str:
    lines = [f"KV deviation of the stored copy from full prefill ({res['cases']} cases): relative L2 "
             "error per token, keys re-rotated, before any recompute (k=0 plan).", "",
             f"### By layer (mean over stored tokens; post tail = computed tokens after the last run, "
             f"after reuse under {res['post_rule']}, {res['post_cases']} cases)", "", "| layer | keys | values | post tail keys | post tail values |",
             "|---|---|---|---|---|"]
    for r in res["by_layer"]:
        if r["layer"] in LAYERS or r["layer"] % 5 == 0:
            lines.append(f"| {r['layer']} | {r['dk']:.3f} | {r['dv']:.3f} | {_f(r['post_tail_dk'])} | {_f(r['post_tail_dv'])} |")
    lines += ["", "### By domain: key deviation in the deeper half of the layers, per run", "",
              "| domain | cases | runs | median run tokens | whole run | first 8 tokens | last 4 tokens |",
              "|---|---|---|---|---|---|---|"]
    for dom, d in res["by_domain"].items():
        lines.append(f"| {dom} | {d['cases']} | {d['runs']} | {_f(d['median_run_tokens'])} | {_f(d['deep_dk_run'])} "
                     f"| {_f(d['deep_dk_first8'])} | {_f(d['deep_dk_last4'])} |")
    for title, key in (("position in the run (tokens from its start)", "by_position"),
                       ("distance from the run's end", "by_position_from_end")):
        lines += ["", f"### By {title}: keys, mean over layers and at some layers", "",
                  "| bin | tokens (cases) | all layers | " + " | ".join(f"L{x}" for x in LAYERS) + " |",
                  "|---|---|---|" + "---|" * len(LAYERS)]
        for r in res[key]["keys"]:
            lines.append(f"| {r['bin']} | {r['tokens']} ({r['cases']}) | {r['mean']:.3f} | "
                         + " | ".join(_f(r["by_layer"].get(str(x))) for x in LAYERS) + " |")
    lines += ["", "### By the stored copy's instruction (mean key deviation per case)", "",
              "| source intent | cases | mean dk | median Δ log p k=0 | median Δ log p k=32 |", "|---|---|---|---|---|"]
    for intent in sorted({str(r["source_intent"]) for r in res["per_case"]}):
        rs = [r for r in res["per_case"] if str(r["source_intent"]) == intent and r["mean_dk"] is not None]
        if rs:
            lines.append(f"| {intent} | {len(rs)} | {np.mean([r['mean_dk'] for r in rs]):.3f} | "
                         f"{_med(rs, 'logprob_delta[sim:k=0]')} | {_med(rs, 'logprob_delta[sim:k=32]')} |")
    lines += ["", "### Correlations across cases (Spearman)", ""]
    lines += [f"- {k}: {v['spearman']:+.2f} (n={v['n']})" for k, v in res["correlations"].items()]
    return "\n".join(lines) + "\n"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _med(rs: list[dict], key: str) -> str:
    xs = [r[key] for r in rs if r.get(key) is not None]
    return f"{np.median(xs):+.4f}" if xs else "-"


def main(out: Path) -> int:
    res = analyze(out)
    (out / "kvdev.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "kvdev.md").write_text("# Where reuse's error comes from\n\n" + md)
    print(md)
    return 0

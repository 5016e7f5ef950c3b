"""Recompute-selection rules, named by short specs (``k=32``, ``k=32,tail=16``, ...).

Keys of a spec (comma-separated ``key=value``):

* ``k``: recompute the first ``k`` tokens of each run (EPIC, the engine's rule).
* ``tail``: also recompute the last ``tail`` tokens of each run (contiguous; the
  planner's ``tail`` option).
* ``blend``: also recompute this share of the injected tokens with the highest KV
  deviation (CacheBlend-style; not contiguous). ``score`` picks the deviation signal:
  ``l1`` (layer 1's keys: what CacheBlend measures after recomputing the first layers
  of all tokens) or ``oracle`` (mean over all layers, keys and values: an upper bound
  for deviation-based choice).
* ``src``: which stored copy to reuse when there are several: ``first`` (the first
  sighting, the engine's store) or ``closest`` (the one whose text before the shared run
  is most like the target's: longest common suffix, then token overlap).
* ``plan=tf`` (simulator only): plan as the engine plans its teacher-forced request
  (target + reference continuation), whose last stored chunk no longer matches, so its
  runs end at the document's last content cut instead of the prompt's last token. For
  checking the simulator against the engine's teacher-forced numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import plans


@dataclass(frozen=True)
class Rule:
    k: int = 32
    tail: int = 0
    blend: float = 0.0
    score: str = "l1"
    src: str = "first"
    plan: str = "prompt"

    @property
    def name(self) -> str:
        parts = [f"k={self.k}"]
        if self.tail:
            parts.append(f"tail={self.tail}")
        if self.blend:
            parts.append(f"blend={self.blend:g}")
            if self.score != "l1":
                parts.append(f"score={self.score}")
        if self.src != "first":
            parts.append(f"src={self.src}")
        if self.plan != "prompt":
            parts.append(f"plan={self.plan}")
        return ",".join(parts)

    @property
    def contiguous(self) -> bool:
        """Whether the scheduler can run it today (one computed range before each run)."""
        return not self.blend


def parse(spec: str) -> Rule:
    """A ``Rule`` from ``k=32,tail=16,...``; raises ValueError naming the bad part."""
    kw: dict = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"rule {spec!r}: {part!r} is not key=value")
        try:
            if key in ("k", "tail"):
                kw[key] = int(val)
                if kw[key] < 0:
                    raise ValueError
            elif key == "blend":
                kw[key] = float(val)
                if not 0 <= kw[key] <= 1:
                    raise ValueError
            elif key == "score" and val in ("l1", "oracle"):
                kw[key] = val
            elif key == "src" and val in ("first", "closest"):
                kw[key] = val
            elif key == "plan" and val in ("prompt", "tf"):
                kw[key] = val
            else:
                raise KeyError(key)
        except ValueError:
            raise ValueError(f"rule {spec!r}: bad value {val!r} for {key!r}") from None
        except KeyError:
            raise ValueError(f"rule {spec!r}: unknown key {key!r} (k, tail, blend, score, src, plan)") from None
    return Rule(**kw)


def closest(target: list[int], sources: dict[str, list[int]]) -> str:
    """The stored copy whose text before the shared run is most like the target's: the
    longest common suffix of the preceding tokens (the nearest context), then the largest
    token-set overlap, then the nearest length. Ties keep sighting order."""

    def key(item):
        i, name = item
        p = plans.plan(target, {name: sources[name]}, 0)
        if not p.injections:
            return (1, 0, 0.0, 0, i)
        inj = p.injections[0]
        pc = inj.pieces[0]
        t, s = target[:inj.run_start], sources[name][:pc.src - (pc.dst - inj.run_start)]
        suf = 0
        while suf < min(len(t), len(s)) and t[-1 - suf] == s[-1 - suf]:
            suf += 1
        jac = len(set(t) & set(s)) / max(1, len(set(t) | set(s)))
        return (0, -suf, -jac, abs(len(t) - len(s)), i)

    return min(enumerate(sources), key=key)[1]


def select(rule: Rule, target: list[int], sources: dict[str, list[int]],
           scores: dict[str, np.ndarray] | None = None, cont: list[int] | None = None) -> plans.Plan:
    """The plan of ``rule`` for ``target``. ``sources``: the stored copies' prompts in
    sighting order (``first`` uses only the first); ``scores``: per-position deviation
    signals by name (needed for ``blend``); ``cont``: the reference continuation (needed
    for ``plan=tf``)."""
    first = dict(list(sources.items())[:1])
    if rule.plan == "tf":
        if cont is None:
            raise ValueError(f"rule {rule.name} needs the reference continuation")
        x = plans.plan(list(target) + list(cont), first, rule.k, tail=rule.tail)
        n = len(target)
        src, names = x.src_pos[:n].copy(), list(x.src_name[:n])
        src[n - 1], names[n - 1] = -1, None
        p = plans.Plan(src, names, x.injections)
    else:
        p = plans.plan(target, first, rule.k, tail=rule.tail)
    if rule.blend:
        if not scores or rule.score not in scores:
            raise ValueError(f"rule {rule.name} needs the {rule.score!r} deviation score")
        p = plans.top_deviation(p, scores[rule.score], rule.blend)
    return p

"""The fewest engine steps any admission order needs: the co-residency LP.

``analysis.packing`` bounds steps by area (block-steps over the pool). That bound lets
every step fill the pool with any mix of requests; but a request that decodes holds all
of its KV at once, so only some *sets* of requests can run side by side. This module
bounds steps by which sets fit.

Model (``analysis.packing``'s): request ``r`` runs ``s_r = max(output_len, 1)`` steps
(its prefill step, then one per further output token) and, while it runs, holds at
least its private blocks (``ceil(prompt_len / B) - covered``, the fewest it ever holds)
and every shared key of its footprint (a key is one block, counted once however many
running requests hold it). A set ``S`` of requests *fits* when its private blocks plus
its distinct keys' blocks are at most the usable pool (``num_blocks - 1``: vLLM keeps one
block as its null block). Every engine step runs a set that fits, and each request needs
``s_r`` steps, so with ``x_S`` the steps that run exactly ``S``::

    steps >= min sum_S x_S   subject to   sum_{S containing r} x_S >= s_r,  x >= 0

over all sets that fit. Its optimum is a lower bound on the steps of *every* schedule
under the footprints' sharing plan (which request borrows what; for the ``shared`` rule,
shared mode's plan, ``analysis.borrow``): any order, any preemption, any admission rule.
For the audit's ``run`` rule (``token_granular``) the plan is the ideal one: every
distinct content-defined run held once, nothing recomputed, and a set fits when its
tokens fit in ``B`` tokens per usable block (no padding, no misaligned edge), so its bound
holds for any plan that shares those runs.
Running requests only grow, preempted ones redo steps, and cached blocks no request holds
still take room, so each of those only adds steps.

The LP has a column per set that fits, so it is solved by column generation: a master LP
over the sets found so far (scipy's HiGHS) gives a price ``y_r`` per request, and a
branch-and-bound search finds the set that fits with the largest total price ``w``. By
weak duality ``sum_r y_r s_r / w`` is a lower bound at every round (Farley's bound); when
``w <= 1`` it equals the master's optimum and the LP is solved. If the search exceeds its
node budget the result says so and no bound is claimed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from analysis import AnalysisError
from analysis.simulate import RequestFootprint

#: Branch-and-bound nodes one pricing search may visit before the bound is given up.
MAX_NODES = 2_000_000
_TOL = 1e-9


@dataclass(frozen=True)
class _Item:
    steps: int
    private: int             # tokens (block rules: whole blocks of tokens)
    keys: frozenset          # key ids


def _items(footprints: Sequence[RequestFootprint], block_size: int,
           token_granular: bool) -> tuple[list[_Item], list[int]]:
    """The requests as LP items, and each key id's size in tokens. Block rules: a key of
    ``t`` tokens is ``ceil(t / B)`` keys of one block each, and a request's private part
    is its uncovered blocks. Token-granular (the ``run`` rule): a key is its tokens, and
    the private part is the prompt's tokens outside every key, packed without padding."""
    B = block_size
    ids: dict = {}
    size: list[int] = []

    def key_id(key, tokens: int) -> int:
        if key not in ids:
            ids[key] = len(size)
            size.append(tokens)
        return ids[key]

    out = []
    for fp in footprints:
        if token_granular:
            keys = {key_id(key, t) for key, t in fp.shared}
            private = max(0, fp.prompt_len - sum(t for _, t in fp.shared))
        else:
            keys = {key_id((key, j), B) for key, t in fp.shared for j in range(-(-t // B))}
            private = B * max(0, -(-fp.prompt_len // B) - fp.covered_blocks)
        out.append(_Item(max(fp.output_len, 1), private, frozenset(keys)))
    return out, size


def _best_set(items: list[_Item], size: list[int], y: np.ndarray, room: int,
              max_nodes: int) -> tuple[float, tuple[int, ...]] | None:
    """The set that fits in ``room`` tokens with the largest ``sum(y)``, or None past
    ``max_nodes``."""
    cand = [i for i in np.argsort(-y, kind="stable") if y[i] > _TOL]
    suffix = np.concatenate([np.cumsum(y[cand][::-1])[::-1], [0.0]])
    best = [0.0, ()]
    nodes = 0

    def dfs(pos: int, chosen: list[int], keys: frozenset, used: int, w: float) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > max_nodes:
            return False
        if w > best[0] + _TOL:
            best[0], best[1] = w, tuple(chosen)
        for j in range(pos, len(cand)):
            if w + suffix[j] <= best[0] + _TOL:
                return True
            it = items[cand[j]]
            u = used + it.private
            if u > room:
                continue
            u += sum(size[k] for k in it.keys - keys)
            if u > room:
                continue
            chosen.append(cand[j])
            ok = dfs(j + 1, chosen, keys | it.keys, u, w + y[cand[j]])
            chosen.pop()
            if not ok:
                return False
        return True

    if not dfs(0, [], frozenset(), 0, 0.0):
        return None
    return best[0], best[1]


def lp_min_steps(footprints: Sequence[RequestFootprint], block_size: int, num_blocks: int,
                 max_nodes: int = MAX_NODES, max_rounds: int = 500,
                 token_granular: bool = False) -> dict:
    """The co-residency LP's lower bound on engine steps at a pool of ``num_blocks``
    (``token_granular``: for the ``run`` rule, whose keys are runs of any length, a set
    fits when its tokens do, ``B`` per usable block: no padding, the ideal packing).

    Returns ``lp_steps`` (the bound, rounded up; None when the search gave up),
    ``exact`` (the LP was solved to optimality), ``rounds`` (master LPs solved),
    ``largest_set`` (most requests in one set that fits, among the sets used) and
    ``sets`` (the master's solution: ``(request indices, steps)`` for each set it runs;
    None when the search gave up). Token-granular keys take the size of their first
    occurrence (a content digest has one length)."""
    from scipy.optimize import linprog

    if num_blocks < 2:
        raise AnalysisError(f"num_blocks must be at least 2 (one is vLLM's null block), "
                            f"got {num_blocks}")
    usable = num_blocks - 1
    room = usable * block_size
    items, size = _items(footprints, block_size, token_granular)
    if not items:
        raise AnalysisError("no requests to bound")
    for i, it in enumerate(items):
        need = it.private + sum(size[k] for k in it.keys)
        if need > room:
            raise AnalysisError(f"request {i} needs {-(-need // block_size)} blocks on its "
                                f"own, more than the {usable} usable blocks of a "
                                f"{num_blocks}-block pool")
    n = len(items)
    s = np.array([it.steps for it in items], dtype=float)
    cols: list[tuple[int, ...]] = [(i,) for i in range(n)]
    seen = set(cols)
    bound = 0.0
    for rounds in range(1, max_rounds + 1):
        A = np.zeros((n, len(cols)))
        for j, c in enumerate(cols):
            A[list(c), j] = 1.0
        res = linprog(np.ones(len(cols)), A_ub=-A, b_ub=-s, bounds=(0, None), method="highs")
        if res.status != 0:
            raise AnalysisError(f"the master LP failed: {res.message}")
        y = np.maximum(0.0, -np.asarray(res.ineqlin.marginals))
        found = _best_set(items, size, y, room, max_nodes)
        if found is None:
            return {"lp_steps": None, "exact": False, "rounds": rounds,
                    "largest_set": max(len(c) for c in cols), "num_blocks": num_blocks,
                    "sets": None}
        w, best = found
        bound = max(bound, float(y @ s) / max(w, _TOL))
        exact = w <= 1 + 1e-7
        if exact or best in seen or rounds == max_rounds:
            used = [(c, float(x)) for c, x in zip(cols, res.x) if x > _TOL]
            return {"lp_steps": math.ceil(bound - 1e-6), "exact": exact, "rounds": rounds,
                    "largest_set": max(len(c) for c, _ in used), "num_blocks": num_blocks,
                    "sets": used}
        cols.append(best)
        seen.add(best)
    raise AssertionError("unreachable")

"""A lower bound on engine steps when the KV pool holds ``num_blocks`` blocks.

Every running request holds KV blocks at every step; the pool holds at most
``num_blocks`` at once, so the steps of any schedule satisfy
``steps * num_blocks >= the block-steps the requests need``. Under a sharing rule, with
the step model of ``analysis.simulate`` (a request runs ``max(output_len, 1)`` steps and
holds ``ceil((prompt_len + k) / B)`` logical blocks at its ``k``-th step):

* a shareable key (a prompt block several requests can hold as one) is needed at least
  as long as the longest of its holders runs: its block-steps are at least
  ``blocks(key) * max(steps of its holders)``, reached only if all its holders run side by
  side;
* everything else (the partial last prompt block, generated tokens, a request's
  unshared blocks) is private: ``ceil((prompt_len + k) / B) - covered`` blocks at step k;
  under the token-granular ``run`` rule, runs and private tokens are packed into blocks
  without padding (as ``analysis.simulate`` counts them), so the bound there is their
  token-steps over ``B``.

So ``min_steps = max(ceil(sum of block-steps / num_blocks), longest request)``. (vLLM
keeps one block of the pool as its null block, so the usable pool is one smaller; the
bound stays a bound.) It is
reachable only by perfect packing: every step uses the whole pool, and all readers of a
shared block run at once. The measured steps of a run (``trace_steps``) against it say
how much a better admission order could still gain; the ratio of two rules' bounds says
how far sharing alone can take throughput where decode steps dominate.
"""

from __future__ import annotations

from typing import Sequence

from analysis import AnalysisError
from analysis.simulate import RequestFootprint


def block_steps(footprints: Sequence[RequestFootprint], block_size: int,
                token_granular: bool = False) -> dict:
    """The block-steps a workload needs at least: ``shared`` (distinct keys, each for its
    longest holder), ``private`` and ``total``."""
    B = block_size
    longest: dict = {}
    cost: dict = {}
    private = 0             # block-steps (block rules) or token-steps (run rule)
    for fp in footprints:
        steps = max(fp.output_len, 1)
        for key, tokens in fp.shared:
            longest[key] = max(longest.get(key, 0), steps)
            cost[key] = tokens
        if token_granular:
            own_tokens = fp.prompt_len - sum(t for _, t in fp.shared)
            private += sum(own_tokens + k for k in range(steps))
        else:
            covered = fp.covered_blocks
            private += sum(max(0, -(-(fp.prompt_len + k) // B) - covered)
                           for k in range(steps))
    if token_granular:   # runs and private tokens packed without padding, as in simulate
        shared_tokens = sum(cost[key] * n for key, n in longest.items())
        shared = shared_tokens // B
        private = -(-(shared_tokens + private) // B) - shared
    else:
        shared = sum(-(-cost[key] // B) * n for key, n in longest.items())
    return {"shared": int(shared), "private": int(private), "total": int(shared + private)}


def min_steps(footprints: Sequence[RequestFootprint], block_size: int, num_blocks: int,
              token_granular: bool = False) -> dict:
    """``block_steps`` plus ``min_steps``, the lower bound on engine steps at
    ``num_blocks``, and ``longest`` (the longest request's steps)."""
    if num_blocks < 1:
        raise AnalysisError(f"num_blocks must be at least 1, got {num_blocks}")
    need = block_steps(footprints, block_size, token_granular)
    longest = max((max(fp.output_len, 1) for fp in footprints), default=0)
    return dict(need, longest=longest, num_blocks=num_blocks,
                min_steps=max(-(-need["total"] // num_blocks), longest))


def rule_bounds(footprints: dict[str, Sequence[RequestFootprint]], block_size: int,
                num_blocks: int) -> dict:
    """``min_steps`` for each rule of the audit (``run`` is token-granular)."""
    return {rule: min_steps(fps, block_size, num_blocks, token_granular=(rule == "run"))
            for rule, fps in footprints.items()}

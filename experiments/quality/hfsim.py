"""Sequence-mode reuse simulated with the HF model (offline, no engine, no lock).

``Sim.reuse`` builds the target's KV cache the way the engine does: computed stretches
run through the model in order (each a step against the cache so far), injected
stretches take the stored copy's KV, keys re-rotated from their source positions with
``vllm_ext.rope.rerotate`` (the engine's rotation). Any recompute set works, contiguous
or not, so selection rules the scheduler cannot run yet can be measured first.

Float32 throughout; results differ from the engine's kernels by rounding only (the
harness checks the two against each other on the same cases).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .plans import Plan


class Sim:
    def __init__(self, model_dir: str, threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vllm_ext.rope import RotaryParams

        # one thread: on this shared 2-core host, two OpenMP threads ran 7x slower than one
        torch.set_num_threads(threads or 1)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.cfg = self.model.config
        self.rotary = RotaryParams.from_hf_config(self.cfg)
        eos = self.cfg.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    # -- primitives ------------------------------------------------------------------
    def _cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.cfg)

    @torch.no_grad()
    def _step(self, ids, start: int, cache) -> torch.Tensor:
        """Run ``ids`` at positions ``start..`` against ``cache``; logits [n, vocab]."""
        x = torch.as_tensor(ids, dtype=torch.long)[None]
        pos = torch.arange(start, start + x.shape[1])[None]
        return self.model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True).logits[0]

    def prefill(self, ids: list[int]):
        """Full prefill: ``(cache, logits of the last position)``."""
        cache = self._cache()
        return cache, self._step(ids, 0, cache)[-1]

    @staticmethod
    def stacked(cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer: two ``[layers, kv_heads, tokens, head_dim]``."""
        return (torch.stack([lyr.keys[0] for lyr in cache.layers]),
                torch.stack([lyr.values[0] for lyr in cache.layers]))

    @torch.no_grad()
    def reuse(self, target: list[int], plan: Plan, sources: dict[str, tuple]):
        """Target cache under ``plan``; ``sources`` maps a source name to ``stacked()``
        KV of its full prefill. Returns ``(cache, logits of the last position)``."""
        from vllm_ext.rope import rerotate

        src, n = plan.src_pos, len(target)
        if src[-1] >= 0:
            raise ValueError("the last prompt token must be computed")
        cache, logits = self._cache(), None
        lo = 0
        while lo < n:
            inj = src[lo] >= 0
            hi = lo + 1
            while hi < n and (src[hi] >= 0) == inj and (not inj or plan.src_name[hi] == plan.src_name[lo]):
                hi += 1
            if not inj:
                logits = self._step(target[lo:hi], lo, cache)[-1]
            else:
                k_all, v_all = sources[plan.src_name[lo]]
                sp = torch.as_tensor(src[lo:hi])
                k = k_all[:, :, sp].transpose(1, 2)                    # [L, m, h, d]
                k = rerotate(k, torch.arange(lo, hi) - sp, self.rotary).transpose(1, 2)
                v = v_all[:, :, sp]
                for layer in range(k.shape[0]):
                    cache.update(k[layer][None].contiguous(), v[layer][None].contiguous(), layer)
            lo = hi
        return cache, logits

    # -- readouts --------------------------------------------------------------------
    @torch.no_grad()
    def teacher_forced(self, cache, last_logits, cont: list[int]) -> tuple[list[float], list[int]]:
        """Log-prob and top-1 at each continuation token; the cache is restored."""
        n = cache.get_seq_length()
        logits = last_logits[None]
        if len(cont) > 1:
            logits = torch.cat([logits, self._step(cont[:-1], n, cache)])
            _crop(cache, n)
        lp = torch.log_softmax(logits.double(), -1)
        idx = torch.as_tensor(cont)
        return lp[torch.arange(len(cont)), idx].tolist(), lp.argmax(-1).tolist()

    @torch.no_grad()
    def greedy(self, cache, last_logits, max_new: int) -> tuple[list[int], str]:
        """Greedy tokens (stopping after an EOS) and their text; the cache is restored."""
        n = cache.get_seq_length()
        out: list[int] = []
        logits = last_logits
        for i in range(max_new):
            t = int(logits.argmax())
            out.append(t)
            if t in self.eos or i == max_new - 1:
                break
            logits = self._step([t], n + i, cache)[-1]
        _crop(cache, n)
        return out, self.tok.decode(out, skip_special_tokens=True)

    def readout(self, cache, last_logits, cont: list[int] | None, max_new: int) -> dict:
        """Greedy output, and teacher-forced scores of ``cont`` (default: the greedy one)."""
        tokens, text = self.greedy(cache, last_logits, max_new)
        lp, top1 = self.teacher_forced(cache, last_logits, cont if cont is not None else tokens)
        return {"tokens": tokens, "text": text, "lp": lp, "top1": top1}


def _crop(cache, n: int) -> None:
    """Drop the cache's tokens after the first ``n``."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def kv_deviation(full: tuple, other: tuple, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relative L2 deviation ``|x - x_full| / |x_full|`` per layer and position (keys,
    values), ``[layers, len(positions)]`` each, over all heads."""
    p = torch.as_tensor(positions)
    out = []
    for a, b in zip(full, other):
        fa, fb = a[:, :, p], b[:, :, p]
        num = (fb - fa).pow(2).sum(dim=(1, 3)).sqrt()
        den = fa.pow(2).sum(dim=(1, 3)).sqrt().clamp_min(1e-12)
        out.append((num / den).numpy())
    return out[0], out[1]

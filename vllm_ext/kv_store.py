"""Worker-side KV store for sequence mode (vLLM 0.32).

Extends, per attention layer, ``AttentionImpl.do_kv_cache_update(layer, key, value,
kv_cache, slot_mapping)`` (called by ``model_executor/layers/attention/attention.py:
unified_kv_cache_update`` with the post-RoPE keys of every token of the step): the
connector wraps each layer's bound method on its own instance, so

* capture sees keys and values in the model's plain ``[tokens, kv_heads, head_dim]``
  layout before the backend packs them (the CPU backend packs keys in an ISA-specific
  format; GPU backends use other layouts), and
* injection writes re-rotated keys and values through the backend's own write path,
  so the cache layout never has to be known.

Commands come from the scheduler in the step's connector metadata and are executed in
order: evict, inject (in ``start_load_kv``, before the forward), capture (during the
forward, as each layer writes). The store holds exactly the chunks the scheduler's index
holds; it never evicts on its own.
"""

from __future__ import annotations

import logging
import os

import torch

from .rope import RotaryParams, rerotate


logger = logging.getLogger("kvdedup")
DEBUG = os.environ.get("KVDEDUP_DEBUG") == "1"


class WorkerKVStore:
    def __init__(self, rotary: RotaryParams) -> None:
        self.rotary = rotary
        self.layers: dict[str, torch.nn.Module] = {}
        self._orig: dict[str, object] = {}
        self.k: dict[bytes, dict[str, torch.Tensor]] = {}
        self.v: dict[bytes, dict[str, torch.Tensor]] = {}
        self._captures: list[tuple[bytes, torch.Tensor]] = []
        self._rows: dict[int, torch.Tensor] = {}

    def install(self, static_forward_context: dict) -> None:
        """Wrap the KV write of every attention layer that has one."""
        for name, layer in static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if impl is None or not hasattr(impl, "do_kv_cache_update") or name in self._orig:
                continue
            orig = impl.do_kv_cache_update
            self.layers[name], self._orig[name] = layer, orig

            def write(lyr, key, value, kv_cache, slot_mapping, _name=name, _orig=orig):
                _orig(lyr, key, value, kv_cache, slot_mapping)
                if self._captures:
                    self._capture(_name, key, value, slot_mapping)

            impl.do_kv_cache_update = write
        if DEBUG:
            logger.warning("kvdedup store: wrapped KV writes of %d layers", len(self.layers))

    # -- per step ------------------------------------------------------------------------
    def begin_step(self, evicts, injects, captures) -> None:
        if DEBUG and (evicts or injects or captures):
            logger.warning("kvdedup store: step evicts=%d injects=%d captures=%d held=%d",
                           len(evicts), len(injects), len(captures), len(self.k))
        for d in evicts:
            self.k.pop(d, None)
            self.v.pop(d, None)
        for slots, pieces in injects:
            self._inject(slots, pieces)
        self._captures = [(d, torch.as_tensor(s, dtype=torch.long)) for d, s, _ in captures]
        for d, _ in self._captures:
            self.k[d], self.v[d] = {}, {}
        self._rows = {}

    def _rows_for(self, slot_mapping: torch.Tensor) -> torch.Tensor:
        """Inverse of this step's slot mapping: slot -> row (-1 where absent)."""
        key = slot_mapping.data_ptr()
        inv = self._rows.get(key)
        if inv is None:
            sm = slot_mapping.to("cpu", torch.long)
            valid = sm >= 0
            inv = torch.full((int(sm.max()) + 2 if sm.numel() else 1,), -1, dtype=torch.long)
            inv[sm[valid]] = torch.arange(sm.numel())[valid]
            self._rows[key] = inv
        return inv

    def _capture(self, name, key, value, slot_mapping) -> None:
        inv = self._rows_for(slot_mapping)
        for digest, slots in self._captures:
            rows = inv[slots.clamp(max=inv.numel() - 1)]
            if (rows < 0).any() or (slots >= inv.numel()).any():
                raise RuntimeError("kvdedup: a planned capture's tokens are not in this step")
            rows = rows.to(key.device)
            self.k[digest][name] = key.index_select(0, rows).clone()
            self.v[digest][name] = value.index_select(0, rows).clone()

    def _inject(self, slots: list[int], pieces) -> None:
        slot_t = None
        for name, layer in self.layers.items():
            ks, vs = [], []
            for digest, offset, length, delta in pieces:
                k = self.k[digest][name][offset:offset + length]
                ks.append(rerotate(k, delta, self.rotary) if delta else k)
                vs.append(self.v[digest][name][offset:offset + length])
            k, v = torch.cat(ks), torch.cat(vs)
            if slot_t is None:
                slot_t = torch.as_tensor(slots, dtype=torch.long, device=k.device)
            self._orig[name](layer, k, v, layer.kv_cache, slot_t)

    def end_step(self) -> None:
        self._captures, self._rows = [], {}

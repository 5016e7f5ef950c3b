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
holds; it never evicts on its own. The vLLM names it relies on (``Attention.impl``,
``Attention.kv_cache``, the backend's ``do_kv_cache_update``) are in ``vllm_ext.contract``.

Faults never stop the engine: a capture whose tokens are not in the step is skipped
(the chunk is then missing from the store), and an injection that needs a missing chunk
writes nothing and reports its blocks through ``take_failed_blocks`` (the connector's
``get_block_ids_with_load_errors``), so vLLM rewinds the request and recomputes them
(``kv_load_failure_policy="recompute"``). Each fault is counted in ``faults`` and logged.
"""

from __future__ import annotations

import logging
import os

import torch

from .rope import RotaryParams, rotate, rotation
from .version import check_vllm_version

check_vllm_version()

logger = logging.getLogger("kvdedup")
DEBUG = os.environ.get("KVDEDUP_DEBUG") == "1"


class WorkerKVStore:
    """Chunk digest -> KV of every attention layer, as two tensors ``[layers, tokens,
    kv_heads, head_dim]`` (keys post-RoPE at the chunk's original positions, values).
    Captures write straight into the chunk's tensor, one layer slice per KV write."""

    def __init__(self, rotary: RotaryParams, block_size: int) -> None:
        self.rotary = rotary
        self.block_size = block_size
        self.layers: dict[str, torch.nn.Module] = {}
        self._index: dict[str, int] = {}
        self._orig: dict[str, object] = {}
        self.k: dict[bytes, torch.Tensor] = {}
        self.v: dict[bytes, torch.Tensor] = {}
        self._captures: list[tuple[bytes, torch.Tensor]] = []
        self._rows: dict[int, list] = {}
        self.faults: dict[str, int] = {"capture_not_in_step": 0, "inject_missing_chunk": 0}
        self._failed_blocks: set[int] = set()

    def install(self, static_forward_context: dict) -> None:
        """Wrap the KV write of every attention layer that has one."""
        for name, layer in static_forward_context.items():
            impl = getattr(layer, "impl", None)
            if impl is None or not hasattr(impl, "do_kv_cache_update") or name in self._orig:
                continue
            orig = impl.do_kv_cache_update
            self._index[name] = len(self.layers)
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
            missing = [d for d, *_ in pieces if d not in self.k]
            if missing:
                self._fault("inject_missing_chunk", "%d stored chunk(s) missing; the "
                            "request recomputes those blocks", len(missing))
                self._failed_blocks.update(s // self.block_size for s in slots)
                continue
            self._inject(slots, pieces)
        self._captures = [(d, torch.as_tensor(s, dtype=torch.long)) for d, s, _ in captures]
        for d, _ in self._captures:  # allocated at the first layer's write (shape, dtype)
            self.k.pop(d, None)
            self.v.pop(d, None)
        self._rows = {}

    def _capture_rows(self, slot_mapping: torch.Tensor, device) -> list:
        """``(digest, rows)`` of this step's captures: the rows of the step's key/value
        tensors that hold each chunk's slots. Computed at the first layer's write and
        reused by the others (layers that share a slot mapping share the rows)."""
        key = slot_mapping.data_ptr()
        out = self._rows.get(key)
        if out is None:
            sm = slot_mapping.to("cpu", torch.long)
            valid = sm >= 0
            inv = torch.full((int(sm.max()) + 2 if sm.numel() else 1,), -1, dtype=torch.long)
            inv[sm[valid]] = torch.arange(sm.numel())[valid]
            out = []
            for digest, slots in self._captures:
                rows = inv[slots.clamp(max=inv.numel() - 1)]
                if (rows < 0).any() or (slots >= inv.numel()).any():
                    self._fault("capture_not_in_step", "a planned capture's tokens are not "
                                "in this step; chunk %s is not stored", digest.hex()[:12])
                    continue
                out.append((digest, rows.to(device)))
            self._rows[key] = out
        return out

    def _capture(self, name, key, value, slot_mapping) -> None:
        layer = self._index[name]
        for digest, rows in self._capture_rows(slot_mapping, key.device):
            if digest not in self.k:
                shape = (len(self.layers), len(rows), *key.shape[1:])
                self.k[digest] = key.new_empty(shape)
                self.v[digest] = value.new_empty((shape[0], shape[1], *value.shape[1:]))
            torch.index_select(key, 0, rows, out=self.k[digest][layer])
            torch.index_select(value, 0, rows, out=self.v[digest][layer])

    def _inject(self, slots: list[int], pieces) -> None:
        """Write the pieces ``(digest, offset, length, delta)`` into ``slots`` (in order),
        keys re-rotated by each piece's position delta, through every layer's own write.
        Layer by layer into reused buffers: whole-model temporaries of ~25 MB cost more
        in page faults than the arithmetic (measured 2.5x slower)."""
        k0, v0 = self.k[pieces[0][0]], self.v[pieces[0][0]]
        n_tok = sum(n for _, _, n, _ in pieces)
        kbuf = k0.new_empty((n_tok, *k0.shape[2:]))
        vbuf = v0.new_empty((n_tok, *v0.shape[2:]))
        dev = k0.device
        cos = sin = rot = None
        if any(delta for *_, delta in pieces):
            cos, sin = rotation(torch.cat([torch.full((n,), dl, dtype=torch.long)
                                           for _, _, n, dl in pieces]), n_tok, self.rotary)
            cos, sin = cos.to(dev), sin.to(dev)
            rot = torch.empty(kbuf.shape, dtype=torch.float32, device=dev)
        slot_t = torch.as_tensor(slots, dtype=torch.long, device=dev)
        for name, layer in self.layers.items():
            i = self._index[name]
            torch.cat([self.k[d][i, o:o + n] for d, o, n, _ in pieces], out=kbuf)
            torch.cat([self.v[d][i, o:o + n] for d, o, n, _ in pieces], out=vbuf)
            k = kbuf
            if rot is not None:
                k = rotate(kbuf.to(torch.float32), cos, sin, out=rot).to(kbuf.dtype)
            self._orig[name](layer, k, vbuf, layer.kv_cache, slot_t)

    def end_step(self) -> None:
        self._captures, self._rows = [], {}

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose injection failed since the last call (vLLM recomputes them)."""
        out, self._failed_blocks = self._failed_blocks, set()
        return out

    def _fault(self, kind: str, msg: str, *args) -> None:
        self.faults[kind] += 1
        logger.error("kvdedup store: " + msg, *args)

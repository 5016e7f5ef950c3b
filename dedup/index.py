"""Verified, budgeted digest -> payload index for KV-cache deduplication.

Pure numpy + stdlib (never imports vllm or torch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from dedup.hashing import TokenInput, as_token_array

__all__ = ["DedupIndex", "Entry", "EvictCallback"]

#: ``on_evict(digest, payload)`` -- called once per entry evicted to make room.
EvictCallback = Callable[[bytes, Any], None]


@dataclass(slots=True, eq=False)
class Entry:
    """One indexed item.  Treat as read-only; mutate via :class:`DedupIndex`.

    ``tokens`` is a read-only int32 copy kept to verify digest hits.
    ``payload`` is an opaque handle owned by the caller (e.g. block ids of a
    KV allocation); the index never copies, frees or inspects it.
    """

    digest: bytes
    tokens: np.ndarray
    payload: Any
    nbytes: int
    refs: int = 0
    last_use: int = 0


class DedupIndex:
    """Map ``digest -> Entry`` with token verification and an LRU byte budget.

    Accounting: ``bytes_held`` is the sum of the caller-declared payload
    ``nbytes`` of all entries.  The verification token arrays are NOT counted
    (they are ~4 bytes/token vs. tens of KB/token of KV); they are reported
    separately as :attr:`token_bytes`.

    Invariants (checked by :meth:`check_invariants`):

    * ``0 <= bytes_held <= budget_bytes`` at all times.
    * An entry with ``refs > 0`` (pinned) is never evicted.
    * Eviction policy: least-recently-used among unpinned entries.  A "use"
      is insert, verified lookup hit, acquire or release; each use stamps a
      monotonically increasing tick (``last_use``).  The unpinned LRU list is
      always ordered by ``last_use``.
    * A digest maps to at most one token sequence: a digest hit whose tokens
      differ is a collision -- rejected, counted, never shared, never
      overwrites the resident entry.
    * ``insert`` either fully succeeds (possibly after evicting) or changes
      nothing: it evicts only when the eviction is guaranteed to make room.

    Counters (:meth:`stats`): ``lookups`` = calls to :meth:`lookup`; ``hits``
    = lookups whose digest was present (``hits == verified_hits +
    collisions`` counted from lookups); ``collisions`` also counts inserts
    refused because the digest is held with other tokens.

    Ownership: payloads belong to the caller.  When an entry is evicted its
    payload is handed to ``on_evict(digest, payload)`` (if given) so the
    caller can free it; :meth:`remove` returns the entry instead.
    Not thread-safe; guard with a lock if shared.
    """

    def __init__(self, budget_bytes: int, on_evict: EvictCallback | None = None) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)):
            raise ValueError(f"budget_bytes must be an int, got {type(budget_bytes).__name__}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if on_evict is not None and not callable(on_evict):
            raise ValueError("on_evict must be callable or None")
        self._budget = int(budget_bytes)
        self._on_evict = on_evict
        self._entries: dict[bytes, Entry] = {}
        # unpinned entries only, oldest first (ordered by last_use)
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self._bytes_held = 0
        self._unpinned_bytes = 0
        self._token_bytes = 0
        self._tick = 0
        self._lookups = 0
        self._hits = 0
        self._verified_hits = 0
        self._collisions = 0
        self._insertions = 0
        self._evictions = 0

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _check_digest(digest: Any) -> bytes:
        if not isinstance(digest, (bytes, bytearray)) or len(digest) == 0:
            raise ValueError(f"digest must be non-empty bytes, got {digest!r:.60}")
        return bytes(digest)

    def _touch(self, entry: Entry) -> None:
        self._tick += 1
        entry.last_use = self._tick
        if entry.refs == 0:
            self._lru.move_to_end(entry.digest)

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.digest]
        if entry.refs == 0:
            del self._lru[entry.digest]
            self._unpinned_bytes -= entry.nbytes
        self._bytes_held -= entry.nbytes
        self._token_bytes -= entry.tokens.nbytes

    def _get(self, digest: Any) -> Entry:
        d = self._check_digest(digest)
        try:
            return self._entries[d]
        except KeyError:
            raise KeyError(f"digest {d.hex()} not in index") from None

    # -------------------------------------------------------------- public API

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def bytes_held(self) -> int:
        """Sum of payload ``nbytes`` of resident entries (tokens excluded)."""
        return self._bytes_held

    @property
    def token_bytes(self) -> int:
        """Bytes of verification token arrays held (not in the budget)."""
        return self._token_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._entries))

    def get(self, digest: bytes) -> Entry | None:
        """Entry for ``digest`` without verification, counting or touching."""
        return self._entries.get(bytes(digest))

    def lookup(self, digest: bytes, tokens: TokenInput) -> Entry | None:
        """Verified lookup; a verified hit counts as a use (moves to MRU).

        Returns the entry iff ``digest`` is present AND its stored tokens equal
        ``tokens``.  A present digest with different tokens is a collision:
        counted, returns ``None``.  Does not change ref counts.
        """
        d = self._check_digest(digest)
        arr = as_token_array(tokens)
        self._lookups += 1
        entry = self._entries.get(d)
        if entry is None:
            return None
        self._hits += 1
        if not np.array_equal(entry.tokens, arr):
            self._collisions += 1
            return None
        self._verified_hits += 1
        self._touch(entry)
        return entry

    def insert(self, digest: bytes, tokens: TokenInput, payload: Any, nbytes: int) -> bool:
        """Insert an unpinned entry; returns whether it is now resident.

        * ``nbytes > budget_bytes`` -> ``False`` (refused, nothing changes).
        * digest already present with equal tokens -> ``True``, the existing
          entry is kept (its payload is NOT replaced) and touched.
        * digest present with different tokens -> collision, ``False``.
        * otherwise evicts LRU unpinned entries until it fits; if the bytes of
          all unpinned entries cannot make room (the rest is pinned) ->
          ``False`` and nothing is evicted.
        """
        d = self._check_digest(digest)
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise ValueError(f"nbytes must be an int, got {type(nbytes).__name__}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        nbytes = int(nbytes)
        arr = as_token_array(tokens)
        existing = self._entries.get(d)
        if existing is not None:
            if np.array_equal(existing.tokens, arr):
                self._touch(existing)
                return True
            self._collisions += 1
            return False
        if nbytes > self._budget:
            return False
        need = self._bytes_held + nbytes - self._budget
        if need > self._unpinned_bytes:
            return False
        while self._bytes_held + nbytes > self._budget:
            victim = self._entries[next(iter(self._lru))]
            self._drop(victim)
            self._evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim.digest, victim.payload)
        stored = arr.copy()  # never alias caller memory
        stored.setflags(write=False)
        self._tick += 1
        entry = Entry(d, stored, payload, nbytes, 0, self._tick)
        self._entries[d] = entry
        self._lru[d] = None
        self._bytes_held += nbytes
        self._unpinned_bytes += nbytes
        self._token_bytes += stored.nbytes
        self._insertions += 1
        return True

    def acquire(self, digest: bytes) -> Entry:
        """Increment the ref count (pins the entry); raises KeyError if absent."""
        entry = self._get(digest)
        if entry.refs == 0:
            del self._lru[entry.digest]
            self._unpinned_bytes -= entry.nbytes
        entry.refs += 1
        self._touch(entry)
        return entry

    def release(self, digest: bytes) -> int:
        """Decrement the ref count; returns the new count.

        Raises KeyError if absent, ValueError if the count is already 0.  At 0
        the entry becomes evictable again, as the most recently used.
        """
        entry = self._get(digest)
        if entry.refs == 0:
            raise ValueError(f"digest {entry.digest.hex()} has ref count 0; release without acquire")
        entry.refs -= 1
        if entry.refs == 0:
            self._lru[entry.digest] = None
            self._unpinned_bytes += entry.nbytes
        self._touch(entry)
        return entry.refs

    def remove(self, digest: bytes) -> Entry:
        """Remove an unpinned entry and return it (``on_evict`` is NOT called).

        Raises KeyError if absent, ValueError if pinned (refs > 0).
        """
        entry = self._get(digest)
        if entry.refs > 0:
            raise ValueError(f"digest {entry.digest.hex()} is pinned (refs={entry.refs})")
        self._drop(entry)
        return entry

    def stats(self) -> dict[str, int]:
        return {
            "lookups": self._lookups,
            "hits": self._hits,
            "verified_hits": self._verified_hits,
            "collisions": self._collisions,
            "insertions": self._insertions,
            "evictions": self._evictions,
            "bytes_held": self._bytes_held,
            "entries": len(self._entries),
            "pinned": len(self._entries) - len(self._lru),
            "token_bytes": self._token_bytes,
            "budget_bytes": self._budget,
        }

    def lru_order(self) -> list[bytes]:
        """Unpinned digests, next-to-evict first."""
        return list(self._lru)

    def check_invariants(self) -> None:
        """Assert all documented invariants (O(n); for tests and debugging)."""
        assert 0 <= self._bytes_held <= self._budget, (self._bytes_held, self._budget)
        assert self._bytes_held == sum(e.nbytes for e in self._entries.values())
        unpinned = [d for d, e in self._entries.items() if e.refs == 0]
        assert set(unpinned) == set(self._lru)
        assert self._unpinned_bytes == sum(self._entries[d].nbytes for d in unpinned)
        ticks = [self._entries[d].last_use for d in self._lru]
        assert ticks == sorted(ticks)
        assert all(e.refs >= 0 for e in self._entries.values())
        assert self._token_bytes == sum(e.tokens.nbytes for e in self._entries.values())


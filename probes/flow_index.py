"""Open-addressing hash table from a 4-tuple's 64-bit hash to a live flow slot, in numpy.

Why not a dict: a dict keyed by address/port tuples costs ~500 bytes per flow in Python objects
and a Python step per new tuple; this table costs 16 bytes per position (at most 70% full) and
looks a whole block's tuples up at once (linear probing, one vectorised step per probe distance).
Hashes are not trusted alone: a hit on a live slot is checked against that slot's stored tuple
(`verify`), and probing goes on past a different tuple with the same hash, so two tuples sharing
a hash still get their own slots. Entries pointing at FOLDED (tuples beyond the live-flow cap) are
hash-only: a colliding new tuple would be folded too (chance ~ folded / 2^64).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

EMPTY_HASH = np.uint64(0)
FOLDED = -2
MISSING = -1


def nonzero_hashes(hashes: np.ndarray) -> np.ndarray:
    """0 marks an empty position: move hash 0 to 1 (verification keeps tuples apart)."""
    return np.where(hashes == EMPTY_HASH, np.uint64(1), hashes)


class FlowIndex:
    def __init__(self, capacity: int = 1024) -> None:
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        capacity = 1 << max(int(capacity - 1).bit_length(), 4)
        self.hashes = np.zeros(capacity, dtype=np.uint64)
        self.slots = np.full(capacity, MISSING, dtype=np.int64)
        self.mask = np.uint64(capacity - 1)
        self.used = 0

    def nbytes(self) -> int:
        return self.hashes.nbytes + self.slots.nbytes

    def lookup(self, hashes: np.ndarray, verify: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        """(slot per hash, or MISSING; table position of each hit, or -1). verify(slots, which)
        says whether live slot slots[i] holds the tuple of hashes[which[i]]."""
        count = len(hashes)
        found = np.full(count, MISSING, dtype=np.int64)
        positions = np.full(count, -1, dtype=np.int64)
        pending = np.arange(count)
        position = (hashes & self.mask).astype(np.int64)
        while len(pending):
            stored = self.hashes[position]
            same_hash = stored == hashes[pending]
            slot = self.slots[position]
            hit = same_hash & (slot == FOLDED)
            live = np.flatnonzero(same_hash & (slot >= 0))
            if len(live):
                hit[live] = verify(slot[live], pending[live])
            found[pending[hit]] = slot[hit]
            positions[pending[hit]] = position[hit]
            go_on = ~hit & (stored != EMPTY_HASH)
            pending = pending[go_on]
            position = (position[go_on] + 1) & int(self.mask)
        return found, positions

    def set_at(self, positions: np.ndarray, slots: np.ndarray) -> None:
        self.slots[positions] = slots

    def insert(self, hashes: np.ndarray, slots: np.ndarray) -> None:
        """Add entries for tuples not in the table (hashes may repeat for distinct tuples)."""
        # Linear probing stays short up to ~70% full; growing to twice the entries keeps the
        # table 35-70% full (16 bytes a position: 23-46 bytes per flow).
        if 10 * (self.used + len(hashes)) > 7 * len(self.hashes):
            self._grow(self.used + len(hashes))
        self._insert(hashes, slots)

    def _insert(self, hashes: np.ndarray, slots: np.ndarray) -> None:
        pending = np.arange(len(hashes))
        position = (hashes & self.mask).astype(np.int64)
        while len(pending):
            empty = self.hashes[position] == EMPTY_HASH
            candidates = np.flatnonzero(empty)
            placed = np.zeros(len(pending), dtype=bool)
            if len(candidates):
                # Several entries aiming at one empty position: the first takes it, the others
                # find it taken on the next step and probe on.
                _, first = np.unique(position[candidates], return_index=True)
                winners = candidates[first]
                self.hashes[position[winners]] = hashes[pending[winners]]
                self.slots[position[winners]] = slots[pending[winners]]
                placed[winners] = True
                self.used += len(winners)
            advance = ~empty
            position = np.where(advance, (position + 1) & int(self.mask), position)
            pending, position = pending[~placed], position[~placed]

    def _grow(self, entries: int) -> None:
        keep = self.hashes != EMPTY_HASH
        hashes, slots = self.hashes[keep], self.slots[keep]
        self._allocate(max(2 * entries, 1024))
        self._insert(hashes, slots)

    def rebuild(self, hashes: np.ndarray, slots: np.ndarray) -> None:
        """A fresh table of the live slots (after they were renumbered) plus the folded tuples."""
        folded = self.hashes[(self.slots == FOLDED) & (self.hashes != EMPTY_HASH)]
        entries = len(hashes) + len(folded)
        self._allocate(max(2 * entries, 1024))
        self._insert(np.concatenate((hashes, folded)),
                     np.concatenate((slots, np.full(len(folded), FOLDED, dtype=np.int64))))

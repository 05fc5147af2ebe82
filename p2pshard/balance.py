"""Byte balance of one publish: split shards that would pile up on a few owners.

A shard lives on the k peers closest to its key, and keys are hashes, so with
a few hundred shards the bytes of one model spread unevenly: at 8 peers and
k=3 the owners of a key always share a half of the id space, and a 57/43 split
of the bytes between halves leaves the loaded half serving 14% more than its
share. A load from every peer then waits for the busiest ones.

The publisher keeps a running count of the bytes of this model each peer will
own (from one crawl of the swarm) and compares it with the peer's *expected*
share: the fraction of random keys it owns, measured by ranking a fixed
sample of keys. When a new shard would push one of its owners more than
``tolerance`` (plus two shards of slack) above that share, the publisher cuts
the shard in two: each piece has a new content id, hence a new random place.
Pieces are never smaller than an eighth of the shard size, so the shard count
grows by a bounded factor (about 1.3x for 128 shards at 8 peers, less for
larger models). Structural differences between peers (a peer whose id region
is twice as large owns twice the keys) are not fought: only the luck of the
draw is.

Balance is measured on the swarm as the publisher sees it; later joins and
departures move shards as usual. Identical bytes still give identical ids,
but whether a shard is split depends on the rest of the model, so two
versions of a model may cut a shared tensor differently.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import blake3
import numpy as np

from .dht import Contact, rank_many
from .hashing import shard_key

__all__ = ["Balance", "split_point"]

SAMPLE_CELLS = 1 << 20  # keys x peers ranked to estimate each peer's share
MAX_SAMPLES = 8192
SLACK_SHARDS = 2.0
MIN_PIECE_FRACTION = 8  # pieces are at least shard_size / 8


class Balance:
    """Running per-peer bytes of one model, and when to split a shard."""

    def __init__(
        self,
        view: Sequence[Contact],
        replicas: int,
        shard_size: int,
        tolerance: float,
    ) -> None:
        self.view = list(view)
        self.replicas = replicas
        self.shard_size = shard_size
        self.tolerance = tolerance
        self.min_piece = max(1, shard_size // MIN_PIECE_FRACTION)
        self.index = {c.id: i for i, c in enumerate(self.view)}
        self.load = np.zeros(len(self.view))
        self.placed = 0
        self.splits = 0
        # With k or fewer peers every peer owns every shard: nothing to even out.
        self.active = len(self.view) > replicas
        self.share = self._expected_share() if self.active else np.zeros(len(self.view))

    def _expected_share(self) -> np.ndarray:
        """Fraction of keys each peer is among the k closest to (a fixed sample)."""
        samples = max(256, min(MAX_SAMPLES, SAMPLE_CELLS // len(self.view)))
        keys = [
            blake3.blake3(b"p2pshard/balance/%d" % i).digest(length=20)
            for i in range(samples)
        ]
        counts = np.zeros(len(self.view))
        for owners in rank_many(self.view, keys, self.replicas).values():
            counts[[self.index[c.id] for c in owners]] += 1
        return counts / samples

    def owners(self, shard_id: str) -> list[int]:
        ranked = rank_many(self.view, [shard_key(shard_id)], self.replicas)
        return [self.index[c.id] for c in next(iter(ranked.values()))]

    def admit(self, shard_id: str, size: int) -> bool:
        """Count ``size`` bytes on the shard's owners and return True, or return
        False (counting nothing) when the shard should be split first."""
        if not self.active:
            return True
        owners = self.owners(shard_id)
        after = self.load[owners] + size
        limit = (1 + self.tolerance) * self.share[owners] * (self.placed + size)
        limit += SLACK_SHARDS * self.shard_size
        if size >= 2 * self.min_piece and bool((after > limit).any()):
            self.splits += 1
            return False
        self.load[owners] = after
        self.placed += size
        return True

    def spread(self) -> float:
        """Largest bytes held over expected bytes, among peers (1.0 is even)."""
        if not self.active or not self.placed:
            return 1.0
        expected = self.share * self.placed
        held = self.load[expected > 0] / expected[expected > 0]
        return float(held.max())


def split_point(start: int, end: int, boundaries: Sequence[int], low: int) -> int:
    """Where to cut ``[start, end)`` in two: the tensor boundary nearest the
    middle if one lies in the middle half, else the middle. Neither piece is
    shorter than ``low`` bytes (the caller makes sure ``end - start >= 2*low``)."""
    middle = (start + end) // 2
    lo = max(start + low, start + (end - start) // 4)
    hi = min(end - low, end - (end - start) // 4)
    inside = boundaries[bisect_left(boundaries, lo) : bisect_right(boundaries, hi)]
    if not inside:
        return middle
    return min(inside, key=lambda b: (abs(b - middle), b))

"""Which shard a load asks which peer for, and when.

Every shard is *assigned* to one of its owners as soon as its holders are
known, so that the bytes each peer is expected to serve are even: a shard
goes to its owner with the least work so far, then improving moves (a queued
shard to another of its owners with less work) run until none is left. With
k=3 of 8 peers a key's owners share one half of the id space; in the 8-peer
namespace lab, choosing shards only when a slot freed up left the busiest
peer serving 9% over the mean (63 to 74.5 MB each), the assignment 1 to 5%.

Requests are pulled: whenever a slot is free, the least loaded peer with room
(fewest faults, then fewest bytes in flight, at most ``per_peer`` requests)
starts its next assigned shard. A peer whose queue is empty (it is faster, or
others are slow or failing) takes a pending shard it owns from the owner with
the most work left: a faster peer, finishing sooner, is given more.

A load keeps ``concurrency`` requests in flight, raised to two per peer that
serves it (up to ``MAX_IN_FLIGHT``): a peer with one request idles between the
end of one body and the start of the next, which at 8 capped peers cost 5% of
the load time. Shards join the plan as their holders are looked up, so the
first ones start before every lookup is done.

Near the end, a peer left with nothing to do (idle, no pending shard of its
own) also asks for the oldest running shard it owns, the likely straggler (an
endgame duplicate); the first verified copy wins and the other request is
abandoned. At most ``duplicates`` run at once and a shard is duplicated once.

This module only decides; the loader does the I/O.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice

from .dht import Contact

__all__ = ["Dispatch", "Duplicate"]

STEAL_WINDOW = 64  # pending shards of its own a peer with no queue looks at
MAX_MOVE_ROUNDS = 8  # passes of improving moves after new shards are assigned
PER_SOURCE = 2  # requests in flight per serving peer, at least
MAX_IN_FLIGHT = 32  # what the per-source rule may raise the concurrency to


@dataclass
class _Peer:
    contact: Contact
    shards: deque[str] = field(default_factory=deque)  # pending ones it owns
    queue: deque[str] = field(default_factory=deque)  # pending ones assigned to it
    queued: int = 0  # bytes in ``queue``
    requests: int = 0
    bytes: int = 0  # in flight

    @property
    def work(self) -> int:
        """Bytes this peer is expected to serve from now on."""
        return self.queued + self.bytes


@dataclass(frozen=True)
class Duplicate:
    """Ask ``contact`` for ``shard_id`` too, while ``original`` is still asked."""

    shard_id: str
    contact: Contact
    original: Contact | None


class Dispatch:
    """The plan of one load's requests (no I/O; see the module docstring).

    sizes: each wanted shard's size, in file order.
    holders: the holders known so far, owners first (the first ``owners``);
        the others come through :meth:`add` as their lookups finish, and
        shards start as soon as their holders are known.
    faults: per peer address, faults seen so far (read, never written).
    """

    def __init__(
        self,
        holders: Mapping[str, Sequence[Contact]],
        sizes: Mapping[str, int],
        faults: Mapping[str, int],
        concurrency: int,
        per_peer: int,
        owners: int,
        duplicates: int = 4,
    ) -> None:
        self.sizes = dict(sizes)
        self.faults = faults
        self.concurrency = max(1, concurrency)
        self.per_peer = max(1, per_peer)
        self.max_duplicates = duplicates
        self.owners = max(1, owners)
        self.pending: dict[str, None] = {}  # holders known, not started
        self.unknown: set[str] = set(sizes)  # holders not known yet
        self.running: dict[str, Contact | None] = {}  # shard -> first peer asked
        self.duplicated: dict[str, Contact] = {}  # shard -> second peer asked
        self.done: set[str] = set()
        self._peers: dict[str, _Peer] = {}
        self._owners: dict[str, list[Contact]] = {}
        self._orphans: deque[str] = deque()  # shards no known peer owns
        self._backlog: dict[str, int] = defaultdict(int)  # pending bytes owned
        self._assignee: dict[str, _Peer] = {}  # pending shard -> its queue's peer
        self._unbalanced = False  # shards assigned since the last moves
        for shard_id in sizes:
            if shard_id in holders:
                self.add(shard_id, holders[shard_id])

    def add(self, shard_id: str, holders: Sequence[Contact]) -> None:
        """The holders of one more shard are known: it may start."""
        self.unknown.discard(shard_id)
        self.pending[shard_id] = None
        owned = list(holders)[: self.owners]
        self._owners[shard_id] = owned
        if not owned:
            self._orphans.append(shard_id)
        peers = []
        for contact in owned:
            peer = self._peers.setdefault(contact.address, _Peer(contact))
            peer.shards.append(shard_id)
            self._backlog[contact.address] += self.sizes[shard_id]
            peers.append(peer)
        if peers:
            self._assign(shard_id, min(peers, key=self._assign_key))
            self._unbalanced = True

    def _assign_key(self, peer: _Peer) -> tuple[int, int]:
        return (self.faults.get(peer.contact.address, 0), peer.work)

    def _assign(self, shard_id: str, peer: _Peer) -> None:
        old = self._assignee.get(shard_id)
        if old is not None:
            old.queued -= self.sizes[shard_id]  # its queue entry goes stale
        self._assignee[shard_id] = peer
        peer.queue.append(shard_id)
        peer.queued += self.sizes[shard_id]

    def _balance(self) -> None:
        """Improving moves: a queued shard goes to another of its owners whose
        expected work, with it, stays below the current assignee's."""
        self._unbalanced = False
        for _ in range(MAX_MOVE_ROUNDS):
            moved = False
            for peer in sorted(self._peers.values(), key=lambda p: -p.work):
                for shard_id in list(peer.queue):
                    if self._assignee.get(shard_id) is not peer:
                        continue
                    size = self.sizes[shard_id]
                    owners = [self._peers[c.address] for c in self._owners[shard_id]]
                    target = min(owners, key=self._assign_key)
                    if self._assign_key(target) < self._assign_key(peer) and (
                        target.work + size < peer.work
                        or self._assign_key(target)[0] < self._assign_key(peer)[0]
                    ):
                        self._assign(shard_id, target)
                        moved = True
            if not moved:
                return

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.duplicated)

    @property
    def limit(self) -> int:
        """Requests allowed in flight now, given the peers known to serve."""
        wanted = min(PER_SOURCE * len(self._peers), MAX_IN_FLIGHT)
        return max(self.concurrency, wanted)

    def next(self) -> tuple[str, Contact | None] | None:
        """The next shard to start and the peer to ask first (None: no known
        owner, let the fetch look for one), or None when nothing should
        start now."""
        if self.in_flight >= self.limit:
            return None
        if self._orphans:
            shard_id = self._orphans.popleft()
            self._start(shard_id, None)
            return shard_id, None
        if self._unbalanced:
            self._balance()
        best: _Peer | None = None
        for peer in self._peers.values():
            while peer.shards and peer.shards[0] not in self.pending:
                peer.shards.popleft()  # started through another owner
            if not peer.shards or peer.requests >= self.per_peer:
                continue
            if best is None or self._key(peer) < self._key(best):
                best = peer
        if best is None:
            return None
        shard_id = self._take(best)
        self._start(shard_id, best.contact)
        return shard_id, best.contact

    def _take(self, peer: _Peer) -> str:
        """The peer's next assigned shard; with none left, a pending shard it
        owns, from the owner with the most work left (the last in its queue)."""
        while peer.queue:
            shard_id = peer.queue.popleft()
            if self._assignee.get(shard_id) is peer:
                return shard_id
        window = [i for i in islice(peer.shards, STEAL_WINDOW) if i in self.pending]
        order = {shard_id: n for n, shard_id in enumerate(window)}
        return max(window, key=lambda i: (self._assignee[i].work, order[i]))

    def duplicate(self) -> Duplicate | None:
        """An endgame duplicate to start now, or None: an idle owner with no
        pending shard of its own also asks for the oldest running shard it
        owns."""
        if self.unknown or self.in_flight >= self.limit:
            return None
        if len(self.duplicated) >= self.max_duplicates:
            return None
        for shard_id, first in self.running.items():  # oldest first
            if shard_id in self.duplicated:
                continue
            for contact in self._owners[shard_id]:
                if contact != first and self._idle(contact):
                    self.duplicated[shard_id] = contact
                    self._load(contact, shard_id, +1)
                    return Duplicate(shard_id, contact, first)
        return None

    def _idle(self, contact: Contact) -> bool:
        """Nothing asked of this healthy peer, and nothing left for it to ask."""
        peer = self._peers[contact.address]
        return (
            not peer.requests
            and not self._backlog[contact.address]
            and not self.faults.get(contact.address, 0)
        )

    def finished(self, shard_id: str) -> None:
        """The shard is verified in place (or failed for good): its requests
        no longer count."""
        self.done.add(shard_id)
        self.pending.pop(shard_id, None)
        first = self.running.pop(shard_id, None)
        if first is not None:
            self._load(first, shard_id, -1)
        second = self.duplicated.pop(shard_id, None)
        if second is not None:
            self._load(second, shard_id, -1)

    def _start(self, shard_id: str, contact: Contact | None) -> None:
        del self.pending[shard_id]
        assignee = self._assignee.pop(shard_id, None)
        if assignee is not None:
            assignee.queued -= self.sizes[shard_id]  # its queue entry goes stale
        for owner in self._owners[shard_id]:
            self._backlog[owner.address] -= self.sizes[shard_id]
        self.running[shard_id] = contact
        if contact is not None:
            self._load(contact, shard_id, +1)

    def _load(self, contact: Contact, shard_id: str, sign: int) -> None:
        peer = self._peers[contact.address]
        peer.requests += sign
        peer.bytes += sign * self.sizes[shard_id]

    def _key(self, peer: _Peer) -> tuple[int, int, int]:
        return (self.faults.get(peer.contact.address, 0), peer.bytes, peer.requests)

"""Which shard a load asks which peer for, and when.

A load keeps ``concurrency`` requests in flight. Rather than taking shards in
file order and each one's least busy holder (a peer then idles whenever the
next shard in line is not one it holds), work is pulled: whenever a request
slot is free, the least loaded peer with room (fewest faults, then fewest
bytes in flight, at most ``per_peer`` requests) gets a pending shard it owns:
of its first few, the one whose other owners have the most pending work left,
so shards that an otherwise idle owner can take are left to it. Every peer
stays busy while any pending shard is one of its own, and a faster peer,
finishing sooner, is given more. Shards join the plan as their holders are
looked up, so the first ones start before every lookup is done.

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

CHOICE_WINDOW = 16  # pending shards of a peer weighed when it is given one


@dataclass
class _Peer:
    contact: Contact
    shards: deque[str] = field(default_factory=deque)  # pending ones it owns
    requests: int = 0
    bytes: int = 0


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
        for contact in owned:
            peer = self._peers.setdefault(contact.address, _Peer(contact))
            peer.shards.append(shard_id)
            self._backlog[contact.address] += self.sizes[shard_id]

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.duplicated)

    def next(self) -> tuple[str, Contact | None] | None:
        """The next shard to start and the peer to ask first (None: no known
        owner, let the fetch look for one), or None when nothing should
        start now."""
        if self.in_flight >= self.concurrency:
            return None
        if self._orphans:
            shard_id = self._orphans.popleft()
            self._start(shard_id, None)
            return shard_id, None
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
        shard_id = self._choose(best)
        self._start(shard_id, best.contact)
        return shard_id, best.contact

    def _choose(self, peer: _Peer) -> str:
        """Of the peer's first pending shards, the one whose other owners have
        the most pending work themselves: a shard that a nearly idle owner can
        take later is left to it."""
        window = [i for i in islice(peer.shards, CHOICE_WINDOW) if i in self.pending]

        def others_backlog(shard_id: str) -> int:
            others = [c for c in self._owners[shard_id] if c != peer.contact]
            return min((self._backlog[c.address] for c in others), default=0)

        shard_id = max(window, key=others_backlog)  # the first of equals
        peer.shards.remove(shard_id)
        return shard_id

    def duplicate(self) -> Duplicate | None:
        """An endgame duplicate to start now, or None: an idle owner with no
        pending shard of its own also asks for the oldest running shard it
        owns."""
        if self.unknown or self.in_flight >= self.concurrency:
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

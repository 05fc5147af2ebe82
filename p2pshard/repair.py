"""Keeping every shard alive: repair, rebalancing, hand-off and scrubbing.

Each peer looks after the shards it holds. A repair pass:

1. crawls the swarm for the live peers (``Dht.crawl``), so the k
   owners of every shard are computed from one membership view instead of one
   lookup per shard;
2. asks each owner, in one batched request, which of its shards it holds;
3. for each shard: if this peer is an owner and the closest owner that holds a
   copy, it pushes the shard to the owners that lack it (one pusher per shard,
   so copies are not sent twice); if this peer is not an owner, it pushes when no
   owner holds a copy, and once every owner holds one it keeps its own copy
   only as cache (evicted when room is needed);
4. republishes the name records it holds to the peers now closest to them.

Passes run periodically (jittered) and soon after the membership changes; the
bytes they push go through a rate limit so repair never starves loads. Hand-off
is a pass run as if this peer had already left. The scrubber re-hashes held
shards at a bounded byte rate; a bad file is quarantined and fetched again from
a replica, as is a shard a loader reports missing on one of its owners.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from .dht import Contact
from .errors import HashMismatchError, P2PShardError
from .hashing import shard_key
from .transfer import PeerError

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["RateLimit", "RepairStats", "Repairer", "owners_of"]

log = logging.getLogger(__name__)

HAS_BATCH = 10_000
PUSH_CONCURRENCY = 4
NET_ERRORS = (PeerError, aiohttp.ClientError, TimeoutError, OSError, P2PShardError)


@dataclass
class RepairStats:
    """What one pass did."""

    peers: int = 0
    checked: int = 0
    pushed: int = 0
    bytes_pushed: int = 0
    cached: int = 0
    failed: int = 0
    records: int = 0
    seconds: float = 0.0
    pushes: dict[str, int] = field(default_factory=dict)  # bytes per target


class RateLimit:
    """A token bucket: ``await take(n)`` returns once ``n`` bytes may pass."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(
                self.burst, self._tokens + (now - self._stamp) * self.rate
            )
            self._stamp = now
            self._tokens -= amount
            if self._tokens < 0:  # pay the debt before the next caller goes
                await asyncio.sleep(-self._tokens / self.rate)


def owners_of(shard_id: str, view: Sequence[Contact], k: int) -> list[Contact]:
    """The k peers of ``view`` closest to the shard's key, nearest first."""
    key = shard_key(shard_id)
    return sorted(view, key=lambda c: c.distance(key))[:k]


class Repairer:
    """Runs a peer's repair passes and scrubbing; owned by the Peer."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.settings = peer.settings
        self.limit = RateLimit(self.settings.repair_rate)
        self.last: RepairStats | None = None
        self.passes = 0
        self.pulled = 0  # shards fetched back (read repair, corruption)
        self.pull_done = asyncio.Event()  # set each time a shard is fetched back
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # --- scheduling -------------------------------------------------------

    @property
    def quiet(self) -> bool:
        """At least one pass done, none running and none asked for."""
        return self.passes > 0 and not self._wake.is_set() and not self._lock.locked()

    def poke(self, _contact: Contact | None = None) -> None:
        """The membership changed: run a pass soon."""
        self._wake.set()

    async def run(self) -> None:
        """Repair forever: soon after start, then every interval or when poked."""
        delay = self.settings.repair_delay
        while True:
            await asyncio.sleep(delay)
            self._wake.clear()
            try:
                await self.repair_once()
            except NET_ERRORS as exc:
                log.warning("repair pass failed: %s", exc)
            interval = self.settings.repair_interval * random.uniform(0.8, 1.2)
            try:
                await asyncio.wait_for(self._wake.wait(), interval)
                delay = self.settings.repair_delay  # debounce a burst of changes
            except TimeoutError:
                delay = 0

    # --- one pass ---------------------------------------------------------

    async def repair_once(self, leaving: bool = False) -> RepairStats:
        """One full pass over the shards held here; see the module docstring.

        With ``leaving``, this peer plans as if it were already gone: every
        shard it owns is handed to the peers that will own it next.
        """
        async with self._lock:
            began = time.monotonic()
            dht = self.peer.dht
            dht.leaving = leaving or dht.leaving
            view = await dht.crawl()
            stats = RepairStats(peers=len(view))
            held = await self._holdings(view)
            await self._push_all(view, held, stats, leaving)
            if not leaving:
                stats.records = await self.republish_records()
            stats.seconds = time.monotonic() - began
            self.last = stats
            self.passes += 1
            if stats.pushed or stats.failed:
                log.info(
                    "repair: %d shards checked, %d copies pushed (%d bytes), "
                    "%d failed, in %.2f s",
                    stats.checked,
                    stats.pushed,
                    stats.bytes_pushed,
                    stats.failed,
                    stats.seconds,
                )
            return stats

    async def _holdings(
        self, view: Sequence[Contact]
    ) -> dict[str, tuple[list[Contact], set[bytes] | None]]:
        """For each held shard: its owners and which of them hold it.

        The set is None when an owner did not answer: nothing is decided then.
        """
        me = self.peer.dht.node.id
        k = self.settings.replicas
        plan: dict[str, list[Contact]] = {}
        ask: dict[Contact, list[str]] = defaultdict(list)
        for shard_id in self.peer.store.ids():
            owners = owners_of(shard_id, view, k)
            plan[shard_id] = owners
            for owner in owners:
                if owner.id != me:
                    ask[owner].append(shard_id)
        answers = await asyncio.gather(*(self._has(c, ids) for c, ids in ask.items()))
        holders: dict[str, set[bytes] | None] = {i: set() for i in plan}
        for contact, held in zip(ask, answers):
            for shard_id in ask[contact]:
                if held is None:
                    holders[shard_id] = None
                elif holders[shard_id] is not None and shard_id in held:
                    holders[shard_id].add(contact.id)  # type: ignore[union-attr]
        return {i: (plan[i], holders[i]) for i in plan}

    async def _has(self, contact: Contact, ids: list[str]) -> set[str] | None:
        found: set[str] = set()
        try:
            for start in range(0, len(ids), HAS_BATCH):
                found |= await self.peer.transfer.has(
                    contact, ids[start : start + HAS_BATCH]
                )
        except NET_ERRORS as exc:
            log.debug("has-query to %s failed: %s", contact.address, exc)
            return None
        return found

    async def _push_all(
        self,
        view: Sequence[Contact],
        held: dict[str, tuple[list[Contact], set[bytes] | None]],
        stats: RepairStats,
        leaving: bool,
    ) -> None:
        store = self.peer.store
        me = self.peer.dht.node.id
        jobs: list[tuple[str, list[Contact]]] = []
        for shard_id, (owners, holders) in held.items():
            stats.checked += 1
            if holders is None:
                continue
            owner_ids = [o.id for o in owners]
            missing = [o for o in owners if o.id != me and o.id not in holders]
            if me in owner_ids:
                store.mark_owned(shard_id)
                leader = next(o for o in owner_ids if o == me or o in holders)
                if leader == me and missing:
                    jobs.append((shard_id, missing))
            elif not holders or leaving:
                if missing:
                    jobs.append((shard_id, missing))  # we may hold the only copy
            elif len(holders) >= len(owners):
                store.mark_cached(shard_id)
                stats.cached += 1
        gate = asyncio.Semaphore(PUSH_CONCURRENCY)

        async def push(shard_id: str, targets: list[Contact]) -> None:
            async with gate:
                await self._push(shard_id, targets, stats)

        await asyncio.gather(*(push(i, t) for i, t in jobs))

    async def _push(
        self, shard_id: str, targets: list[Contact], stats: RepairStats
    ) -> None:
        store = self.peer.store
        size = store.size(shard_id) if shard_id in store else 0
        try:
            data = await store.read(shard_id)
        except (P2PShardError, OSError) as exc:
            log.warning("cannot read shard %s for repair: %s", shard_id, exc)
            stats.failed += len(targets)
            if isinstance(exc, HashMismatchError):  # quarantined: get a good copy
                await self.pull([(shard_id, size)])
            return
        for target in targets:
            await self.limit.take(len(data))
            try:
                await self.peer.transfer.put(target, shard_id, data)
            except NET_ERRORS as exc:
                log.debug("push of %s to %s failed: %s", shard_id, target.address, exc)
                stats.failed += 1
                continue
            stats.pushed += 1
            stats.bytes_pushed += len(data)
            stats.pushes[target.address] = stats.pushes.get(target.address, 0) + len(
                data
            )

    async def republish_records(self) -> int:
        count = 0
        for record in self.peer.records.all():
            try:
                await self.peer.dht.put_record(record)
                count += 1
            except NET_ERRORS as exc:
                log.debug("republishing %s failed: %s", record.name, exc)
        return count

    # --- pulling copies back ----------------------------------------------

    async def pull(self, wanted: Sequence[tuple[str, int]]) -> int:
        """Fetch shards this peer should hold from their other holders.

        Used for read repair (a loader found an owner without its copy) and
        after a corrupt file was quarantined. Returns the shards fetched.
        """
        store = self.peer.store
        wanted = [(i, n) for i, n in wanted if i not in store]
        if not wanted:
            return 0
        view = await self.peer.dht.crawl()
        me = self.peer.dht.node.id
        fetched = 0
        for shard_id, size in wanted:
            others = [c for c in owners_of(shard_id, view, len(view)) if c.id != me]
            holders = others[: self.settings.replicas + 2]

            async def one(
                shard_id: str = shard_id,
                size: int = size,
                holders: list[Contact] = holders,
            ) -> None:
                await self.limit.take(size)
                data = await self.peer.transfer.fetch_bytes(shard_id, size, holders)
                await store.put(shard_id, data)

            try:
                await store.single_flight(shard_id, one)
                fetched += 1
                self.pulled += 1
                self.pull_done.set()
            except NET_ERRORS as exc:
                log.warning("could not fetch shard %s back: %s", shard_id, exc)
        return fetched

    async def recheck(self, ids: Sequence[str]) -> int:
        """Hash these held shards again now; fetch good copies of bad ones.
        Returns how many were bad."""
        store = self.peer.store
        bad = []
        for shard_id in ids:
            if shard_id in store:
                size = store.size(shard_id)
                if not await store.check(shard_id):
                    bad.append((shard_id, size))
        if bad:
            log.warning("%d shards were corrupt; fetching them again", len(bad))
            self.peer.scrub_failures += len(bad)
            await self.pull(bad)
        return len(bad)

    async def scrub(self) -> None:
        """Re-hash every held shard, forever, at ``scrub_rate`` bytes per second."""
        while True:
            if not await self.scrub_once():
                await asyncio.sleep(self.settings.repair_interval)  # nothing held

    async def scrub_once(self, rate: float | None = None) -> int:
        """Re-hash each held shard once; a corrupt one is quarantined and fetched
        again from a replica. Returns how many shards were checked."""
        rate = self.settings.scrub_rate if rate is None else rate
        store = self.peer.store
        checked = 0
        for shard_id in store.ids():
            if shard_id not in store:
                continue
            size = store.size(shard_id)
            checked += 1
            if not await store.check(shard_id):
                log.warning("scrub: shard %s is corrupt; fetching it again", shard_id)
                self.peer.scrub_failures += 1
                await self.pull([(shard_id, size)])
            if rate > 0:
                await asyncio.sleep(size / rate)
        return checked

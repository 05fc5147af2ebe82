"""The Kademlia layer: who owns a key, and where a model name points.

Built on the ``kademlia`` package's routing table (k-buckets, XOR distance) and
its ``Node`` type, with p2pshard's own datagram RPC and lookups because the
package's own fall short for this use:

- its RPC timeout is a fixed 5 s and every round that meets a dead peer waits
  it out; here the timeout comes from :class:`Settings`, a lookup keeps alpha
  queries in flight and stops counting a silent one against alpha after a few
  round trips, so dead peers never stall it, and lookups return only peers
  that answered (the package's crawl can re-admit a peer that failed);
- its ``find_neighbors`` returns the first k contacts it meets in bucket
  order, not the k closest; here it is exact;
- it drops a contact after one lost datagram, or never; here a peer that fails
  to answer is *suspect*: lookups skip it for a while, it is pinged once more
  at once, and it leaves the routing table after two failures in a row (a
  replacement from the bucket's cache takes its place);
- its hand-off to a newcomer measures distance to a key hashed twice; here a
  newcomer gets exactly the records it is now among the closest peers for,
  measured to the key each record is stored under;
- it spawns tasks it never owns and never cancels; here every task belongs to
  the :class:`Dht`, which cancels and awaits them on ``stop()``;
- it trusts any ``store`` and its local copy first, accepts values that do not
  fit a datagram, and keeps values in memory only; here only name records are
  stored, validated (before any RPC), versioned and persisted (see
  :mod:`p2pshard.records`), and reads ask the network;
- it binds 0.0.0.0 by default; here the caller names the interface.

The wire format is rpcudp's: ``0x00|0x01`` + 20-byte message id + msgpack.
A client joins in *client mode*: it sends an empty node id, so peers answer it
but never put it in their routing tables or make it own anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from kademlia.node import Node
from kademlia.routing import RoutingTable

from .errors import NetworkError, NoPeersError
from .hashing import KEY_BYTES, name_key
from .records import NameRecord, RecordError, RecordStore
from .settings import Settings

__all__ = ["Contact", "Dht", "parse_address", "rank_many"]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 8192
MAX_MEMBERS = 4096  # most peers a crawl collects
CRAWL_CONCURRENCY = 32  # find_node calls a crawl keeps in flight
MANY_KEYS = 8  # from this many keys on, owners come from one crawl, not lookups
VIEW_TTL = 10.0  # seconds a crawl of the swarm is reused
REQUEST, RESPONSE = b"\x00", b"\x01"
RPC_NAMES = frozenset({"ping", "find_node", "find_value", "store"})

SUSPECT_SECONDS = 30.0  # how long lookups skip a peer that failed to answer
MAX_SUSPECTS = 4096
EVICT_AFTER = 2  # failed calls in a row that remove a contact from the table
# A lookup query silent for 4 round trips (at least MIN_STALL s, at most
# STALL_FRACTION of rpc_timeout) stops counting against alpha.
STALL_FRACTION = 0.25
MIN_STALL = 0.05
LOOKUP_TIMEOUTS = 10  # a lookup returns what it has after this many rpc_timeouts
HANDOFF_CONCURRENCY = 8


@dataclass(frozen=True)
class Contact:
    """A peer of the swarm: its node id and the address of its UDP and HTTP."""

    id: bytes
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def address(self) -> str:
        return _host_port(self.host, self.port)

    def distance(self, key: bytes) -> int:
        return int.from_bytes(self.id, "big") ^ int.from_bytes(key, "big")

    @classmethod
    def of(cls, node: Node) -> Contact:
        return cls(node.id, node.ip, node.port)


def parse_address(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[v6]:PORT``) into a host and a port."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port_text)


class _Table(RoutingTable):
    """kademlia's routing table, with its one background ping owned by the Dht."""

    def get_bucket_for(self, node: Node) -> int:
        # Bucket ranges are inclusive at both ends; the package compares the
        # upper end with '<' and files an id equal to it in the next bucket.
        for index, bucket in enumerate(self.buckets):
            if node.long_id <= bucket.range[1]:
                return index
        return len(self.buckets) - 1

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """The ``k`` contacts closest to ``node``.

        The package walks buckets outward from the key's own and stops at the
        first k contacts it meets, most recently seen first: with fewer than
        k buckets' worth of contacts that is not the k closest.
        """
        nodes = (
            n
            for bucket in self.buckets
            for n in bucket.nodes.values()
            if n.id != node.id and (exclude is None or not n.same_home_as(exclude))
        )
        return heapq.nsmallest(k or self.ksize, nodes, key=node.distance_to)

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        # A full bucket splits if it covers our own id (section 4.2 of the paper);
        # otherwise the newcomer waits as a replacement while the oldest is pinged.
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.dht.spawn(self.protocol.dht.ping(Contact.of(bucket.head())))


class _Protocol(asyncio.DatagramProtocol):
    """Datagram RPC: requests are dispatched to ``Dht.handle_*``."""

    def __init__(self, dht: Dht) -> None:
        self.dht = dht
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[bytes, tuple[asyncio.Future[Any], tuple[str, int]]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) < 22 or len(data) > MAX_DATAGRAM:
            return
        kind, msg_id, body = data[:1], data[1:21], data[21:]
        try:
            payload = msgpack.unpackb(body, raw=False, max_bin_len=MAX_DATAGRAM)
        except Exception:  # any garbage from the network is dropped
            log.debug("undecodable datagram from %s", addr)
            return
        if kind == RESPONSE:
            self._answer(msg_id, payload, (addr[0], addr[1]))
        elif kind == REQUEST:
            self._serve(msg_id, payload, (addr[0], addr[1]))

    def _answer(self, msg_id: bytes, payload: Any, addr: tuple[str, int]) -> None:
        entry = self.pending.get(msg_id)
        if entry is None or entry[1] != addr:  # unknown id, or a forged sender
            return
        del self.pending[msg_id]
        if not entry[0].done():
            entry[0].set_result(payload)

    def _serve(self, msg_id: bytes, payload: Any, addr: tuple[str, int]) -> None:
        if not (isinstance(payload, list) and len(payload) == 2):
            return
        name, args = payload
        if name not in RPC_NAMES or not isinstance(args, list):
            return
        try:
            result = getattr(self.dht, f"handle_{name}")(addr, *args)
        except (TypeError, ValueError) as exc:
            log.debug("bad %s request from %s: %s", name, addr, exc)
            return
        reply = RESPONSE + msg_id + msgpack.packb(result, use_bin_type=True)
        if self.transport is not None and len(reply) <= MAX_DATAGRAM:
            self.transport.sendto(reply, addr)

    async def call(self, addr: tuple[str, int], name: str, *args: Any) -> Any:
        """Send one request and wait for its answer; None on timeout."""
        if self.transport is None or self.transport.is_closing():
            return None
        msg_id = os.urandom(20)
        data = REQUEST + msg_id + msgpack.packb([name, list(args)], use_bin_type=True)
        if len(data) > MAX_DATAGRAM:
            raise NetworkError(
                f"{name} request of {len(data)} bytes exceeds a datagram"
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = (future, addr)
        try:
            self.transport.sendto(data, addr)
            return await asyncio.wait_for(future, self.dht.settings.rpc_timeout)
        except (TimeoutError, OSError):
            return None
        finally:
            self.pending.pop(msg_id, None)


class Dht:
    """One member (or, with ``node_id=None``, one client) of the Kademlia DHT."""

    def __init__(
        self,
        settings: Settings,
        node_id: bytes | None = None,
        records: RecordStore | None = None,
    ) -> None:
        self.settings = settings
        self.is_peer = node_id is not None
        self.node = Node(node_id if node_id is not None else os.urandom(KEY_BYTES))
        self.records = records if records is not None else RecordStore(None)
        self.protocol = _Protocol(self)
        self.router = _Table(self.protocol, settings.dht_ksize, self.node)
        self.host = ""
        self.port = 0
        # Membership hooks: a peer seen for the first time, a peer that stopped
        # answering. A leaving peer no longer counts itself among the owners.
        self.on_contact: Callable[[Contact], None] | None = None
        self.on_lost: Callable[[Contact], None] | None = None
        self.leaving = False
        self._view: tuple[float, list[Contact]] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seeds: list[Node] = []
        # Peers that failed to answer: when they last failed, and how many
        # calls in a row; lookups skip them until they answer or time passes.
        self._suspects: dict[Contact, tuple[float, int]] = {}
        self._probes: dict[Contact, asyncio.Task[bool]] = {}
        self._srtt: float | None = None  # smoothed round trip of answered calls

    # --- lifecycle --------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Bind the UDP socket; returns the port bound."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: self.protocol, local_addr=(host, port), family=family
        )
        self.host = host
        self.port = transport.get_extra_info("sockname")[1]
        return self.port

    async def stop(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.close()
        for future, _ in list(self.protocol.pending.values()):
            future.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task owned by this Dht (cancelled on stop)."""
        return self._adopt(asyncio.get_running_loop().create_task(coro))

    def _adopt(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def wait_idle(self) -> None:
        """Wait until the background work running now (and what it starts) ends."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("dht task failed", exc_info=task.exception())

    @property
    def me(self) -> Contact | None:
        return Contact(self.node.id, self.host, self.port) if self.is_peer else None

    # --- outgoing calls ---------------------------------------------------

    @property
    def _my_id(self) -> bytes:
        return self.node.id if self.is_peer else b""

    async def _call(self, contact: Contact, name: str, *args: Any) -> Any:
        began = time.monotonic()
        result = await self.protocol.call((contact.host, contact.port), name, *args)
        if result is None:
            self._failed(contact)
            return None
        rtt = time.monotonic() - began
        self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
        self._welcome(Node(contact.id, contact.host, contact.port))
        return result

    @property
    def stall_after(self) -> float:
        """Seconds after which a lookup stops waiting on a silent query."""
        ceiling = STALL_FRACTION * self.settings.rpc_timeout
        if self._srtt is None:
            return ceiling
        return min(ceiling, max(MIN_STALL, 4 * self._srtt))

    async def find_node(self, contact: Contact, key: bytes) -> list[Contact] | None:
        """Ask one peer for the peers it knows closest to ``key``; None if silent.

        A suspect (a peer that just failed to answer) is not asked again.
        """
        if self.is_suspect(contact):
            return None
        answer = await self._call(contact, "find_node", self._my_id, key)
        if answer is None:
            return None
        return [Contact.of(n) for n in _parse_nodes(answer)]

    async def ping(self, contact: Contact) -> bool:
        return await self._call(contact, "ping", self._my_id) is not None

    # --- contacts that stop answering -----------------------------------

    def is_suspect(self, contact: Contact) -> bool:
        """True if ``contact`` failed to answer lately and has not answered since."""
        entry = self._suspects.get(contact)
        if entry is None:
            return False
        if time.monotonic() - entry[0] > SUSPECT_SECONDS:
            del self._suspects[contact]
            return False
        return True

    def _failed(self, contact: Contact) -> None:
        """A call got no answer: suspect the contact, probe it, evict on repeat.

        One lost datagram must not cost a good contact its place, and a dead
        one must not stay: the first failure starts one ping right away, the
        second failure in a row removes the contact from the routing table
        (kademlia then promotes the bucket's most recent replacement).
        """
        _, strikes = self._suspects.pop(contact, (0.0, 0))
        self._suspects[contact] = (time.monotonic(), strikes + 1)
        if len(self._suspects) > MAX_SUSPECTS:
            del self._suspects[next(iter(self._suspects))]
        node = Node(contact.id, contact.host, contact.port)
        known = self._in_table(node)
        if known and strikes + 1 >= EVICT_AFTER:
            self.router.remove_contact(node)
            log.debug("evicted %s after %d failed calls", contact.address, strikes + 1)
            if self.on_lost is not None:
                self.on_lost(contact)
        elif known and contact not in self._probes:
            self._probes[contact] = self.spawn(self._probe(contact))
        elif not known:  # never promote it from the bucket's replacement cache
            bucket = self.router.buckets[self.router.get_bucket_for(node)]
            waiting = bucket.replacement_nodes.get(node.id)
            if waiting is not None and waiting.same_home_as(node):
                del bucket.replacement_nodes[node.id]

    async def _probe(self, contact: Contact) -> bool:
        try:
            return await self.ping(contact)
        finally:
            self._probes.pop(contact, None)

    def _in_table(self, node: Node) -> bool:
        held = self.router.buckets[self.router.get_bucket_for(node)][node.id]
        return held is not None and held.same_home_as(node)

    async def check_contacts(self, nearest: int | None = None) -> int:
        """Ping every contact in the routing table, or only the ``nearest`` to
        this peer's id (the peers it shares shards with); one that fails twice
        is evicted (and ``on_lost`` told). Returns how many were evicted."""
        contacts = self.contacts()
        if nearest is not None:
            me = self._my_id
            contacts = heapq.nsmallest(nearest, contacts, key=lambda c: c.distance(me))
        before = {c.id for c in contacts}
        await asyncio.gather(*(self.ping(c) for c in contacts))
        probes = [self._probes[c] for c in contacts if c in self._probes]
        await asyncio.gather(*probes, return_exceptions=True)
        return len(before - {c.id for c in self.contacts()})

    async def bootstrap(self, addresses: Iterable[tuple[str, int]]) -> int:
        """Greet the given peers and fill the routing table; returns peers known.

        Raises NoPeersError when addresses were given and none answered.
        """
        addresses = list(addresses)
        seeds = await asyncio.gather(*(self._greet(a) for a in addresses))
        self._seeds = [s for s in seeds if s is not None]
        if addresses and not self._seeds:
            raise NoPeersError(
                "no bootstrap peer answered: "
                + ", ".join(_host_port(h, p) for h, p in addresses)
            )
        if self._seeds:
            await self.closest(self.node.id, self.settings.dht_ksize)
        return len(self.contacts())

    async def _greet(self, address: tuple[str, int]) -> Node | None:
        host, port = address
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_DGRAM
        )
        ip = infos[0][4][0]
        answer = await self.protocol.call((ip, port), "ping", self._my_id)
        if not isinstance(answer, bytes) or len(answer) != KEY_BYTES:
            return None
        node = Node(answer, ip, port)
        self._welcome(node)
        return node

    # --- lookups ----------------------------------------------------------

    async def closest(self, key: bytes, k: int) -> list[Contact]:
        """The ``k`` live peers closest to ``key``, nearest first.

        An iterative lookup that keeps only peers that answered in this lookup;
        a peer includes itself.
        """
        contacts, _ = await self.lookup(key, k)
        return contacts

    async def lookup(self, key: bytes, k: int) -> tuple[list[Contact], int]:
        """Like :meth:`closest`, also returning the hops it took: the longest
        chain of referrals, from this peer's own table, to a peer that answered."""
        return await _Lookup(self, key, k).run()

    async def closest_many(
        self, keys: Iterable[bytes], k: int, concurrency: int = 16
    ) -> dict[bytes, list[Contact]]:
        """Owners of many keys at once.

        A few keys are looked up one by one. For many, one crawl of the swarm
        (kept for ``VIEW_TTL`` seconds) gives every live peer, and each key's k
        closest are ranked locally: 1,000 keys cost about what one lookup does.
        """
        keys = list(dict.fromkeys(keys))
        if len(keys) < MANY_KEYS:
            gate = asyncio.Semaphore(concurrency)

            async def one(key: bytes) -> tuple[bytes, list[Contact]]:
                async with gate:
                    return key, await self.closest(key, k)

            return dict(await asyncio.gather(*(one(key) for key in keys)))
        return rank_many(await self.view(), keys, k)

    async def view(self, max_age: float = VIEW_TTL) -> list[Contact]:
        """Every live peer of the swarm, from a crawl at most ``max_age`` old."""
        loop = asyncio.get_running_loop()
        if self._view is None or loop.time() - self._view[0] > max_age:
            self._view = (loop.time(), await self.crawl())
        return [c for c in self._view[1] if not self.is_suspect(c)]

    async def crawl(self, limit: int = MAX_MEMBERS) -> list[Contact]:
        """Every live peer reachable from here (this peer included unless leaving).

        Asks each peer found for its neighbourhood and for a random region,
        until no new peer turns up; only peers that answered are returned.
        """
        me = self.me
        known: dict[bytes, Contact] = {c.id: c for c in self.contacts()}
        for node in self._seeds:
            known.setdefault(node.id, Contact.of(node))
        alive: dict[bytes, Contact] = {}
        if me is not None and not self.leaving:
            alive[me.id] = me
            known.pop(me.id, None)
        frontier = list(known.values())
        gate = asyncio.Semaphore(CRAWL_CONCURRENCY)  # no burst of datagrams

        async def ask(contact: Contact, key: bytes) -> list[Contact] | None:
            async with gate:
                return await self.find_node(contact, key)

        while frontier and len(known) < limit:
            asked, frontier = frontier, []
            answers = await asyncio.gather(
                *(ask(c, c.id) for c in asked),
                *(ask(c, os.urandom(KEY_BYTES)) for c in asked),
            )
            for contact, near, far in zip(asked, answers, answers[len(asked) :]):
                if near is None and far is None:
                    continue
                alive[contact.id] = contact
                for found in (near or []) + (far or []):
                    if found.id not in known and (me is None or found.id != me.id):
                        known[found.id] = found
                        frontier.append(found)
        members = list(alive.values())
        self._view = (asyncio.get_running_loop().time(), members)
        return members

    def contacts(self) -> list[Contact]:
        """Every peer in the routing table (not this peer itself)."""
        return [Contact.of(n) for b in self.router.buckets for n in b.get_nodes()]

    # --- name records -----------------------------------------------------

    async def put_record(self, record: NameRecord) -> int:
        """Store a record on the peers closest to its name; returns how many keep it.

        The record is checked before any RPC: RecordError at once for anything
        that is not a valid NameRecord fitting a datagram. RecordError too when
        every holder that answered refused it (they hold a newer version);
        NetworkError when none answered.
        """
        data = _encode_record(record)
        key = name_key(record.name)
        holders = await self.closest(key, self.settings.record_replicas)
        answers = await asyncio.gather(*(self._store_on(c, key, data) for c in holders))
        kept = sum(1 for a in answers if a is True)
        refused = sum(1 for a in answers if a is False)
        if not kept and refused:
            raise RecordError(
                f"record of {record.name!r} version {record.version} refused by "
                f"{refused} peers: they hold a newer one"
            )
        if not kept:
            raise NetworkError(
                f"no peer answered to store the record of {record.name!r}"
            )
        return kept

    async def _store_on(self, contact: Contact, key: bytes, data: bytes) -> bool | None:
        """True if the peer keeps the record, False if it refused, None if silent."""
        if self.is_peer and contact.id == self.node.id:
            try:
                return self.records.offer(key, data)
            except RecordError as exc:
                log.debug("refused own record: %s", exc)
                return False
        answer = await self._call(contact, "store", self._my_id, key, data)
        return None if answer is None else answer is True

    async def get_record(self, name: str) -> NameRecord | None:
        """The newest record of ``name`` among the peers closest to its key.

        Holders found with an older record (or none) are brought up to date in
        the background, so readers repair the record as they go.
        """
        key = name_key(name)
        holders = await self.closest(key, self.settings.record_replicas)
        answers = await asyncio.gather(*(self._fetch_record(c, key) for c in holders))
        found = [r for r in answers if r is not None]
        if not found:
            return None
        best = max(found, key=lambda r: r.rank)
        stale = [c for c, r in zip(holders, answers) if r is None or r.rank < best.rank]
        for contact in stale:
            self.spawn(self._store_on(contact, key, best.encode()))
        return best

    async def _fetch_record(self, contact: Contact, key: bytes) -> NameRecord | None:
        if self.is_peer and contact.id == self.node.id:
            return self.records.get(key)
        answer = await self._call(contact, "find_value", self._my_id, key)
        if not isinstance(answer, dict) or "value" not in answer:
            return None
        try:
            record = NameRecord.decode(answer["value"])
        except RecordError as exc:
            log.debug("bad record from %s: %s", contact.address, exc)
            return None
        return record if name_key(record.name) == key else None

    # --- incoming calls ---------------------------------------------------

    def _welcome(self, node: Node) -> None:
        """A peer answered or called us: it is alive, and maybe new."""
        if node.id == self.node.id:
            return
        self._suspects.pop(Contact.of(node), None)
        is_new = self.router.is_new_node(node)
        if self.is_peer:
            for other in self.router.find_neighbors(node, self.settings.dht_ksize):
                if other.same_home_as(node) and other.id != node.id:
                    self.router.remove_contact(other)  # the address changed hands
        self.router.add_contact(node)
        if is_new and self.is_peer:
            if self.records.all():
                self.spawn(self._hand_off(Contact.of(node)))
            if self.on_contact is not None:
                self.on_contact(Contact.of(node))

    async def _hand_off(self, newcomer: Contact) -> int:
        """Give a newly seen peer the records it is now among the closest peers
        for (section 2.5 of the Kademlia paper); returns how many it kept.

        Distances are measured to each record's own key, ``name_key(name)``,
        the digest it is stored under (the package hashes it once more). Only
        holders that are themselves among the closest send, so a record goes
        out at most ``record_replicas`` times.
        """
        replicas = self.settings.record_replicas
        due = []
        # TODO: this ranks every record held against the routing table, per
        # newcomer; with a very large record store it wants an index by key.
        for record in self.records.all():
            key = name_key(record.name)
            ranked = self._nearest_known(key, replicas + 1, newcomer)
            if newcomer in ranked[:replicas] and self.me in ranked:
                due.append((key, record.encode()))
        gate = asyncio.Semaphore(HANDOFF_CONCURRENCY)

        async def give(key: bytes, data: bytes) -> bool:
            async with gate:
                return await self._store_on(newcomer, key, data) is True

        kept = sum(await asyncio.gather(*(give(key, data) for key, data in due)))
        if due:
            log.debug("handed %d of %d records to %s", kept, len(due), newcomer.address)
        return kept

    def _nearest_known(self, key: bytes, n: int, extra: Contact) -> list[Contact]:
        """The ``n`` peers closest to ``key`` among this peer, its routing table
        and ``extra``."""
        found = {extra.id: extra}
        for node in self.router.find_neighbors(Node(key), n):
            found.setdefault(node.id, Contact.of(node))
        me = self.me
        if me is not None and not self.leaving:
            found[me.id] = me
        return sorted(found.values(), key=lambda c: c.distance(key))[:n]

    def _sender(self, addr: tuple[str, int], node_id: object) -> None:
        if not isinstance(node_id, bytes):
            raise TypeError("node id must be bytes")
        if len(node_id) == KEY_BYTES:
            self._welcome(Node(node_id, addr[0], addr[1]))
        elif node_id:
            raise ValueError("node id must be 20 bytes, or empty for a client")

    def handle_ping(self, addr: tuple[str, int], node_id: bytes) -> bytes:
        self._sender(addr, node_id)
        return self._my_id

    def handle_find_node(
        self, addr: tuple[str, int], node_id: bytes, key: bytes
    ) -> list[list[Any]]:
        _check_key(key)
        self._sender(addr, node_id)
        target = Node(key)
        neighbors = self.router.find_neighbors(target, self.settings.dht_ksize)
        return [
            [n.id, n.ip, n.port]
            for n in neighbors
            if (n.ip, n.port) != addr and n.id != node_id
        ]

    def handle_find_value(
        self, addr: tuple[str, int], node_id: bytes, key: bytes
    ) -> dict[str, bytes] | list[list[Any]]:
        record = self.records.get(key) if self.is_peer else None
        if record is None:
            return self.handle_find_node(addr, node_id, key)
        self._sender(addr, node_id)
        return {"value": record.encode()}

    def handle_store(
        self, addr: tuple[str, int], node_id: bytes, key: bytes, value: bytes
    ) -> bool:
        _check_key(key)
        self._sender(addr, node_id)
        if not self.is_peer:
            return False
        try:
            return self.records.offer(key, value)
        except RecordError as exc:
            log.debug("refused record from %s: %s", addr, exc)
            return False


class _Lookup:
    """One iterative node lookup (section 2.3 of the Kademlia paper).

    Instead of lock-step rounds of alpha queries, up to alpha queries are kept
    active: a new one starts as soon as one answers, and a query silent for a
    few round trips (``Dht.stall_after``) stops counting as active, so dead
    peers cost one timeout in parallel with the search, never one per round.
    The lookup ends when the k closest peers not known to have failed have all
    answered; queries still in flight then finish in the background, where
    their failures are remembered (see ``Dht._failed``). Suspects are skipped.
    """

    def __init__(self, dht: Dht, key: bytes, k: int) -> None:
        self.dht = dht
        self.key = key
        self.target = int.from_bytes(key, "big")
        self.k = k
        self.candidates: dict[bytes, tuple[Contact, int]] = {}  # id -> (contact, depth)
        self.alive: dict[bytes, Contact] = {}
        self.failed: set[bytes] = set()
        self.asked: set[bytes] = set()
        self.flights: dict[asyncio.Task[Any], tuple[Contact, int]] = {}
        self.sent: dict[bytes, float] = {}  # id -> when its query went out
        # A peer heard of at a second address while its first is still being
        # asked: if the first fails, the second is asked (it restarted elsewhere).
        self.moved: dict[bytes, tuple[Contact, int]] = {}
        self.hops = 0
        self.budget = 4 * k + 8 * dht.settings.dht_alpha  # queries at most

    async def run(self) -> tuple[list[Contact], int]:
        self._seed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOOKUP_TIMEOUTS * self.dht.settings.rpc_timeout
        try:
            while not self._converged() and loop.time() < deadline:
                wake = self._launch(loop.time())
                if not self.flights:
                    break  # out of budget, or nobody left to ask
                done, _ = await asyncio.wait(
                    self.flights,
                    timeout=max(0.0, min(wake, deadline) - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    self._land(task)
        finally:
            self._release()
        ranked = sorted(self.alive.values(), key=self._distance)[: self.k]
        return ranked, self.hops

    def _distance(self, contact: Contact) -> int:
        return int.from_bytes(contact.id, "big") ^ self.target

    def _seed(self) -> None:
        dht = self.dht
        for node in dht.router.find_neighbors(Node(self.key), dht.settings.dht_ksize):
            self._offer(Contact.of(node), 0)
        for node in dht._seeds:
            self._offer(Contact.of(node), 0)
        me = dht.me
        if me is not None and not dht.leaving:
            self.candidates[me.id] = (me, 0)
            self.alive[me.id] = me
            self.asked.add(me.id)

    def _offer(self, contact: Contact, depth: int) -> None:
        known = self.candidates.get(contact.id)
        if known is not None:
            if known[0] != contact:  # heard at another address: a moved peer?
                if contact.id in self.failed:
                    self._retry_at(contact, depth)
                else:
                    self.moved.setdefault(contact.id, (contact, depth))
            return
        if contact.id in self.failed:
            return
        if self.dht.is_peer and contact.id == self.dht.node.id:
            return  # never ask ourselves (a leaving peer is not a candidate)
        if self.dht.is_suspect(contact):
            self.failed.add(contact.id)
            return
        self.candidates[contact.id] = (contact, depth)

    def _retry_at(self, contact: Contact, depth: int) -> None:
        """Ask a peer that failed at one address again at another."""
        if self.dht.is_suspect(contact):
            return
        self.failed.discard(contact.id)
        self.asked.discard(contact.id)
        self.candidates[contact.id] = (contact, depth)

    def _ranked(self) -> list[Contact]:
        live = (c for c, _ in self.candidates.values() if c.id not in self.failed)
        return sorted(live, key=self._distance)

    def _converged(self) -> bool:
        return all(c.id in self.alive for c in self._ranked()[: self.k])

    def _launch(self, now: float) -> float:
        """Start queries until alpha are active; returns when to look again.

        Candidates are taken nearest first from the k closest, where a stalled
        query holds no place: while it may still answer, the search goes on
        past it.
        """
        stall = self.dht.stall_after
        active = [t0 for t0 in self.sent.values() if now - t0 < stall]
        places = 0
        for contact in self._ranked():
            sent = self.sent.get(contact.id)
            if places >= self.k:
                break
            if sent is not None and now - sent >= stall:
                continue
            places += 1
            if contact.id in self.asked:
                continue
            if len(active) >= self.dht.settings.dht_alpha or not self.budget:
                break
            self.asked.add(contact.id)
            self.budget -= 1
            call = self.dht._call(contact, "find_node", self.dht._my_id, self.key)
            task = asyncio.get_running_loop().create_task(call)
            self.flights[task] = (contact, self.candidates[contact.id][1])
            self.sent[contact.id] = now
            active.append(now)
        return min(active, default=now) + stall

    def _land(self, task: asyncio.Task[Any]) -> None:
        contact, depth = self.flights.pop(task)
        del self.sent[contact.id]
        answer = None if task.cancelled() or task.exception() else task.result()
        if answer is None:
            self.failed.add(contact.id)
            elsewhere = self.moved.pop(contact.id, None)
            if elsewhere is not None:
                self._retry_at(*elsewhere)
            return
        self.alive[contact.id] = contact
        self.hops = max(self.hops, depth + 1)
        for node in _parse_nodes(answer):
            self._offer(Contact.of(node), depth + 1)

    def _release(self) -> None:
        """Hand queries still in flight to the Dht: their answers or silences
        still teach the routing table, and stop() cancels them."""
        for task in self.flights:
            self.dht._adopt(task)
        self.flights.clear()


def _encode_record(record: object) -> bytes:
    """The wire bytes of a record, checked as a receiver would check them."""
    if not isinstance(record, NameRecord):
        raise RecordError(f"expected a NameRecord, got {type(record).__name__}")
    try:
        data = record.encode()
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack's refusals
        raise RecordError(
            f"record of {record.name!r} cannot be encoded: {exc}"
        ) from exc
    if NameRecord.decode(data) != record:  # RecordError if invalid or too large
        raise RecordError(f"record of {record.name!r} does not survive encoding")
    return data


def _check_key(key: object) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError("key must be 20 bytes")


def _parse_nodes(answer: object) -> list[Node]:
    """Nodes from a find_node answer; malformed entries are skipped."""
    nodes = []
    if not isinstance(answer, list):
        return nodes
    for entry in answer[:64]:
        with contextlib.suppress(TypeError, ValueError):
            node_id, ip, port = entry
            if not isinstance(node_id, bytes) or len(node_id) != KEY_BYTES:
                continue
            ipaddress.ip_address(ip)  # only literal addresses, never names
            if type(port) is int and 0 < port < 65536:
                nodes.append(Node(node_id, ip, port))
    return nodes


def rank_many(
    view: list[Contact], keys: list[bytes], k: int
) -> dict[bytes, list[Contact]]:
    """Each key's ``k`` closest peers of ``view`` by XOR distance, nearest first.

    Ranks on the top 64 bits of the distances at once with numpy; a row where
    those bits tie around the cut is ranked again exactly.
    """
    take = min(k, len(view))
    if not take:
        return {key: [] for key in keys}
    heads = np.array([int.from_bytes(c.id[:8], "big") for c in view], dtype=np.uint64)
    targets = np.array(
        [int.from_bytes(key[:8], "big") for key in keys], dtype=np.uint64
    )
    distances = targets[:, None] ^ heads[None, :]
    edge = min(take + 1, len(view))
    order = np.argpartition(distances, edge - 1, axis=1)[:, :edge]
    near = np.take_along_axis(distances, order, axis=1)
    within = np.argsort(near, axis=1, kind="stable")
    order = np.take_along_axis(order, within, axis=1)
    near = np.take_along_axis(near, within, axis=1)
    ties = (near[:, 1:] == near[:, :-1]).any(axis=1)
    result: dict[bytes, list[Contact]] = {}
    for key, row, tied in zip(keys, order[:, :take].tolist(), ties.tolist()):
        if tied:  # equal top 64 bits around the cut: rank this key exactly
            exact = sorted(view, key=lambda c, key=key: c.distance(key))
            result[key] = exact[:take]
        else:
            result[key] = [view[i] for i in row]
    return result


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""The Kademlia layer: who owns a key, and where a model name points.

Built on the ``kademlia`` package's routing table (k-buckets, XOR distance) and
its ``Node`` type, with p2pshard's own datagram RPC and lookups because the
package's own fall short for this use:

- its RPC timeout is a fixed 5 s and every round that meets a dead peer waits
  it out; here the timeout comes from :class:`Settings` and lookups return only
  peers that answered (the package's crawl can re-admit a peer that failed);
- it spawns tasks it never owns and never cancels; here every task belongs to
  the :class:`Dht`, which cancels and awaits them on ``stop()``;
- it trusts any ``store`` and its local copy first, accepts values that do not
  fit a datagram, and keeps values in memory only; here only name records are
  stored, validated, versioned and persisted (see :mod:`p2pshard.records`),
  and reads ask the network;
- it binds 0.0.0.0 by default; here the caller names the interface.

The wire format is rpcudp's: ``0x00|0x01`` + 20-byte message id + msgpack.
A client joins in *client mode*: it sends an empty node id, so peers answer it
but never put it in their routing tables or make it own anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
from kademlia.node import Node
from kademlia.routing import RoutingTable

from .errors import NetworkError, NoPeersError
from .hashing import KEY_BYTES, name_key
from .records import NameRecord, RecordError, RecordStore
from .settings import Settings

__all__ = ["Contact", "Dht", "parse_address"]

log = logging.getLogger(__name__)

MAX_DATAGRAM = 8192
REQUEST, RESPONSE = b"\x00", b"\x01"
RPC_NAMES = frozenset({"ping", "find_node", "find_value", "store"})


@dataclass(frozen=True)
class Contact:
    """A peer of the swarm: its node id and the address of its UDP and HTTP."""

    id: bytes
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

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
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seeds: list[Node] = []

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

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task owned by this Dht (cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

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
        result = await self.protocol.call((contact.host, contact.port), name, *args)
        node = Node(contact.id, contact.host, contact.port)
        if result is None:
            was_known = not self.router.is_new_node(node)
            self.router.remove_contact(node)
            if was_known and self.on_lost is not None:
                self.on_lost(contact)
        else:
            self._welcome(node)
        return result

    async def find_node(self, contact: Contact, key: bytes) -> list[Contact] | None:
        """Ask one peer for the peers it knows closest to ``key``; None if silent."""
        answer = await self._call(contact, "find_node", self._my_id, key)
        if answer is None:
            return None
        return [Contact.of(n) for n in _parse_nodes(answer)]

    async def ping(self, contact: Contact) -> bool:
        return await self._call(contact, "ping", self._my_id) is not None

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
                + ", ".join(f"{h}:{p}" for h, p in addresses)
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
        """Like :meth:`closest`, also returning the rounds (hops) it took."""
        target = Node(key)
        known: dict[bytes, Node] = {}
        for node in self.router.find_neighbors(target, self.settings.dht_ksize):
            known[node.id] = node
        for node in self._seeds:
            known.setdefault(node.id, node)
        alive: dict[bytes, Node] = {}
        if self.is_peer:
            known.pop(self.node.id, None)
            if not self.leaving:
                alive[self.node.id] = Node(self.node.id, self.host, self.port)
        failed: set[bytes] = set()
        hops = 0
        while True:
            ranked = sorted(
                (n for n in [*known.values(), *alive.values()] if n.id not in failed),
                key=target.distance_to,
            )
            todo = [n for n in ranked[:k] if n.id not in alive]
            if not todo:
                break
            hops += 1
            batch = todo[: self.settings.dht_alpha]
            answers = await asyncio.gather(
                *(
                    self._call(Contact.of(n), "find_node", self._my_id, key)
                    for n in batch
                )
            )
            for node, answer in zip(batch, answers):
                known.pop(node.id, None)
                if answer is None:
                    failed.add(node.id)
                    continue
                alive[node.id] = node
                for found in _parse_nodes(answer):
                    if found.id not in failed and found.id not in alive:
                        known.setdefault(found.id, found)
        ranked_alive = sorted(alive.values(), key=target.distance_to)[:k]
        return [Contact.of(n) for n in ranked_alive], hops

    async def closest_many(
        self, keys: Iterable[bytes], k: int, concurrency: int = 16
    ) -> dict[bytes, list[Contact]]:
        """Owners of many keys at once, looked up concurrently."""
        gate = asyncio.Semaphore(concurrency)

        async def one(key: bytes) -> tuple[bytes, list[Contact]]:
            async with gate:
                return key, await self.closest(key, k)

        return dict(await asyncio.gather(*(one(key) for key in set(keys))))

    def contacts(self) -> list[Contact]:
        """Every peer in the routing table (not this peer itself)."""
        return [Contact.of(n) for b in self.router.buckets for n in b.get_nodes()]

    # --- name records -----------------------------------------------------

    async def put_record(self, record: NameRecord) -> int:
        """Store a record on the peers closest to its name; returns acks."""
        key = name_key(record.name)
        data = record.encode()
        holders = await self.closest(key, self.settings.record_replicas)
        acks = await asyncio.gather(*(self._store_on(c, key, data) for c in holders))
        count = sum(acks)
        if not count:
            raise NetworkError(f"no peer accepted the record of {record.name!r}")
        return count

    async def _store_on(self, contact: Contact, key: bytes, data: bytes) -> bool:
        if self.is_peer and contact.id == self.node.id:
            return self.records.offer(key, data)
        return await self._call(contact, "store", self._my_id, key, data) is True

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
        if node.id == self.node.id:
            return
        is_new = self.router.is_new_node(node)
        if self.is_peer:
            for other in self.router.find_neighbors(node, self.settings.dht_ksize):
                if other.same_home_as(node) and other.id != node.id:
                    self.router.remove_contact(other)  # the address changed hands
        self.router.add_contact(node)
        if is_new and self.is_peer and self.on_contact is not None:
            self.on_contact(Contact.of(node))

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

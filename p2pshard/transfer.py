"""Moving shard bytes between peers over HTTP: verified fetch with failover.

Fetching. Each request for a shard body is a :class:`wire.Request` run in a
worker thread (see :mod:`p2pshard.wire` for why and for the response rules):
the body streams into its sink (:class:`MemorySink` receives straight into
memory, :class:`FileSink` through a small reused buffer) while it is hashed,
and only a body of exactly the right length that hashes to the shard id
counts. Holders are tried owners first, then by fewest faults, then fewest
bytes in flight, so requests spread over replicas and a faulty peer drifts
to the back (the loader's :mod:`p2pshard.schedule` picks the first one).
On a refused connection, an error status, a stall or a trickle, a short or
long body or wrong bytes, the shard goes to the next holder and the fault is
counted against the peer; a 404 ("not held") is no fault. A peer that served
wrong bytes is never asked for that shard again (:class:`Attempts` remembers
it across rounds). At most ``per_peer_connections`` requests run per peer;
waiting for one of those slots happens before the request's clocks start, so
a peer is blamed only for its own slowness. A cancelled fetch stops its
worker and waits until the worker has let go of the sink.

A retry is always a fresh request for the whole shard, never a Range request
for the rest: the bytes of a failed attempt are overwritten, so nothing from
a failed source is ever mixed into what is verified, and resuming would save
at most one shard's transfer per failure.

Uploads and the small JSON/msgpack requests go through aiohttp in the event
loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import numpy as np

from . import wire
from .dht import Contact
from .errors import ShardUnavailableError
from .memory import populate
from .schedule import MAX_IN_FLIGHT
from .server import REPLICATE_HEADER
from .settings import Settings
from .wire import BadBytes, NotHeld, PeerError, Sink

__all__ = [
    "Attempts",
    "FileSink",
    "MemorySink",
    "NotHeld",
    "PeerError",
    "Sink",
    "Transfer",
]

log = logging.getLogger(__name__)

BODY_CHUNK = 1024 * 1024


@dataclass
class Attempts:
    """What became of one shard's requests so far, across rounds of holders."""

    failures: dict[str, str] = field(default_factory=dict)  # address -> why
    bad: set[str] = field(default_factory=set)  # addresses that sent wrong bytes
    bad_ids: set[bytes] = field(default_factory=set)  # their node ids
    requests: int = 0
    not_held: list[Contact] = field(default_factory=list)  # asked, had no copy
    liars: list[Contact] = field(default_factory=list)  # sent bytes that failed

    def excluded(self, contact: Contact) -> bool:
        return contact.address in self.bad or contact.id in self.bad_ids

    def failed(self, contact: Contact, error: PeerError) -> None:
        self.failures[contact.address] = str(error) or type(error).__name__
        if isinstance(error, NotHeld):
            self.not_held.append(contact)
        if isinstance(error, BadBytes):
            self.liars.append(contact)
            self.bad.add(contact.address)
            self.bad_ids.add(contact.id)


class MemorySink:
    """Receive a shard straight into a writable byte buffer of its size."""

    def __init__(self, dest: memoryview | np.ndarray | bytearray) -> None:
        self.memory: memoryview | None = memoryview(dest).cast("B")

    def prepare(self) -> None:
        assert self.memory is not None
        populate(self.memory)

    def write(self, offset: int, piece: memoryview) -> None:
        assert self.memory is not None
        self.memory[offset : offset + len(piece)] = piece


class FileSink:
    """Write a shard at ``(fd, offset)`` of every place it appears."""

    memory: memoryview | None = None

    def __init__(self, places: Sequence[tuple[int, int]]) -> None:
        self.places = list(places)

    def prepare(self) -> None:
        pass

    def write(self, offset: int, piece: memoryview) -> None:
        for fd, base in self.places:
            done = 0
            while done < len(piece):
                done += os.pwrite(fd, piece[done:], base + offset + done)


class _ShardPayload(aiohttp.payload.Payload):
    """A request body sent from a buffer in slices, so flow control applies
    between slices and the buffer is never copied."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        super().__init__(view, content_type="application/octet-stream")
        self._size = len(view)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("shard bytes are binary")

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view: memoryview = self._value
        end = len(view) if content_length is None else min(len(view), content_length)
        for start in range(0, end, BODY_CHUNK):
            await writer.write(view[start : min(start + BODY_CHUNK, end)])


class Transfer:
    """An HTTP client to the swarm's peers; use as an async context manager.

    ``faults``, ``inflight`` (bytes), ``served`` (verified bytes) and
    ``received`` (body bytes read, good or bad) are kept per peer address.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.faults: dict[str, int] = defaultdict(int)
        self.inflight: dict[str, int] = defaultdict(int)
        self.served: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.limits = wire.Limits(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            min_rate=settings.min_rate,
            request_timeout=settings.request_timeout,
        )
        self.pool = wire.Pool(settings.per_peer_connections)
        self._session: aiohttp.ClientSession | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._running: set[wire.Request] = set()

    async def __aenter__(self) -> Transfer:
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=self.settings.per_peer_connections
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self.settings.request_timeout,
                sock_connect=self.settings.connect_timeout,
                sock_read=self.settings.read_timeout,
            ),
            auto_decompress=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop requests still running, close every connection, join the workers."""
        for request in list(self._running):
            request.abort()
        self.pool.close()
        workers, self._workers = self._workers, None
        if workers is not None:
            await asyncio.to_thread(workers.shutdown, True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Transfer used outside its async context")
        return self._session

    # --- fetching ---------------------------------------------------------

    def rank(
        self, holders: Sequence[Contact], owners: int | None = None
    ) -> list[Contact]:
        """Holders in the order to try them: the first ``owners`` of them (those
        expected to hold the shard; all by default) before the others, then
        fewest faults, then fewest bytes in flight."""
        owners = len(holders) if owners is None else owners
        ranked = sorted(
            enumerate(holders),
            key=lambda item: (
                item[0] >= owners,
                self.faults[item[1].address],
                self.inflight[item[1].address],
            ),
        )
        return [contact for _, contact in ranked]

    async def fetch(
        self,
        shard_id: str,
        size: int,
        holders: Sequence[Contact],
        sink: Sink,
        attempts: Attempts | None = None,
        owners: int | None = None,
        first: Contact | None = None,
    ) -> Contact:
        """Stream the shard's verified bytes into ``sink``; returns the peer used.

        Each holder is tried at most once: ``first`` if given, then the others
        in :meth:`rank` order, skipping those ``attempts`` excludes. Raises
        ShardUnavailableError when every holder failed (``attempts`` then
        tells how each failed).
        """
        attempts = attempts if attempts is not None else Attempts()
        order = self.rank(holders, owners)
        if first is not None:
            order = [first, *(c for c in order if c != first)]
        for contact in order:
            if attempts.excluded(contact):
                continue
            address = contact.address
            self.inflight[address] += size
            attempts.requests += 1
            try:
                await self._request(contact, shard_id, size, sink)
            except PeerError as exc:
                attempts.failed(contact, exc)
                if not isinstance(exc, NotHeld):
                    self.faults[address] += 1
                log.debug("shard %s from %s failed: %s", shard_id, address, exc)
                continue
            finally:
                self.inflight[address] -= size
            self.served[address] += size
            return contact
        raise ShardUnavailableError(shard_id, dict(attempts.failures))

    async def fetch_into(
        self, shard_id: str, holders: Sequence[Contact], dest: memoryview
    ) -> Contact:
        """Fill ``dest`` with the shard's verified bytes; returns the peer used."""
        return await self.fetch(shard_id, len(dest), holders, MemorySink(dest))

    async def fetch_bytes(
        self, shard_id: str, size: int, holders: Sequence[Contact]
    ) -> bytearray:
        buffer = bytearray(size)
        await self.fetch_into(shard_id, holders, memoryview(buffer))
        return buffer

    async def _request(
        self, contact: Contact, shard_id: str, size: int, sink: Sink
    ) -> None:
        address = (contact.host, contact.port)
        request = wire.Request(self.pool, address, shard_id, size, sink, self.limits)
        async with self._slot(contact.address):
            future = asyncio.wrap_future(self._submit(request))
            self._running.add(request)
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                request.abort()
                await _settle(future)
                raise
            finally:
                self._running.discard(request)
                self.received[contact.address] += request.received
                # An error raised here keeps this frame in its traceback; the
                # future holds that error (a cycle) and the request its sink.
                del future, request

    def _slot(self, address: str) -> asyncio.Semaphore:
        slot = self._slots.get(address)
        if slot is None:
            slot = self._slots[address] = asyncio.Semaphore(
                self.settings.per_peer_connections
            )
        return slot

    def _submit(self, request: wire.Request) -> Future[None]:
        if self._workers is None:
            self._workers = ThreadPoolExecutor(
                max_workers=max(self.settings.fetch_concurrency, MAX_IN_FLIGHT),
                thread_name_prefix="p2pshard-fetch",
            )
        return self._workers.submit(request.run)

    # --- storing ----------------------------------------------------------

    async def put(
        self,
        contact: Contact,
        shard_id: str,
        data: bytes | bytearray | memoryview,
        replicas: int = 0,
    ) -> bool:
        """Upload a shard to one peer; True if it was new there.

        ``replicas`` > 0 asks the peer to complete that many owners itself.
        Raises PeerError (or aiohttp/timeout errors) on failure.
        """
        headers = {}
        if replicas:
            headers[REPLICATE_HEADER] = str(replicas)
        url = f"{contact.url}/v1/shards/{shard_id}"
        payload = _ShardPayload(data)
        async with self.session.put(url, data=payload, headers=headers) as resp:
            text = await resp.text()
            if resp.status not in (200, 201):
                raise PeerError(f"HTTP {resp.status}: {text.strip()}")
            return resp.status == 201

    async def report_gaps(
        self, contact: Contact, gaps: Sequence[tuple[str, int]]
    ) -> None:
        """Tell an owner which of its shards it lacks; it fetches them itself."""
        body = msgpack.packb([[i, n] for i, n in gaps])
        await self._post_202(contact, "/v1/shards/fetch", body)

    async def report_bad(self, contact: Contact, ids: Sequence[str]) -> None:
        """Tell a peer it served bytes that failed their hash: it re-checks its
        copies, quarantines the bad ones and fetches good ones."""
        await self._post_202(contact, "/v1/shards/check", msgpack.packb(list(ids)))

    async def _post_202(self, contact: Contact, path: str, body: bytes) -> None:
        async with self.session.post(f"{contact.url}{path}", data=body) as resp:
            if resp.status != 202:
                raise PeerError(f"HTTP {resp.status}")

    async def has(self, contact: Contact, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` one peer holds (one batched request)."""
        url = f"{contact.url}/v1/shards/has"
        async with self.session.post(url, data=msgpack.packb(list(ids))) as resp:
            if resp.status != 200:
                raise PeerError(f"HTTP {resp.status}")
            held = msgpack.unpackb(await resp.read(), raw=False)
        if not isinstance(held, list):
            raise PeerError("malformed has answer")
        wanted = set(ids)
        return {i for i in held if isinstance(i, str) and i in wanted}

    async def get_json(self, contact: Contact, path: str) -> Any:
        async with self.session.get(f"{contact.url}{path}") as resp:
            if resp.status != 200:
                raise PeerError(f"HTTP {resp.status}")
            return await resp.json()

    async def get_msgpack(self, contact: Contact, path: str) -> Any:
        async with self.session.get(f"{contact.url}{path}") as resp:
            if resp.status != 200:
                raise PeerError(f"HTTP {resp.status}")
            return msgpack.unpackb(await resp.read(), raw=False)


async def _settle(future: asyncio.Future[None]) -> None:
    """Wait until a worker is done with its request, even if cancelled again
    meanwhile: it must have let go of the sink before the caller moves on."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: the caller raises its own error

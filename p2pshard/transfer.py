"""Moving shard bytes between peers over HTTP: verified fetch with failover.

A fetch streams the body straight into its destination buffer while hashing
it, so bytes are copied once, and only a body of exactly the right length that
hashes to the shard id counts. On a refused connection, an error status, a
stall longer than ``read_timeout``, a short or long body or a wrong hash, the
shard is retried on the next holder and the fault counted against the peer;
holders are tried in order of fewest faults, then fewest bytes in flight, so
load spreads over replicas and a bad peer drifts to the back.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgpack

from .dht import Contact
from .errors import HashMismatchError, ShardUnavailableError
from .hashing import Hasher
from .server import REPLICATE_HEADER
from .settings import Settings

__all__ = ["PeerError", "Transfer"]

log = logging.getLogger(__name__)

BODY_CHUNK = 1024 * 1024


class PeerError(Exception):
    """One peer failed one request; internal, turned into failover."""


class NotHeld(PeerError):
    """The peer answered that it does not hold the shard: no fault of its own."""


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
    """An HTTP client to the swarm's peers; use as an async context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.faults: dict[str, int] = defaultdict(int)
        self.inflight: dict[str, int] = defaultdict(int)
        self.served: dict[str, int] = defaultdict(int)  # bytes received per peer
        self._session: aiohttp.ClientSession | None = None

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
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Transfer used outside its async context")
        return self._session

    # --- fetching ---------------------------------------------------------

    def rank(self, holders: Sequence[Contact]) -> list[Contact]:
        """Holders in the order to try them: fewest faults, then least busy."""
        return sorted(
            holders, key=lambda c: (self.faults[c.address], self.inflight[c.address])
        )

    async def fetch_into(
        self, shard_id: str, holders: Sequence[Contact], dest: memoryview
    ) -> Contact:
        """Fill ``dest`` with the shard's verified bytes; returns the peer used.

        Raises ShardUnavailableError when every holder failed.
        """
        failures: dict[str, str] = {}
        for contact in self.rank(holders):
            self.inflight[contact.address] += len(dest)
            try:
                await self._get(contact, shard_id, dest)
            except (PeerError, aiohttp.ClientError, TimeoutError, OSError) as exc:
                failures[contact.address] = str(exc) or type(exc).__name__
                if not isinstance(exc, NotHeld):
                    self.faults[contact.address] += 1
                log.debug("shard %s from %s failed: %r", shard_id, contact.address, exc)
                continue
            finally:
                self.inflight[contact.address] -= len(dest)
            self.served[contact.address] += len(dest)
            return contact
        raise ShardUnavailableError(shard_id, failures)

    async def fetch_bytes(
        self, shard_id: str, size: int, holders: Sequence[Contact]
    ) -> bytearray:
        buffer = bytearray(size)
        await self.fetch_into(shard_id, holders, memoryview(buffer))
        return buffer

    async def _get(self, contact: Contact, shard_id: str, dest: memoryview) -> None:
        size = len(dest)
        url = f"{contact.url}/v1/shards/{shard_id}"
        hasher = Hasher(max_threads=1)
        async with self.session.get(url) as resp:
            if resp.status == 404:
                raise NotHeld("not held")
            if resp.status != 200:
                raise PeerError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length != size:
                raise PeerError(f"announced {resp.content_length} of {size} bytes")
            pos = 0
            async for chunk in resp.content.iter_chunked(BODY_CHUNK):
                end = pos + len(chunk)
                if end > size:
                    raise PeerError(f"body longer than {size} bytes")
                dest[pos:end] = chunk
                hasher.update(chunk)
                pos = end
        if pos != size:
            raise PeerError(f"short body: {pos} of {size} bytes")
        actual = hasher.hexdigest()
        if actual != shard_id:
            raise PeerError(str(HashMismatchError(shard_id, actual, contact.address)))

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

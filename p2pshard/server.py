"""The HTTP side of a peer: serves and accepts shard bytes.

Routes (ids are checked against one strict pattern before anything else runs):

- ``GET|HEAD /v1/shards/{id}``: the shard's bytes (Range supported, sendfile).
  A shard is hash-checked once before this process first serves it; a shard
  that fails is quarantined and answered 404, never served.
- ``PUT /v1/shards/{id}``: a streamed upload, hashed on the way in and committed
  only if it matches: 201 created, 200 already held, 400 wrong bytes or length,
  411 no length, 413 too large, 507 no room. ``X-P2PShard-Replicas: K`` asks the
  peer to complete the set of K owners itself, in the background.
- ``POST /v1/shards/has``: msgpack list of ids in, the subset held out.
- ``GET /v1/shards``: msgpack list of ``[id, size, cached]`` held (``cached``:
  no longer owned here, kept until room is needed).
- ``POST /v1/shards/fetch``: msgpack list of ``[id, size]`` this peer should
  hold but lacks (a loader found the gap): it fetches them from replicas.
- ``POST /v1/shards/check``: msgpack list of ids a loader got bad bytes for:
  they are hashed again, and a bad copy quarantined and fetched again.
- ``GET /v1/records``: name records held, as JSON; ``POST /v1/records``: one
  msgpack-encoded record to hold (kept only if valid and newer).
- ``GET /v1/status`` and ``GET /v1/peers``: JSON about this peer and its contacts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import TYPE_CHECKING, BinaryIO

import aiohttp
import msgpack
from aiohttp import hdrs, web, web_fileresponse
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import HttpProcessingError

from .errors import (
    HashMismatchError,
    ShardNotFoundError,
    ShardTooLargeError,
    StoreFullError,
)
from .hashing import ID_PATTERN, name_key
from .records import NameRecord, RecordError

if TYPE_CHECKING:
    from .peer import Peer

__all__ = ["REPLICATE_HEADER", "make_app"]

log = logging.getLogger(__name__)

REPLICATE_HEADER = "X-P2PShard-Replicas"
MAX_HAS_IDS = 100_000
BODY_CHUNK = 1024 * 1024
RANGE_PATTERN = re.compile(r"bytes=(\d{0,19})-(\d{0,19})", re.ASCII | re.IGNORECASE)

PEER_KEY = web.AppKey("peer", object)


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot even parse (a 100 kB URL, a broken
    header) at ERROR with a traceback, after answering 400. That is the remote
    side's mistake, not this peer's: one WARNING line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            what = record.getMessage()
            detail = str(error.message).splitlines()[0][:200] if error.message else ""
            record.msg, record.args = "%s (answered %d): %s", (what, error.code, detail)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


_MALFORMED = _MalformedRequests()


def make_app(peer: Peer) -> web.Application:
    server_log = logging.getLogger("aiohttp.server")
    if _MALFORMED not in server_log.filters:
        server_log.addFilter(_MALFORMED)
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[PEER_KEY] = peer
    app.router.add_get("/v1/shards/{id}", get_shard)  # also answers HEAD
    app.router.add_put("/v1/shards/{id}", put_shard)
    app.router.add_post("/v1/shards/has", has_shards)
    app.router.add_post("/v1/shards/fetch", fetch_shards)
    app.router.add_post("/v1/shards/check", check_shards)
    app.router.add_get("/v1/shards", list_shards)
    app.router.add_get("/v1/records", list_records)
    app.router.add_post("/v1/records", offer_record)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/peers", peers)
    return app


def _peer(request: web.Request) -> Peer:
    return request.app[PEER_KEY]  # type: ignore[return-value]


def _shard_id(request: web.Request) -> str:
    shard_id = request.match_info["id"]
    if not ID_PATTERN.fullmatch(shard_id):
        raise web.HTTPBadRequest(text="invalid shard id\n")
    return shard_id


async def get_shard(request: web.Request) -> web.StreamResponse:
    """A held shard's verified bytes, whole or one byte range (GET and HEAD).

    The bytes come from a file opened after the hash check and checked against
    the indexed size, nothing else: aiohttp's FileResponse would serve a
    ``.gz`` or ``.br`` file lying next to it instead, and answer conditional
    headers with 304 or 412. A shard's bytes never change, so conditional
    headers are ignored.
    """
    shard_id = _shard_id(request)
    handle, size = await _open_verified(_peer(request), shard_id)
    try:
        start, count = _byte_range(request.headers.get(hdrs.RANGE), size)
    except web.HTTPException:
        handle.close()
        raise
    partial = request.headers.get(hdrs.RANGE) is not None
    return _ShardBody(handle, start, count, size, partial)


async def _open_verified(peer: Peer, shard_id: str) -> tuple[BinaryIO, int]:
    """An open file of a held shard's verified bytes, and its size.

    A copy found corrupt, missing or resized is quarantined, answered 404, and
    fetched again from a replica in the background.
    """
    store = peer.store
    not_held = web.HTTPNotFound(text="shard not held\n")
    try:
        size = store.size(shard_id)
        path = await store.verified_path(shard_id)
        handle = await asyncio.to_thread(open, path, "rb")
    except ShardNotFoundError:  # never held, or dropped meanwhile
        raise not_held from None
    except HashMismatchError:
        log.warning("shard %s failed its hash check and was quarantined", shard_id)
        peer.spawn(peer.repairer.pull([(shard_id, size)]))
        raise not_held from None
    except FileNotFoundError:
        store.quarantine(shard_id)
        peer.spawn(peer.repairer.pull([(shard_id, size)]))
        raise not_held from None
    except OSError as exc:
        log.warning("shard %s cannot be read: %s", shard_id, exc)
        raise web.HTTPServiceUnavailable(text="shard unreadable\n") from None
    if os.fstat(handle.fileno()).st_size != size:  # changed since its check
        handle.close()
        log.warning("shard %s changed size on disk and was quarantined", shard_id)
        store.quarantine(shard_id)
        peer.spawn(peer.repairer.pull([(shard_id, size)]))
        raise not_held
    return handle, size


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """``(start, count)`` to serve for a Range header (RFC 9110, one range).

    No header: the whole shard. A last position past the end is clamped; an
    unsatisfiable, malformed or multi-range header is answered 416.
    """
    if header is None:
        return 0, size
    unsatisfiable = web.HTTPRequestRangeNotSatisfiable(
        headers={hdrs.CONTENT_RANGE: f"bytes */{size}"}, text="range not satisfiable\n"
    )
    match = RANGE_PATTERN.fullmatch(header.strip())
    if match is None:
        raise unsatisfiable
    first, last = match.groups()
    if not first:  # a suffix: the last N bytes
        if not last or int(last) == 0 or size == 0:
            raise unsatisfiable
        count = min(int(last), size)
        return size - count, count
    start = int(first)
    if start >= size or (last and int(last) < start):
        raise unsatisfiable
    end = min(int(last), size - 1) if last else size - 1
    return start, end - start + 1


class _ShardBody(web.StreamResponse):
    """Exactly ``count`` bytes of an open file from ``start``.

    Sent with the loop's sendfile, or read in chunks off the event loop when
    aiohttp's sendfile switch (the ``AIOHTTP_NOSENDFILE`` environment variable)
    is set. A file that ends early aborts the connection, so a body never falls
    short of its Content-Length silently.
    """

    def __init__(
        self, handle: BinaryIO, start: int, count: int, size: int, partial: bool
    ) -> None:
        super().__init__(status=206 if partial else 200)
        self._file = handle
        self._offset = start
        self._length = count
        self.content_type = "application/octet-stream"
        self.content_length = count
        self.headers[hdrs.ACCEPT_RANGES] = "bytes"
        if partial:
            end = start + count - 1
            self.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end}/{size}"

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        try:
            writer = await super().prepare(request)
            if writer is not None and self._length and request.method != hdrs.METH_HEAD:
                sent = await self._send(request)
                if sent != self._length:
                    raise ConnectionResetError(
                        f"shard file ended after {sent} of {self._length} bytes"
                    )
                await super().write_eof()
            return writer
        finally:
            self._file.close()

    async def _send(self, request: web.BaseRequest) -> int:
        if not web_fileresponse.NOSENDFILE:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            loop = asyncio.get_running_loop()
            return await loop.sendfile(
                transport, self._file, self._offset, self._length
            )
        fd, sent = self._file.fileno(), 0
        while sent < self._length:
            want = min(BODY_CHUNK, self._length - sent)
            chunk = await asyncio.to_thread(os.pread, fd, want, self._offset + sent)
            if not chunk:
                break
            await self.write(chunk)
            sent += len(chunk)
        return sent


async def put_shard(request: web.Request) -> web.Response:
    shard_id = _shard_id(request)
    peer = _peer(request)
    size = request.content_length
    if size is None:
        raise web.HTTPLengthRequired(text="Content-Length required\n")
    replicas = _replicas_header(request)
    try:
        created = await peer.store.put_stream(
            shard_id, size, request.content.iter_chunked(BODY_CHUNK)
        )
    except ShardTooLargeError as exc:
        raise web.HTTPRequestEntityTooLarge(
            max_size=exc.limit, actual_size=exc.size, text=f"{exc}\n"
        ) from None
    except StoreFullError as exc:
        raise web.HTTPInsufficientStorage(text=f"{exc}\n") from None
    except HashMismatchError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    except (ConnectionError, aiohttp.ClientPayloadError) as exc:
        # The uploader went away mid-body (a peer stopping, say): nothing was
        # stored, and there is no one left to answer.
        log.debug("upload of %s broke off: %r", shard_id, exc)
        raise web.HTTPBadRequest(text="upload broke off\n") from None
    if replicas:
        peer.replicate_later(shard_id, replicas)
    return web.Response(status=201 if created else 200)


def _replicas_header(request: web.Request) -> int:
    text = request.headers.get(REPLICATE_HEADER)
    if text is None:
        return 0
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise web.HTTPBadRequest(text=f"{REPLICATE_HEADER} must be 1..64\n")
    return int(text)


async def has_shards(request: web.Request) -> web.Response:
    store = _peer(request).store
    ids = await _msgpack_body(request)
    if not isinstance(ids, list) or len(ids) > MAX_HAS_IDS:
        raise web.HTTPBadRequest(text="body must be a msgpack list of ids\n")
    held = [i for i in ids if isinstance(i, str) and i in store]
    return web.Response(body=msgpack.packb(held), content_type="application/msgpack")


async def list_shards(request: web.Request) -> web.Response:
    store = _peer(request).store
    items = [[i, size, store.is_cached(i)] for i, size in store.items()]
    return web.Response(body=msgpack.packb(items), content_type="application/msgpack")


async def fetch_shards(request: web.Request) -> web.Response:
    peer = _peer(request)
    wanted = await _msgpack_body(request)
    if not isinstance(wanted, list) or len(wanted) > MAX_HAS_IDS:
        raise web.HTTPBadRequest(text="body must be a msgpack list of [id, size]\n")
    pulls = []
    for entry in wanted:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not ID_PATTERN.fullmatch(entry[0])
            or type(entry[1]) is not int
            or not 0 <= entry[1] <= peer.store.max_shard_size
        ):
            raise web.HTTPBadRequest(text="body must be a msgpack list of [id, size]\n")
        pulls.append((entry[0], entry[1]))
    if pulls:
        peer.spawn(peer.repairer.pull(pulls))
    return web.Response(status=202)


async def check_shards(request: web.Request) -> web.Response:
    """A loader got bad bytes from us: hash these copies again, in the
    background; a bad one is quarantined and fetched again from a replica."""
    peer = _peer(request)
    ids = await _msgpack_body(request)
    if not isinstance(ids, list) or len(ids) > MAX_HAS_IDS:
        raise web.HTTPBadRequest(text="body must be a msgpack list of ids\n")
    held = [i for i in ids if isinstance(i, str) and i in peer.store]
    if held:
        peer.spawn(peer.repairer.recheck(held))
    return web.Response(status=202)


async def offer_record(request: web.Request) -> web.Response:
    peer = _peer(request)
    data = await request.read()
    try:
        record = NameRecord.decode(data)
        kept = peer.records.offer(name_key(record.name), data)
    except RecordError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    return web.json_response({"kept": kept})


async def _msgpack_body(request: web.Request) -> object:
    try:
        return msgpack.unpackb(await request.read(), raw=False)
    except Exception:  # msgpack raises several unrelated types
        raise web.HTTPBadRequest(text="body must be msgpack\n") from None


async def list_records(request: web.Request) -> web.Response:
    records = [r.to_json() for r in _peer(request).dht.records.all()]
    return web.json_response(records)


async def status(request: web.Request) -> web.Response:
    return web.json_response(_peer(request).status())


async def peers(request: web.Request) -> web.Response:
    peer = _peer(request)
    contacts = [peer.dht.me, *peer.dht.contacts()]
    return web.json_response(
        [{"id": c.id.hex(), "host": c.host, "port": c.port} for c in contacts if c]
    )

"""The shard server's HTTP surface: ids, edge sizes, Range semantics, uploads.

Field cases transfer-edge-sizes and transfer-range-semantics (server side), each
building its own shards in a standalone peer on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web_fileresponse

from p2pshard import Peer
from p2pshard.dht import Contact
from p2pshard.hashing import hash_bytes
from p2pshard.transfer import Transfer

from .conftest import FAST, wait_for

MIB = 1024 * 1024
EMPTY_ID = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
# 4 GiB of zeros then these 17 bytes; the id was computed once, offline, because
# hashing 4 GiB takes about 10 s here (see test_range_beyond_4_gib).
HUGE_TAIL = b"0123456789abcdefg"
HUGE_SIZE = 4 * 1024**3 + len(HUGE_TAIL)
HUGE_ID = "094ff075b59655d58e9a31e1bcaa4e9553bd7be5dfedd27ab0a26a0782ee6c31"


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    peer = Peer(tmp_path / "peer", settings=FAST)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop(handoff=False)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as s:
        yield s


async def held(peer: Peer, data: bytes) -> str:
    shard_id = hash_bytes(data)
    await peer.store.put(shard_id, data)
    return shard_id


def url(peer: Peer, shard_id: str) -> str:
    return f"http://{peer.address}/v1/shards/{shard_id}"


async def get(
    http: aiohttp.ClientSession, target: str, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET; the body must match its length."""
    async with http.get(target, headers=headers) as resp:
        body = await resp.read()
        if resp.content_length is not None:
            assert len(body) == resp.content_length
        return resp.status, dict(resp.headers), body


# --- transfer-edge-sizes ----------------------------------------------------


async def test_empty_shard_is_served_and_verified(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    assert await held(peer, b"") == EMPTY_ID
    status, headers, body = await get(http, url(peer, EMPTY_ID))
    assert (status, headers["Content-Length"], body) == (200, "0", b"")
    async with http.head(url(peer, EMPTY_ID)) as resp:
        assert (resp.status, resp.headers["Content-Length"]) == (200, "0")
    async with Transfer(FAST) as transfer:
        contact = Contact(peer.node_id, peer.host, peer.port)
        assert await transfer.fetch_bytes(EMPTY_ID, 0, [contact]) == b""


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "nosendfile"])
async def test_first_100_bytes_on_both_paths(
    peer: Peer,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    sendfile: bool,
) -> None:
    data = os.urandom(MIB)
    shard_id = await held(peer, data)
    # aiohttp reads AIOHTTP_NOSENDFILE once, at import, into this constant.
    monkeypatch.setattr(web_fileresponse, "NOSENDFILE", not sendfile)
    loop = asyncio.get_running_loop()
    calls: list[tuple[int, int | None]] = []
    real_sendfile = loop.sendfile

    async def spy(transport: Any, file: Any, offset: int = 0, count: Any = None) -> Any:
        calls.append((offset, count))
        return await real_sendfile(transport, file, offset, count)

    monkeypatch.setattr(loop, "sendfile", spy)
    status, headers, body = await get(http, url(peer, shard_id), Range="bytes=0-99")
    assert status == 206
    assert headers["Content-Range"] == f"bytes 0-99/{MIB}"
    assert body == data[:100]
    assert calls == ([(0, 100)] if sendfile else [])
    # The whole shard too, on the same path.
    status, _, body = await get(http, url(peer, shard_id))
    assert (status, body) == (200, data)


async def test_range_beyond_4_gib(
    tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse 4 GiB + 17 byte shard, read from offset 2**32.

    Its hash check (10 s of reading zeros here) is stubbed for this one shard:
    the test is about offsets past 32 bits in the serving path, and the id is
    the real hash of the file, computed offline.
    """
    peer = Peer(tmp_path / "peer", settings=FAST)
    path = peer.store.path(HUGE_ID, HUGE_SIZE)
    path.parent.mkdir(parents=True)
    with open(path, "wb") as handle:
        handle.truncate(HUGE_SIZE - len(HUGE_TAIL))  # a hole: no disk used
        handle.seek(HUGE_SIZE - len(HUGE_TAIL))
        handle.write(HUGE_TAIL)
    real = peer.store.verified_path

    async def verified_path(shard_id: str) -> Path:
        return (
            peer.store.path(shard_id) if shard_id == HUGE_ID else await real(shard_id)
        )

    monkeypatch.setattr(peer.store, "verified_path", verified_path)
    await peer.start()
    try:
        assert HUGE_ID in peer.store
        status, headers, body = await get(
            http, url(peer, HUGE_ID), Range="bytes=4294967296-"
        )
        assert status == 206
        assert headers["Content-Range"] == "bytes 4294967296-4294967312/4294967313"
        assert headers["Content-Length"] == "17"
        assert body == HUGE_TAIL
        async with http.head(url(peer, HUGE_ID)) as resp:
            assert resp.headers["Content-Length"] == str(HUGE_SIZE)
    finally:
        await peer.stop(handoff=False)


# --- transfer-range-semantics ------------------------------------------------

SIZE_16 = 16 * MIB


@pytest.fixture
async def shard16(peer: Peer) -> tuple[str, bytes]:
    data = os.urandom(SIZE_16)
    return await held(peer, data), data


async def test_range_tail(
    peer: Peer, http: aiohttp.ClientSession, shard16: tuple[str, bytes]
) -> None:
    shard_id, data = shard16
    status, headers, body = await get(
        http, url(peer, shard_id), Range="bytes=10485760-"
    )
    assert status == 206
    assert headers["Content-Range"] == "bytes 10485760-16777215/16777216"
    assert len(body) == 6 * MIB and body == data[10485760:]


async def test_range_end_past_the_size_is_clamped(
    peer: Peer, http: aiohttp.ClientSession, shard16: tuple[str, bytes]
) -> None:
    shard_id, data = shard16
    status, headers, body = await get(
        http, url(peer, shard_id), Range="bytes=0-99999999"
    )
    assert status == 206
    assert headers["Content-Range"] == "bytes 0-16777215/16777216"
    assert body == data


@pytest.mark.parametrize("spec", ["bytes=20000000-", "bytes=8-3", "bytes=16777216-"])
async def test_unsatisfiable_ranges_are_416(
    peer: Peer, http: aiohttp.ClientSession, shard16: tuple[str, bytes], spec: str
) -> None:
    shard_id, _ = shard16
    status, headers, body = await get(http, url(peer, shard_id), Range=spec)
    assert status == 416
    assert headers["Content-Range"] == "bytes */16777216"
    assert len(body) < 1024  # never the shard's bytes


async def test_only_the_verified_file_is_served(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    """A stray compressed sibling next to a shard's file is never served."""
    data = os.urandom(4096)
    shard_id = await held(peer, data)
    path = peer.store.path(shard_id)
    for suffix in (".gz", ".br"):
        path.with_name(path.name + suffix).write_bytes(b"not the shard")
    status, headers, body = await get(
        http, url(peer, shard_id), **{"Accept-Encoding": "gzip, br"}
    )
    assert (status, body) == (200, data)
    assert "Content-Encoding" not in headers


async def test_conditional_headers_never_replace_the_body(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(4096)
    shard_id = await held(peer, data)
    status, headers, _ = await get(http, url(peer, shard_id))
    assert status == 200
    for name, value in (
        ("If-None-Match", headers.get("ETag", '"x"')),
        ("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT"),
        ("If-Match", '"something-else"'),
        ("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT"),
    ):
        status, _, body = await get(http, url(peer, shard_id), **{name: value})
        assert (status, body) == (200, data), name
    status, _, body = await get(
        http,
        url(peer, shard_id),
        Range="bytes=0-9",
        **{"If-Range": "Thu, 01 Jan 1970 00:00:00 GMT"},
    )
    assert (status, body) == (206, data[:10])


async def test_file_changed_after_its_check_is_never_served(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(100_000)
    shard_id = await held(peer, data)
    status, _, body = await get(http, url(peer, shard_id))
    assert (status, body) == (200, data)  # verified and served once
    path = peer.store.path(shard_id)
    path.write_bytes(data[:50_000])  # truncated behind the store's back
    status, _, body = await get(http, url(peer, shard_id))
    assert status == 404 and body != data[:50_000]
    assert shard_id not in peer.store  # quarantined
    assert not path.exists()


async def test_shard_dropped_while_being_opened_is_404(
    peer: Peer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An eviction racing a GET: never a 500."""
    data = os.urandom(10_000)
    shard_id = await held(peer, data)
    real = peer.store.verified_path

    async def then_evicted(wanted: str) -> Path:
        path = await real(wanted)
        peer.store.delete(wanted)
        return path

    monkeypatch.setattr(peer.store, "verified_path", then_evicted)
    status, _, _ = await get(http, url(peer, shard_id))
    assert status == 404
    monkeypatch.setattr(peer.store, "verified_path", real)
    status, _, _ = await get(http, url(peer, shard_id))
    assert status == 404


# --- ids, HEAD, uploads -----------------------------------------------------

VALID = "ab" * 32


@pytest.mark.parametrize(
    "raw",
    [
        VALID + "%0A",  # a valid id then a URL-encoded newline
        VALID + "%0D%0A",
        VALID[:-1],
        VALID + "0",
        VALID.upper(),
        "g" * 64,
        "%2E%2E%2F" + VALID[:58],
        VALID[:32] + "%00" + VALID[33:],
    ],
)
async def test_invalid_ids_are_400(
    peer: Peer, http: aiohttp.ClientSession, raw: str
) -> None:
    target = f"http://{peer.address}/v1/shards/{raw}"
    for method in ("GET", "HEAD", "PUT"):
        async with http.request(
            method, aiohttp.client.URL(target, encoded=True), data=b"x"
        ) as resp:
            assert resp.status == 400, (method, raw)


async def test_missing_shard_is_404(peer: Peer, http: aiohttp.ClientSession) -> None:
    status, _, _ = await get(http, url(peer, VALID))
    assert status == 404
    async with http.head(url(peer, VALID)) as resp:
        assert resp.status == 404


async def test_head_gives_the_size(peer: Peer, http: aiohttp.ClientSession) -> None:
    data = os.urandom(12345)
    shard_id = await held(peer, data)
    async with http.head(url(peer, shard_id)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == "12345"
        assert await resp.read() == b""


async def test_put_round_trip(peer: Peer, http: aiohttp.ClientSession) -> None:
    data = os.urandom(70_000)
    shard_id = hash_bytes(data)
    async with http.put(url(peer, shard_id), data=data) as resp:
        assert resp.status == 201
    async with http.put(url(peer, shard_id), data=data) as resp:
        assert resp.status == 200  # already held
    status, _, body = await get(http, url(peer, shard_id))
    assert (status, body) == (200, data)


def tmp_files(peer: Peer) -> list[Path]:
    return list((peer.store.root / "tmp").iterdir())


async def test_put_wrong_bytes_is_400_and_stores_nothing(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(70_000)
    shard_id = hash_bytes(data)
    wrong = bytearray(data)
    wrong[-1] ^= 1
    async with http.put(url(peer, shard_id), data=bytes(wrong)) as resp:
        assert resp.status == 400
    assert shard_id not in peer.store and not tmp_files(peer)
    assert not peer.store.path(shard_id, len(data)).exists()
    status, _, _ = await get(http, url(peer, shard_id))
    assert status == 404


async def test_put_without_length_is_411(
    peer: Peer, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(1000)
    shard_id = hash_bytes(data)

    async def chunked() -> AsyncIterator[bytes]:
        yield data

    async with http.put(url(peer, shard_id), data=chunked()) as resp:
        assert resp.status == 411
    assert shard_id not in peer.store and not tmp_files(peer)


async def test_put_too_large_is_413(peer: Peer, http: aiohttp.ClientSession) -> None:
    peer.store.max_shard_size = 4096
    data = os.urandom(4097)
    shard_id = hash_bytes(data)
    async with http.put(url(peer, shard_id), data=data) as resp:
        assert resp.status == 413
    assert shard_id not in peer.store and not tmp_files(peer)


async def test_put_short_body_stores_nothing(peer: Peer) -> None:
    """A Content-Length the body never reaches: nothing is committed."""
    data = os.urandom(5000)
    shard_id = hash_bytes(data)
    reader, writer = await asyncio.open_connection(peer.host, peer.port)
    try:
        writer.write(
            f"PUT /v1/shards/{shard_id} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:1000]
        )
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    await wait_for(lambda: not tmp_files(peer), 5)
    assert shard_id not in peer.store


async def test_unparseable_request_is_400_and_one_warning_line(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request aiohttp cannot parse is answered 400; the peer logs one
    warning line, no traceback, and goes on serving."""
    caplog.set_level(logging.WARNING)
    reader, writer = await asyncio.open_connection(peer.host, peer.port)
    try:
        writer.write(b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status.split()[1] == b"400"
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert records, "the bad request was not logged at all"
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in records)
    assert "answered 400" in records[0].getMessage()
    assert len(records[0].getMessage()) < 400
    data = os.urandom(100)
    shard_id = await held(peer, data)
    async with aiohttp.ClientSession() as http:
        assert (await get(http, url(peer, shard_id)))[2] == data

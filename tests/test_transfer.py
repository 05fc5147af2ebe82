"""The client side of shard transfer: field cases transfer-truncated-body,
transfer-repeat-bad-piece, transfer-slow-peers-pool, transfer-all-holders-gone and
transfer-provider-moved.

Each test builds its own inputs: fake peers (asyncio servers on 127.0.0.1, port
0) that misbehave byte by byte, and a fake DHT whose answers the test controls.
Timeouts are injected through Settings (read_timeout=0.3), never slept out.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest

from p2pshard import (
    LoadDeadlineError,
    LoadIncompleteError,
    ManifestError,
    Settings,
)
from p2pshard import loader as loader_module
from p2pshard.chunking import plan_tensors
from p2pshard.dht import Contact
from p2pshard.formats.safetensors import build_header
from p2pshard.hashing import hash_bytes, shard_key
from p2pshard.loader import Loader
from p2pshard.manifest import Chunk, FileEntry, Manifest
from p2pshard.transfer import FileSink, Transfer

from .conftest import Swarm

MIB = 1024 * 1024
QUICK = Settings(
    rpc_timeout=0.5,
    connect_timeout=1.0,
    read_timeout=0.3,
    min_rate=64 * 1024,
    request_timeout=20.0,
    relookup_rounds=0,
)

# --- fake peers ---------------------------------------------------------------

Mode = str  # how a fake peer answers one request; see FakePeer._answer


class FakePeer:
    """A shard server that answers each request the way ``mode`` says.

    ``mode`` is a mode name, or a function of (shard id, request number of this
    peer) returning one. ``requests`` lists (shard id, request head lines);
    ``sent`` counts body bytes written.
    """

    def __init__(
        self,
        shards: dict[str, bytes],
        mode: Mode | Callable[[str, int], Mode] = "ok",
        node_id: bytes | None = None,
        on_die: Callable[[FakePeer], None] | None = None,
    ) -> None:
        self.shards = shards
        self.mode = mode
        self.node_id = node_id or os.urandom(20)
        self.on_die = on_die
        self.requests: list[tuple[str, list[bytes]]] = []
        self.reports: list[bytes] = []  # POSTs a loader sent (read repair)
        self.sent = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._progress = asyncio.Condition()

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, "127.0.0.1", self.port)

    @property
    def address(self) -> str:
        return self.contact.address

    async def start(self) -> FakePeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _mode(self, shard_id: str) -> Mode:
        if callable(self.mode):
            return self.mode(shard_id, len(self.requests))
        return self.mode

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                if not lines[0].startswith(b"GET "):  # a loader's repair report
                    await self._accept_report(reader, writer, lines)
                    continue
                shard_id = lines[0].split(b" ")[1].rsplit(b"/", 1)[-1].decode()
                mode = self._mode(shard_id)
                self.requests.append((shard_id, lines[1:]))
                if not await self._answer(writer, shard_id, mode):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.transport.abort()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def _body(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        await self._send(writer, body)
        self.sent += len(body)
        async with self._progress:
            self._progress.notify_all()

    async def wait_sent(self, count: int) -> None:
        """Wait until this peer has sent ``count`` body bytes."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.sent >= count)

    async def _accept_report(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        lines: list[bytes],
    ) -> None:
        length = next(
            (
                int(x.split(b":")[1])
                for x in lines
                if x.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        self.reports.append(lines[0])
        writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def _answer(
        self, writer: asyncio.StreamWriter, shard_id: str, mode: Mode
    ) -> bool:
        """Answer one request; False when the connection must end."""
        data = self.shards.get(shard_id)
        if data is None or mode == "404":
            await self._send(writer, status(404, b"shard not held\n"))
            return True
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        part = data[: len(data) * 6 // 10]
        if mode == "ok":
            await self._send(writer, head)
            await self._body(writer, data)
            return True
        if mode in ("500", "503"):
            await self._send(writer, status(int(mode), b"boom\n"))
            return True
        if mode == "delay":  # a fair peer that takes its time to answer
            await asyncio.sleep(0.2)
            await self._send(writer, head)
            await self._body(writer, data)
            return True
        if mode in ("reset", "die"):
            await self._send(writer, head)
            await self._body(writer, part)
            reset(writer)
            if mode == "die":
                await self._die()
            return False
        if mode == "close":
            await self._send(writer, head)
            await self._body(writer, part)
            return False
        if mode == "nolength":
            await self._send(writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            await self._body(writer, part)
            return False
        if mode == "wrong":  # the same 1 MiB region wrong every time
            bad = bytearray(data)
            bad[MIB : 2 * MIB] = bytes(b ^ 0xFF for b in bad[MIB : 2 * MIB])
            await self._send(writer, head)
            await self._body(writer, bytes(bad))
            return True
        if mode == "long":  # announces and sends more than the shard
            longer = data + b"and more"
            await self._send(
                writer, head.replace(b"%d" % len(data), b"%d" % len(longer))
            )
            await self._body(writer, longer)
            return True
        if mode == "overflow":  # the right length announced, then extra bytes
            await self._send(writer, head)
            await self._body(writer, data + b"HTTP/1.1 200 OK\r\n\r\n")
            return True
        if mode == "announce-short":
            await self._send(
                writer, head.replace(b"%d" % len(data), b"%d" % (len(data) - 1))
            )
            await self._body(writer, data[:-1])
            return True
        if mode == "chunked":
            await self._send(
                writer, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            await self._body(writer, b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            return True
        if mode == "garbage":
            await self._send(writer, b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")
            return False
        if mode == "stall":  # headers, then silence
            await self._send(writer, head)
            await asyncio.Event().wait()
        if mode == "trickle":  # 1 KiB/s in pieces: never a long gap, just slow
            await self._send(writer, head)
            for start in range(0, len(data), 64):
                await self._body(writer, data[start : start + 64])
                await asyncio.sleep(1 / 16)
            return True
        raise AssertionError(f"unknown mode {mode}")

    async def _die(self) -> None:
        if self._server is not None:
            self._server.close()
        if self.on_die is not None:
            self.on_die(self)


def status(code: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (code, len(body), body)


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP reset, not a clean close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FakeDht:
    """Answers ``closest`` from a table the test edits: shard id -> holders."""

    def __init__(self) -> None:
        self.holders: dict[bytes, list[Contact]] = {}
        self.lookups = 0

    def set(self, shard_id: str, contacts: Iterable[Contact]) -> None:
        self.holders[shard_key(shard_id)] = list(contacts)

    async def closest(self, key: bytes, k: int) -> list[Contact]:
        self.lookups += 1
        return self.holders.get(key, [])[:k]

    async def closest_many(
        self, keys: Iterable[bytes], k: int
    ) -> dict[bytes, list[Contact]]:
        return {key: await self.closest(key, k) for key in keys}


@pytest.fixture
async def peers() -> AsyncIterator[Callable[..., FakePeer]]:
    """Make fake peers (``await make(...).start()``); all stopped at the end."""
    made: list[FakePeer] = []

    def make(*args: object, **kwargs: object) -> FakePeer:
        peer = FakePeer(*args, **kwargs)  # type: ignore[arg-type]
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        await asyncio.gather(*(p.stop() for p in made))


@pytest.fixture
async def transfer() -> AsyncIterator[Transfer]:
    async with Transfer(QUICK) as t:
        yield t
    assert not fetch_threads(), "worker threads outlived the transfer"


def fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("p2pshard-fetch")]


def shard(size: int, seed: int) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes()
    return hash_bytes(data), data


def model(
    sizes: list[int], shard_size: int = MIB
) -> tuple[Manifest, dict[str, bytes], dict[str, np.ndarray]]:
    """A manifest of one tensor per size, one shard per tensor."""
    rng = np.random.default_rng(sum(sizes))
    arrays = {
        f"t{i}": rng.integers(0, 256, size, np.uint8) for i, size in enumerate(sizes)
    }
    header, ordered = build_header(arrays)
    data = b"".join(a.tobytes() for a in ordered)
    ranges = plan_tensors(
        [(t.start, t.end) for t in header.tensors], header.data_size, shard_size
    )
    chunks = tuple(Chunk(hash_bytes(data[s:e]), e - s) for s, e in ranges)
    entry = FileEntry(
        "model.safetensors", header.data_offset + header.data_size, header, chunks
    )
    shards = {c.id: data[s:e] for c, (s, e) in zip(chunks, ranges)}
    return Manifest("arrays", shard_size, 2, (entry,)), shards, arrays


def same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(
        got[k].tobytes() == want[k].tobytes() for k in want
    )


# --- transfer-truncated-body ----------------------------------------------------


@pytest.mark.parametrize("mode", ["reset", "close", "nolength"])
async def test_truncated_body_is_fetched_again_from_the_next_replica(
    peers: Callable[..., FakePeer], transfer: Transfer, mode: str
) -> None:
    shard_id, data = shard(16 * MIB, 1)
    bad = await peers({shard_id: data}, mode).start()
    good = await peers({shard_id: data}).start()
    got = await transfer.fetch_bytes(shard_id, len(data), [bad.contact, good.contact])
    assert got == data
    assert bad.sent < len(data) and len(bad.requests) == 1
    assert transfer.faults[bad.address] == 1 and transfer.faults[good.address] == 0
    assert transfer.served == {good.address: len(data)}
    assert transfer.pool.active == 0


async def test_truncated_body_with_no_good_replica_names_shard_and_peers(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    manifest, shards, _ = model([16 * MIB], shard_size=16 * MIB)
    ((shard_id, _),) = shards.items()
    first = await peers(shards, "reset").start()
    second = await peers(shards, "close").start()
    dht = FakeDht()
    dht.set(shard_id, [first.contact, second.contact])
    loader = Loader(dht, transfer, QUICK)  # type: ignore[arg-type]
    with pytest.raises(LoadIncompleteError) as error:
        await loader.arrays(manifest)
    assert list(error.value.missing) == [shard_id]
    assert set(error.value.missing[shard_id]) == {first.address, second.address}
    text = str(error.value)
    assert shard_id in text and first.address in text and second.address in text
    assert transfer.pool.active == 0


@pytest.mark.parametrize(
    "mode", ["long", "announce-short", "chunked", "garbage", "wrong", "500", "stall"]
)
async def test_anything_but_exact_verified_bytes_fails_over(
    peers: Callable[..., FakePeer], transfer: Transfer, mode: str
) -> None:
    shard_id, data = shard(2 * MIB + 5, 2)
    bad = await peers({shard_id: data}, mode).start()
    good = await peers({shard_id: data}).start()
    began = time.monotonic()
    got = await transfer.fetch_bytes(shard_id, len(data), [bad.contact, good.contact])
    assert got == data
    assert transfer.faults[bad.address] == 1
    assert time.monotonic() - began < 5 * QUICK.read_timeout + 1.0
    assert transfer.pool.active == 0


async def test_not_held_is_no_fault_and_keeps_the_connection(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    shard_id, data = shard(1000, 3)
    other_id, other = shard(1000, 4)
    lacking = await peers({other_id: other}).start()
    good = await peers({shard_id: data}).start()
    got = await transfer.fetch_bytes(
        shard_id, len(data), [lacking.contact, good.contact]
    )
    assert got == data
    assert transfer.faults[lacking.address] == 0
    assert await transfer.fetch_bytes(other_id, len(other), [lacking.contact]) == other
    assert transfer.pool.idle() == 2  # the 404 left its connection reusable


async def test_bytes_after_the_announced_body_are_never_taken(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    shard_id, data = shard(MIB, 7)
    sloppy = await peers({shard_id: data}, "overflow").start()
    got = await transfer.fetch_bytes(shard_id, len(data), [sloppy.contact])
    assert got == data
    assert transfer.pool.active == 0


async def test_empty_shard_is_verified(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    empty = hash_bytes(b"")
    peer = await peers({empty: b""}).start()
    assert await transfer.fetch_bytes(empty, 0, [peer.contact]) == b""


async def test_a_local_disk_error_is_not_blamed_on_the_peer(
    peers: Callable[..., FakePeer], transfer: Transfer, tmp_path: Path
) -> None:
    shard_id, data = shard(300_000, 5)
    peer = await peers({shard_id: data}).start()
    fd = os.open(tmp_path / "out", os.O_RDONLY | os.O_CREAT)  # not writable
    try:
        with pytest.raises(OSError):
            await transfer.fetch(
                shard_id, len(data), [peer.contact], FileSink([(fd, 0)])
            )
    finally:
        os.close(fd)
    assert transfer.faults[peer.address] == 0
    assert transfer.pool.active == 0


# --- transfer-repeat-bad-piece --------------------------------------------------


async def test_a_peer_that_sent_a_bad_piece_is_not_asked_again(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    manifest, shards, arrays = model([8 * MIB], shard_size=8 * MIB)
    ((shard_id, data),) = shards.items()
    liar = await peers(shards, "wrong").start()
    # The honest replica is busy the first time: every holder fails round one.
    honest = await peers(shards, lambda _, n: "503" if n == 0 else "ok").start()
    dht = FakeDht()
    dht.set(shard_id, [liar.contact, honest.contact])
    settings = replace(QUICK, relookup_rounds=3)
    loader = Loader(dht, transfer, settings)  # type: ignore[arg-type]
    got = await loader.arrays(manifest)
    assert same(got, arrays)
    assert len(liar.requests) == 1 and len(honest.requests) == 2
    assert transfer.faults[liar.address] == 1
    fetched = sum(transfer.received.values())
    assert fetched <= 2 * len(data)  # the bad copy once and the good one: no more


def test_a_manifest_chunk_without_its_hash_is_refused() -> None:
    manifest, _, _ = model([1000, 2000], shard_size=1500)
    doc = msgpack.unpackb(manifest.encode(), raw=False)
    doc["files"][0]["chunks"][1] = [doc["files"][0]["chunks"][1][1]]  # size only
    with pytest.raises(ManifestError):
        Manifest.decode(msgpack.packb(doc, use_bin_type=True))
    doc["files"][0]["chunks"][1] = [None, 2000]
    with pytest.raises(ManifestError):
        Manifest.decode(msgpack.packb(doc, use_bin_type=True))


# --- transfer-slow-peers-pool ---------------------------------------------------


async def test_slow_peers_and_errors_do_not_stall_a_concurrent_load(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    manifest, shards, arrays = model([MIB] * 64)
    ids = list(shards)
    fast = [await peers(shards).start() for _ in range(3)]
    errors = {"left": 3}

    def three_errors(_: str, __: int) -> str:
        if errors["left"]:
            errors["left"] -= 1
            return "500"
        return "ok"

    flaky = await peers(shards, three_errors).start()
    slow = [await peers(shards, "trickle").start() for _ in range(2)]
    dht = FakeDht()
    for n, shard_id in enumerate(ids):
        # Slow peers hold every fourth shard, listed first; a fast peer too.
        first = [slow[n % 8 // 4].contact] if n % 4 == 0 else []
        dht.set(shard_id, [*first, flaky.contact, fast[n % 3].contact])
    settings = replace(QUICK, fetch_concurrency=8)
    loader = Loader(dht, transfer, settings)  # type: ignore[arg-type]
    began = time.monotonic()
    got = await loader.arrays(manifest)
    elapsed = time.monotonic() - began
    assert same(got, arrays)
    assert elapsed < 10.0  # each trickle costs about one read_timeout window
    assert errors["left"] == 0
    assert transfer.pool.active == 0
    assert transfer.faults[flaky.address] == 3
    assert all(transfer.faults[p.address] >= 1 for p in slow)
    assert all(transfer.faults[p.address] == 0 for p in fast)


async def test_waiting_for_a_local_connection_is_not_blamed_on_the_peer(
    peers: Callable[..., FakePeer],
) -> None:
    manifest, shards, arrays = model([100_000] * 8, shard_size=100_000)
    patient = await peers(shards, "delay").start()  # 0.2 s per answer
    dht = FakeDht()
    for shard_id in shards:
        dht.set(shard_id, [patient.contact])
    # One connection, eight requests at once: the last waits 1.4 s for it,
    # far beyond read_timeout, yet the peer answered each in time.
    settings = replace(QUICK, per_peer_connections=1, fetch_concurrency=8)
    async with Transfer(settings) as transfer:
        got = await Loader(dht, transfer, settings).arrays(manifest)  # type: ignore[arg-type]
        assert transfer.faults[patient.address] == 0
        assert transfer.pool.active == 0
    assert same(got, arrays)
    assert len(patient.requests) == 8


async def test_a_cancelled_load_releases_threads_and_connections(
    peers: Callable[..., FakePeer],
) -> None:
    manifest, shards, _ = model([MIB] * 4)
    slow = await peers(shards, "trickle").start()
    dht = FakeDht()
    for shard_id in shards:
        dht.set(shard_id, [slow.contact])
    settings = replace(QUICK, read_timeout=30.0, min_rate=1.0)
    async with Transfer(settings) as transfer:
        loader = Loader(dht, transfer, settings)  # type: ignore[arg-type]
        task = asyncio.create_task(loader.arrays(manifest))
        await slow.wait_sent(4 * 64)  # every request is streaming
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert transfer.pool.active == 0
        assert not transfer._running
        assert transfer.faults[slow.address] == 0
    assert not fetch_threads()


async def test_a_straggler_is_duplicated_on_an_idle_owner_at_the_end(
    peers: Callable[..., FakePeer],
) -> None:
    manifest, shards, arrays = model([MIB, MIB])
    first, second = shards
    slow = await peers(shards, "trickle").start()  # 1 KiB/s: 17 min for 1 MiB
    fast = await peers(shards).start()
    dht = FakeDht()
    dht.set(first, [slow.contact, fast.contact])
    dht.set(second, [fast.contact, slow.contact])
    settings = replace(QUICK, read_timeout=30.0, min_rate=1.0, per_peer_connections=1)
    async with Transfer(settings) as transfer:
        began = time.monotonic()
        got = await Loader(dht, transfer, settings).arrays(manifest)  # type: ignore[arg-type]
        assert time.monotonic() - began < 3.0
        assert transfer.pool.active == 0
        assert transfer.faults[slow.address] == 0  # abandoned, not blamed
    assert same(got, arrays)
    assert [i for i, _ in slow.requests] == [first]
    assert [i for i, _ in fast.requests] == [second, first]


# --- transfer-all-holders-gone --------------------------------------------------


async def test_all_holders_gone_fails_at_the_deadline_naming_every_shard(
    peers: Callable[..., FakePeer], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, shards, _ = model([MIB] * 4)
    ids = list(shards)
    alive = await peers(shards).start()
    gone = [await peers(shards).start() for _ in range(3)]
    dht = FakeDht()
    for n, shard_id in enumerate(ids):
        # shards 2 and 4 (ids[1], ids[3]) live only on the peers that stop
        dht.set(shard_id, [p.contact for p in gone] if n % 2 else [alive.contact])
    for peer in gone:
        await peer.stop()
    buffers: list[weakref.ref[np.ndarray]] = []
    fresh = loader_module._fresh_buffer

    def tracked(size: int) -> np.ndarray:
        buffer = fresh(size)
        buffers.append(weakref.ref(buffer))
        return buffer

    monkeypatch.setattr(loader_module, "_fresh_buffer", tracked)
    settings = replace(QUICK, load_deadline=5.0)
    async with Transfer(settings) as transfer:
        loader = Loader(dht, transfer, settings)  # type: ignore[arg-type]
        began = time.monotonic()
        with pytest.raises(LoadDeadlineError) as error:
            await loader.arrays(manifest)
        elapsed = time.monotonic() - began
        assert transfer.pool.active == 0
    assert 5.0 <= elapsed < 5.0 + 1.0
    assert set(error.value.missing) == {ids[1], ids[3]}
    for shard_id in (ids[1], ids[3]):
        assert set(error.value.missing[shard_id]) == {p.address for p in gone}
        assert shard_id in str(error.value)
    assert isinstance(error.value, TimeoutError)
    assert buffers and all(ref() is None for ref in buffers)  # freed already


async def test_a_new_holder_that_appears_later_serves_a_fresh_request(
    peers: Callable[..., FakePeer],
) -> None:
    manifest, shards, arrays = model([MIB] * 4)
    ids = list(shards)
    others = {i: d for i, d in shards.items() if i != ids[1]}
    dht = FakeDht()
    loop = asyncio.get_running_loop()
    newcomer = peers(shards)
    appeared: list[float] = []

    def appear_later(_: FakePeer) -> None:
        async def start() -> None:
            await newcomer.start()
            dht.set(ids[1], [newcomer.contact])
            appeared.append(time.monotonic())

        loop.call_later(1.0, lambda: tasks.add(loop.create_task(start())))

    tasks: set[asyncio.Task[None]] = set()
    dying = await peers(shards, "die", on_die=appear_later).start()
    rest = await peers(others).start()
    for shard_id in ids:
        dht.set(shard_id, [dying.contact] if shard_id == ids[1] else [rest.contact])
    settings = replace(QUICK, load_deadline=5.0)
    async with Transfer(settings) as transfer:
        got = await Loader(dht, transfer, settings).arrays(manifest)  # type: ignore[arg-type]
    await asyncio.gather(*tasks)
    assert same(got, arrays)
    assert appeared and 0 < dying.sent < len(shards[ids[1]])
    assert [i for i, _ in newcomer.requests] == [ids[1]]
    _, head = newcomer.requests[0]
    assert not any(line.lower().startswith(b"range:") for line in head)


# --- transfer-provider-moved ----------------------------------------------------


async def test_the_only_holder_moves_to_a_new_port_and_is_found_again(
    peers: Callable[..., FakePeer],
) -> None:
    manifest, shards, arrays = model([4 * MIB], shard_size=4 * MIB)
    ((shard_id, _),) = shards.items()
    dht = FakeDht()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    moved = peers(shards)  # the same peer (same node id) once it restarted

    def restart(old: FakePeer) -> None:
        async def start() -> None:
            moved.node_id = old.node_id
            await moved.start()
            dht.set(shard_id, [moved.contact])

        tasks.add(loop.create_task(start()))

    before = await peers(shards, "die", on_die=restart).start()
    dht.set(shard_id, [before.contact])
    settings = replace(QUICK, relookup_rounds=3)
    async with Transfer(settings) as transfer:
        began = time.monotonic()
        got = await Loader(dht, transfer, settings).arrays(manifest)  # type: ignore[arg-type]
        assert time.monotonic() - began < 3.0
    await asyncio.gather(*tasks)
    assert same(got, arrays)
    assert moved.port != before.port and len(moved.requests) == 1
    assert dht.lookups >= 2  # the first lookup, then again after the failure


async def test_a_source_that_goes_silent_is_abandoned_by_the_watchdog(
    peers: Callable[..., FakePeer], transfer: Transfer
) -> None:
    shard_id, data = shard(MIB, 6)
    silent = await peers({shard_id: data}, "stall").start()
    good = await peers({shard_id: data}).start()
    began = time.monotonic()
    got = await transfer.fetch_bytes(
        shard_id, len(data), [silent.contact, good.contact]
    )
    assert got == data
    assert QUICK.read_timeout <= time.monotonic() - began < QUICK.read_timeout + 1.0
    assert transfer.faults[silent.address] == 1


async def test_a_restarted_peer_on_a_new_port_is_found_through_the_dht(
    swarm: Swarm, tmp_path: Path
) -> None:
    swarm.settings = replace(swarm.settings, replicas=1, read_timeout=0.5)
    await swarm.grow(4)
    rng = np.random.default_rng(8)
    arrays = {f"w{i}": rng.standard_normal(16384, dtype=np.float32) for i in range(8)}
    async with swarm.client(relookup_rounds=3) as client:
        await client.publish(arrays, "case/moved")
        manifest = await client.manifest("case/moved")
        holder = next(
            p for p in swarm.peers[2:] if any(i in p.store for i in manifest.shards())
        )
        old_port, data_dir = holder.port, holder.data_dir
        await swarm.stop(holder)
        again = await swarm.add(data_dir)  # same node id, new port
        assert again.port != old_port
        # The client still knows the old address; the load must find the new one.
        got = await client.load("case/moved")
    assert same(got, arrays)

"""Tests of the on-disk shard store: atomic writes, start-up scan, hash checks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import numpy as np
import pytest

import p2pshard.store as store_module
from p2pshard.errors import (
    HashMismatchError,
    InvalidIdError,
    ShardNotFoundError,
    ShardTooLargeError,
    StoreError,
    StoreFullError,
)
from p2pshard.hashing import hash_bytes
from p2pshard.store import ShardStore

MiB = 1024 * 1024
PIECE = 256 * 1024


def make_shard(size: int, seed: int) -> tuple[str, bytes]:
    data = np.random.default_rng(seed).bytes(size)
    return hash_bytes(data), data


def files(root: Path, sub: str) -> list[Path]:
    return sorted(p for p in (root / sub).rglob("*") if p.is_file())


def assert_clean(root: Path) -> None:
    """No write left a temp file behind."""
    assert files(root, "tmp") == []


def opened(root: Path, **kwargs: int) -> ShardStore:
    store = ShardStore(root, **kwargs)
    store.open()
    return store


async def pieces(
    data: bytes, size: int = PIECE, log: list[str] | None = None, tag: str = ""
) -> AsyncIterator[bytes]:
    """``data`` in pieces, handing the loop to other tasks between them."""
    for offset in range(0, len(data), size):
        if log is not None:
            log.append(tag)
        yield data[offset : offset + size]
        await asyncio.sleep(0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(root: Path) -> ShardStore:
    return opened(root)


# --- basics ------------------------------------------------------------------------


async def test_put_read_and_index(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(100_000, 1)
    assert sid not in store and len(store) == 0
    assert await store.put(sid, data) is True
    assert sid in store and len(store) == 1
    assert store.size(sid) == len(data)
    assert store.ids() == [sid] and store.items() == [(sid, len(data))]
    assert store.total_bytes == len(data)
    path = store.path(sid)
    assert path == root / "shards" / sid[:2] / f"{sid}.{len(data)}"
    assert path.read_bytes() == data
    assert await store.verified_path(sid) == path
    assert await store.read(sid) == data
    assert await store.put(sid, data) is False  # already held
    assert files(root, "shards") == [path]
    assert_clean(root)

    store.delete(sid)
    assert sid not in store and not path.exists()
    store.delete(sid)  # deleting twice is harmless
    with pytest.raises(ShardNotFoundError):
        store.size(sid)


async def test_reopen_indexes_what_is_on_disk(root: Path) -> None:
    store = opened(root)
    shards = [make_shard(size, seed) for seed, size in enumerate([1, 5000, MiB])]
    for sid, data in shards:
        await store.put(sid, data)
    again = opened(root)
    assert sorted(again.ids()) == sorted(sid for sid, _ in shards)
    for sid, data in shards:
        assert await again.read(sid) == data


async def test_stray_files_are_ignored(store: ShardStore, root: Path) -> None:
    bucket = root / "shards" / "ab"
    bucket.mkdir()
    (bucket / "notes.txt").write_bytes(b"hello")
    (bucket / ("ab" * 32 + ".x")).write_bytes(b"hello")
    (root / "shards" / "loose").write_bytes(b"hello")
    assert len(opened(root)) == 0


async def test_invalid_id_is_refused(store: ShardStore, root: Path) -> None:
    for bad in ["", "AB" * 32, "ab" * 31, "../" + "a" * 61]:
        with pytest.raises(InvalidIdError):
            await store.put(bad, b"x")
    assert files(root, "shards") == []
    assert_clean(root)


# --- 1. two writers of one shard ------------------------------------------------


async def test_two_tasks_write_one_shard(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(4 * MiB, 2)
    order: list[str] = []
    temp_counts: list[int] = []

    async def feed(tag: str) -> AsyncIterator[bytes]:
        async for piece in pieces(data, PIECE, order, tag):
            temp_counts.append(len(files(root, "tmp")))
            yield piece

    results = await asyncio.gather(
        store.put_stream(sid, len(data), feed("a")),
        store.put_stream(sid, len(data), feed("b")),
    )
    trace = "".join(order)
    assert "ab" in trace and "ba" in trace, "the writers did not interleave"
    assert max(temp_counts) == 2  # each writer had a temp file of its own
    assert True in results
    assert files(root, "shards") == [store.path(sid)]
    assert store.path(sid).read_bytes() == data
    assert_clean(root)
    assert store.ids() == [sid] and store.total_bytes == len(data)
    assert await store.read(sid) == data


CHILD = """
import asyncio, sys
import numpy as np
from p2pshard.hashing import hash_bytes
from p2pshard.store import ShardStore

async def write(root, seed):
    data = np.random.default_rng(seed).bytes(4 * 1024 * 1024)
    store = ShardStore(root)
    store.open()

    async def pieces():
        for offset in range(0, len(data), 128 * 1024):
            yield data[offset : offset + 128 * 1024]
            await asyncio.sleep(0)

    await store.put_stream(hash_bytes(data), len(data), pieces())

while line := sys.stdin.readline():
    asyncio.run(write(sys.argv[1], int(line)))
    print(int(line), flush=True)
"""


def test_two_processes_write_one_shard(root: Path, tmp_path: Path) -> None:
    opened(root)
    rounds = 4
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    with contextlib.ExitStack() as stack:
        procs = []
        for log in logs:
            err = stack.enter_context(open(log, "w"))
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(root)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
            stack.enter_context(proc)
            stack.callback(lambda p=proc: p.poll() is None and p.kill())
            procs.append(proc)
        for seed in range(rounds):
            for proc in procs:  # both start the same shard together
                assert proc.stdin is not None
                proc.stdin.write(f"{seed}\n")
                proc.stdin.flush()
            for proc, log in zip(procs, logs):
                assert proc.stdout is not None
                answer = proc.stdout.readline()
                assert answer.strip() == str(seed), log.read_text()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        codes = [proc.wait(timeout=60) for proc in procs]
    assert codes == [0, 0], [log.read_text() for log in logs]

    store = opened(root)
    expected = dict(make_shard(4 * MiB, seed) for seed in range(rounds))
    assert sorted(store.ids()) == sorted(expected)
    assert files(root, "shards") == sorted(store.path(sid) for sid in expected)
    for sid, data in expected.items():
        path = store.path(sid)
        assert blake3.blake3(path.read_bytes()).hexdigest() == sid
        assert path.read_bytes() == data
    assert_clean(root)
    assert files(root, "quarantine") == []


async def test_single_flight_runs_work_once(store: ShardStore) -> None:
    sid = "ab" * 32
    started = asyncio.Event()
    gate = asyncio.Event()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()

    first = asyncio.create_task(store.single_flight(sid, work))
    second = asyncio.create_task(store.single_flight(sid, work))
    await started.wait()  # the first runs work; the second has joined it
    gate.set()
    await asyncio.gather(first, second)
    assert calls == 1

    await store.single_flight(sid, work)  # a later call runs it anew
    assert calls == 2


async def test_single_flight_shares_failure(store: ShardStore) -> None:
    sid = "cd" * 32
    started = asyncio.Event()
    gate = asyncio.Event()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        started.set()
        await gate.wait()
        raise RuntimeError("fetch failed")

    first = asyncio.create_task(store.single_flight(sid, work))
    second = asyncio.create_task(store.single_flight(sid, work))
    await started.wait()
    gate.set()
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results), results


async def test_single_flight_with_put(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(MiB, 3)
    calls = 0

    async def fetch() -> None:
        nonlocal calls
        calls += 1
        await store.put_stream(sid, len(data), pieces(data))

    await asyncio.gather(*(store.single_flight(sid, fetch) for _ in range(4)))
    assert calls == 1
    assert await store.read(sid) == data
    assert_clean(root)


# --- 2. the store believes it holds what the disk lost ---------------------------


@pytest.mark.parametrize("damage", ["truncate", "delete"])
async def test_lost_bytes_are_dropped_at_open(root: Path, damage: str) -> None:
    store = opened(root)
    sid, data = make_shard(4 * MiB, 4)
    await store.put(sid, data)
    path = store.path(sid)
    if damage == "truncate":
        os.truncate(path, MiB)
    else:
        path.unlink()

    again = opened(root)
    assert sid not in again
    assert len(again) == 0 and again.total_bytes == 0
    with pytest.raises(ShardNotFoundError):
        again.size(sid)
    with pytest.raises(ShardNotFoundError):
        await again.verified_path(sid)
    assert files(root, "shards") == []


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


async def test_flipped_byte_is_caught_before_serving(root: Path) -> None:
    store = opened(root)
    sid, data = make_shard(4 * MiB, 5)
    good_sid, good = make_shard(1000, 6)
    await store.put(sid, data)
    await store.put(good_sid, good)
    path = store.path(sid)
    flip_byte(path, 3 * MiB + 17)

    again = opened(root)
    assert sid in again and again.size(sid) == 4 * MiB  # the cheap checks pass
    with pytest.raises(HashMismatchError) as caught:
        await again.verified_path(sid)
    assert caught.value.shard_id == sid
    assert caught.value.actual != sid

    assert sid not in again
    assert not path.exists()
    moved = files(root, "quarantine")
    assert len(moved) == 1 and moved[0].name.startswith(path.name)
    assert moved[0].read_bytes() != data
    with pytest.raises(ShardNotFoundError):
        await again.read(sid)
    assert await again.read(good_sid) == good  # the others are still served

    assert sid not in opened(root)  # quarantine is not indexed


async def test_corrupt_shard_is_repaired_by_a_new_put(root: Path) -> None:
    store = opened(root)
    sid, data = make_shard(4 * MiB, 7)
    await store.put(sid, data)
    flip_byte(store.path(sid), 5)

    again = opened(root, capacity=6 * MiB)  # room for one copy only
    assert await again.put_stream(sid, len(data), pieces(data)) is True
    assert await again.read(sid) == data
    assert again.path(sid).read_bytes() == data
    assert len(files(root, "quarantine")) == 1
    assert_clean(root)


async def test_put_of_an_intact_shard_after_restart_keeps_the_file(
    root: Path,
) -> None:
    store = opened(root)
    sid, data = make_shard(MiB, 7)
    await store.put(sid, data)
    inode = store.path(sid).stat().st_ino

    again = opened(root)
    assert await again.put_stream(sid, len(data), pieces(data)) is False
    assert again.path(sid).stat().st_ino == inode
    assert await again.read(sid) == data
    assert_clean(root)


# --- 3. a full-length file that is not complete ----------------------------------


async def test_capacity_refuses_before_writing(root: Path) -> None:
    store = opened(root, capacity=6 * MiB)
    first_sid, first = make_shard(4 * MiB, 8)
    assert await store.put(first_sid, first)

    sid, data = make_shard(4 * MiB, 9)
    with pytest.raises(StoreFullError) as caught:
        await store.put(sid, data)
    assert (caught.value.needed, caught.value.available) == (4 * MiB, 2 * MiB)
    assert isinstance(caught.value, OSError)
    assert sid not in store
    assert files(root, "shards") == [store.path(first_sid)]
    assert_clean(root)

    store.delete(first_sid)
    assert await store.put(sid, data)  # room again


async def test_capacity_counts_writes_in_progress(root: Path) -> None:
    store = opened(root, capacity=6 * MiB)
    a_sid, a = make_shard(4 * MiB, 10)
    b_sid, b = make_shard(4 * MiB, 11)
    results = await asyncio.gather(
        store.put_stream(a_sid, len(a), pieces(a)),
        store.put_stream(b_sid, len(b), pieces(b)),
        return_exceptions=True,
    )
    assert results[0] is True
    assert isinstance(results[1], StoreFullError)
    assert store.ids() == [a_sid]
    assert_clean(root)


async def test_disk_full_mid_write(
    store: ShardStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, data = make_shard(4 * MiB, 12)
    real_write = os.write
    budget = [3 * MiB]

    def full_disk(fd: int, chunk: bytes) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        done = real_write(fd, memoryview(chunk)[: budget[0]])
        budget[0] -= done
        return done

    monkeypatch.setattr(store_module.os, "write", full_disk)
    with pytest.raises(StoreFullError) as caught:
        await store.put(sid, data)
    monkeypatch.undo()
    assert budget[0] == 0  # 3 MiB reached the disk before it filled up
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert sid not in store
    assert files(root, "shards") == []
    assert_clean(root)

    assert await store.put(sid, data)  # space is back: the write succeeds
    assert await store.read(sid) == data


async def test_other_write_errors_are_not_disk_full(
    store: ShardStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, data = make_shard(MiB, 13)

    def broken(fd: int, chunk: bytes) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store_module.os, "write", broken)
    with pytest.raises(OSError) as caught:
        await store.put(sid, data)
    monkeypatch.undo()
    assert not isinstance(caught.value, StoreError)
    assert caught.value.errno == errno.EIO
    assert sid not in store
    assert_clean(root)


async def test_full_length_file_with_zero_tail(root: Path) -> None:
    opened(root)
    sid, data = make_shard(4 * MiB, 14)
    final = root / "shards" / sid[:2] / f"{sid}.{len(data)}"
    final.parent.mkdir(parents=True)
    final.write_bytes(data[: 3 * MiB] + bytes(MiB))

    store = opened(root)
    assert sid in store  # right name, right length
    with pytest.raises(HashMismatchError):
        await store.verified_path(sid)
    assert sid not in store
    assert not final.exists()
    assert len(files(root, "quarantine")) == 1
    with pytest.raises(ShardNotFoundError):
        await store.read(sid)


async def test_wrong_bytes_are_refused(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(MiB, 15)
    other = bytearray(data)
    other[-1] ^= 0xFF
    with pytest.raises(HashMismatchError) as caught:
        await store.put(sid, bytes(other))
    assert caught.value.shard_id == sid
    assert caught.value.actual == hash_bytes(bytes(other))
    assert sid not in store
    assert files(root, "shards") == []
    assert_clean(root)


@pytest.mark.parametrize("length", [0, 1, MiB - 1])
async def test_short_stream_is_refused(
    store: ShardStore, root: Path, length: int
) -> None:
    sid, data = make_shard(MiB, 16)
    with pytest.raises(ValueError) as caught:
        await store.put_stream(sid, len(data), pieces(data[:length], 1000))
    assert not isinstance(caught.value, HashMismatchError)
    assert sid not in store
    assert files(root, "shards") == []
    assert_clean(root)


async def test_long_stream_is_refused(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(MiB, 17)
    with pytest.raises(ValueError):
        await store.put_stream(sid, len(data) - 1, pieces(data))
    assert sid not in store
    assert files(root, "shards") == []
    assert_clean(root)


async def test_shard_too_large(root: Path) -> None:
    store = opened(root, max_shard_size=MiB)
    sid, data = make_shard(MiB + 1, 18)
    with pytest.raises(ShardTooLargeError) as caught:
        await store.put(sid, data)
    assert (caught.value.size, caught.value.limit) == (MiB + 1, MiB)
    with pytest.raises(ShardTooLargeError):
        store.check_room(MiB + 1)
    store.check_room(MiB)
    assert sid not in store
    assert files(root, "shards") == []
    assert_clean(root)

    sid, data = make_shard(MiB, 18)
    assert await store.put(sid, data)  # exactly the limit fits


async def test_failing_stream_leaves_nothing(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(MiB, 19)

    async def dies() -> AsyncIterator[bytes]:
        yield data[:PIECE]
        raise ConnectionResetError("sender went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream(sid, len(data), dies())
    assert sid not in store
    assert_clean(root)


async def test_cancelled_write_leaves_nothing(store: ShardStore, root: Path) -> None:
    sid, data = make_shard(MiB, 20)
    first_piece = asyncio.Event()
    never = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        yield data[:PIECE]
        first_piece.set()
        await never.wait()
        yield data[PIECE:]

    task = asyncio.create_task(store.put_stream(sid, len(data), stalls()))
    await first_piece.wait()
    assert len(files(root, "tmp")) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sid not in store
    assert_clean(root)
    store.check_room(6 * MiB)  # the reservation was released


# --- 4. stale temp files ------------------------------------------------------------


def test_open_removes_temp_files_of_dead_writers(root: Path) -> None:
    opened(root)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(finished.stdout)
    sid = "ab" * 32
    tmp = root / "tmp"
    stale = tmp / f"{sid}.{dead}.0123456789ab"
    odd = tmp / "leftover-without-pid"
    mine = tmp / f"{sid}.{os.getpid()}.0123456789ab"  # an earlier store of mine
    for path in (stale, odd, mine):
        path.write_bytes(b"partial")

    with subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
    ) as helper:
        try:
            live = tmp / f"{sid}.{helper.pid}.0123456789ab"
            live.write_bytes(b"in progress elsewhere")
            opened(root)
            assert files(root, "tmp") == [live]
        finally:
            assert helper.stdin is not None
            helper.stdin.close()
            helper.wait(timeout=30)
    assert helper.returncode == 0

    opened(root)  # its writer is gone now
    assert_clean(root)


# --- 5. zero-byte shard ---------------------------------------------------------------


async def test_zero_byte_shard(store: ShardStore, root: Path) -> None:
    empty = blake3.blake3(b"").hexdigest()
    assert hash_bytes(b"") == empty
    missing = hash_bytes(b"missing")
    assert empty not in store

    assert await store.put(empty, b"") is True
    assert empty in store and missing not in store
    assert store.size(empty) == 0 and len(store) == 1
    assert store.path(empty).exists() and store.path(empty).stat().st_size == 0
    assert await store.read(empty) == b""
    with pytest.raises(ShardNotFoundError):
        store.size(missing)
    with pytest.raises(ShardNotFoundError):
        await store.read(missing)

    again = opened(root)
    assert empty in again and again.size(empty) == 0
    assert await again.read(empty) == b""
    assert await again.put(empty, b"") is False
    assert_clean(root)


async def test_zero_byte_shard_from_an_empty_stream(
    store: ShardStore, root: Path
) -> None:
    empty = hash_bytes(b"")
    assert await store.put_stream(empty, 0, pieces(b""))
    assert await store.read(empty) == b""
    with pytest.raises(ValueError):
        await store.put_stream(hash_bytes(b"x"), 1, pieces(b""))
    assert_clean(root)

"""The on-disk, content-addressed shard store of one peer.

Layout under the store's root::

    shards/ab/<id>.<size>   one file per shard, named by its hash and length
    tmp/<id>.<pid>.<rand>   writes in progress, one unique file per writer
    quarantine/             files that failed their hash check, kept for autopsy

A write goes to its own temp file, is hashed on the way, fsynced and renamed
into place, so a final name only ever holds complete, verified bytes and two
concurrent writers of one shard (even in two processes) leave one good file.
Completeness is judged by hash, never by name, length or presence: start-up
drops files that are short or unreadable (cheap checks), and every shard is
hash-checked once before this process first serves or uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterable, Awaitable, Callable
from pathlib import Path

from .errors import (
    HashMismatchError,
    ShardNotFoundError,
    ShardTooLargeError,
    StoreFullError,
)
from .hashing import Hasher, check_id

__all__ = ["DEFAULT_MAX_SHARD", "ShardStore"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD = 256 * 1024 * 1024
DISK_RESERVE = 64 * 1024 * 1024  # never fill the disk to its last byte
READ_BLOCK = 1024 * 1024


class ShardStore:
    """Shards of one peer, one file each, with an in-memory index of sizes.

    ``capacity`` caps the bytes held (``None``: only the free disk space caps it).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int | None = None,
        max_shard_size: int = DEFAULT_MAX_SHARD,
    ) -> None:
        self.root = Path(root)
        self.capacity = capacity
        self.max_shard_size = max_shard_size
        self._sizes: dict[str, int] = {}
        self._verified: set[str] = set()
        # Shards this peer no longer owns, kept (and served) until room is needed,
        # oldest first; the owners already hold their copies.
        self._cached: dict[str, None] = {}
        self._flights: dict[str, asyncio.Future[None]] = {}
        self._reserved = 0  # bytes of writes in progress

    # --- start-up ---------------------------------------------------------

    def open(self) -> None:
        """Create the layout, drop stale temp files and index what is on disk."""
        for sub in ("shards", "tmp", "quarantine"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        self._sizes.clear()
        self._verified.clear()
        self._cached.clear()
        for bucket in sorted((self.root / "shards").iterdir()):
            if bucket.is_dir():
                for path in sorted(bucket.iterdir()):
                    self._index_file(path)
        log.info("store %s holds %d shards", self.root, len(self._sizes))

    def _clean_tmp(self) -> None:
        for path in (self.root / "tmp").iterdir():
            pid = _pid_of_tmp(path.name)
            if pid is None or pid == os.getpid() or not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()

    def _index_file(self, path: Path) -> None:
        shard_id, _, size_text = path.name.partition(".")
        try:
            check_id(shard_id)
            size = int(size_text)
        except ValueError:
            log.warning("ignoring stray file %s", path)
            return
        if path != self.path(shard_id, size):  # e.g. "<id>.05" or a wrong folder
            log.warning("ignoring misplaced file %s", path)
            return
        try:
            actual = path.stat().st_size
            with open(path, "rb"):
                pass
        except OSError as exc:
            log.warning("dropping unreadable shard %s: %s", shard_id, exc)
            self._quarantine_path(path)
            return
        if actual != size:
            log.warning("dropping shard %s: %d of %d bytes", shard_id, actual, size)
            self._quarantine_path(path)
            return
        self._sizes[shard_id] = size

    # --- queries ----------------------------------------------------------

    def __contains__(self, shard_id: object) -> bool:
        return shard_id in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def size(self, shard_id: str) -> int:
        """Bytes of a held shard; ShardNotFoundError if not held."""
        try:
            return self._sizes[shard_id]
        except KeyError:
            raise ShardNotFoundError(shard_id) from None

    def ids(self) -> list[str]:
        return list(self._sizes)

    def items(self) -> list[tuple[str, int]]:
        return list(self._sizes.items())

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes.values())

    def path(self, shard_id: str, size: int | None = None) -> Path:
        size = self.size(shard_id) if size is None else size
        return self.root / "shards" / shard_id[:2] / f"{shard_id}.{size}"

    # --- reads ------------------------------------------------------------

    async def verified_path(self, shard_id: str) -> Path:
        """Path of a shard whose bytes were hash-checked in this process.

        A shard that fails the check is quarantined, dropped from the index and
        reported as HashMismatchError.
        """
        path = self.path(shard_id)
        if shard_id not in self._verified:
            actual = await asyncio.to_thread(_hash_file, path)
            if actual != shard_id:
                self.quarantine(shard_id)
                raise HashMismatchError(shard_id, actual, "local store")
            if shard_id in self._sizes:
                self._verified.add(shard_id)
        return path

    async def read(self, shard_id: str) -> bytes:
        """The verified bytes of a held shard."""
        path = await self.verified_path(shard_id)
        return await asyncio.to_thread(path.read_bytes)

    # --- writes -----------------------------------------------------------

    def check_room(self, size: int) -> None:
        """Raise unless a shard of ``size`` bytes can be written now.

        Cached shards (no longer owned here) are evicted, oldest first, to make
        room before the store reports itself full.
        """
        if size > self.max_shard_size:
            raise ShardTooLargeError(size, self.max_shard_size)
        while (free := self._free()) < size and self._cached:
            self.delete(next(iter(self._cached)))
        if size > free:
            raise StoreFullError(size, max(free, 0))

    def _free(self) -> int:
        disk_free = shutil.disk_usage(self.root).free - DISK_RESERVE - self._reserved
        if self.capacity is None:
            return disk_free
        return min(disk_free, self.capacity - self.total_bytes - self._reserved)

    # --- ownership --------------------------------------------------------

    def mark_cached(self, shard_id: str) -> None:
        """This peer no longer owns the shard: keep it only while room allows."""
        if shard_id in self._sizes:
            self._cached.setdefault(shard_id, None)

    def mark_owned(self, shard_id: str) -> None:
        self._cached.pop(shard_id, None)

    def is_cached(self, shard_id: str) -> bool:
        return shard_id in self._cached

    def owned_items(self) -> list[tuple[str, int]]:
        """Held shards this peer is responsible for (cached ones left out)."""
        return [(i, n) for i, n in self._sizes.items() if i not in self._cached]

    @property
    def cached_bytes(self) -> int:
        return sum(self._sizes[i] for i in self._cached)

    async def check(self, shard_id: str) -> bool:
        """Hash a held shard's file again (even if verified before); a bad file
        is quarantined. True if the shard is intact."""
        try:
            path = self.path(shard_id)
        except ShardNotFoundError:
            return False
        try:
            actual = await asyncio.to_thread(_hash_file, path)
        except OSError:
            actual = ""
        if actual == shard_id:
            self._verified.add(shard_id)
            return True
        if shard_id in self._sizes:
            self.quarantine(shard_id)
        return False

    async def put(self, shard_id: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` under ``shard_id``; True if it was new here."""

        async def one_chunk() -> AsyncIterable[bytes | bytearray | memoryview]:
            yield data

        return await self.put_stream(shard_id, len(data), one_chunk())

    async def put_stream(
        self,
        shard_id: str,
        size: int,
        chunks: AsyncIterable[bytes | bytearray | memoryview],
    ) -> bool:
        """Write a shard from a stream of chunks; True if it was new here.

        The bytes must be exactly ``size`` long and hash to ``shard_id``, else
        the temp file is removed and HashMismatchError or ValueError raised.
        """
        check_id(shard_id)
        if shard_id in self._sizes and self._sizes[shard_id] == size:
            with contextlib.suppress(HashMismatchError, FileNotFoundError):
                await self.verified_path(shard_id)  # a bad copy is quarantined
        if shard_id in self._verified and self._sizes.get(shard_id) == size:
            async for _ in chunks:  # drain, so the sender sees a normal answer
                pass
            return False
        self.check_room(size)
        self._reserved += size
        tmp = self.root / "tmp" / f"{shard_id}.{os.getpid()}.{secrets.token_hex(6)}"
        try:
            await self._write_tmp(tmp, shard_id, size, chunks)
            final = self.path(shard_id, size)
            await asyncio.to_thread(_commit, tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            self._reserved -= size
        self._sizes[shard_id] = size
        self._verified.add(shard_id)
        return True

    async def _write_tmp(
        self,
        tmp: Path,
        shard_id: str,
        size: int,
        chunks: AsyncIterable[bytes | bytearray | memoryview],
    ) -> None:
        hasher = Hasher(max_threads=1)
        written = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            async for chunk in chunks:
                written += len(chunk)
                if written > size:
                    raise ValueError(f"shard {shard_id}: body longer than {size}")
                hasher.update(chunk)
                _write_all(fd, chunk, size)
            if written != size:
                raise ValueError(f"shard {shard_id}: body of {written} of {size} bytes")
            actual = hasher.hexdigest()
            if actual != shard_id:
                raise HashMismatchError(shard_id, actual, "upload")
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)

    async def single_flight(
        self, shard_id: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``work`` for a shard unless the same work already runs; share it."""
        running = self._flights.get(shard_id)
        if running is not None:
            await asyncio.shield(running)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flights[shard_id] = future
        try:
            await work()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(None)
        finally:
            del self._flights[shard_id]

    # --- removal ----------------------------------------------------------

    def delete(self, shard_id: str) -> None:
        """Forget a shard and remove its file."""
        size = self._sizes.pop(shard_id, None)
        self._verified.discard(shard_id)
        self._cached.pop(shard_id, None)
        if size is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path(shard_id, size).unlink()

    def quarantine(self, shard_id: str) -> None:
        """Move a shard's file aside and forget it; it is no longer served."""
        size = self._sizes.pop(shard_id, None)
        self._verified.discard(shard_id)
        self._cached.pop(shard_id, None)
        if size is not None:
            self._quarantine_path(self.path(shard_id, size))

    def _quarantine_path(self, path: Path) -> None:
        target = self.root / "quarantine" / f"{path.name}.{secrets.token_hex(4)}"
        try:
            os.replace(path, target)
        except OSError:
            with contextlib.suppress(OSError):
                path.unlink()


def _write_all(fd: int, chunk: bytes | bytearray | memoryview, size: int) -> None:
    view = memoryview(chunk)
    try:
        while view:
            done = os.write(fd, view)
            view = view[done:]
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreFullError(size, 0) from exc
        raise


def _commit(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)  # atomic; a concurrent writer's identical file may win
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _hash_file(path: Path) -> str:
    hasher = Hasher(max_threads=1)
    with open(path, "rb") as handle:
        buffer = bytearray(READ_BLOCK)
        view = memoryview(buffer)
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
    return hasher.hexdigest()


def _pid_of_tmp(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

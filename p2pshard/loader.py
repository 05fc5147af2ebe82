"""Loading: from a name to verified numpy arrays or byte-identical files.

Resolve the name, fetch and validate the manifest, plan which shards the
wanted tensors need, look up their owners all at once, then fetch many shards
concurrently, each streamed and hash-checked, failing over between replicas.

Arrays: the needed shards of each file land back to back in one buffer, in file
order. A tensor's shards are consecutive, so every tensor is a zero-copy view
into that buffer, whether the whole model or only some tensors were asked for.
Files: each shard is written at its offset into a temp file that is renamed
into place only when every byte is verified, so a failed load never leaves a
partial file under the final name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .chunking import overlapping
from .dht import Contact, Dht
from .errors import (
    DuplicateTensorError,
    NameNotFoundError,
    NoTensorMatchError,
    OutputExistsError,
    first_error,
)
from .formats.safetensors import TensorInfo, tensor_view, write_file
from .hashing import shard_key
from .manifest import FileEntry, Manifest
from .records import NameRecord
from .settings import Settings
from .transfer import Transfer

__all__ = ["LoadStats", "Loader"]

log = logging.getLogger(__name__)

EXTRA_HOLDERS = 2  # peers beyond k asked for a shard, in case it moved
Progress = Callable[[int], None]


@dataclass
class LoadStats:
    """What a load did: the figures ``p2pshard load --json`` reports."""

    name: str = ""
    version: int = 0
    tensors: int = 0
    bytes: int = 0
    shards: int = 0
    peers: int = 0
    seconds: float = 0.0
    per_peer: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "shards": self.shards,
            "peers": self.peers,
            "seconds": round(self.seconds, 4),
            "throughput_mb_s": round(self.bytes / max(self.seconds, 1e-9) / 1e6, 1),
        }


class Loader:
    """One load; keeps the figures in ``stats``."""

    def __init__(
        self,
        dht: Dht,
        transfer: Transfer,
        settings: Settings,
        progress: Progress | None = None,
    ) -> None:
        self.dht = dht
        self.transfer = transfer
        self.settings = settings
        self.progress = progress
        self.stats = LoadStats()
        self._began = time.monotonic()
        self._used: set[str] = set()

    # --- manifest ---------------------------------------------------------

    async def resolve(self, name: str) -> tuple[NameRecord, Manifest]:
        record = await self.dht.get_record(name)
        if record is None:
            raise NameNotFoundError(name)
        self.stats.name, self.stats.version = name, record.version
        holders = await self._holders([record.manifest], self.settings.replicas)
        data = await self.transfer.fetch_bytes(
            record.manifest, record.manifest_size, holders[record.manifest]
        )
        return record, Manifest.decode(bytes(data))

    async def _holders(
        self, ids: Sequence[str], replicas: int
    ) -> dict[str, list[Contact]]:
        keys = {shard_key(i): i for i in ids}
        owners = await self.dht.closest_many(keys, replicas + EXTRA_HOLDERS)
        return {keys[key]: contacts for key, contacts in owners.items()}

    # --- fetching ---------------------------------------------------------

    async def _fetch_all(
        self,
        manifest: Manifest,
        wanted: dict[str, int],
        dest: Callable[[str], memoryview],
        done: Callable[[str, memoryview], object] | None = None,
    ) -> None:
        """Fetch every wanted shard (id -> size) into ``dest(id)``, verified.

        ``done(id, view)`` runs after each shard is verified (it may be async).
        """
        holders = await self._holders(list(wanted), manifest.replicas)
        gate = asyncio.Semaphore(self.settings.fetch_concurrency)

        async def one(shard_id: str) -> None:
            async with gate:
                view = dest(shard_id)
                contact = await self.transfer.fetch_into(
                    shard_id, holders.get(shard_id, []), view
                )
                self._used.add(contact.address)
                if done is not None:
                    result = done(shard_id, view)
                    if asyncio.iscoroutine(result):
                        await result
            if self.progress is not None:
                self.progress(len(view))

        try:
            async with asyncio.TaskGroup() as group:
                for shard_id in wanted:
                    group.create_task(one(shard_id))
        except BaseExceptionGroup as group_error:
            raise first_error(group_error) from None
        self.stats.shards += len(wanted)

    def _finish(self, tensors: int, nbytes: int) -> LoadStats:
        self.stats.tensors = tensors
        self.stats.bytes = nbytes
        self.stats.peers = len(self._used)
        self.stats.per_peer = dict(self.transfer.served)
        self.stats.seconds = time.monotonic() - self._began
        return self.stats

    # --- arrays -----------------------------------------------------------

    async def arrays(
        self, manifest: Manifest, patterns: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The selected tensors as arrays (zero-copy views of shard buffers)."""
        selected = select(manifest, patterns)
        names = [t.name for _, t in selected]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            paths = [f.path for f, t in selected if t.name == dup]
            raise DuplicateTensorError(dup, (paths[0], paths[1]))
        layouts = [
            _Layout(f, [t for g, t in selected if g is f]) for f in manifest.files
        ]
        placed: dict[str, memoryview] = {}
        copies: list[tuple[memoryview, str]] = []
        wanted: dict[str, int] = {}
        for layout in layouts:
            for index in layout.chunks:
                chunk = layout.file.chunks[index]
                view = layout.view(index)
                if chunk.id in placed:  # same bytes twice in the model: copy
                    copies.append((view, chunk.id))
                else:
                    placed[chunk.id] = view
                    wanted[chunk.id] = chunk.size
        await self._fetch_all(manifest, wanted, placed.__getitem__)
        for view, shard_id in copies:
            view[:] = placed[shard_id]
        result = {
            t.name: layout.tensor(t) for layout in layouts for t in layout.tensors
        }
        nbytes = sum(layout.buffer.nbytes for layout in layouts)
        self._finish(len(result), nbytes)
        return result

    # --- files ------------------------------------------------------------

    async def to_path(
        self,
        manifest: Manifest,
        out: str | os.PathLike[str],
        patterns: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write the model to ``out``: a directory when a directory was published,
        else a single file. With ``patterns``, a safetensors file of the
        selected tensors only."""
        out = Path(out)
        if out.exists() and not overwrite:
            raise OutputExistsError(str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        if patterns:
            arrays = await self.arrays(manifest, patterns)
            await asyncio.to_thread(_write_arrays, out, arrays)
            return out
        staging = out.parent / f".{out.name}.p2pshard-{secrets.token_hex(4)}"
        try:
            await self._write_files(manifest, staging)
            await asyncio.to_thread(_swap_into_place, staging, out, manifest.source)
        finally:
            await asyncio.to_thread(_remove, staging)
        self._finish(len(manifest.tensors()), manifest.total_size)
        return out

    async def _write_files(self, manifest: Manifest, staging: Path) -> None:
        single = manifest.source != "dir"
        fds: dict[str, int] = {}
        places: dict[str, list[tuple[int, int]]] = {}  # id -> [(fd, offset)]
        wanted: dict[str, int] = {}
        try:
            for f in manifest.files:
                path = staging if single else staging / f.path
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = fds[f.path] = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
                )
                header = f.header.prefix if f.header is not None else b""
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, f.size)
                for index, chunk in enumerate(f.chunks):
                    offset = f.data_offset + f.bounds[index]
                    places.setdefault(chunk.id, []).append((fd, offset))
                    wanted[chunk.id] = chunk.size

            def write(shard_id: str, view: memoryview) -> object:
                return asyncio.to_thread(_pwrite_all, places[shard_id], view)

            await self._fetch_all(
                manifest, wanted, lambda i: memoryview(bytearray(wanted[i])), write
            )
            await asyncio.to_thread(lambda: [os.fsync(fd) for fd in fds.values()])
        finally:
            for fd in fds.values():
                os.close(fd)


class _Layout:
    """Where the needed shards of one file sit in one contiguous buffer."""

    def __init__(self, file: FileEntry, tensors: list[TensorInfo]) -> None:
        self.file = file
        self.tensors = tensors
        needed: set[int] = set()
        for t in tensors:
            needed.update(overlapping(file.bounds, t.start, t.end))
        self.chunks = sorted(needed)
        self.offsets: dict[int, int] = {}
        position = 0
        for index in self.chunks:
            self.offsets[index] = position
            position += file.chunks[index].size
        self.buffer = np.empty(position, dtype=np.uint8)

    def view(self, index: int) -> memoryview:
        start = self.offsets[index]
        return memoryview(self.buffer[start : start + self.file.chunks[index].size])

    def tensor(self, info: TensorInfo) -> np.ndarray:
        chunks = overlapping(self.file.bounds, info.start, info.end)
        if not chunks:
            return tensor_view(np.empty(0, np.uint8), 0, info)
        first = chunks[0]
        offset = self.offsets[first] + info.start - self.file.bounds[first]
        return tensor_view(self.buffer, offset, info)


def select(
    manifest: Manifest, patterns: Sequence[str] | None
) -> list[tuple[FileEntry, TensorInfo]]:
    """Tensors whose names match any glob pattern (all when none are given)."""
    everything = manifest.tensors()
    if not patterns:
        return everything
    chosen = [
        (f, t)
        for f, t in everything
        if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)
    ]
    if not chosen:
        raise NoTensorMatchError(list(patterns))
    return chosen


def _pwrite_all(places: list[tuple[int, int]], view: memoryview) -> None:
    for fd, offset in places:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)


def _write_arrays(out: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = out.parent / f".{out.name}.p2pshard-{secrets.token_hex(4)}"
    try:
        write_file(tmp, arrays)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _swap_into_place(staging: Path, out: Path, source: str) -> None:
    if out.is_dir() and not out.is_symlink():
        trash = out.parent / f".{out.name}.p2pshard-old-{secrets.token_hex(4)}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

"""Publishing: cut a checkpoint into shards, place them, then bind the name.

The pipeline reads, hashes and uploads a bounded number of shards at a time,
so memory stays near ``upload_concurrency * shard_size`` whatever the model's
size. The manifest is stored only after every shard is acknowledged, and the
name record only after the manifest is: a name never points at missing data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .balance import Balance, split_point
from .chunking import plan_blob, plan_tensors
from .dht import Dht
from .errors import ManifestError, NameConflictError, NoPeersError, first_error
from .formats.checkpoint import SourceFile, scan_path
from .formats.safetensors import SafetensorsHeader, build_header
from .hashing import check_name, hash_bytes
from .manifest import Chunk, FileEntry, Manifest
from .records import NameRecord, RecordError, new_record
from .replication import offer_record, store_first, store_on_owners
from .settings import Settings
from .transfer import Transfer

__all__ = ["ARRAYS_FILE", "PublishResult", "publish"]

log = logging.getLogger(__name__)

ARRAYS_FILE = "model.safetensors"  # the file a dict of arrays is published as
UPLOAD_CONCURRENCY = 4

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PublishResult:
    name: str
    version: int
    manifest: str
    files: int
    tensors: int
    bytes: int
    shards: int
    seconds: float
    record: NameRecord
    spread: float = 1.0  # most bytes a peer owns over its expected share


class _Reader:
    """Reads byte ranges of one source file's data region (blocking)."""

    def __init__(
        self,
        path: str | None = None,
        offset: int = 0,
        arrays: list[np.ndarray] | None = None,
    ) -> None:
        self.path = path
        self.offset = offset
        self.pieces: list[memoryview] = []
        self.starts: list[int] = []
        position = 0
        for array in arrays or []:
            self.starts.append(position)
            view = memoryview(array.reshape(-1).view(np.uint8))
            self.pieces.append(view)
            position += len(view)

    def read(self, start: int, end: int) -> bytes:
        if self.path is not None:
            return _pread_exact(self.path, self.offset + start, end - start)
        out = bytearray()
        for base, piece in zip(self.starts, self.pieces):
            lo, hi = max(start, base), min(end, base + len(piece))
            if lo < hi:
                out += piece[lo - base : hi - base]
        return bytes(out)


def _pread_exact(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as handle:
        data = os.pread(handle.fileno(), length, offset)
    if len(data) != length:
        raise OSError(f"{path} changed while it was being published")
    return data


def _open_source(
    source: str | os.PathLike[str] | Mapping[str, np.ndarray],
) -> tuple[str, list[tuple[SourceFile, _Reader]]]:
    if isinstance(source, Mapping):
        header, arrays = build_header(source)
        entry = SourceFile(ARRAYS_FILE, header.data_offset + header.data_size, header)
        return "arrays", [(entry, _Reader(arrays=arrays))]
    kind, files = scan_path(Path(source))
    readers = []
    for f in files:
        offset = f.header.data_offset if f.header is not None else 0
        readers.append((f, _Reader(path=f.abs_path, offset=offset)))
    return kind, readers


def _boundaries(f: SourceFile) -> list[int]:
    """Tensor starts in the data region: preferred places to split a shard."""
    if f.header is None:
        return []
    return sorted({t.start for t in f.header.tensors})


def _plan(f: SourceFile, shard_size: int) -> list[tuple[int, int]]:
    header: SafetensorsHeader | None = f.header
    if header is None:
        return plan_blob(f.size, shard_size)
    ranges = [(t.start, t.end) for t in header.tensors]
    return plan_tensors(ranges, header.data_size, shard_size)


class _Uploader:
    """Reads, hashes and places shards, a bounded number at a time."""

    def __init__(
        self,
        dht: Dht,
        transfer: Transfer,
        settings: Settings,
        asynchronous: bool,
        progress: Progress | None,
        balance: Balance | None = None,
    ) -> None:
        self.dht = dht
        self.transfer = transfer
        self.settings = settings
        self.asynchronous = asynchronous
        self.progress = progress
        self.gate = asyncio.Semaphore(UPLOAD_CONCURRENCY)
        self.uploads: dict[str, asyncio.Task[None]] = {}
        self.balance = balance

    async def run(
        self, sources: list[tuple[SourceFile, _Reader]]
    ) -> tuple[FileEntry, ...]:
        async with asyncio.TaskGroup() as self.group:
            tasks = []
            for f, reader in sources:
                cuts = _boundaries(f)
                tasks.append(
                    [
                        self.group.create_task(self.chunk(reader, start, end, cuts))
                        for start, end in _plan(f, self.settings.shard_size)
                    ]
                )
        return tuple(
            FileEntry(
                f.path,
                f.size,
                f.header,
                tuple(c for t in file_tasks for c in t.result()),
            )
            for (f, _), file_tasks in zip(sources, tasks)
        )

    async def chunk(
        self, reader: _Reader, start: int, end: int, cuts: Sequence[int]
    ) -> list[Chunk]:
        """Read, hash and place ``[start, end)``: one shard, or several when
        the balance asks for the bytes to be cut and placed again."""
        async with self.gate:
            data = memoryview(await asyncio.to_thread(reader.read, start, end))
            pieces = await self._pieces(data, start, cuts)
            waits = []
            for shard_id, piece in pieces:
                task = self.uploads.get(shard_id)
                if task is None:  # identical bytes elsewhere in the model: once
                    task = self.group.create_task(self.place(shard_id, piece))
                    self.uploads[shard_id] = task
                waits.append(task)
            await asyncio.gather(*waits)
        if self.progress is not None:
            self.progress(end - start)
        return [Chunk(shard_id, len(piece)) for shard_id, piece in pieces]

    async def _pieces(
        self, data: memoryview, offset: int, cuts: Sequence[int]
    ) -> list[tuple[str, memoryview]]:
        shard_id = await asyncio.to_thread(hash_bytes, data)
        balance = self.balance
        if (
            balance is None
            or shard_id in self.uploads
            or balance.admit(shard_id, len(data))
        ):
            return [(shard_id, data)]
        end = offset + len(data)
        cut = split_point(offset, end, cuts, balance.min_piece) - offset
        head = await self._pieces(data[:cut], offset, cuts)
        return head + await self._pieces(data[cut:], offset + cut, cuts)

    async def place(self, shard_id: str, data: bytes) -> None:
        settings = self.settings
        if self.asynchronous:
            await store_first(
                self.dht, self.transfer, shard_id, data, settings.replicas
            )
        else:
            await store_on_owners(
                self.dht,
                self.transfer,
                shard_id,
                data,
                settings.replicas,
                settings.quorum,
            )


async def publish(
    dht: Dht,
    transfer: Transfer,
    settings: Settings,
    source: str | os.PathLike[str] | Mapping[str, np.ndarray],
    name: str,
    asynchronous: bool = False,
    progress: Progress | None = None,
) -> PublishResult:
    """Publish ``source`` (a path or a dict of arrays) under ``name``."""
    check_name(name)
    began = time.monotonic()
    kind, sources = await asyncio.to_thread(_open_source, source)
    view = await dht.view()
    # The manifest is written with the full quorum even by an asynchronous
    # publish: fail before storing shards that no name would point at.
    if len(view) < settings.quorum:
        raise NoPeersError(
            f"the swarm has {len(view)} peers; a write quorum of {settings.quorum} "
            "needs at least that many (lower the quorum or the replicas)"
        )
    balance = None
    if settings.balance is not None:
        balance = Balance(
            view, settings.replicas, settings.shard_size, settings.balance
        )
    uploader = _Uploader(dht, transfer, settings, asynchronous, progress, balance)
    try:
        files = await uploader.run(sources)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    manifest = Manifest(kind, settings.shard_size, settings.replicas, files)
    record = await _bind_name(dht, transfer, settings, name, manifest)
    result = PublishResult(
        name=name,
        version=record.version,
        manifest=record.manifest,
        files=len(files),
        tensors=len(manifest.tensors()),
        bytes=manifest.total_size,
        shards=len(manifest.shards()),
        seconds=time.monotonic() - began,
        record=record,
        spread=balance.spread() if balance is not None else 1.0,
    )
    log.info(
        "published %s v%d: %d bytes in %d shards (%d split for balance, spread %.3f)",
        name,
        result.version,
        result.bytes,
        result.shards,
        balance.splits if balance is not None else 0,
        result.spread,
    )
    return result


async def _bind_name(
    dht: Dht, transfer: Transfer, settings: Settings, name: str, manifest: Manifest
) -> NameRecord:
    data = manifest.encode()
    if len(data) > settings.max_manifest_size:
        raise ManifestError(f"manifest of {len(data)} bytes exceeds the limit")
    manifest_id = hash_bytes(data)
    # The manifest is always written synchronously: without it nothing loads.
    holders = await store_on_owners(
        dht, transfer, manifest_id, data, settings.replicas, settings.quorum
    )
    current = await dht.get_record(name)
    version = current.version + 1 if current is not None else 1
    record = new_record(name, manifest_id, len(data), version, manifest.total_size)
    try:
        await dht.put_record(record)
    except RecordError:  # every holder already has a newer record
        pass
    current = await dht.get_record(name)
    if current is not None and current.rank > record.rank:
        raise NameConflictError(name, version, current.manifest)
    # The manifest's owners hold the record too and republish it, so the name
    # outlives the peers closest to its key.
    encoded = record.encode()
    await asyncio.gather(*(offer_record(transfer, c, encoded) for c in holders))
    return record

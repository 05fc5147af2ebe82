"""Loading: from a name to verified numpy arrays or byte-identical files.

Resolve the name, fetch and validate the manifest, plan which shards the
wanted tensors need, look up their owners all at once, then fetch many shards
concurrently, each streamed and hash-checked, failing over between replicas.
When every known holder of a shard failed, its holders are looked up again
(a peer may have moved to a new address, or a new holder appeared) after a
short back-off: until ``Settings.load_deadline`` if one is set, else
``Settings.relookup_rounds`` times. A load that fails raises one error naming
every shard still missing and the peers tried for each, and lets go of its
buffers first.

Arrays: the needed shards of each file land back to back in one buffer, in file
order. A tensor's shards are consecutive, so every tensor is a zero-copy view
into that buffer, whether the whole model or only some tensors were asked for.
The buffers come from :mod:`p2pshard.memory`, populated by a thread while the
bytes arrive.
Files: each shard is written by the receiving worker straight to its offsets
in a temp file (no shard buffer: memory stays flat whatever the model size),
renamed into place only when every byte is verified, so a failed load never
leaves a partial file under the final name.
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
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .chunking import overlapping
from .dht import Contact, Dht
from .errors import (
    DuplicateTensorError,
    LoadDeadlineError,
    LoadIncompleteError,
    ManifestError,
    NameNotFoundError,
    NoTensorMatchError,
    OutputExistsError,
    OutputPathError,
    P2PShardError,
    ShardUnavailableError,
    first_error,
)
from .formats.safetensors import TensorInfo, tensor_view, write_file
from .hashing import shard_key
from .manifest import FileEntry, Manifest
from .memory import fresh_buffer
from .records import NameRecord
from .schedule import Dispatch
from .settings import Settings
from .transfer import Attempts, FileSink, MemorySink, Sink, Transfer

__all__ = ["LoadStats", "Loader"]

log = logging.getLogger(__name__)

EXTRA_HOLDERS = 2  # peers beyond k asked for a shard, in case it moved
REPORT_TIMEOUT = 2.0  # seconds a load spends telling owners of their gaps
RETRY_DELAY = 0.1  # first back-off before looking a shard's holders up again
FIRST_LOOKUPS = 16  # holders looked up before the first fetch starts
LOOKUP_BATCH = 64  # then looked up this many at a time while fetches run
MAX_RETRY_DELAY = 1.0
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
    path: str = ""  # where a load to a path wrote

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
        self._attempts: dict[str, Attempts] = {}  # every shard asked for
        self._missing: set[str] = set()  # asked for and not yet verified
        self._deadline: float | None = None
        self._sizes: dict[str, int] = {}

    # --- manifest ---------------------------------------------------------

    async def resolve(self, name: str) -> tuple[NameRecord, Manifest]:
        async with self._bounded():
            record = await self.dht.get_record(name)
            if record is None:
                raise NameNotFoundError(name)
            self.stats.name, self.stats.version = name, record.version
            if record.manifest_size > self.settings.max_manifest_size:
                raise ManifestError(
                    f"manifest of {record.manifest_size} bytes exceeds the limit"
                )
            data = bytearray(record.manifest_size)
            wanted = {record.manifest: record.manifest_size}
            await self._fetch_all(
                wanted, self.settings.replicas, lambda _: MemorySink(data)
            )
        return record, Manifest.decode(bytes(data))

    async def _holders(
        self, ids: Sequence[str], replicas: int
    ) -> dict[str, list[Contact]]:
        """The owners (the ``replicas`` closest) and a few more peers of each shard."""
        keys = {shard_key(i): i for i in ids}
        owners = await self.dht.closest_many(keys, replicas + EXTRA_HOLDERS)
        return {keys[key]: contacts for key, contacts in owners.items()}

    # --- fetching ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _bounded(self) -> AsyncIterator[None]:
        """Run a phase of the load under its deadline, if it has one.

        When the deadline passes, whatever runs is cancelled (fetches stop
        their workers first) and LoadDeadlineError names the missing shards.
        """
        limit = self.settings.load_deadline
        if limit is None:
            yield
            return
        loop = asyncio.get_running_loop()
        if self._deadline is None:
            self._deadline = loop.time() + limit
        timeout = asyncio.timeout_at(self._deadline)
        expired = False
        try:
            async with timeout:
                yield
        except TimeoutError as exc:
            if not timeout.expired():
                raise
            # The cancellation that stopped the fetches went through frames
            # (and cancelled tasks keep theirs) whose locals reach the sinks,
            # and so the buffers: this error is the context of the one raised.
            _clear_frames(exc)
            expired = True
        if expired:  # raised outside the handler: no context keeps frames alive
            raise LoadDeadlineError(self._missing_report(), limit)

    def _missing_report(self) -> dict[str, dict[str, str]]:
        return {i: dict(self._attempts[i].failures) for i in sorted(self._missing)}

    async def _fetch_all(
        self, wanted: dict[str, int], replicas: int, sink: Callable[[str], Sink]
    ) -> None:
        """Fetch every wanted shard (id -> size) into ``sink(id)``, verified.

        Raises LoadIncompleteError naming every shard that could not be had.
        """
        for shard_id in wanted:
            self._attempts.setdefault(shard_id, Attempts())
        self._missing.update(wanted)
        self._sizes.update(wanted)
        holders: dict[str, list[Contact]] = {}  # filled as lookups finish
        plan = Dispatch(
            holders,
            wanted,
            self.transfer.faults,
            self.settings.fetch_concurrency,
            self.settings.per_peer_connections,
            replicas,
        )
        unavailable = False
        try:
            async with asyncio.TaskGroup() as group:
                await _Run(self, plan, group, holders, sink, replicas).run()
        except BaseExceptionGroup as group_error:
            error = first_error(group_error)
            if not isinstance(error, ShardUnavailableError):
                raise error from None
            unavailable = True
            del error  # its traceback holds the sinks, and they the buffers
        if unavailable:  # raised outside the handler: no context keeps frames alive
            raise LoadIncompleteError(self._missing_report())
        await self._report_gaps(wanted, holders, replicas)

    async def _report_gaps(
        self, wanted: dict[str, int], holders: dict[str, list[Contact]], replicas: int
    ) -> None:
        """Read repair: owners found without their copy are told, so they fetch
        it; bounded in time, and a failure here never fails the load."""
        gaps: dict[Contact, list[tuple[str, int]]] = {}
        bad: dict[Contact, list[str]] = {}
        for shard_id, size in wanted.items():
            owners = holders.get(shard_id, [])[:replicas]
            attempts = self._attempts[shard_id]
            for contact in attempts.not_held:
                if contact in owners:
                    gaps.setdefault(contact, []).append((shard_id, size))
            for contact in attempts.liars:
                bad.setdefault(contact, []).append(shard_id)
        if not gaps and not bad:
            return
        log.info("read repair: %d peers lack or hold bad copies", len(gaps) + len(bad))
        calls = [self.transfer.report_gaps(c, g) for c, g in gaps.items()]
        calls += [self.transfer.report_bad(c, ids) for c, ids in bad.items()]
        try:
            async with asyncio.timeout(REPORT_TIMEOUT):
                await asyncio.gather(*calls, return_exceptions=True)
        except TimeoutError:
            log.debug("read-repair reports timed out")

    def _verified(self, shard_id: str, contact: Contact) -> None:
        self._missing.discard(shard_id)
        self._used.add(contact.address)
        if self.progress is not None:
            self.progress(self._sizes.get(shard_id, 0))

    async def _fetch_shard(
        self,
        shard_id: str,
        size: int,
        holders: list[Contact],
        sink: Sink,
        replicas: int,
        first: Contact | None = None,
    ) -> Contact:
        """One shard from its holders (``first`` first), looking them up again
        while allowed."""
        attempts = self._attempts[shard_id]
        delay = RETRY_DELAY
        rounds = 0
        while True:
            try:
                return await self.transfer.fetch(
                    shard_id, size, holders, sink, attempts, replicas, first
                )
            except ShardUnavailableError:
                if self._deadline is None and rounds >= self.settings.relookup_rounds:
                    raise
            rounds += 1
            first = None
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RETRY_DELAY)
            found = await self.dht.closest(
                shard_key(shard_id), replicas + EXTRA_HOLDERS
            )
            log.debug("shard %s: holders looked up again: %d", shard_id, len(found))
            holders = _merge(found, holders)

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
        first: dict[str, tuple[_Layout, int]] = {}  # where each shard lands first
        copies: list[tuple[_Layout, int, str]] = []  # same bytes again elsewhere
        wanted: dict[str, int] = {}
        for layout in layouts:
            for index in layout.chunks:
                chunk = layout.file.chunks[index]
                if chunk.id in first:  # same bytes twice in the model: copy
                    copies.append((layout, index, chunk.id))
                else:
                    first[chunk.id] = (layout, index)
                    wanted[chunk.id] = chunk.size

        def sink(shard_id: str) -> Sink:
            layout, index = first[shard_id]
            return MemorySink(layout.piece(index))

        for layout in layouts:
            layout.buffer = _fresh_buffer(layout.size)
        try:
            async with self._bounded():
                await self._fetch_all(wanted, manifest.replicas, sink)
                self.stats.shards += len(wanted)
        except BaseException:
            for layout in layouts:  # the caller may keep the error: free now
                layout.release()
            raise
        for layout, index, shard_id in copies:
            source, source_index = first[shard_id]
            layout.piece(index)[:] = source.piece(source_index)
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
        selected tensors only. A single file whose ``out`` is an existing
        directory, or ends with a slash, goes inside it under its published
        name (as ``cp`` does); ``overwrite`` never replaces a directory with a
        file, nor the current directory or one of its parents."""
        out = _output_path(out, manifest, bool(patterns))
        if out.exists() and not overwrite:
            raise OutputExistsError(str(out))
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if patterns:
                arrays = await self.arrays(manifest, patterns)
                await asyncio.to_thread(_write_arrays, out, arrays)
                return out
            staging = out.parent / f".{out.name}.p2pshard-{secrets.token_hex(4)}"
            try:
                async with self._bounded():
                    await self._write_files(manifest, staging)
                await asyncio.to_thread(_swap_into_place, staging, out, manifest.source)
            finally:
                await asyncio.to_thread(_remove, staging)
        except OSError as exc:
            if isinstance(exc, P2PShardError | ConnectionError | TimeoutError):
                raise  # not about the output path
            raise OutputPathError(str(out), exc) from exc
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
            await self._fetch_all(
                wanted, manifest.replicas, lambda i: FileSink(places[i])
            )
            self.stats.shards += len(wanted)
            await asyncio.to_thread(lambda: [os.fsync(fd) for fd in fds.values()])
        finally:
            for fd in fds.values():
                os.close(fd)


def _output_path(out: str | os.PathLike[str], manifest: Manifest, subset: bool) -> Path:
    """Where ``to_path`` writes, checked before any byte is fetched."""
    text = os.fspath(out)
    if not text:
        raise OutputPathError("''", "the output path is empty")
    path = Path(text)
    single = subset or manifest.source != "dir"
    if single and (path.is_dir() or text.endswith(("/", os.sep))):
        path = path / Path(manifest.files[0].path).name
        if path.is_dir():
            raise OutputPathError(str(path), "it is a directory")
    elif not single and path.exists() and not path.is_dir():
        raise OutputPathError(str(path), "a published directory needs a directory")
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise OutputPathError(
            str(path), "it is the current directory or one of its parents"
        )
    return path


class _Run:
    """Carries out a :class:`Dispatch` plan: starts the fetches it hands out,
    settles endgame duplicates (the first verified copy wins; the other
    request is cancelled, and a winning duplicate is copied into place only
    after the first request let go of the destination)."""

    def __init__(
        self,
        loader: Loader,
        plan: Dispatch,
        group: asyncio.TaskGroup,
        holders: dict[str, list[Contact]],
        sink: Callable[[str], Sink],
        replicas: int,
    ) -> None:
        self.loader = loader
        self.plan = plan
        self.group = group
        self.holders = holders
        self.sink = sink
        self.replicas = replicas
        self.known = asyncio.Event()  # set when more holders are known
        self.tasks: dict[
            asyncio.Task[Contact | None], tuple[str, bytearray | None]
        ] = {}

    async def run(self) -> None:
        plan = self.plan
        self.group.create_task(self._look_up())
        waiter: asyncio.Task[bool] | None = None
        try:
            while plan.pending or plan.unknown or self.tasks:
                self._start()
                waits: set[asyncio.Future[Any]] = set(self.tasks)
                if plan.unknown:  # wake up too when more holders are known
                    if waiter is None or waiter.done():
                        waiter = asyncio.create_task(self.known.wait())
                    waits.add(waiter)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                self.known.clear()
                for task in done:
                    if task in self.tasks:
                        await self._settle(task)
        finally:
            if waiter is not None:
                waiter.cancel()

    async def _look_up(self) -> None:
        """Look the holders up in file order, a batch at a time, so the first
        shards start while the rest are looked up."""
        ids = [i for i in self.plan.sizes if i in self.plan.unknown]
        start, batch = 0, FIRST_LOOKUPS
        while start < len(ids):
            chunk = ids[start : start + batch]
            found = await self.loader._holders(chunk, self.replicas)
            for shard_id in chunk:
                self.holders[shard_id] = found.get(shard_id, [])
                self.plan.add(shard_id, self.holders[shard_id])
            self.known.set()
            start, batch = start + batch, LOOKUP_BATCH

    def _start(self) -> None:
        loader, plan = self.loader, self.plan
        while (choice := plan.next()) is not None:
            shard_id, first = choice
            size = plan.sizes[shard_id]
            fetch = loader._fetch_shard(
                shard_id,
                size,
                self.holders.get(shard_id, []),
                self.sink(shard_id),
                self.replicas,
                first,
            )
            self.tasks[self.group.create_task(fetch)] = (shard_id, None)
        while (extra := plan.duplicate()) is not None:
            scratch = bytearray(plan.sizes[extra.shard_id])
            fetch = self._duplicate(extra.shard_id, extra.contact, scratch)
            self.tasks[self.group.create_task(fetch)] = (extra.shard_id, scratch)

    async def _duplicate(
        self, shard_id: str, contact: Contact, scratch: bytearray
    ) -> Contact | None:
        attempts = self.loader._attempts[shard_id]
        try:
            return await self.loader.transfer.fetch(
                shard_id, len(scratch), [contact], MemorySink(scratch), attempts
            )
        except ShardUnavailableError:
            return None  # the first request is still running: nothing lost

    async def _settle(self, task: asyncio.Task[Contact | None]) -> None:
        shard_id, scratch = self.tasks.pop(task)
        if task.cancelled() or task.exception() is not None:
            return  # a failed duplicate; a failed fetch fails the TaskGroup
        contact = task.result()
        if contact is None or shard_id in self.plan.done:
            return
        others = [t for t, (i, _) in self.tasks.items() if i == shard_id]
        for other in others:
            other.cancel()
            del self.tasks[other]
        if others:
            await asyncio.wait(others)  # each has let go of its sink
        if scratch is not None:
            await asyncio.to_thread(self.sink(shard_id).write, 0, memoryview(scratch))
        self.plan.finished(shard_id)
        self.loader._verified(shard_id, contact)


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
        self.size = position
        self.buffer = np.empty(0, dtype=np.uint8)

    def piece(self, index: int) -> np.ndarray:
        start = self.offsets[index]
        return self.buffer[start : start + self.file.chunks[index].size]

    def release(self) -> None:
        """Drop the buffer (a failed load must not hold the model's memory)."""
        self.buffer = np.empty(0, dtype=np.uint8)

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


def _fresh_buffer(size: int) -> np.ndarray:
    return fresh_buffer(size)


def _clear_frames(error: BaseException | None) -> None:
    """Drop the locals of the finished frames an exception chain holds."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        if error.__cause__ is not None and error.__cause__ is not error.__context__:
            _clear_frames(error.__cause__)
        error = error.__context__


def _merge(found: list[Contact], known: list[Contact]) -> list[Contact]:
    """Holders just looked up, then those known before that were not found."""
    seen = {(c.id, c.address) for c in found}
    return [*found, *(c for c in known if (c.id, c.address) not in seen)]


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

"""The manifest: everything needed to rebuild a published checkpoint.

It lists each file (relative path, size, the verbatim safetensors header when
it is one) and the shards that hold the file's data region, in order. Tensors
(name, dtype, shape, offsets) come from parsing that header with the strict
parser, so they can never disagree with the bytes. The manifest is msgpack,
content-addressed and stored like any shard; it is validated strictly on read
because it comes from the network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from typing import Any

import msgpack

from .errors import FormatError, InvalidIdError, ManifestError, P2PShardError
from .formats.checkpoint import check_relpath
from .formats.safetensors import SafetensorsHeader, TensorInfo, parse_prefix
from .hashing import check_id

__all__ = ["FORMAT", "Chunk", "FileEntry", "Manifest"]

FORMAT = "p2pshard-manifest"
VERSION = 1
SOURCES = ("file", "dir", "arrays")
MAX_FILES = 100_000
MAX_CHUNKS = 10_000_000


@dataclass(frozen=True)
class Chunk:
    """One shard of a file: its id and length."""

    id: str
    size: int


@dataclass(frozen=True)
class FileEntry:
    """One file of the checkpoint and the shards of its data region."""

    path: str
    size: int
    header: SafetensorsHeader | None
    chunks: tuple[Chunk, ...]

    @property
    def data_offset(self) -> int:
        """Where the sharded bytes start in the file (after a header)."""
        return self.header.data_offset if self.header is not None else 0

    @cached_property
    def bounds(self) -> list[int]:
        """Cumulative offsets in the data region: chunk i is bounds[i]:bounds[i+1]."""
        return [0, *accumulate(c.size for c in self.chunks)]

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return self.header.tensors if self.header is not None else ()


@dataclass(frozen=True)
class Manifest:
    source: str  # "file", "dir" or "arrays": what was published
    shard_size: int
    replicas: int
    files: tuple[FileEntry, ...]
    created: float = field(default_factory=time.time)

    # --- views ------------------------------------------------------------

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def shards(self) -> dict[str, int]:
        """Every distinct shard id and its size."""
        return {c.id: c.size for f in self.files for c in f.chunks}

    def tensors(self) -> list[tuple[FileEntry, TensorInfo]]:
        return [(f, t) for f in self.files for t in f.tensors]

    # --- codec ------------------------------------------------------------

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "hash": "blake3",
            "source": self.source,
            "shard_size": self.shard_size,
            "replicas": self.replicas,
            "created": self.created,
            "files": [
                {
                    "path": f.path,
                    "size": f.size,
                    "header": f.header.prefix if f.header is not None else None,
                    "chunks": [[c.id, c.size] for c in f.chunks],
                }
                for f in self.files
            ],
        }
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Parse and validate an untrusted manifest, or raise ManifestError."""
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ManifestError(f"undecodable manifest: {exc}") from exc
        try:
            return _from_doc(doc)
        except ManifestError:
            raise
        except (P2PShardError, KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ManifestError(f"invalid manifest: {exc}") from exc


def _from_doc(doc: Any) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError("manifest must be a map")
    version = doc.get("version")
    if doc.get("format") != FORMAT or type(version) is not int or version != VERSION:
        raise ManifestError("not a p2pshard manifest of a known version")
    if doc.get("hash") != "blake3":
        raise ManifestError(f"unknown hash algorithm {doc.get('hash')!r}")
    if doc.get("source") not in SOURCES:
        raise ManifestError(f"unknown source kind {doc.get('source')!r}")
    shard_size = _int(doc, "shard_size", minimum=1)
    replicas = _int(doc, "replicas", minimum=1)
    files = doc.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise ManifestError("manifest must list 1 to 100000 files")
    entries = tuple(_file_from_doc(f, shard_size) for f in files)
    paths = [e.path for e in entries]
    if len(set(paths)) != len(paths):
        raise ManifestError("manifest lists a path twice")
    _check_no_prefix_clash(paths)
    created = doc.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ManifestError("manifest created must be a number")
    return Manifest(doc["source"], shard_size, replicas, entries, float(created))


def _file_from_doc(doc: Any, shard_size: int) -> FileEntry:
    if not isinstance(doc, dict):
        raise ManifestError("file entry must be a map")
    path = check_relpath(doc.get("path"))
    size = _int(doc, "size", minimum=0)
    raw_header = doc.get("header")
    header = None
    if raw_header is not None:
        if not isinstance(raw_header, bytes):
            raise ManifestError(f"{path}: header must be bytes")
        try:
            header = parse_prefix(raw_header, file_size=size, source=path)
        except FormatError as exc:
            raise ManifestError(f"{path}: {exc}") from exc
    chunks = doc.get("chunks")
    if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
        raise ManifestError(f"{path}: chunks must be a list")
    parsed = tuple(_chunk_from_doc(c, shard_size, path) for c in chunks)
    entry = FileEntry(path, size, header, parsed)
    if entry.bounds[-1] != size - entry.data_offset:
        raise ManifestError(
            f"{path}: shards cover {entry.bounds[-1]} bytes, "
            f"data region has {size - entry.data_offset}"
        )
    return entry


def _chunk_from_doc(doc: Any, shard_size: int, path: str) -> Chunk:
    if not isinstance(doc, list) or len(doc) != 2:
        raise ManifestError(f"{path}: chunk must be [id, size]")
    try:
        shard_id = check_id(doc[0])
    except InvalidIdError as exc:
        raise ManifestError(f"{path}: {exc}") from exc
    size = doc[1]
    if type(size) is not int or not 0 < size <= shard_size:
        raise ManifestError(f"{path}: chunk size must be 1..{shard_size}")
    return Chunk(shard_id, size)


def _int(doc: dict[str, Any], key: str, minimum: int) -> int:
    value = doc.get(key)
    if type(value) is not int or not minimum <= value < 2**62:
        raise ManifestError(f"manifest {key} must be an int >= {minimum}")
    return value


def _check_no_prefix_clash(paths: list[str]) -> None:
    """A path may not be both a file and a folder of another path."""
    names = set(paths)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in names:
                raise ManifestError(
                    f"{path} lies under the file {'/'.join(parts[:depth])}"
                )

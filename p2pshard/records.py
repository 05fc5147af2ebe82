"""Name records: the small DHT values that bind a model name to a manifest.

A record is msgpack, a few hundred bytes, well inside one UDP datagram. Its
version only grows; of two records for one name the higher (version, manifest)
wins everywhere, so peers that saw them in any order converge on the same one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack

from .errors import InvalidIdError, InvalidNameError, P2PShardError
from .hashing import check_id, check_name, name_key

__all__ = [
    "MAX_RECORD_BYTES",
    "NameRecord",
    "RecordError",
    "RecordStore",
    "new_record",
]

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1024
MAX_RECORDS = 100_000


class RecordError(P2PShardError, ValueError):
    """A name record is malformed."""


@dataclass(frozen=True, order=False)
class NameRecord:
    """Binds ``name`` to the manifest shard ``manifest`` at ``version``."""

    name: str
    manifest: str
    manifest_size: int
    version: int
    size: int  # bytes of the model, for listings
    created: float

    @property
    def rank(self) -> tuple[int, str]:
        return (self.version, self.manifest)

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, data: object) -> NameRecord:
        """Parse untrusted bytes into a record, or raise RecordError."""
        if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
            raise RecordError("record must be bytes of at most 1 KiB")
        try:
            fields = msgpack.unpackb(data, raw=False, max_str_len=512, max_bin_len=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise RecordError(f"undecodable record: {exc}") from exc
        if not isinstance(fields, dict) or set(fields) != {
            "name",
            "manifest",
            "manifest_size",
            "version",
            "size",
            "created",
        }:
            raise RecordError("record has wrong fields")
        try:
            check_name(fields["name"])
            check_id(fields["manifest"])
        except (InvalidNameError, InvalidIdError) as exc:
            raise RecordError(str(exc)) from exc
        for key in ("manifest_size", "version", "size"):
            value = fields[key]
            if type(value) is not int or not 0 <= value < 2**63:
                raise RecordError(f"record {key} must be a non-negative int")
        if not isinstance(fields["created"], (int, float)):
            raise RecordError("record created must be a number")
        return cls(**fields)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def new_record(
    name: str, manifest: str, manifest_size: int, version: int, size: int
) -> NameRecord:
    return NameRecord(name, manifest, manifest_size, version, size, time.time())


class RecordStore:
    """Name records this peer stores for the DHT, persisted across restarts.

    ``offer`` only marks the store dirty; the owner calls ``flush`` (from a
    worker thread) to write it, so no datagram handler waits on a disk.
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._records: dict[bytes, NameRecord] = {}
        self.dirty = False

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            raw = msgpack.unpackb(self.path.read_bytes(), raw=False)
            for data in raw:
                self.offer(name_key(NameRecord.decode(data).name), data)
        except Exception as exc:  # a damaged file must not stop the peer
            log.warning("ignoring unreadable record file %s: %s", self.path, exc)
        self.dirty = False

    def snapshot(self) -> bytes | None:
        """The encoded records if they changed since the last snapshot."""
        if not self.dirty or self.path is None:
            return None
        self.dirty = False
        return msgpack.packb([r.encode() for r in self._records.values()])

    def write(self, data: bytes) -> None:
        """Write a snapshot atomically (blocking: call it in a worker thread)."""
        assert self.path is not None
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def offer(self, key: bytes, data: object) -> bool:
        """Keep ``data`` under ``key`` if it is valid and newer; True if kept."""
        record = NameRecord.decode(data)
        if name_key(record.name) != key:
            raise RecordError("record stored under a key that is not its name's")
        held = self._records.get(key)
        if held is not None and held.rank >= record.rank:
            return held.rank == record.rank
        if held is None and len(self._records) >= MAX_RECORDS:
            raise RecordError("record store is full")
        self._records[key] = record
        self.dirty = True
        return True

    def get(self, key: bytes) -> NameRecord | None:
        return self._records.get(key)

    def all(self) -> list[NameRecord]:
        return list(self._records.values())

"""Every error p2pshard raises on purpose, grouped by the phase that fails.

Each class also subclasses the closest builtin (``ValueError``, ``OSError``,
``LookupError``...) so callers may catch at either level, and carries the data a
caller needs to act (tensor names, shard ids, sizes, peers).
"""

from __future__ import annotations

__all__ = [
    "CheckpointNotFoundError",
    "DuplicateTensorError",
    "FormatError",
    "HashMismatchError",
    "HeaderError",
    "HoleError",
    "IndexMismatchError",
    "InvalidIdError",
    "InvalidNameError",
    "LoadDeadlineError",
    "LoadIncompleteError",
    "ManifestError",
    "NameConflictError",
    "NameNotFoundError",
    "NetworkError",
    "NoPeersError",
    "NoTensorMatchError",
    "OutputExistsError",
    "OutputPathError",
    "OverlapError",
    "P2PShardError",
    "PeerSetupError",
    "QuorumError",
    "ShapeMismatchError",
    "ShardNotFoundError",
    "ShardTooLargeError",
    "ShardUnavailableError",
    "StoreError",
    "StoreFullError",
    "TrailingBytesError",
    "TruncatedError",
    "UnknownDtypeError",
    "UnsafeLinkError",
    "UnsafePathError",
    "UnsupportedDtypeError",
]


class P2PShardError(Exception):
    """Base class of every error p2pshard raises on purpose."""


# --- input formats ---------------------------------------------------------


class FormatError(P2PShardError, ValueError):
    """A checkpoint file or directory is malformed."""


class HeaderError(FormatError):
    """A safetensors header cannot be read: bad length, bad JSON, bad fields."""


class UnknownDtypeError(FormatError):
    """A tensor declares a dtype that safetensors does not define."""

    def __init__(self, tensor: str, dtype: str) -> None:
        super().__init__(f"tensor {tensor!r} has unknown dtype {dtype!r}")
        self.tensor = tensor
        self.dtype = dtype


class UnsupportedDtypeError(FormatError):
    """A dtype exists but cannot be represented as a numpy array."""

    def __init__(self, tensor: str, dtype: str, why: str) -> None:
        super().__init__(f"tensor {tensor!r} of dtype {dtype}: {why}")
        self.tensor = tensor
        self.dtype = dtype


class ShapeMismatchError(FormatError):
    """A tensor's byte range does not match its dtype and shape."""

    def __init__(self, tensor: str, expected: int, actual: int) -> None:
        super().__init__(
            f"tensor {tensor!r} needs {expected} bytes for its dtype and shape "
            f"but its offsets cover {actual}"
        )
        self.tensor = tensor
        self.expected = expected
        self.actual = actual


class OverlapError(FormatError):
    """Two tensors claim overlapping bytes of the data region."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__(f"tensors {first!r} and {second!r} overlap")
        self.tensors = (first, second)


class HoleError(FormatError):
    """Bytes of the data region belong to no tensor."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(f"bytes [{start}, {end}) of the data region hold no tensor")
        self.start = start
        self.end = end


class TruncatedError(FormatError):
    """The file is shorter than its header says."""

    def __init__(self, expected: int, actual: int, what: str = "file") -> None:
        super().__init__(
            f"{what} is truncated: expected {expected} bytes, got {actual}"
        )
        self.expected = expected
        self.actual = actual


class TrailingBytesError(FormatError):
    """The file continues past the last tensor."""

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(
            f"{actual - expected} trailing bytes after the last tensor "
            f"(data region should be {expected} bytes, is {actual})"
        )
        self.expected = expected
        self.actual = actual


class IndexMismatchError(FormatError):
    """A sharded checkpoint's index names a tensor or file that is not there."""

    def __init__(self, tensor: str, file: str, why: str) -> None:
        super().__init__(f"index entry {tensor!r} -> {file!r}: {why}")
        self.tensor = tensor
        self.file = file


class DuplicateTensorError(FormatError):
    """Two files of one checkpoint define a tensor of the same name."""

    def __init__(self, tensor: str, files: tuple[str, str]) -> None:
        super().__init__(
            f"tensor {tensor!r} is defined in both {files[0]} and {files[1]}"
        )
        self.tensor = tensor
        self.files = files


class UnsafeLinkError(FormatError):
    """A symlink in a checkpoint leaves it or points at something not a file."""

    def __init__(self, path: str, target: str, why: str) -> None:
        super().__init__(f"symlink {path} -> {target}: {why}")
        self.path = path
        self.target = target


class CheckpointNotFoundError(P2PShardError, FileNotFoundError):
    """The path to publish does not exist."""

    def __init__(self, path: str) -> None:
        super().__init__(f"no such file or directory: {path}")
        self.path = path


# --- identifiers and manifests ---------------------------------------------


class InvalidIdError(P2PShardError, ValueError):
    """A shard id is not 64 lowercase hex characters."""


class InvalidNameError(P2PShardError, ValueError):
    """A model name is empty, too long or has forbidden characters."""


class ManifestError(P2PShardError, ValueError):
    """A manifest is malformed or inconsistent."""


class UnsafePathError(P2PShardError, ValueError):
    """A relative path from untrusted input could escape its directory."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"unsafe relative path {path!r}: {why}")
        self.path = path


# --- local store -------------------------------------------------------------


class StoreError(P2PShardError, OSError):
    """The on-disk shard store failed."""


class StoreFullError(StoreError):
    """The store has no room for a shard."""

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"store full: need {needed} bytes, {available} available")
        self.needed = needed
        self.available = available


class ShardTooLargeError(StoreError):
    """A shard is larger than the store accepts."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"shard of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit


class HashMismatchError(P2PShardError, ValueError):
    """Bytes do not hash to the id they were stored or served under."""

    def __init__(self, shard_id: str, actual: str, source: str = "") -> None:
        where = f" from {source}" if source else ""
        super().__init__(f"shard {shard_id}{where} hashes to {actual}")
        self.shard_id = shard_id
        self.actual = actual
        self.source = source


class ShardNotFoundError(P2PShardError, KeyError):
    """The local store does not hold a shard."""

    def __init__(self, shard_id: str) -> None:
        super().__init__(shard_id)
        self.shard_id = shard_id

    def __str__(self) -> str:
        return f"shard {self.shard_id} is not held here"


# --- network ----------------------------------------------------------------


class NetworkError(P2PShardError, ConnectionError):
    """The swarm could not be reached or did not answer."""


class NoPeersError(NetworkError):
    """No peer of the swarm answered (bootstrap unreachable or swarm empty)."""


class NameNotFoundError(P2PShardError, LookupError):
    """No record binds this model name in the swarm."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r} in the swarm")
        self.name = name


class ShardUnavailableError(NetworkError):
    """Every known holder of a shard failed to serve it intact."""

    def __init__(self, shard_id: str, failures: dict[str, str]) -> None:
        tried = "; ".join(f"{p}: {why}" for p, why in failures.items()) or "no holders"
        super().__init__(f"shard {shard_id} unavailable ({tried})")
        self.shard_id = shard_id
        self.failures = failures


class LoadIncompleteError(NetworkError):
    """A load stopped with shards missing: every holder of them failed."""

    def __init__(self, missing: dict[str, dict[str, str]], why: str = "") -> None:
        shown = "; ".join(
            f"shard {shard_id} ("
            + (
                "tried " + ", ".join(f"{p}: {w}" for p, w in tried.items())
                if tried
                else "no peer tried"
            )
            + ")"
            for shard_id, tried in list(missing.items())[:20]
        )
        more = f"; and {len(missing) - 20} more" if len(missing) > 20 else ""
        super().__init__(
            f"load failed{why}: {len(missing)} shard(s) missing: {shown}{more}"
        )
        self.missing = missing


class LoadDeadlineError(LoadIncompleteError, TimeoutError):
    """A load's deadline passed with shards still missing."""

    def __init__(self, missing: dict[str, dict[str, str]], deadline: float) -> None:
        super().__init__(missing, f" at its deadline of {deadline:g} s")
        self.deadline = deadline


class QuorumError(NetworkError):
    """A synchronous write reached fewer replicas than its quorum."""

    def __init__(
        self, shard_id: str, needed: int, acked: int, failures: dict[str, str]
    ):
        detail = "; ".join(f"{p}: {why}" for p, why in failures.items())
        super().__init__(
            f"shard {shard_id}: {acked} of {needed} required replicas acknowledged"
            + (f" ({detail})" if detail else "")
        )
        self.shard_id = shard_id
        self.needed = needed
        self.acked = acked
        self.failures = failures


class NameConflictError(P2PShardError, RuntimeError):
    """Another publisher bound the same name at the same time, and won."""

    def __init__(self, name: str, version: int, winner: str) -> None:
        super().__init__(
            f"{name!r} v{version} lost to a concurrent publish of manifest "
            f"{winner[:16]}; publish again to supersede it"
        )
        self.name = name
        self.version = version
        self.winner = winner


class NoTensorMatchError(P2PShardError, LookupError):
    """A tensor filter matches no tensor of the model."""

    def __init__(self, patterns: list[str]) -> None:
        super().__init__(f"no tensor matches {patterns}")
        self.patterns = patterns


# --- output -----------------------------------------------------------------


class OutputExistsError(P2PShardError, FileExistsError):
    """A load would overwrite an existing path."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path} already exists (pass --overwrite, or overwrite=True, to "
            "replace it)"
        )
        self.path = path


class OutputPathError(P2PShardError, OSError):
    """A load cannot write where it was told to (not a directory, no permission,
    disk full...)."""

    def __init__(self, path: str, reason: OSError | str) -> None:
        if isinstance(reason, str):
            why = reason
        elif isinstance(reason, FileExistsError | NotADirectoryError):
            why = "a parent of it is not a directory"
        else:
            why = reason.strerror or str(reason) or type(reason).__name__
        super().__init__(f"cannot write {path}: {why}")
        self.path = path


class PeerSetupError(P2PShardError, OSError):
    """A peer cannot start: its data directory is unusable or already in use,
    or it cannot listen on its address."""


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a TaskGroup's group: its first p2pshard error if
    any (the cause a caller can act on), else its first leaf."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, P2PShardError)), leaves[0])

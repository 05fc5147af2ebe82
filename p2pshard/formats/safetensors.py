"""Strict reader and writer of the safetensors file format.

A file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON, then
the data region. The parser refuses anything ambiguous: overlapping tensors,
holes, trailing bytes, unknown dtypes, sizes that disagree with shapes.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import (
    HeaderError,
    HoleError,
    OverlapError,
    ShapeMismatchError,
    TrailingBytesError,
    TruncatedError,
    UnknownDtypeError,
    UnsupportedDtypeError,
)

__all__ = [
    "DTYPE_BITS",
    "LENGTH_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_RANK",
    "METADATA_KEY",
    "SafetensorsHeader",
    "TensorInfo",
    "build_header",
    "numpy_dtype",
    "parse_bytes",
    "parse_prefix",
    "read_header",
    "safetensors_dtype",
    "tensor_view",
    "write_file",
]

LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
METADATA_KEY = "__metadata__"
MAX_RANK = 64  # numpy's limit; also bounds the cost of multiplying huge dims
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_PACKED_WHY = "packed sub-byte dtype has no numpy layout; load it to a file instead"

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F64": np.dtype("<f8"),
    "C64": np.dtype("<c8"),
}
_SAFETENSORS: dict[np.dtype, str] = {dt: name for name, dt in _NUMPY.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry; ``start`` and ``end`` are offsets in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's bytes."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header; ``prefix`` is the file's bytes before the data region."""

    prefix: bytes
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    data_size: int

    @property
    def data_offset(self) -> int:
        """Where the data region starts in the file."""
        return len(self.prefix)

    @property
    def file_size(self) -> int:
        """Size of the whole file this header describes."""
        return self.data_offset + self.data_size

    @cached_property
    def by_name(self) -> dict[str, TensorInfo]:
        """Tensors keyed by name."""
        return {info.name: info for info in self.tensors}

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name``; KeyError if absent."""
        return self.by_name[name]


# --- parsing -----------------------------------------------------------------


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def _header_length(first: bytes, file_size: int | None, source: str) -> int:
    """Validate the 8-byte length field and return N."""
    if len(first) < LENGTH_BYTES:
        raise TruncatedError(LENGTH_BYTES, len(first), what=source or "header length")
    (length,) = struct.unpack("<Q", first[:LENGTH_BYTES])
    if length == 0:
        raise HeaderError(f"{_where(source)}header length is 0")
    if length > MAX_HEADER_BYTES:
        raise HeaderError(
            f"{_where(source)}header length {length} exceeds {MAX_HEADER_BYTES} bytes"
        )
    if file_size is not None and LENGTH_BYTES + length > file_size:
        raise TruncatedError(LENGTH_BYTES + length, file_size, what=source or "file")
    return length


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _load_json(raw: bytes, source: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        doc = json.loads(
            text, object_pairs_hook=_unique_object, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"{_where(source)}header is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise HeaderError(
            f"{_where(source)}header must be a JSON object, not {type(doc).__name__}"
        )
    return doc


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_metadata(value: object, source: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise HeaderError(f"{_where(source)}{METADATA_KEY} must map strings to strings")
    return dict(value)


def _shape_bytes(name: str, dtype: str, shape: tuple[int, ...], actual: int) -> None:
    """Check that a tensor's byte count matches its dtype and shape."""
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        err = ShapeMismatchError(name, -(-bits // 8), actual)
        err.args = (
            f"tensor {name!r} of packed dtype {dtype} and shape {list(shape)} "
            f"holds {bits} bits, not a whole number of bytes",
        )
        raise err
    if bits // 8 != actual:
        raise ShapeMismatchError(name, bits // 8, actual)


def _parse_entry(name: str, entry: object, source: str) -> TensorInfo:
    where = f"{_where(source)}tensor {name!r}"
    if not isinstance(entry, dict):
        raise HeaderError(f"{where}: entry must be an object")
    if set(entry) != _ENTRY_KEYS:
        raise HeaderError(
            f"{where}: entry must have exactly the keys dtype, shape, data_offsets "
            f"(has {sorted(entry)})"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise HeaderError(f"{where}: dtype must be a string, not {dtype!r}")
    if dtype not in DTYPE_BITS:
        raise UnknownDtypeError(name, dtype)
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise HeaderError(f"{where}: shape must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise HeaderError(f"{where}: {len(shape)} dimensions exceed {MAX_RANK}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_uint(o) for o in offsets)
    ):
        raise HeaderError(
            f"{where}: data_offsets must be [begin, end] non-negative integers"
        )
    start, end = offsets
    if start > end:
        raise HeaderError(f"{where}: data_offsets begin {start} > end {end}")
    _shape_bytes(name, dtype, tuple(shape), end - start)
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _check_layout(tensors: list[TensorInfo]) -> int:
    """Reject overlaps and holes; return the size the data region must have."""
    pos = 0
    owner: TensorInfo | None = None
    for info in tensors:
        if info.start > pos:
            raise HoleError(pos, info.start)
        if info.start < pos:
            assert owner is not None
            raise OverlapError(owner.name, info.name)
        if info.nbytes:
            pos, owner = info.end, info
    return pos


def _check_data_size(
    length: int, data_size: int, file_size: int | None, source: str
) -> None:
    if file_size is None:
        return
    actual = file_size - LENGTH_BYTES - length
    if actual < data_size:
        expected = LENGTH_BYTES + length + data_size
        raise TruncatedError(expected, file_size, what=source or "file")
    if actual > data_size:
        raise TrailingBytesError(data_size, actual)


def parse_prefix(
    prefix: bytes, file_size: int | None = None, source: str = ""
) -> SafetensorsHeader:
    """Validate the length field and JSON header of a safetensors file.

    ``prefix`` is exactly the 8 + N bytes before the data region. When
    ``file_size`` is given, the data region's length is checked too.
    """
    prefix = bytes(prefix)
    length = _header_length(prefix, file_size, source)
    total = LENGTH_BYTES + length
    if len(prefix) < total:
        raise TruncatedError(total, len(prefix), what=source or "header")
    if len(prefix) > total:
        raise HeaderError(
            f"{_where(source)}prefix has {len(prefix)} bytes, header says {total}"
        )
    doc = _load_json(prefix[LENGTH_BYTES:], source)
    metadata = _parse_metadata(doc.pop(METADATA_KEY, None), source)
    tensors = [_parse_entry(name, entry, source) for name, entry in doc.items()]
    tensors.sort(key=lambda t: (t.start, t.end, t.name))
    data_size = _check_layout(tensors)
    _check_data_size(length, data_size, file_size, source)
    return SafetensorsHeader(prefix, tuple(tensors), metadata, data_size)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the file at ``path`` against its size."""
    source = os.fspath(path)
    with open(source, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        first = f.read(LENGTH_BYTES)
        length = _header_length(first, file_size, source)
        rest = f.read(length)
    return parse_prefix(first + rest, file_size, source)


def parse_bytes(data: bytes | bytearray | memoryview) -> SafetensorsHeader:
    """Validate a whole safetensors file held in memory."""
    view = memoryview(data).cast("B")
    length = _header_length(bytes(view[:LENGTH_BYTES]), len(view), "")
    return parse_prefix(bytes(view[: LENGTH_BYTES + length]), len(view))


# --- dtypes and views ----------------------------------------------------------


def numpy_dtype(dtype: str, tensor: str = "") -> np.dtype:
    """The numpy dtype holding safetensors ``dtype`` (little-endian)."""
    found = _NUMPY.get(dtype)
    if found is not None:
        return found
    if dtype in DTYPE_BITS:
        raise UnsupportedDtypeError(tensor, dtype, _PACKED_WHY)
    raise UnknownDtypeError(tensor, dtype)


def safetensors_dtype(dtype: np.dtype, tensor: str = "") -> str:
    """The safetensors name of numpy ``dtype``, either byte order; never casts."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedDtypeError(tensor, str(dtype), "not a numpy dtype") from exc
    if dt.byteorder == ">" or (dt.byteorder == "=" and sys.byteorder == "big"):
        dt = dt.newbyteorder("<")
    name = _SAFETENSORS.get(dt) if dt.names is None and dt.subdtype is None else None
    if name is None:
        raise UnsupportedDtypeError(tensor, str(dtype), "safetensors has no such dtype")
    return name


def _byte_len(buffer: Any) -> int:
    if isinstance(buffer, np.ndarray):
        return buffer.nbytes
    return memoryview(buffer).nbytes


def tensor_view(buffer: Any, offset: int, info: TensorInfo) -> np.ndarray:
    """Zero-copy array over ``info.nbytes`` bytes found at ``offset`` in ``buffer``.

    ``offset`` is where the tensor's first byte is in ``buffer`` (for a whole
    file: ``header.data_offset + info.start``).
    """
    dtype = numpy_dtype(info.dtype, info.name)
    available = _byte_len(buffer)
    if offset < 0 or offset + info.nbytes > available:
        raise TruncatedError(
            offset + info.nbytes, available, what=f"tensor {info.name!r}"
        )
    if info.numel * dtype.itemsize != info.nbytes:
        raise ShapeMismatchError(info.name, info.numel * dtype.itemsize, info.nbytes)
    flat = np.frombuffer(buffer, dtype=dtype, count=info.numel, offset=offset)
    return flat.reshape(info.shape)


# --- writing -------------------------------------------------------------------


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or name == METADATA_KEY:
        raise HeaderError(f"invalid tensor name {name!r}")
    return name


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(f"{METADATA_KEY} must map strings to strings")
    return dict(metadata)


def _little_endian(name: str, array: object) -> tuple[str, np.ndarray]:
    """Return the dtype name and a C-contiguous little-endian form of ``array``."""
    if not isinstance(array, np.ndarray):
        raise HeaderError(
            f"tensor {name!r} is a {type(array).__name__}, not an ndarray"
        )
    dtype_name = safetensors_dtype(array.dtype, name)
    if not array.flags.c_contiguous:
        array = np.copy(array, order="C")
    if array.dtype.byteorder == ">" or (
        array.dtype.byteorder == "=" and sys.byteorder == "big"
    ):
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    return dtype_name, array


def _encode_header(doc: dict[str, Any]) -> bytes:
    """JSON-encode ``doc`` and prepend its length, padded to 8-byte alignment."""
    try:
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise HeaderError(
            f"a tensor name or metadata is not valid text: {exc}"
        ) from exc
    raw += b" " * (-(LENGTH_BYTES + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def build_header(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> tuple[SafetensorsHeader, list[np.ndarray]]:
    """Lay out ``arrays`` as a safetensors file, tensors in sorted name order.

    Returns the validated header and, in ``header.tensors`` order, each array as
    C-contiguous little-endian data (copied only when needed). An array given
    under two names (tied weights) is written twice; content addressing stores
    the identical bytes once later.
    """
    meta = _check_metadata(metadata)
    doc: dict[str, Any] = {} if meta is None else {METADATA_KEY: meta}
    out: list[np.ndarray] = []
    pos = 0
    for name in sorted(arrays, key=_check_name):
        dtype_name, array = _little_endian(name, arrays[name])
        doc[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [pos, pos + array.nbytes],
        }
        pos += array.nbytes
        out.append(array)
    return parse_prefix(_encode_header(doc)), out


def _raw_bytes(array: np.ndarray) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))


def write_file(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> SafetensorsHeader:
    """Write ``arrays`` to a safetensors file at ``path``; see build_header."""
    header, data = build_header(arrays, metadata)
    with open(path, "wb") as f:
        f.write(header.prefix)
        for array in data:
            f.write(_raw_bytes(array))
    return header

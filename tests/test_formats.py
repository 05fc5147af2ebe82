"""Tests of the strict safetensors parser/writer and the checkpoint scanner."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy as stnp

from p2pshard.errors import (
    CheckpointNotFoundError,
    DuplicateTensorError,
    FormatError,
    HeaderError,
    HoleError,
    IndexMismatchError,
    OverlapError,
    ShapeMismatchError,
    TrailingBytesError,
    TruncatedError,
    UnknownDtypeError,
    UnsafeLinkError,
    UnsafePathError,
    UnsupportedDtypeError,
)
from p2pshard.formats.checkpoint import SourceFile, check_relpath, scan_path
from p2pshard.formats.safetensors import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    build_header,
    numpy_dtype,
    parse_bytes,
    parse_prefix,
    read_header,
    safetensors_dtype,
    tensor_view,
    write_file,
)


def raw_file(header: dict | bytes, data: bytes = b"") -> bytes:
    """Bytes of a safetensors file with ``header`` (dict or raw JSON) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def both(tmp_path: Path, data: bytes, name: str = "t.safetensors") -> list:
    """Parse ``data`` as bytes and from a file: two callables for pytest.raises."""
    path = tmp_path / name
    path.write_bytes(data)
    return [lambda: read_header(path), lambda: parse_bytes(data)]


def check_both(tmp_path: Path, data: bytes, error: type) -> list[Exception]:
    caught = []
    for parse in both(tmp_path, data):
        with pytest.raises(error) as info:
            parse()
        caught.append(info.value)
    return caught


def views(data: bytes, header: SafetensorsHeader) -> dict[str, np.ndarray]:
    return {
        t.name: tensor_view(data, header.data_offset + t.start, t)
        for t in header.tensors
    }


# --- 1. exotic dtypes ----------------------------------------------------------

EXOTIC_DATA = bytes.fromhex("803f20c0") + bytes.fromhex("3840b800")
EXOTIC_HEADER = {
    "w_bf16": entry("BF16", [2], [0, 4]),
    "w_f8": entry("F8_E4M3", [4], [4, 8]),
}


def test_exotic_dtypes_decode(tmp_path: Path) -> None:
    data = raw_file(EXOTIC_HEADER, EXOTIC_DATA)
    for parse in both(tmp_path, data):
        header = parse()
        got = views(data, header)
        assert got["w_bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
        assert got["w_f8"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
        assert got["w_bf16"].astype(np.float32).tolist() == [1.0, -2.5]
        assert got["w_f8"].astype(np.float32).tolist() == [1.0, 2.0, -1.0, 0.0]


def test_exotic_dtypes_round_trip(tmp_path: Path) -> None:
    data = raw_file(EXOTIC_HEADER, EXOTIC_DATA)
    arrays = views(data, parse_bytes(data))
    header, out = build_header(arrays)
    assert [t.name for t in header.tensors] == ["w_bf16", "w_f8"]
    assert b"".join(a.tobytes() for a in out) == EXOTIC_DATA
    path = tmp_path / "out.safetensors"
    written = write_file(path, arrays)
    blob = path.read_bytes()
    assert blob[written.data_offset :] == EXOTIC_DATA
    assert written.data_offset % 8 == 0
    assert read_header(path) == written


def test_unknown_dtype(tmp_path: Path) -> None:
    data = raw_file({"w_bad": entry("F7", [1], [0, 1])}, b"\0")
    for err in check_both(tmp_path, data, UnknownDtypeError):
        assert "w_bad" in str(err) and "F7" in str(err)
        assert (err.tensor, err.dtype) == ("w_bad", "F7")


def test_packed_dtypes() -> None:
    with pytest.raises(UnsupportedDtypeError):
        numpy_dtype("F4")
    with pytest.raises(UnsupportedDtypeError, match="w4"):
        numpy_dtype("F6_E2M3", "w4")
    with pytest.raises(UnknownDtypeError):
        numpy_dtype("F7")
    # 3 F4 values are 12 bits: not a whole byte count
    bad = raw_file({"p": entry("F4", [3], [0, 2])}, b"\0\0")
    with pytest.raises(ShapeMismatchError, match="'p'"):
        parse_bytes(bad)
    good = raw_file({"p": entry("F4", [4], [0, 2])}, b"\0\0")
    assert parse_bytes(good).tensor("p").nbytes == 2


def test_dtype_tables() -> None:
    assert len(DTYPE_BITS) == 20
    for name in DTYPE_BITS:
        if DTYPE_BITS[name] % 8 == 0:
            dt = numpy_dtype(name)
            assert dt.itemsize * 8 == DTYPE_BITS[name]
            assert safetensors_dtype(dt) == name
    assert safetensors_dtype(np.dtype(">f4")) == "F32"
    assert safetensors_dtype(np.dtype(">i8")) == "I64"
    assert numpy_dtype("F8_E8M0") == np.dtype(ml_dtypes.float8_e8m0fnu)
    for bad in (object, "U3", np.longdouble, np.complex128, "M8[s]", "V2", "f4,f4"):
        dt = np.dtype(bad)
        if dt == np.float64:  # longdouble is float64 on some platforms
            continue
        with pytest.raises(UnsupportedDtypeError):
            safetensors_dtype(dt, "x")


# --- 2. tied weights -------------------------------------------------------------


def test_tied_weights_build() -> None:
    shared = np.arange(16, dtype=np.float32).reshape(4, 4)
    header, out = build_header({"embed.weight": shared, "lm_head.weight": shared})
    assert set(header.by_name) == {"embed.weight", "lm_head.weight"}
    assert header.data_size == 2 * shared.nbytes
    assert all(a is shared for a in out)  # no copy when not needed


@pytest.mark.parametrize("y_offsets", [[0, 64], [32, 96]])
def test_tied_overlap(tmp_path: Path, y_offsets: list[int]) -> None:
    header = {
        "x": entry("F32", [16], [0, 64]),
        "y": entry("F32", [16], y_offsets),
    }
    data = raw_file(header, bytes(max(64, y_offsets[1])))
    for err in check_both(tmp_path, data, OverlapError):
        assert set(err.tensors) == {"x", "y"}
        assert "'x'" in str(err) and "'y'" in str(err)


# --- 3. data region disagreement ---------------------------------------------------

TWO = {"A": entry("F32", [4], [0, 16]), "B": entry("F32", [4], [16, 32])}


def test_trailing_bytes(tmp_path: Path) -> None:
    data = raw_file(TWO, bytes(32) + b"garbage")
    for err in check_both(tmp_path, data, TrailingBytesError):
        assert (err.expected, err.actual) == (32, 39)


def test_truncated(tmp_path: Path) -> None:
    full = raw_file(TWO, bytes(32))
    data = full[:-4]
    for err in check_both(tmp_path, data, TruncatedError):
        assert (err.expected, err.actual) == (len(full), len(full) - 4)
        assert str(len(full)) in str(err)


def test_hole(tmp_path: Path) -> None:
    header = {"A": entry("F32", [4], [0, 16]), "B": entry("F32", [4], [32, 48])}
    for err in check_both(tmp_path, raw_file(header, bytes(48)), HoleError):
        assert (err.start, err.end) == (16, 32)
    first = {"A": entry("F32", [4], [8, 24])}
    for err in check_both(tmp_path, raw_file(first, bytes(24)), HoleError):
        assert (err.start, err.end) == (0, 8)


# --- 4. zero-element tensors ---------------------------------------------------------


def test_zero_element_tensors(tmp_path: Path) -> None:
    header = {
        "a": entry("F32", [2, 2], [0, 16]),
        "empty": entry("F32", [0, 4], [16, 16]),
        "b": entry("I64", [1], [16, 24]),
    }
    data = raw_file(header, bytes(16) + struct.pack("<q", 7))
    for parse in both(tmp_path, data):
        parsed = parse()
        assert parsed.data_size == 24
        got = views(data, parsed)
        assert got["empty"].shape == (0, 4)
        assert got["empty"].dtype == np.float32
        assert got["b"].tolist() == [7]


def test_only_empty_tensor(tmp_path: Path) -> None:
    data = raw_file({"empty": entry("F32", [0, 4], [0, 0])})
    for parse in both(tmp_path, data):
        parsed = parse()
        assert parsed.data_size == 0
        assert tensor_view(data, len(data), parsed.tensor("empty")).shape == (0, 4)


def test_zero_length_inside_or_past_others() -> None:
    inside = {"a": entry("F32", [4], [0, 16]), "z": entry("F32", [0], [8, 8])}
    with pytest.raises(OverlapError):
        parse_bytes(raw_file(inside, bytes(16)))
    past = {"a": entry("F32", [4], [0, 16]), "z": entry("F32", [0], [20, 20])}
    with pytest.raises(HoleError):
        parse_bytes(raw_file(past, bytes(16)))


def test_build_zero_element_and_scalar(tmp_path: Path) -> None:
    arrays = {
        "e": np.zeros((0, 4), np.float32),
        "s": np.array(3.5, np.float64),
        "v": np.arange(3, dtype=np.int16),
    }
    path = tmp_path / "z.safetensors"
    header = write_file(path, arrays, {"format": "np"})
    assert header.metadata == {"format": "np"}
    loaded = stnp.load_file(str(path))
    for name, arr in arrays.items():
        assert loaded[name].shape == arr.shape
        np.testing.assert_array_equal(loaded[name], arr)


# --- 5. round trip with the safetensors library -------------------------------------


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": rng.standard_normal((4, 4)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "bool": rng.integers(0, 2, (2, 3)).astype(bool),
        "c64": (rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(
            np.complex64
        ),
    }
    for kind in ("i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8"):
        out[kind] = rng.integers(0, 100, (2, 2, 3)).astype(kind)
    return out


def test_round_trip_write_then_library(tmp_path: Path) -> None:
    arrays = sample_arrays()
    arrays["strided"] = np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2]
    arrays["big_endian"] = np.array([1.5, -2.25, 1e30], dtype=">f4")
    path = tmp_path / "ours.safetensors"
    write_file(path, arrays, {"k": "v"})
    loaded = stnp.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, arr in arrays.items():
        assert loaded[name].shape == arr.shape
        np.testing.assert_array_equal(loaded[name], arr)
    assert loaded["big_endian"].dtype == np.dtype("<f4")
    assert loaded["big_endian"].tolist() == [1.5, -2.25, np.float32(1e30)]


def test_round_trip_library_then_parse(tmp_path: Path) -> None:
    arrays = sample_arrays()
    path = tmp_path / "lib.safetensors"
    stnp.save_file(arrays, str(path), metadata={"format": "np"})
    header = read_header(path)
    data = path.read_bytes()
    assert parse_bytes(data) == header
    assert header.metadata == {"format": "np"}
    assert header.prefix == data[: header.data_offset]
    got = views(data, header)
    for name, arr in arrays.items():
        assert got[name].dtype == arr.dtype
        np.testing.assert_array_equal(got[name], arr)
    # the prefix plus each tensor's bytes at its offsets rebuild the file exactly
    rebuilt = bytearray(header.file_size)
    rebuilt[: header.data_offset] = header.prefix
    for t in header.tensors:
        start = header.data_offset + t.start
        rebuilt[start : start + t.nbytes] = got[t.name].tobytes()
    assert rebuilt == data
    # our own layout differs (sorted by name) but holds the same tensors
    ours, _ = build_header(got, header.metadata)
    assert {t.name: (t.dtype, t.shape) for t in ours.tensors} == {
        t.name: (t.dtype, t.shape) for t in header.tensors
    }


def test_tensor_view_is_zero_copy() -> None:
    buf = bytearray(raw_file({"x": entry("I32", [2], [0, 8])}, bytes(8)))
    header = parse_bytes(buf)
    view = tensor_view(buf, header.data_offset, header.tensor("x"))
    view[1] = 42
    assert struct.unpack_from("<i", buf, header.data_offset + 4) == (42,)
    as_u8 = np.frombuffer(buf, dtype=np.uint8)
    assert tensor_view(as_u8, header.data_offset, header.tensor("x")).tolist() == [
        0,
        42,
    ]
    with pytest.raises(TruncatedError):
        tensor_view(buf, header.data_offset + 4, header.tensor("x"))


def test_build_rejects_bad_input() -> None:
    ok = np.zeros(2, np.float32)
    for bad in ({"": ok}, {"__metadata__": ok}, {3: ok}):
        with pytest.raises(FormatError):
            build_header(bad)
    with pytest.raises(HeaderError, match="'x'"):
        build_header({"x": [1.0, 2.0]})
    with pytest.raises(UnsupportedDtypeError, match="'x'"):
        build_header({"x": np.zeros(2, np.complex128)})
    with pytest.raises(HeaderError):
        build_header({"x": ok}, {"k": 1})
    with pytest.raises(HeaderError):
        build_header({"bad\ud800": ok})


# --- 6. malformed headers -------------------------------------------------------------


def test_header_length_beyond_file(tmp_path: Path) -> None:
    data = struct.pack("<Q", 1000) + b"{}"
    for err in check_both(tmp_path, data, TruncatedError):
        assert (err.expected, err.actual) == (1008, 10)
    check_both(tmp_path, b"\x01\x00", TruncatedError)
    with pytest.raises(TruncatedError):
        parse_prefix(data)


def test_header_length_limits(tmp_path: Path) -> None:
    check_both(tmp_path, struct.pack("<Q", 0), HeaderError)
    huge = struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}"
    check_both(tmp_path, huge, HeaderError)


@pytest.mark.parametrize(
    ("header", "error", "needle"),
    [
        (b"not json", HeaderError, "JSON"),
        (b"\xff\xfe{}", HeaderError, "JSON"),
        (b"[1, 2]", HeaderError, "object"),
        (b'{"x": {"dtype": "F32", "shape": [NaN]}}', HeaderError, "JSON"),
        (b'{"x": 1, "x": 2}', HeaderError, "duplicate"),
        ({"x": entry("F32", ["1"], [0, 4])}, HeaderError, "'x'"),
        ({"x": entry("F32", [1.0], [0, 4])}, HeaderError, "'x'"),
        ({"x": entry("F32", [True], [0, 4])}, HeaderError, "'x'"),
        ({"x": entry("F32", [-1], [0, 4])}, HeaderError, "'x'"),
        ({"x": entry("F32", 4, [0, 4])}, HeaderError, "'x'"),
        ({"x": entry("F32", [1] * 65, [0, 4])}, HeaderError, "dimensions"),
        ({"x": entry("F32", [1], [-4, 0])}, HeaderError, "'x'"),
        ({"x": entry("F32", [1], [0])}, HeaderError, "'x'"),
        ({"x": entry("F32", [1], [4, 0])}, HeaderError, "'x'"),
        ({"x": entry(32, [1], [0, 4])}, HeaderError, "'x'"),
        ({"x": {"dtype": "F32", "shape": [1]}}, HeaderError, "'x'"),
        ({"x": {**entry("F32", [1], [0, 4]), "extra": 1}}, HeaderError, "'x'"),
        ({"x": [1]}, HeaderError, "'x'"),
        ({"__metadata__": {"k": 1}}, HeaderError, "__metadata__"),
        ({"__metadata__": ["k"]}, HeaderError, "__metadata__"),
        ({"x": entry("F32", [2, 3], [0, 20])}, ShapeMismatchError, "'x'"),
    ],
)
def test_malformed_headers(
    tmp_path: Path, header: dict | bytes, error: type, needle: str
) -> None:
    for err in check_both(tmp_path, raw_file(header, bytes(4)), error):
        assert needle in str(err)


def test_header_errors_name_source(tmp_path: Path) -> None:
    path = tmp_path / "named.safetensors"
    path.write_bytes(raw_file(b"[]"))
    with pytest.raises(HeaderError, match=r"named\.safetensors"):
        read_header(path)


def test_shape_mismatch_values(tmp_path: Path) -> None:
    data = raw_file({"x": entry("F32", [2, 3], [0, 20])}, bytes(20))
    for err in check_both(tmp_path, data, ShapeMismatchError):
        assert (err.tensor, err.expected, err.actual) == ("x", 24, 20)


def test_parse_prefix_details() -> None:
    data = raw_file({"x": entry("U8", [2], [0, 2])}, b"\1\2")
    header = parse_bytes(data)
    assert header.data_offset == len(data) - 2
    assert header.file_size == len(data)
    assert parse_prefix(header.prefix) == header
    assert parse_prefix(header.prefix, len(data), "src") == header
    assert header.tensor("x") == TensorInfo("x", "U8", (2,), 0, 2)
    with pytest.raises(KeyError):
        header.tensor("y")
    with pytest.raises(HeaderError):
        parse_prefix(header.prefix + b" ")
    with pytest.raises(TruncatedError):
        parse_prefix(header.prefix[:-1])
    empty = parse_bytes(raw_file(b"{}"))
    assert (empty.tensors, empty.data_size, empty.metadata) == ((), 0, None)


# --- 7. checkpoint directories ---------------------------------------------------


def make_checkpoint(root: Path) -> None:
    root.mkdir()
    write_file(root / "model-00001-of-00002.safetensors", {"a": np.zeros(2, "f4")})
    write_file(root / "model-00002-of-00002.safetensors", {"b": np.ones(3, "i8")})
    index = {
        "metadata": {"total_size": 40},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text('{"hidden": 2}')
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text("{}")


def test_scan_directory(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    kind, files = scan_path(root)
    assert kind == "dir"
    assert [f.path for f in files] == [
        ".gitattributes",
        "1_Pooling/config.json",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    kinds = {f.path: f.kind for f in files}
    assert kinds["model-00001-of-00002.safetensors"] == "safetensors"
    assert kinds["model.safetensors.index.json"] == "blob"
    for f in files:
        assert f.abs_path is not None
        assert os.path.getsize(f.abs_path) == f.size
    shard = next(f for f in files if f.path.startswith("model-00002"))
    assert shard.header is not None and shard.header.tensor("b").shape == (3,)


def test_scan_single_file(tmp_path: Path) -> None:
    path = tmp_path / "one.safetensors"
    header = write_file(path, {"w": np.zeros(3, np.float16)})
    kind, files = scan_path(str(path))
    assert kind == "file"
    assert files == [SourceFile("one.safetensors", header.file_size, header, str(path))]


def test_scan_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        scan_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError):
        scan_path(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FormatError):
        scan_path(tmp_path / "notes.txt")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.safetensors").write_bytes(raw_file(b"[]"))
    with pytest.raises(HeaderError):
        scan_path(bad)


def test_index_mismatches(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    index_path = root / "model.safetensors.index.json"
    cases = [
        ({"c": "model-00001-of-00002.safetensors"}, "c", "no such tensor"),
        ({"a": "model-00003-of-00002.safetensors"}, "a", "no such safetensors"),
        ({"a": "config.json"}, "a", "no such safetensors"),
        ({"a": "../x.safetensors"}, "a", "unsafe"),
    ]
    for weight_map, tensor, why in cases:
        index_path.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(IndexMismatchError, match=why) as info:
            scan_path(root)
        assert info.value.tensor == tensor
    index_path.write_text("{}")
    with pytest.raises(FormatError, match="weight_map"):
        scan_path(root)


def test_duplicate_tensors(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    root.mkdir()
    write_file(root / "a.safetensors", {"w": np.zeros(2, "f4")})
    write_file(root / "b.safetensors", {"w": np.zeros(2, "f4")})
    with pytest.raises(DuplicateTensorError, match="'w'"):
        scan_path(root)
    # the same name in different folders (e.g. diffusers components) is fine
    os.rename(root / "b.safetensors", root / "sub.safetensors")
    (root / "sub").mkdir()
    os.rename(root / "sub.safetensors", root / "sub" / "b.safetensors")
    assert len(scan_path(root)[1]) == 2


@pytest.mark.parametrize(
    "path", ["../x", "/abs", "a//b", "a\\b", "", "a/./b", "a/", "C:x", "a\0b"]
)
def test_check_relpath_rejects(path: str) -> None:
    with pytest.raises(UnsafePathError):
        check_relpath(path)


def test_check_relpath_accepts() -> None:
    for path in ("a", ".gitattributes", "1_Pooling/config.json", "a..b/c"):
        assert check_relpath(path) == path
    with pytest.raises(UnsafePathError):
        check_relpath("x" * 4097)


def test_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    root = tmp_path / "ckpt"
    make_checkpoint(root)
    (root / "inner_link.json").symlink_to(root / "config.json")
    _, files = scan_path(root)
    link = next(f for f in files if f.path == "inner_link.json")
    assert link.abs_path == str((root / "config.json").resolve())
    (root / "leak.txt").symlink_to(outside)
    with pytest.raises(UnsafeLinkError, match=r"leak\.txt"):
        scan_path(root)
    (root / "leak.txt").unlink()
    (root / "dirlink").symlink_to(root / "1_Pooling")
    with pytest.raises(UnsafeLinkError, match="dirlink"):
        scan_path(root)
    (root / "dirlink").unlink()
    (root / "dangling").symlink_to(root / "nope")
    with pytest.raises(UnsafeLinkError, match="dangling"):
        scan_path(root)

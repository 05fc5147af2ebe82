"""Tests of the manifest codec and of its strict validation of untrusted input."""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest

from p2pshard.chunking import plan_blob, plan_tensors
from p2pshard.errors import ManifestError
from p2pshard.formats.safetensors import build_header
from p2pshard.hashing import hash_bytes
from p2pshard.manifest import Chunk, FileEntry, Manifest

SHARD = 4096
ST_PATH = "model.safetensors"
BLOB_PATH = "extra/config/tokenizer.bin"


def chunks_of(data: bytes, plan: list[tuple[int, int]]) -> tuple[Chunk, ...]:
    return tuple(Chunk(hash_bytes(data[s:e]), e - s) for s, e in plan)


def make_manifest() -> Manifest:
    """A safetensors file, a blob in a subfolder, its copy and an empty file."""
    rng = np.random.default_rng(7)
    arrays = {
        "embed": rng.standard_normal((64, 40)).astype(np.float32),  # > SHARD
        "bias": rng.standard_normal(16).astype(np.float16),
        "empty": np.zeros((0, 3), np.float32),
        "scale": np.array(2.0, np.float32),
    }
    header, ordered = build_header(arrays, {"format": "np"})
    data = b"".join(a.tobytes() for a in ordered)
    assert len(data) == header.data_size
    ranges = [(t.start, t.end) for t in header.tensors]
    model = FileEntry(
        ST_PATH,
        header.file_size,
        header,
        chunks_of(data, plan_tensors(ranges, header.data_size, SHARD)),
    )
    blob = rng.bytes(10_000)
    blob_chunks = chunks_of(blob, plan_blob(len(blob), SHARD))
    files = (
        model,
        FileEntry(BLOB_PATH, len(blob), None, blob_chunks),
        FileEntry("extra/copy.bin", len(blob), None, blob_chunks),
        FileEntry("extra/empty.txt", 0, None, ()),
    )
    return Manifest("dir", SHARD, 3, files, created=1_700_000_000.25)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return make_manifest()


@pytest.fixture
def doc(manifest: Manifest) -> dict[str, Any]:
    """The manifest as a plain msgpack document, free to corrupt."""
    return msgpack.unpackb(manifest.encode(), raw=False)


def pack(doc: Any) -> bytes:
    return msgpack.packb(doc, use_bin_type=True)


def assert_bad(doc: Any) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(pack(doc))


# --- round trip ------------------------------------------------------------------


def test_round_trip(manifest: Manifest) -> None:
    data = manifest.encode()
    decoded = Manifest.decode(data)
    assert decoded == manifest
    assert decoded.encode() == data
    assert decoded.source == "dir"
    assert decoded.shard_size == SHARD
    assert decoded.replicas == 3
    assert decoded.created == 1_700_000_000.25
    assert [f.path for f in decoded.files] == [
        ST_PATH,
        BLOB_PATH,
        "extra/copy.bin",
        "extra/empty.txt",
    ]


def test_views(manifest: Manifest) -> None:
    decoded = Manifest.decode(manifest.encode())
    model, blob, copy_, empty = decoded.files
    assert model.header is not None
    assert model.header.prefix == manifest.files[0].header.prefix  # type: ignore[union-attr]
    assert model.header.metadata == {"format": "np"}
    assert model.data_offset == len(model.header.prefix)
    assert blob.data_offset == 0 and blob.header is None and blob.tensors == ()

    names = [(f.path, t.name) for f, t in decoded.tensors()]
    assert names == [(ST_PATH, n) for n in ("bias", "embed", "empty", "scale")]
    embed = model.header.tensor("embed")
    assert (embed.dtype, embed.shape, embed.nbytes) == ("F32", (64, 40), 10240)

    assert decoded.total_size == model.size + 2 * 10_000
    shards = decoded.shards()
    all_chunks = [c for f in decoded.files for c in f.chunks]
    assert shards == {c.id: c.size for c in all_chunks}
    # The copy of the blob shares its shards.
    assert len(shards) == len(model.chunks) + len(blob.chunks)
    assert sum(shards.values()) == model.header.data_size + 10_000

    assert blob.bounds == [0, 4096, 8192, 10_000]
    assert copy_.bounds == blob.bounds
    assert empty.bounds == [0]
    assert model.bounds[0] == 0
    assert model.bounds[-1] == model.size - model.data_offset
    assert len(model.bounds) == len(model.chunks) + 1
    # The big tensor is cut at fixed offsets from its own start.
    assert embed.start in model.bounds and embed.end in model.bounds
    assert embed.start + SHARD in model.bounds


@pytest.mark.parametrize("source", ["file", "dir", "arrays"])
def test_every_source_kind_decodes(doc: dict[str, Any], source: str) -> None:
    doc["source"] = source
    assert Manifest.decode(pack(doc)).source == source


def test_integer_created_is_accepted(doc: dict[str, Any]) -> None:
    doc["created"] = 1_700_000_000
    assert Manifest.decode(pack(doc)).created == 1_700_000_000.0


# --- corruption ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\x81",  # a map announced, nothing follows
        b"\xdd\xff\xff\xff\xff",  # a huge array announced, nothing follows
        b"not msgpack at all",
        b"\x00" * 16,
        pack([1, 2, 3]),
        pack("p2pshard-manifest"),
        pack(None),
        pack({1: 2}),
    ],
)
def test_not_a_manifest(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(data)


def test_trailing_bytes(manifest: Manifest) -> None:
    with pytest.raises(ManifestError):
        Manifest.decode(manifest.encode() + b"\x00")


def test_every_truncation(manifest: Manifest) -> None:
    data = manifest.encode()
    for end in range(len(data)):
        with pytest.raises(ManifestError):
            Manifest.decode(data[:end])


def first_file(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["files"][0]


def blob_file(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["files"][1]


def set_path(index: int, path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["files"][index]["path"] = path

    return mutate


def header_of_length(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def swap_header(doc: dict[str, Any], prefix: bytes) -> None:
    """Give the safetensors file another header, size kept consistent."""
    entry = first_file(doc)
    entry["size"] += len(prefix) - len(entry["header"])
    entry["header"] = prefix


def deep_json(doc: dict[str, Any]) -> None:
    text = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    text += b" " * (-(8 + len(text)) % 8)
    swap_header(doc, header_of_length(text))


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "format tag": lambda d: d.update(format="p2pshard-manifesto"),
    "no format": lambda d: d.pop("format"),
    "version 2": lambda d: d.update(version=2),
    "version 0": lambda d: d.update(version=0),
    "no version": lambda d: d.pop("version"),
    "hash sha256": lambda d: d.update(hash="sha256"),
    "hash BLAKE3": lambda d: d.update(hash="BLAKE3"),
    "no hash": lambda d: d.pop("hash"),
    "unknown source": lambda d: d.update(source="weights"),
    "no source": lambda d: d.pop("source"),
    "shard_size 0": lambda d: d.update(shard_size=0),
    "shard_size negative": lambda d: d.update(shard_size=-1),
    "shard_size huge": lambda d: d.update(shard_size=2**62),
    "replicas 0": lambda d: d.update(replicas=0),
    "no created": lambda d: d.pop("created"),
    "no files": lambda d: d.pop("files"),
    "empty files": lambda d: d.update(files=[]),
    "parent path": set_path(1, "../x"),
    "inner parent path": set_path(1, "extra/../../x"),
    "absolute path": set_path(1, "/abs"),
    "empty path": set_path(1, ""),
    "dot path": set_path(1, "./x"),
    "double slash": set_path(1, "extra//x"),
    "trailing slash": set_path(1, "extra/x/"),
    "backslash": set_path(1, "extra\\x"),
    "nul": set_path(1, "x\0y"),
    "drive letter": set_path(1, "C:/x"),
    "duplicate path": set_path(2, BLOB_PATH),
    "file then folder": set_path(3, "extra/copy.bin/inner"),
    "folder then file": set_path(1, "extra"),
    "file deep under file": set_path(3, BLOB_PATH + "/a/b"),
    "chunk id short": lambda d: blob_file(d)["chunks"][0].__setitem__(0, "ab" * 31),
    "chunk id long": lambda d: blob_file(d)["chunks"][0].__setitem__(0, "ab" * 33),
    "chunk id upper": lambda d: blob_file(d)["chunks"][0].__setitem__(0, "AB" * 32),
    "chunk id not hex": lambda d: blob_file(d)["chunks"][0].__setitem__(0, "zz" * 32),
    "chunk id newline": lambda d: blob_file(d)["chunks"][0].__setitem__(
        0, "ab" * 32 + "\n"
    ),
    "chunk size 0": lambda d: blob_file(d)["chunks"].append(["ab" * 32, 0]),
    "chunk size over shard": lambda d: blob_file(d)["chunks"].__setitem__(
        slice(None), [[blob_file(d)["chunks"][0][0], SHARD + 1]]
    ),
    "chunk size negative": lambda d: blob_file(d)["chunks"][2].__setitem__(1, -1),
    "chunk one item": lambda d: blob_file(d)["chunks"][0].pop(),
    "chunk three items": lambda d: blob_file(d)["chunks"][0].append(1),
    "chunk as map": lambda d: blob_file(d)["chunks"].__setitem__(
        0, {"id": "ab" * 32, "size": SHARD}
    ),
    "chunk missing": lambda d: blob_file(d)["chunks"].pop(),
    "chunk extra": lambda d: blob_file(d)["chunks"].append(["ab" * 32, 1]),
    "chunk shorter": lambda d: blob_file(d)["chunks"][-1].__setitem__(
        1, blob_file(d)["chunks"][-1][1] - 1
    ),
    "st chunk missing": lambda d: first_file(d)["chunks"].pop(),
    "st chunks cover whole file": lambda d: first_file(d)["chunks"].append(
        ["ab" * 32, len(first_file(d)["header"])]
    ),
    "st header dropped": lambda d: first_file(d).__setitem__("header", None),
    "st header str": lambda d: first_file(d).__setitem__(
        "header", first_file(d)["header"].decode("latin-1")
    ),
    "st size +1": lambda d: first_file(d).__setitem__(
        "size", first_file(d)["size"] + 1
    ),
    "st size -1": lambda d: first_file(d).__setitem__(
        "size", first_file(d)["size"] - 1
    ),
    "header garbage": lambda d: swap_header(d, b"garbage!"),
    "header empty": lambda d: swap_header(d, b""),
    "header length 0": lambda d: swap_header(d, struct.pack("<Q", 0)),
    "header length past file": lambda d: swap_header(
        d, struct.pack("<Q", 2**40) + b"{}"
    ),
    "header not json": lambda d: swap_header(d, header_of_length(b"{not json}")),
    "header json list": lambda d: swap_header(d, header_of_length(b"[]      ")),
    "header not utf8": lambda d: swap_header(d, header_of_length(b'{"\xff":1}')),
    "header bad entry": lambda d: swap_header(
        d, header_of_length(b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}')
    ),
    "header trailing bytes": lambda d: first_file(d).__setitem__(
        "header", first_file(d)["header"] + b" "
    ),
    "header deeply nested": deep_json,
    "blob gets a header": lambda d: blob_file(d).__setitem__(
        "header", first_file(d)["header"]
    ),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_corruption(doc: dict[str, Any], name: str) -> None:
    MUTATIONS[name](doc)
    assert_bad(doc)


def test_missing_keys(doc: dict[str, Any]) -> None:
    for key in list(doc):
        broken = copy.deepcopy(doc)
        del broken[key]
        assert_bad(broken)
    for key in list(first_file(doc)):
        broken = copy.deepcopy(doc)
        del first_file(broken)[key]
        assert_bad(broken)


BAD_TOP: dict[str, list[Any]] = {
    "format": [None, 1, b"p2pshard-manifest", ["p2pshard-manifest"], {}],
    "version": [None, "1", 1.0, True, b"\x01", [1], {}],
    "hash": [None, 1, b"blake3", ["blake3"], {"blake3": 1}],
    "source": [None, 1, True, b"dir", ["dir"], {"dir": 1}],
    "shard_size": [None, "4096", 4096.0, True, b"\x10", [SHARD], {}, 2**64 - 1],
    "replicas": [None, "3", 3.0, True, b"\x03", [3], {}, -(2**63)],
    "created": [None, "1", True, b"1", [1.0], {}],
    "files": [None, 1, "x", b"x", {}, [None], [1], ["x"], [[]], [b"x"]],
}
BAD_FILE: dict[str, list[Any]] = {
    "path": [None, 1, 1.5, True, b"model.safetensors", ["a"], {}],
    "size": [None, "1", 1.0, True, b"\x01", [1], {}, -1, 2**64 - 1],
    "header": ["x", 1, 1.5, True, [1], {}],
    "chunks": [None, 1, "x", b"x", {}, [None], [1], ["x"], [[1, 2]], [b"x"]],
}
BAD_CHUNK: dict[int, list[Any]] = {
    0: [None, 1, 1.5, True, b"\xab" * 32, ("ab" * 32).encode(), ["ab" * 32], {}],
    1: [None, "1", 1.0, True, False, b"\x01", [1], {}],
}


def test_wrong_types_everywhere(doc: dict[str, Any]) -> None:
    cases = 0
    for key, values in BAD_TOP.items():
        for value in values:
            broken = copy.deepcopy(doc)
            broken[key] = value
            assert_bad(broken)
            cases += 1
    for index in range(2):  # the safetensors file and a blob file
        for key, values in BAD_FILE.items():
            for value in values:
                broken = copy.deepcopy(doc)
                broken["files"][index][key] = value
                assert_bad(broken)
                cases += 1
        for slot, values in BAD_CHUNK.items():
            for value in values:
                broken = copy.deepcopy(doc)
                broken["files"][index]["chunks"][0][slot] = value
                assert_bad(broken)
                cases += 1
        for value in [None, 1, "x", b"x", {}, [[]]]:
            broken = copy.deepcopy(doc)
            broken["files"][index] = value
            assert_bad(broken)
            cases += 1
    assert cases > 150


def test_random_byte_flips_never_escape_as_other_errors(
    manifest: Manifest, rng: np.random.Generator
) -> None:
    """Flipped bytes give ManifestError or a manifest that validates again."""
    data = manifest.encode()
    for _ in range(300):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            mutated[int(pos)] ^= int(rng.integers(1, 256))
        try:
            decoded = Manifest.decode(bytes(mutated))
        except ManifestError:
            continue
        assert Manifest.decode(decoded.encode()) == decoded

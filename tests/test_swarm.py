"""Multi-peer tests: a real swarm of in-process peers on 127.0.0.1."""

from __future__ import annotations

import filecmp
import os
from pathlib import Path

import numpy as np
import pytest

from p2pshard import (
    InvalidNameError,
    NameNotFoundError,
    NoPeersError,
    NoTensorMatchError,
    OutputExistsError,
    OutputPathError,
    Peer,
)
from p2pshard.formats.safetensors import write_file
from p2pshard.hashing import shard_key

from .conftest import Swarm


def owners_of(peers: list[Peer], shard_id: str, k: int) -> set[bytes]:
    key = int.from_bytes(shard_key(shard_id), "big")
    ranked = sorted(peers, key=lambda p: int.from_bytes(p.node_id, "big") ^ key)
    return {p.node_id for p in ranked[:k]}


def holders_of(peers: list[Peer], shard_id: str) -> set[bytes]:
    return {p.node_id for p in peers if shard_id in p.store}


def model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small transformer-shaped set of tensors: big ones span many shards."""
    return {
        "embed.weight": rng.standard_normal((512, 96), dtype=np.float32),
        "layers.0.attn.q.weight": rng.standard_normal((96, 96), dtype=np.float32),
        "layers.0.attn.q.bias": rng.standard_normal(96, dtype=np.float32),
        "layers.0.mlp.up.weight": rng.standard_normal((96, 384), dtype=np.float32),
        "layers.0.norm.weight": np.ones(96, dtype=np.float16),
        "layers.1.attn.q.weight": rng.standard_normal((96, 96), dtype=np.float32),
        "layers.1.mlp.up.weight": rng.standard_normal((96, 384), dtype=np.float32),
        "step": np.array([7], dtype=np.int64),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


async def test_publish_places_every_shard_on_its_k_closest(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        result = await client.publish(arrays, "acme/tiny")
        manifest = await client.manifest("acme/tiny")
        got = await client.load("acme/tiny")
    assert result.version == 1 and result.shards == len(manifest.shards()) > 8
    assert_same(got, arrays)
    for shard_id in [*manifest.shards(), result.manifest]:
        assert holders_of(swarm.peers, shard_id) == owners_of(swarm.peers, shard_id, 3)
    stats = client.last_load
    assert stats is not None and stats.shards == len(manifest.shards())
    assert stats.peers >= 3  # fetched from several peers at once


async def test_partial_load_fetches_only_needed_shards(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        await client.publish(arrays, "acme/tiny")
        manifest = await client.manifest("acme/tiny")
        got = await client.load("acme/tiny", tensors=["layers.0.attn.*", "step"])
        with pytest.raises(NoTensorMatchError):
            await client.load("acme/tiny", tensors=["nothing.*"])
    want = {k: v for k, v in arrays.items() if k.startswith("layers.0.attn")}
    want["step"] = arrays["step"]
    assert_same(got, want)
    stats = client.last_load
    assert stats is not None
    assert 0 < stats.shards < len(manifest.shards())
    assert stats.bytes < manifest.total_size // 2


async def test_load_survives_two_stopped_peers(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        await client.publish(arrays, "acme/tiny")
    # Stop two peers that own shards (never the two bootstrap peers).
    for peer in list(swarm.peers[-2:]):
        await swarm.stop(peer)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)


async def test_lying_peer_is_detected_and_skipped(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        await client.publish(arrays, "acme/tiny")
        manifest = await client.manifest("acme/tiny")
    liar = swarm.peers[3]
    lied = 0
    for shard_id in manifest.shards():
        if shard_id in liar.store:
            # Corrupt the file after it was verified: the peer now serves garbage.
            path = await liar.store.verified_path(shard_id)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(data))
            lied += 1
    assert lied > 0
    victim = next(i for i in manifest.shards() if i in liar.store)
    others = [p.contact for p in swarm.peers if victim in p.store and p is not liar]
    buffer = bytearray(manifest.shards()[victim])
    async with swarm.client() as client:
        # Ask the liar first: its bytes fail the hash, the next replica serves.
        used = await client.transfer.fetch_into(
            victim, [liar.contact, *others], memoryview(buffer)
        )
        assert used != liar.contact
        assert client.transfer.faults[liar.address] == 1
        assert_same(await client.load("acme/tiny"), arrays)


async def test_restarted_peer_keeps_identity_and_shards(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        await client.publish(arrays, "acme/tiny")
    peer = swarm.peers[4]
    held, node_id, data_dir = set(peer.store.ids()), peer.node_id, peer.data_dir
    assert held
    await swarm.stop(peer)
    again = await swarm.add(data_dir)
    assert again.node_id == node_id
    assert set(again.store.ids()) == held
    for shard_id in held:  # hash-checked before it is served again
        await again.store.verified_path(shard_id)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)


async def test_async_publish_completes_the_owner_set(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(8)
    arrays = model(rng)
    async with swarm.client() as client:
        result = await client.publish(arrays, "acme/async", asynchronous=True)
        manifest = await client.manifest("acme/async")
        for peer in swarm.peers:  # the owners copy in the background
            await peer.wait_replicated()
        assert_same(await client.load("acme/async"), arrays)
    for shard_id in [*manifest.shards(), result.manifest]:
        assert holders_of(swarm.peers, shard_id) == owners_of(swarm.peers, shard_id, 3)


async def test_versions_grow_and_names_list(
    swarm: Swarm, rng: np.random.Generator
) -> None:
    await swarm.grow(5)
    first, second = model(rng), model(rng)
    async with swarm.client() as client:
        one = await client.publish(first, "acme/tiny")
        two = await client.publish(second, "acme/tiny")
        await client.publish({"x": np.zeros(3, np.int8)}, "acme/other")
        assert (one.version, two.version) == (1, 2)
        assert_same(await client.load("acme/tiny"), second)
        listed = {r.name: r.version for r in await client.list()}
        status = await client.status()
    assert listed == {"acme/tiny": 2, "acme/other": 1}
    assert status["peers"] == 5 and status["replicas_short"] == 0


async def test_clear_errors(swarm: Swarm, tmp_path: Path) -> None:
    await swarm.grow(3)
    async with swarm.client() as client:
        with pytest.raises(NameNotFoundError):
            await client.load("acme/missing")
        with pytest.raises(InvalidNameError):
            await client.load("../etc/passwd")
        await client.publish({"x": np.arange(4, dtype=np.int32)}, "acme/x")
        out = tmp_path / "x.safetensors"
        out.write_bytes(b"keep me")
        with pytest.raises(OutputExistsError):
            await client.load_to("acme/x", out)
        assert out.read_bytes() == b"keep me"
        await client.load_to("acme/x", out, overwrite=True)
        assert out.read_bytes() != b"keep me"
        # A path under a regular file: a named error saying so, nothing left.
        for bad in (out / "y.safetensors", out / "sub" / "y.safetensors"):
            with pytest.raises(OutputPathError, match="not a directory"):
                await client.load_to("acme/x", bad)
            with pytest.raises(OutputPathError):
                await client.load_to("acme/x", bad, tensors=["x"])
        assert sorted(tmp_path.iterdir()) == sorted([out, tmp_path / "swarm"])
    dead = swarm.peers[0].address
    await swarm.close()
    with pytest.raises(NoPeersError):
        async with swarm.client() as client:
            pass
    assert dead


def hf_directory(root: Path, rng: np.random.Generator) -> Path:
    """A Hugging Face style sharded checkpoint with its side files."""
    import json

    root.mkdir()
    part1 = {"embed.weight": rng.standard_normal((300, 64), dtype=np.float32)}
    part2 = {
        "head.weight": rng.standard_normal((64, 300), dtype=np.float32),
        "head.bias": np.zeros(300, dtype=np.float32),
    }
    write_file(root / "model-00001-of-00002.safetensors", part1, {"format": "pt"})
    write_file(root / "model-00002-of-00002.safetensors", part2, {"format": "pt"})
    weight_map = {name: "model-00001-of-00002.safetensors" for name in part1}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in part2}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text('{"hidden_size": 64}\n')
    (root / "tokenizer.json").write_bytes(rng.bytes(150_000))
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text("{}\n")
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (root / "empty.txt").write_bytes(b"")
    return root


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(
        filecmp.cmp(a / rel, b / rel, shallow=False) for rel in files_a
    )


async def test_model_directory_round_trip(
    swarm: Swarm, rng: np.random.Generator, tmp_path: Path
) -> None:
    await swarm.grow(8)
    source = hf_directory(tmp_path / "model", rng)
    out = tmp_path / "loaded"
    async with swarm.client() as client:
        result = await client.publish(source, "acme/hf")
        stats = await client.load_to("acme/hf", out)
        arrays = await client.load("acme/hf", tensors=["head.*"])
    assert result.files == 8 and stats.bytes == result.bytes
    assert same_tree(source, out)
    assert set(arrays) == {"head.weight", "head.bias"}
    assert not [p for p in tmp_path.iterdir() if ".p2pshard-" in p.name]


async def test_single_file_round_trip_is_byte_identical(
    swarm: Swarm, rng: np.random.Generator, tmp_path: Path
) -> None:
    await swarm.grow(8)
    path = tmp_path / "model.safetensors"
    write_file(path, model(rng), {"producer": "test"})
    out = tmp_path / "out" / "copy.safetensors"
    async with swarm.client() as client:
        await client.publish(path, "acme/file")
        await client.load_to("acme/file", out)
    assert filecmp.cmp(path, out, shallow=False)
    assert os.listdir(out.parent) == ["copy.safetensors"]


async def test_output_paths_follow_cp_and_never_replace_a_directory(
    swarm: Swarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await swarm.grow(3)
    arrays = {"x": np.arange(6, dtype=np.int32)}
    async with swarm.client() as client:
        await client.publish(arrays, "acme/x")
        # A single file into an existing directory goes inside it, by name.
        keep = tmp_path / "out"
        keep.mkdir()
        (keep / "other.bin").write_bytes(b"mine")
        for _ in range(2):  # the second time, only with overwrite
            await client.load_to("acme/x", keep, overwrite=_ > 0)
        assert (keep / "other.bin").read_bytes() == b"mine"
        assert (keep / "model.safetensors").is_file()
        # A trailing slash names a directory to make.
        await client.load_to("acme/x", f"{tmp_path / 'new'}/")
        assert (tmp_path / "new" / "model.safetensors").is_file()
        # Never a directory replaced by the file, never the current directory.
        (keep / "model.safetensors").unlink()
        (keep / "model.safetensors").mkdir()
        with pytest.raises(OutputPathError, match="it is a directory"):
            await client.load_to("acme/x", keep, overwrite=True)
        monkeypatch.chdir(keep)
        with pytest.raises(OutputPathError, match="output path is empty"):
            await client.load_to("acme/x", "", overwrite=True)
        published = tmp_path / "tree"
        published.mkdir()
        write_file(published / "a.safetensors", arrays)
        await client.publish(published, "acme/tree")
        for bad in (".", ".."):
            with pytest.raises(OutputPathError, match="current directory"):
                await client.load_to("acme/tree", bad, overwrite=True)
        with pytest.raises(OutputPathError, match="needs a directory"):
            await client.load_to(
                "acme/tree", tmp_path / "new" / "model.safetensors", overwrite=True
            )
    assert sorted(p.name for p in keep.iterdir()) == ["model.safetensors", "other.bin"]


async def test_publish_needing_more_peers_than_exist_stores_nothing(
    swarm: Swarm,
) -> None:
    await swarm.grow(3)
    async with swarm.client(replicas=5) as client:
        for asynchronous in (False, True):  # the manifest needs the quorum too
            with pytest.raises(NoPeersError, match="has 3 peers; a write quorum of 5"):
                await client.publish(
                    {"x": np.ones(1000)}, "acme/too-many", asynchronous=asynchronous
                )
    assert all(len(p.store) == 0 for p in swarm.peers)

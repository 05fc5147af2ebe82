"""Field cases (format-*, store-*) played through a real swarm."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import aiohttp
import ml_dtypes
import numpy as np
import pytest

from p2pshard import UnknownDtypeError
from p2pshard.formats.safetensors import read_header, write_file

from .conftest import Swarm


def raw_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    """A safetensors file written byte by byte, exactly as given."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


async def test_exotic_dtypes_round_trip(swarm: Swarm, tmp_path: Path) -> None:
    source = raw_safetensors(
        tmp_path / "exotic.safetensors",
        {
            "w_bf16": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
            "w_f8": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [4, 8]},
        },
        bytes.fromhex("803f20c0") + bytes.fromhex("3840b800"),
    )
    bad = raw_safetensors(
        tmp_path / "bad.safetensors",
        {"w_bad": {"dtype": "F7", "shape": [1], "data_offsets": [0, 1]}},
        b"\x00",
    )
    await swarm.grow(4)
    async with swarm.client() as client:
        await client.publish(source, "case/exotic")
        arrays = await client.load("case/exotic")
        await client.load_to("case/exotic", tmp_path / "back.safetensors")
        with pytest.raises(UnknownDtypeError) as error:
            await client.publish(bad, "case/bad")
    assert arrays["w_bf16"].dtype == ml_dtypes.bfloat16
    assert arrays["w_bf16"].astype(np.float32).tolist() == [1.0, -2.5]
    assert arrays["w_f8"].dtype == ml_dtypes.float8_e4m3fn
    assert arrays["w_f8"].tobytes() == bytes.fromhex("3840b800")
    assert (tmp_path / "back.safetensors").read_bytes() == source.read_bytes()
    again = write_file(tmp_path / "again.safetensors", arrays)
    assert again.tensor("w_bf16").dtype == "BF16"
    assert again.tensor("w_f8").dtype == "F8_E4M3"
    assert "w_bad" in str(error.value) and "F7" in str(error.value)


async def test_tied_weights_are_stored_once(swarm: Swarm) -> None:
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((256, 128), dtype=np.float32)  # 2 shards of 64 KiB
    await swarm.grow(6)
    async with swarm.client() as client:
        result = await client.publish(
            {"embed.weight": shared, "lm_head.weight": shared}, "case/tied"
        )
        manifest = await client.manifest("case/tied")
        arrays = await client.load("case/tied")
    chunks = [c.id for f in manifest.files for c in f.chunks]
    assert len(chunks) == 2 * len(set(chunks))  # written twice, stored once
    assert result.shards == len(set(chunks))
    assert np.array_equal(arrays["embed.weight"], shared)
    assert np.array_equal(arrays["lm_head.weight"], shared)


async def test_zero_element_tensors(swarm: Swarm, tmp_path: Path) -> None:
    mixed = raw_safetensors(
        tmp_path / "mixed.safetensors",
        {
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [16, 16]},
            "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
        },
        np.arange(4, dtype="<f4").tobytes() + np.array([9], "<i8").tobytes(),
    )
    only_empty = raw_safetensors(
        tmp_path / "only-empty.safetensors",
        {"empty": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}},
        b"",
    )
    assert read_header(only_empty).data_size == 0
    await swarm.grow(4)
    async with swarm.client() as client:
        for name, path in (("case/mixed", mixed), ("case/only-empty", only_empty)):
            await client.publish(path, name)
            out = tmp_path / f"{path.stem}.out.safetensors"
            await client.load_to(name, out)
            assert out.read_bytes() == path.read_bytes()
        mixed_arrays = await client.load("case/mixed")
        empty_arrays = await client.load("case/only-empty")
    assert mixed_arrays["empty"].shape == (0, 4)
    assert mixed_arrays["empty"].dtype == np.float32
    assert mixed_arrays["a"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert mixed_arrays["b"].tolist() == [9]
    assert empty_arrays["empty"].shape == (0, 4)


async def test_peer_never_serves_what_its_disk_lost(swarm: Swarm) -> None:
    """store-index-vs-disk: truncated, deleted or flipped files after a restart."""
    rng = np.random.default_rng(5)
    arrays = {"w": rng.standard_normal(3 * 16384, dtype=np.float32)}  # 3 shards
    await swarm.grow(6)
    async with swarm.client() as client:
        await client.publish(arrays, "case/disk")
        manifest = await client.manifest("case/disk")
    shard_ids = [c.id for c in manifest.files[0].chunks]
    assert len(shard_ids) == 3
    damaged = []  # (peer's data dir, shard id, how)
    for shard_id, how in zip(shard_ids, ("truncate", "delete", "flip"), strict=True):
        victim = next(p for p in swarm.peers[2:] if shard_id in p.store)
        damaged.append((victim.data_dir, shard_id, how, victim.store.path(shard_id)))
    for data_dir in {d for d, *_ in damaged}:
        await swarm.stop(next(p for p in swarm.peers if p.data_dir == data_dir))
    for _, _, how, path in damaged:
        if how == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 4])
        elif how == "delete":
            path.unlink()
        else:
            raw = bytearray(path.read_bytes())
            raw[-1] ^= 0x01
            path.write_bytes(bytes(raw))
    restarted = {d: await swarm.add(d) for d in {d for d, *_ in damaged}}
    async with aiohttp.ClientSession() as http:
        for data_dir, shard_id, how, _ in damaged:
            peer = restarted[data_dir]
            # Cheap start-up checks drop short and missing files at once.
            assert (shard_id in peer.store) == (how == "flip")
            url = f"http://{peer.address}/v1/shards/{shard_id}"
            async with http.get(url) as resp:
                assert resp.status == 404  # the flipped one fails its hash check
    # Each gets a good copy back from a replica (joining the background fetch
    # that the failed check started, if it is still running).
    for data_dir, shard_id, _, _ in damaged:
        peer = restarted[data_dir]
        await peer.repairer.pull([(shard_id, manifest.shards()[shard_id])])
        assert await peer.store.check(shard_id)
    async with swarm.client() as client:
        loaded = await client.load("case/disk")
    assert loaded["w"].tobytes() == arrays["w"].tobytes()

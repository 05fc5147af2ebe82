"""The acceptance scenario: a 200 MB checkpoint through 8 peers with k=3."""

from __future__ import annotations

import filecmp
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from p2pshard import Client
from p2pshard.formats.safetensors import write_file
from p2pshard.settings import MIB

from .conftest import Swarm
from .test_swarm import holders_of, owners_of

BIG_MB = int(os.environ.get("P2PSHARD_BIG_MB", "200"))


def big_checkpoint(path: Path, megabytes: int) -> None:
    """Embedding, per-layer matrices, norms and biases summing to ~``megabytes``."""
    rng = np.random.default_rng(7)
    arrays: dict[str, np.ndarray] = {}
    width = 1024
    arrays["embed.weight"] = rng.standard_normal((8 * width, width // 4), np.float32)
    layer = 0
    while sum(a.nbytes for a in arrays.values()) < megabytes * 1_000_000:
        prefix = f"layers.{layer}"
        arrays[f"{prefix}.attn.qkv.weight"] = rng.standard_normal(
            (width, 3 * width), np.float32
        )
        arrays[f"{prefix}.attn.qkv.bias"] = rng.standard_normal(3 * width, np.float32)
        arrays[f"{prefix}.mlp.up.weight"] = rng.standard_normal(
            (width, 4 * width), np.float32
        ).astype(np.float16)
        arrays[f"{prefix}.norm.weight"] = np.ones(width, np.float32)
        layer += 1
    write_file(path, arrays, {"format": "pt"})


async def test_200mb_through_8_peers(swarm: Swarm, tmp_path: Path) -> None:
    swarm.settings = replace(swarm.settings, shard_size=16 * MIB, read_timeout=10.0)
    await swarm.grow(8)
    source = tmp_path / "big.safetensors"
    big_checkpoint(source, BIG_MB)
    everyone = [p.address for p in swarm.peers]
    async with Client(everyone, swarm.settings) as client:
        result = await client.publish(source, "acme/big")
        manifest = await client.manifest("acme/big")
        await client.load_to("acme/big", tmp_path / "first.safetensors")
    assert result.bytes >= BIG_MB * 1_000_000
    assert filecmp.cmp(source, tmp_path / "first.safetensors", shallow=False)
    (tmp_path / "first.safetensors").unlink()
    for shard_id in [*manifest.shards(), result.manifest]:
        assert holders_of(swarm.peers, shard_id) == owners_of(swarm.peers, shard_id, 3)

    # Stop two owners of the manifest: the hardest pair for the loader.
    victims = [p for p in swarm.peers if result.manifest in p.store][:2]
    for peer in victims:
        await swarm.stop(peer)
    async with Client(everyone, swarm.settings) as client:
        stats = await client.load_to("acme/big", tmp_path / "second.safetensors")
    assert filecmp.cmp(source, tmp_path / "second.safetensors", shallow=False)
    assert stats.shards == len(manifest.shards())

"""A peer's identity: kept across restarts, chosen to balance the key space."""

from __future__ import annotations

import os
from pathlib import Path

from p2pshard import Peer
from p2pshard.hashing import KEY_BYTES
from p2pshard.peer import balanced_id

from .conftest import Swarm


def share_spread(ids: list[bytes], keys: int = 2000, k: int = 3) -> float:
    """Max over mean of the keys each id owns (k closest by XOR)."""
    points = [int.from_bytes(i, "big") for i in ids]
    owned = [0] * len(points)
    rng_keys = [int.from_bytes(os.urandom(KEY_BYTES), "big") for _ in range(keys)]
    for key in rng_keys:
        for j in sorted(range(len(points)), key=lambda j: points[j] ^ key)[:k]:
            owned[j] += 1
    return max(owned) / (sum(owned) / len(owned))


def test_balanced_ids_split_the_key_space_evenly() -> None:
    ids = [os.urandom(KEY_BYTES)]
    for _ in range(15):
        new = balanced_id(ids)
        assert new is not None and new not in ids
        ids.append(new)
    assert share_spread(ids) < 1.4  # random ids reach 2.0; these stay near 1.1
    assert balanced_id([]) is None


async def test_new_peers_take_balanced_ids_and_keep_them(
    swarm: Swarm, tmp_path: Path
) -> None:
    await swarm.grow(8)
    ids = [p.node_id for p in swarm.peers]
    assert len(set(ids)) == 8
    peer = swarm.peers[5]
    node_id, data_dir = peer.node_id, peer.data_dir
    await swarm.stop(peer)
    again = await swarm.add(data_dir)
    assert again.node_id == node_id
    assert (data_dir / "node_id").read_text().strip() == node_id.hex()
    fresh = Peer(tmp_path / "lonely")
    async with fresh:  # no bootstrap: the first peer of a swarm, random id
        assert len(fresh.node_id) == KEY_BYTES

"""A peer's identity: kept across restarts, chosen to balance the key space."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pshard import InvalidNameError, Peer, PeerSetupError, Settings
from p2pshard.dht import Contact
from p2pshard.hashing import KEY_BYTES, check_name
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


async def test_one_data_directory_serves_one_peer_at_a_time(tmp_path: Path) -> None:
    first = Peer(tmp_path / "d")
    await first.start()
    try:
        second = Peer(tmp_path / "d")
        with pytest.raises(
            PeerSetupError, match=rf"in use by another peer \(pid {os.getpid()}\)"
        ):
            await second.start()
    finally:
        await first.stop(handoff=False)
    again = Peer(tmp_path / "d")  # the lock went with the first peer
    await again.start()
    try:
        assert again.node_id == first.node_id
    finally:
        await again.stop(handoff=False)


async def test_unusable_address_or_directory_is_one_clear_error(tmp_path: Path) -> None:
    busy = Peer(tmp_path / "a")
    await busy.start()
    try:
        clash = Peer(tmp_path / "b", port=busy.port)
        with pytest.raises(
            PeerSetupError, match=rf"cannot listen on 127.0.0.1:{busy.port}: "
        ):
            await clash.start()
        assert "[Errno" not in str(clash.dht.port)  # nothing half-started is left
        retry = Peer(tmp_path / "b")  # and its directory is not left locked
        await retry.start()
        await retry.stop(handoff=False)
    finally:
        await busy.stop(handoff=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(PeerSetupError, match=r"data directory .*: Not a dir"):
        Peer(tmp_path / "file" / "sub")


def test_messages_stay_short_and_unambiguous() -> None:
    with pytest.raises(InvalidNameError) as caught:
        check_name("!" * 5000)
    assert len(str(caught.value)) < 300
    assert Contact(b"\0" * KEY_BYTES, "::1", 7000).address == "[::1]:7000"
    assert Contact(b"\0" * KEY_BYTES, "::1", 7000).url == "http://[::1]:7000"
    with pytest.raises(ValueError, match=r"replicas \(3\), not 5"):
        Settings(write_quorum=5)

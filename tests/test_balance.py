"""Per-publish byte balance: shards are split so no owner gets far above its share."""

from __future__ import annotations

import os

import numpy as np
import pytest

from p2pshard.balance import SLACK_SHARDS, Balance, split_point
from p2pshard.dht import Contact
from p2pshard.hashing import hash_bytes

from .conftest import Swarm
from .test_swarm import assert_same, owners_of

SHARD = 1 << 20


def contacts(n: int) -> list[Contact]:
    """``n`` peers with evenly spread ids (what balanced node ids give)."""
    step = (1 << 160) // n
    return [
        Contact((i * step).to_bytes(20, "big"), "127.0.0.1", 1000 + i) for i in range(n)
    ]


def place(balance: Balance, count: int, seed: int) -> list[int]:
    """Offer ``count`` full shards of random content, splitting as told; the
    sizes of the pieces placed."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []

    def offer(size: int) -> None:
        shard_id = hash_bytes(rng.bytes(32))  # stands in for new content
        if balance.admit(shard_id, size):
            sizes.append(size)
            return
        half = size // 2
        offer(half)
        offer(size - half)

    for _ in range(count):
        offer(SHARD)
    return sizes


def test_expected_shares_add_up_to_k() -> None:
    balance = Balance(contacts(8), 3, SHARD, 0.03)
    assert balance.share.sum() == pytest.approx(3.0)
    # Evenly spread ids: every peer expects 3/8 of the keys, within sampling noise.
    assert np.abs(balance.share - 3 / 8).max() < 0.03


@pytest.mark.parametrize("seed", range(4))
def test_splitting_keeps_every_owner_near_its_share(seed: int) -> None:
    balance = Balance(contacts(8), 3, SHARD, 0.03)
    sizes = place(balance, 128, seed)
    assert sum(sizes) == 128 * SHARD
    assert min(sizes) >= balance.min_piece
    expected = balance.share * balance.placed
    slack = SLACK_SHARDS * SHARD / expected.min()
    assert balance.spread() <= 1.03 + slack
    # The bound that matters: at 8 peers and k=3 a key's owners share one half
    # of the id space, so each half must carry half of the bytes.
    halves = [balance.load[:4].max(), balance.load[4:].max()]
    assert max(halves) / min(halves) < 1.1
    # Splitting grows the shard count by a bounded factor.
    assert len(sizes) < 2.5 * 128


def test_unbalanced_without_splitting() -> None:
    """The draw alone leaves owners well above their share: the reason to split."""
    spreads = []
    for seed in range(4):
        balance = Balance(contacts(8), 3, SHARD, tolerance=1e9)
        sizes = place(balance, 128, seed)
        assert len(sizes) == 128 and balance.splits == 0
        spreads.append(balance.spread())
    assert max(spreads) > 1.1


def test_k_or_fewer_peers_never_split() -> None:
    balance = Balance(contacts(3), 3, SHARD, 0.0)
    assert not balance.active
    assert len(place(balance, 50, 0)) == 50
    assert balance.spread() == 1.0


def test_pieces_never_below_the_minimum() -> None:
    balance = Balance(contacts(16), 3, SHARD, 0.0)
    sizes = place(balance, 64, 1)
    assert min(sizes) >= SHARD // 8


def test_split_point_prefers_a_tensor_boundary_near_the_middle() -> None:
    assert split_point(0, 100, [], 10) == 50
    assert split_point(0, 100, [10, 40, 90], 10) == 40
    assert split_point(0, 100, [30, 70], 10) == 30  # ties: the lower one
    assert split_point(0, 100, [5, 95], 10) == 50  # outside the middle half
    assert split_point(1000, 1100, [1060], 10) == 1060


async def test_publish_splits_for_balance_and_loads_back(swarm: Swarm) -> None:
    await swarm.grow(8)
    rng = np.random.default_rng(7)
    # 8 MiB in 64 KiB shards: 128 shards before balancing.
    arrays = {
        f"layers.{i}.weight": rng.standard_normal((256, 256), dtype=np.float32)
        for i in range(32)
    }
    k = swarm.settings.replicas
    async with swarm.client() as client:
        result = await client.publish(arrays, "balanced")
        manifest = await client.manifest("balanced")
        assert_same(await client.load("balanced"), arrays)
    chunks = manifest.files[0].chunks
    assert result.shards == len({c.id for c in chunks}) >= 128
    assert min(c.size for c in chunks) >= swarm.settings.shard_size // 8
    # Each peer's bytes, from where the shards really went, against the
    # share of keys its id region gives it.
    view = [Contact(p.node_id, "127.0.0.1", 0) for p in swarm.peers]
    share = Balance(view, k, swarm.settings.shard_size, 0.03).share
    held = np.zeros(len(swarm.peers))
    for c in chunks:
        owners = owners_of(swarm.peers, c.id, k)
        for i, p in enumerate(swarm.peers):
            if p.node_id in owners:
                assert c.id in p.store
                held[i] += c.size
    total = sum(c.size for c in chunks)
    slack = SLACK_SHARDS * swarm.settings.shard_size / (share.min() * total)
    assert (held / (share * total)).max() <= 1.03 + slack + 0.01
    assert result.spread == pytest.approx((held / (share * total)).max(), rel=0.02)


async def test_balance_off_cuts_by_layout_alone(swarm: Swarm) -> None:
    await swarm.grow(8)
    arrays = {"w": np.frombuffer(os.urandom(64 * 1024 * 40), dtype=np.uint8)}
    async with swarm.client(balance=None) as client:
        result = await client.publish(arrays, "plain")
        manifest = await client.manifest("plain")
    assert result.shards == 40
    assert [c.size for c in manifest.files[0].chunks] == [64 * 1024] * 40

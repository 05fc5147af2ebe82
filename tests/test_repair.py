"""Keeping k copies: rebalancing on join, hand-off on leave, repair after crashes,
scrubbing corrupt files, and name records outliving their first holders."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np

from p2pshard import Peer
from p2pshard.hashing import name_key

from .conftest import FAST, Swarm, wait_for
from .test_swarm import assert_same, holders_of, model, owners_of


async def publish_model(
    swarm: Swarm, name: str = "acme/tiny"
) -> tuple[dict, list[str]]:
    arrays = model(np.random.default_rng(11))
    async with swarm.client() as client:
        result = await client.publish(arrays, name)
        manifest = await client.manifest(name)
    return arrays, [*manifest.shards(), result.manifest]


async def settle(swarm: Swarm, rounds: int = 2) -> int:
    """Run repair passes on every peer until one round pushes nothing."""
    pushed = 0
    for _ in range(rounds + 2):
        moved = sum([(await p.repair_once()).pushed for p in swarm.peers])
        pushed += moved
        if not moved:
            break
    return pushed


def placement_ok(peers: list[Peer], shard_ids: list[str], k: int = 3) -> bool:
    owned = [
        {p.node_id for p in peers if i in p.store and not p.store.is_cached(i)}
        for i in shard_ids
    ]
    return all(
        owners_of(peers, i, k) <= holders_of(peers, i)
        and owned_set == owners_of(peers, i, k)
        for i, owned_set in zip(shard_ids, owned, strict=True)
    )


async def test_join_rebalances_to_new_owners(swarm: Swarm) -> None:
    await swarm.grow(8)
    arrays, shard_ids = await publish_model(swarm)
    newcomers = [await swarm.add(), await swarm.add()]
    pushed = await settle(swarm)
    assert pushed > 0
    assert any(i in p.store for p in newcomers for i in shard_ids)
    assert placement_ok(swarm.peers, shard_ids)
    # Peers that dropped out keep their copy only as cache.
    for p in swarm.peers:
        for i in shard_ids:
            if i in p.store and p.node_id not in owners_of(swarm.peers, i, 3):
                assert p.store.is_cached(i)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)
        assert (await client.status())["replicas_short"] == 0


async def test_graceful_leave_hands_off(swarm: Swarm) -> None:
    await swarm.grow(8)
    arrays, shard_ids = await publish_model(swarm)
    leaver = max(swarm.peers[2:], key=lambda p: len(p.store))
    owned = [i for i in shard_ids if i in leaver.store]
    assert owned
    await swarm.stop(leaver, handoff=True)
    # No repair pass ran on the others: the hand-off alone restored k copies.
    for i in owned:
        assert owners_of(swarm.peers, i, 3) <= holders_of(swarm.peers, i)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)


async def test_crash_of_k_minus_1_owners_is_repaired(swarm: Swarm) -> None:
    await swarm.grow(8)
    arrays, shard_ids = await publish_model(swarm)
    target = shard_ids[0]
    victims = [p for p in swarm.peers[2:] if target in p.store][:2]
    if len(victims) < 2:  # a bootstrap peer owns it: crash that one too
        victims = [p for p in swarm.peers if target in p.store][:2]
    for peer in victims:
        await swarm.stop(peer)  # no hand-off: a crash
    assert len(holders_of(swarm.peers, target)) == 1
    await settle(swarm)
    for i in shard_ids:
        assert owners_of(swarm.peers, i, 3) <= holders_of(swarm.peers, i)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)
        assert (await client.status())["replicas_short"] == 0


async def test_restarted_peer_resumes_repair(swarm: Swarm) -> None:
    await swarm.grow(6)
    _, shard_ids = await publish_model(swarm)
    peer = next(p for p in swarm.peers[2:] if len(p.store))
    data_dir = peer.data_dir
    await swarm.stop(peer)
    for other in swarm.peers:  # the swarm repairs around the missing peer
        await other.repair_once()
    again = await swarm.add(data_dir)
    await settle(swarm)
    assert placement_ok(swarm.peers, shard_ids)
    assert again.repairer.passes >= 1


async def test_scrub_finds_corruption_and_fetches_a_good_copy(swarm: Swarm) -> None:
    await swarm.grow(6)
    _, shard_ids = await publish_model(swarm)
    peer = next(p for p in swarm.peers if any(i in p.store for i in shard_ids))
    victim = next(i for i in shard_ids if i in peer.store)
    path = peer.store.path(victim)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    path.write_bytes(bytes(raw))
    checked = await peer.repairer.scrub_once(rate=0)
    assert checked == len(peer.store) or checked >= 1
    assert peer.scrub_failures == 1
    assert victim in peer.store
    assert await peer.store.check(victim)  # the re-fetched copy is intact
    assert any((peer.data_dir / "quarantine").iterdir())


async def test_read_repair_endpoint_pulls_missing_copy(swarm: Swarm) -> None:
    await swarm.grow(6)
    _, shard_ids = await publish_model(swarm)
    owner = next(p for p in swarm.peers if any(i in p.store for i in shard_ids))
    victim = next(i for i in shard_ids if i in owner.store)
    size = owner.store.size(victim)
    owner.store.delete(victim)
    pulled = await owner.repairer.pull([(victim, size)])
    assert pulled == 1 and victim in owner.store


async def test_name_record_outlives_its_first_holders(swarm: Swarm) -> None:
    swarm.settings = replace(swarm.settings, record_replicas=3)
    await swarm.grow(10)
    arrays, _ = await publish_model(swarm, "acme/durable")
    key = name_key("acme/durable")
    originals = [p for p in swarm.peers if p.records.get(key) is not None]
    assert len(originals) >= 3  # the 3 closest to the name, plus the manifest's owners
    for peer in originals:  # they crash one after another; survivors repair between
        await swarm.stop(peer)
        for other in swarm.peers:
            await other.repair_once()
    assert not set(originals) & set(swarm.peers)
    assert any(p.records.get(key) is not None for p in swarm.peers)
    async with swarm.client() as client:
        assert_same(await client.load("acme/durable"), arrays)


async def test_loader_reports_an_owner_that_lost_its_copies(swarm: Swarm) -> None:
    """Read repair: a load that meets an owner without its shards tells it."""
    await swarm.grow(6)
    arrays, shard_ids = await publish_model(swarm)
    owner = max(swarm.peers, key=lambda p: sum(i in p.store for i in shard_ids))
    lost = {i: owner.store.size(i) for i in shard_ids if i in owner.store}
    assert len(lost) >= 3
    for shard_id in lost:
        owner.store.delete(shard_id)
    async with swarm.client() as client:
        assert_same(await client.load("acme/tiny"), arrays)
    # The owner fetches back, on its own, what the loader found missing (a
    # pull: repair passes push, they do not pull).
    await asyncio.wait_for(owner.repairer.pull_done.wait(), 20)
    assert owner.repairer.pulled >= 1
    assert any(i in owner.store for i in lost)


async def test_peer_told_of_bad_bytes_rechecks_and_refetches(swarm: Swarm) -> None:
    """A loader that got wrong bytes from a peer tells it (POST /v1/shards/check)."""
    await swarm.grow(6)
    _, shard_ids = await publish_model(swarm)
    liar = max(swarm.peers, key=lambda p: sum(i in p.store for i in shard_ids))
    victim = next(i for i in shard_ids if i in liar.store)
    path = await liar.store.verified_path(victim)  # verified, then damaged
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    async with swarm.client() as client:
        await client.transfer.report_bad(liar.contact, [victim])
    await asyncio.wait_for(liar.repairer.pull_done.wait(), 20)
    assert liar.scrub_failures == 1
    assert await liar.store.check(victim)


async def test_crash_nobody_calls_is_found_by_neighbour_pings(tmp_path: Path) -> None:
    """No load, no lookup and no periodic pass: the crashed owner's neighbours
    notice it by their own pings, and repair brings every shard back to k."""
    settings = replace(
        FAST, repair_interval=3600.0, repair_delay=0.2, liveness_interval=0.3
    )
    swarm = Swarm(tmp_path / "swarm", settings)
    try:
        await swarm.grow(6)
        arrays, shard_ids = await publish_model(swarm)
        await settle(swarm)
        # Every start-up and join pass is over, so none can find the crash.
        await wait_for(lambda: all(p.repairer.quiet for p in swarm.peers), 10)
        victim = max(swarm.peers[2:], key=lambda p: len(p.store))
        await swarm.stop(victim)  # a crash: no hand-off
        await wait_for(lambda: placement_ok(swarm.peers, shard_ids), 20)
        async with swarm.client() as client:
            assert_same(await client.load("acme/tiny"), arrays)
    finally:
        await swarm.close()

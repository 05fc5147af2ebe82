"""The DHT layer under faults: the dht-* field cases, each building its own swarm.

Every swarm here runs on 127.0.0.1 with port 0, short RPC timeouts and the
peers' background repair passes pushed out of the test's way, so what is
measured is the DHT itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from kademlia.node import Node

from p2pshard import (
    Client,
    NoPeersError,
    Peer,
    QuorumError,
    Settings,
)
from p2pshard.dht import MAX_DATAGRAM, REQUEST, RESPONSE, Contact, Dht, rank_many
from p2pshard.errors import NameConflictError
from p2pshard.formats.safetensors import write_file
from p2pshard.hashing import KEY_BYTES, hash_bytes, name_key, shard_key
from p2pshard.records import NameRecord, RecordError, RecordStore, new_record

from .conftest import FAST, Swarm, wait_for


def settings(**changes: Any) -> Settings:
    """FAST, with repair passes that never start during a test."""
    return replace(FAST, repair_delay=600.0, repair_interval=600.0, **changes)


@contextlib.asynccontextmanager
async def swarm_of(root: Path, n: int, config: Settings) -> AsyncIterator[Swarm]:
    swarm = Swarm(root, config)
    try:
        await swarm.grow(n)
        yield swarm
    finally:
        await swarm.close()


@contextlib.asynccontextmanager
async def lone_dht(
    config: Settings, node_id: bytes | None = None
) -> AsyncIterator[Dht]:
    dht = Dht(config, node_id if node_id is not None else os.urandom(KEY_BYTES))
    await dht.start("127.0.0.1", 0)
    try:
        yield dht
    finally:
        await dht.stop()


@contextlib.contextmanager
def silent_ports(n: int) -> Iterator[list[int]]:
    """UDP ports on 127.0.0.1 that receive datagrams and never answer."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        yield [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


async def timed(work: Awaitable[Any]) -> tuple[Any, float]:
    began = time.monotonic()
    result = await work
    return result, time.monotonic() - began


def ids(contacts: list[Contact] | list[Peer]) -> set[bytes]:
    return {c.id if isinstance(c, Contact) else c.node_id for c in contacts}


def closest_ids(node_ids: list[bytes], key: bytes, n: int) -> set[bytes]:
    target = int.from_bytes(key, "big")
    return set(sorted(node_ids, key=lambda i: int.from_bytes(i, "big") ^ target)[:n])


def near(key: bytes, offset: int) -> bytes:
    """An id at XOR distance ``offset`` from ``key``."""
    return (int.from_bytes(key, "big") ^ offset).to_bytes(KEY_BYTES, "big")


def tiny_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(1024, dtype=np.float32)}  # one 4 KiB shard


def same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return set(got) == set(want) and all(
        got[k].tobytes() == want[k].tobytes() for k in want
    )


# --- dht-dead-contacts ------------------------------------------------------


async def test_dead_contacts_cost_one_timeout_then_nothing(tmp_path: Path) -> None:
    """SIGKILL 2 of a shard's 3 holders and 2 other peers of 6, no goodbye."""
    config = settings(rpc_timeout=1.0)
    arrays = tiny_model(1)
    async with swarm_of(tmp_path, 6, config) as swarm:
        async with swarm.client() as client:
            result = await client.publish(arrays, "dead/tiny")
            (shard_id,) = (await client.manifest("dead/tiny")).shards()
        holders = [p for p in swarm.peers if shard_id in p.store]
        others = [p for p in swarm.peers if p not in holders]
        assert len(holders) == 3
        data = await holders[0].store.read(shard_id)
        # Keep one holder and one other peer, one of them holding the manifest.
        keep = next(
            (h, o)
            for h in holders
            for o in others
            if result.manifest in h.store or result.manifest in o.store
        )
        for peer in [p for p in swarm.peers if p not in keep]:
            await swarm.stop(peer)  # vanishes: no hand-off, no goodbye
        assert all(p.status()["contacts"] == 5 for p in keep)

        joining = Client([p.address for p in keep], config)
        _, joined = await timed(joining.open())
        try:
            owners, looked = await timed(joining.dht.closest(shard_key(shard_id), 3))
            assert ids(owners) == ids(list(keep))
            got = await joining.transfer.fetch_bytes(shard_id, len(data), owners)
            assert bytes(got) == data
            assert same_arrays(await joining.load("dead/tiny"), arrays)
        finally:
            await joining.close()
        # Joining asked the 4 dead contacts at once: one timeout (plus one
        # stall step), not one per round; the lookup after skipped them.
        assert joined < 1.9 * config.rpc_timeout  # lock-step: 2 or more timeouts
        assert looked < 0.5 * config.rpc_timeout  # no timeout waited at all

        # The survivors hold on to the dead until they call them: a refresh
        # lookup fails on each once, a ping fails again, and they are gone.
        await asyncio.gather(*(p.dht.closest(p.node_id, 20) for p in keep))
        await wait_for(
            lambda: all(p.status()["contacts"] == 1 for p in keep),
            3 * config.rpc_timeout,
        )


async def test_silent_contacts_never_hold_up_a_lookup(tmp_path: Path) -> None:
    config = settings(rpc_timeout=1.0)
    async with swarm_of(tmp_path, 4, config) as swarm:
        asker = swarm.peers[0].dht
        key = os.urandom(KEY_BYTES)
        with silent_ports(12) as ports:
            # Twelve silent contacts closer to the key than any live peer: a
            # lock-step lookup would wait four rounds of a full timeout each.
            for i, port in enumerate(ports, start=1):
                asker.router.add_contact(Node(near(key, i), "127.0.0.1", port))
            assert len(asker.contacts()) == 3 + 12
            found, first = await timed(asker.closest(key, 3))
            assert ids(found) <= ids(swarm.peers)
            found_again, second = await timed(asker.closest(key, 3))
            assert ids(found_again) == ids(found)
            await asker.wait_idle()  # the probes of the silent ones
            assert ids(asker.contacts()) == ids(swarm.peers[1:])
        assert first < 2.9 * config.rpc_timeout  # lock-step: 4 timeouts
        assert second < 0.5 * config.rpc_timeout


async def test_one_lost_answer_does_not_evict(monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings(rpc_timeout=0.3)
    async with lone_dht(config) as asker, lone_dht(config) as flaky:
        contact = Contact(flaky.node.id, "127.0.0.1", flaky.port)
        asker.router.add_contact(Node(contact.id, contact.host, contact.port))
        serve = flaky.protocol._serve
        dropped: list[bytes] = []

        def drop_first(msg_id: bytes, payload: Any, addr: tuple[str, int]) -> None:
            if not dropped:
                dropped.append(msg_id)
                return
            serve(msg_id, payload, addr)

        monkeypatch.setattr(flaky.protocol, "_serve", drop_first)
        assert not await asker.ping(contact)
        assert asker.is_suspect(contact)
        assert ids(asker.contacts()) == {contact.id}  # one loss: still there
        await asker.wait_idle()  # the probe ping is answered
        assert not asker.is_suspect(contact)
        assert ids(asker.contacts()) == {contact.id}
        await flaky.stop()  # now it is gone for good
        assert await asker.check_contacts() == 1
        assert asker.contacts() == []


async def test_full_bucket_replaces_its_dead_head() -> None:
    """kademlia's remove_contact promotes the newest replacement: a silent head
    of a full bucket is pinged, fails twice, and the waiting newcomer takes its
    place."""
    config = settings(rpc_timeout=0.3, dht_ksize=2)
    own = bytes(KEY_BYTES)
    # First bytes 0xF8 and 0xFC share exactly 5 leading bits: no further split.
    head, second, newcomer = (
        bytes([b]) + bytes(KEY_BYTES - 1) for b in (0xF8, 0xFC, 0xF9)
    )
    with silent_ports(3) as ports:
        async with lone_dht(config, own) as dht:
            for node_id, port in zip((head, second, newcomer), ports):
                dht.router.add_contact(Node(node_id, "127.0.0.1", port))
            assert ids(dht.contacts()) == {head, second}  # the newcomer waits
            await dht.wait_idle()  # ping of the head, its probe, the eviction
            assert ids(dht.contacts()) == {second, newcomer}


# --- dht-bootstrap-unreachable ----------------------------------------------


async def test_unreachable_bootstrap_is_a_named_error(tmp_path: Path) -> None:
    config = settings(rpc_timeout=0.3)
    with silent_ports(1) as (port,):
        closed = f"127.0.0.1:{port}"
        peer = Peer(tmp_path / "lonely", bootstrap=[closed], settings=config)
        with pytest.raises(NoPeersError, match="no bootstrap peer answered"):
            await peer.start()
        assert (
            peer.dht.protocol.transport is None
            or peer.dht.protocol.transport.is_closing()
        )
        with pytest.raises(NoPeersError, match=closed):
            async with Client(closed, config):
                pass


async def test_publish_to_no_owner_fails_with_0_of_k(tmp_path: Path) -> None:
    config = settings(rpc_timeout=0.3)
    async with swarm_of(tmp_path / "gone", 3, config) as swarm:
        client = swarm.client()
        await client.open()
        try:
            for peer in list(swarm.peers):
                await swarm.stop(peer)
            with pytest.raises(QuorumError) as error:
                await client.publish(tiny_model(2), "gone/tiny")
        finally:
            await client.close()
    assert (error.value.acked, error.value.needed) == (0, 3)
    assert "0 of 3" in str(error.value)

    full = Swarm(tmp_path / "full", config)
    try:
        for _ in range(3):
            await full.add(capacity=0)
        async with full.client() as client:
            with pytest.raises(QuorumError) as error:
                await client.publish(tiny_model(2), "full/tiny")
    finally:
        await full.close()
    assert (error.value.acked, error.value.needed) == (0, 3)
    assert "0 of 3" in str(error.value) and "507" in str(error.value)


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "p2pshard",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_publish_that_stores_nothing_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_file(path, tiny_model(3))
    with silent_ports(1) as (port,):
        code, out, err = await run_cli(
            "publish",
            str(path),
            "--name",
            "cli/tiny",
            "--bootstrap",
            f"127.0.0.1:{port}",
        )
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("p2pshard: error: no bootstrap peer answered")

    full = Swarm(tmp_path / "full", settings())
    try:
        for _ in range(3):
            await full.add(capacity=0)
        code, out, err = await run_cli(
            "publish", str(path), "--name", "cli/tiny", "--bootstrap", full.bootstrap[0]
        )
    finally:
        await full.close()
    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("p2pshard: error: ") and "0 of 3" in err


# --- dht-join-handoff ---------------------------------------------------------


async def test_newcomer_receives_exactly_its_records(tmp_path: Path) -> None:
    config = settings(record_replicas=3)
    names = [f"join/model-{i}" for i in range(200)]
    async with swarm_of(tmp_path, 10, config) as swarm:
        gate = asyncio.Semaphore(16)

        async def put(i: int, name: str) -> None:
            manifest = hash_bytes(name.encode())
            async with gate:
                await swarm.peers[i % 10].dht.put_record(
                    new_record(name, manifest, 100, 1, 1000)
                )

        await asyncio.gather(*(put(i, name) for i, name in enumerate(names)))
        old_ids = [p.node_id for p in swarm.peers]
        for name in names:  # placed on the 3 closest of 10, by the name's key
            key = name_key(name)
            assert {p.node_id for p in swarm.peers if p.records.get(key)} == (
                closest_ids(old_ids, key, 3)
            )

        newcomer = await swarm.add()
        all_ids = [*old_ids, newcomer.node_id]
        due = {
            n for n in names if newcomer.node_id in closest_ids(all_ids, name_key(n), 3)
        }
        assert due  # 200 records over 11 peers: about 55

        def received() -> set[str]:
            return {r.name for r in newcomer.records.all()}

        # Greeting the newcomer hands it its records, with no lookup at all.
        await wait_for(lambda: received() >= due, 10)
        for peer in swarm.peers:
            await peer.dht.wait_idle()
        assert received() == due

        # Republishing from every holder (the peers' periodic duty) agrees.
        await asyncio.gather(*(p.republish_records() for p in swarm.peers))
        assert received() == due
        for name in names:
            key = name_key(name)
            holders = {p.node_id for p in swarm.peers if p.records.get(key)}
            assert holders >= closest_ids(all_ids, key, 3)


# --- dht-value-too-large ------------------------------------------------------


def record_with(**fields: Any) -> NameRecord:
    base = new_record("big/model", "ab" * 32, 100, 1, 1000)
    return replace(base, **fields)


async def test_values_that_cannot_fit_are_refused_before_any_rpc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = settings(rpc_timeout=0.3)
    async with swarm_of(tmp_path, 3, config) as swarm:
        dht = swarm.peers[0].dht
        sent: list[Any] = []
        real_call = dht.protocol.call

        async def spy(*args: Any) -> Any:
            sent.append(args)
            return await real_call(*args)

        monkeypatch.setattr(dht.protocol, "call", spy)
        manifest_150k = "0" * 150_000  # a whole manifest in place of its id
        providers = [[os.urandom(20), "127.0.0.1", 7000 + i] for i in range(40)]
        bad_values: list[Any] = [
            record_with(manifest=manifest_150k),
            record_with(manifest=providers),
            record_with(name="x" * 150_000),
            record_with(version=-1),
            record_with(size=2**70),
            record_with(created="yesterday"),
            {"name": "big/model", "manifest": "ab" * 32},
            [1, 2, 3],
            b"\x00" * 150_000,
        ]
        for value in bad_values:
            began = time.monotonic()
            with pytest.raises(RecordError):
                await dht.put_record(value)
            assert time.monotonic() - began < 0.5  # at once, no timeout
        assert sent == []
        assert all(not p.records.all() for p in swarm.peers)

        # Nothing was poisoned: a good record still goes through and reads back.
        good = record_with()
        assert await dht.put_record(good) == 3
        async with swarm.client() as client:
            assert await client.dht.get_record("big/model") == good


async def test_oversized_or_malformed_datagrams_are_dropped(tmp_path: Path) -> None:
    config = settings(rpc_timeout=0.3)
    async with swarm_of(tmp_path, 2, config) as swarm:
        target = swarm.peers[0]
        good = record_with(name="dgram/model")
        key = name_key(good.name)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        address = ("127.0.0.1", target.port)
        try:

            async def request(name: str, *args: Any) -> bytes | None:
                msg_id = os.urandom(20)
                body = msgpack.packb([name, list(args)], use_bin_type=True)
                raw.sendto(REQUEST + msg_id + body, address)
                with contextlib.suppress(TimeoutError):
                    reply = await asyncio.wait_for(loop.sock_recv(raw, 65536), 0.3)
                    assert reply[:21] == RESPONSE + msg_id
                    return reply[21:]
                return None

            huge = replace(good, manifest="0" * 9000).encode()  # > one datagram
            assert await request("store", b"", key, huge) is None  # dropped unread
            big = replace(good, manifest="0" * 2000).encode()  # fits, > 1 KiB
            assert msgpack.unpackb(await request("store", b"", key, big)) is False
            assert await request("store", b"", key, {"a": 1}) is not None
            assert await request("store", b"", b"short", good.encode()) is None
            assert await request("nonsense", b"") is None
            raw.sendto(b"\x00" * 30, address)
            raw.sendto(os.urandom(MAX_DATAGRAM + 100), address)
            assert not target.records.all()
            # Still serving, and a valid record is still accepted.
            pong = await request("ping", b"")
            assert pong is not None and msgpack.unpackb(pong) == target.node_id
            stored = await request("store", b"", key, good.encode())
            assert stored is not None and msgpack.unpackb(stored) is True
            assert target.records.get(key) == good
        finally:
            raw.close()


async def test_oversized_answer_leaves_the_caller_clean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = settings(rpc_timeout=0.3)
    async with lone_dht(config) as asker, lone_dht(config) as liar:
        contact = Contact(liar.node.id, "127.0.0.1", liar.port)
        monkeypatch.setattr(
            liar, "handle_find_value", lambda addr, node_id, key: {"value": {"x": 1}}
        )
        monkeypatch.setattr(
            liar,
            "handle_find_node",
            lambda addr, node_id, key: [[b"\x01" * 20, "127.0.0.1", 1]] * 400,
        )
        assert await asker._fetch_record(contact, name_key("a/b")) is None
        # A find_node answer too large for a datagram is never sent: a silence.
        assert await asker.find_node(contact, os.urandom(KEY_BYTES)) is None
        assert not asker.records.all()


# --- dht-name-conflict --------------------------------------------------------


async def test_two_publishers_converge_on_one_model(tmp_path: Path) -> None:
    config = settings(record_replicas=3)
    first, second = tiny_model(10), tiny_model(11)
    async with swarm_of(tmp_path, 6, config) as swarm:
        async with swarm.client() as one, swarm.client() as two:
            results = await asyncio.gather(
                one.publish(first, "race/model"),
                two.publish(second, "race/model"),
                return_exceptions=True,
            )
        # A publisher whose record lost the race learns it (a named error);
        # one that read the other's record first simply published the next
        # version. Either way the highest (version, manifest) is the winner.
        published = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            assert not isinstance(r, BaseException) or isinstance(
                r, NameConflictError
            ), r
        assert published
        assert len({r.version for r in published}) == len(published)
        winner = max(published, key=lambda r: r.record.rank)
        want = first if results[0] is winner else second

        # The 3 peers closest to the name hold the winner; a peer that holds
        # the record besides (publish also hands it to the manifest's owners)
        # may keep the loser, which every reader then outranks.
        key = name_key("race/model")
        closest = closest_ids([p.node_id for p in swarm.peers], key, 3)
        holders = [p for p in swarm.peers if p.node_id in closest]
        assert all(p.records.get(key) == winner.record for p in holders)
        for peer in swarm.peers:
            held = peer.records.get(key)
            assert held is None or held.rank <= winner.record.rank
        for peer in swarm.peers[:3]:  # loaders bootstrapped at three peers
            async with Client(peer.address, config) as loader:
                assert (await loader.resolve("race/model")) == winner.record
                assert same_arrays(await loader.load("race/model"), want)

        # A lower version than the one held is refused, locally and remotely.
        older = replace(winner.record, version=winner.record.version - 1)
        assert holders[0].records.offer(key, older.encode()) is False
        with pytest.raises(RecordError, match="newer"):
            await swarm.peers[0].dht.put_record(older)
        assert all(p.records.get(key) == winner.record for p in holders)


def test_record_store_refuses_lower_versions() -> None:
    store = RecordStore(None)
    key = name_key("v/model")
    v2 = new_record("v/model", "cd" * 32, 10, 2, 100)
    assert store.offer(key, v2.encode()) is True
    assert (
        store.offer(key, replace(v2, version=1, manifest="ff" * 32).encode()) is False
    )
    assert store.offer(key, v2.encode()) is True  # the same record again
    # Equal versions: the larger manifest id wins, whatever the order.
    tie_low, tie_high = (replace(v2, version=3, manifest=m * 32) for m in ("01", "fe"))
    assert store.offer(key, tie_high.encode()) is True
    assert store.offer(key, tie_low.encode()) is False
    assert store.get(key) == tie_high


# --- dht-many-providers -------------------------------------------------------


async def test_owners_of_a_shard_are_its_holders(tmp_path: Path) -> None:
    """dht-many-providers, in this design's terms.

    p2pshard keeps no provider records: a shard lives on the k peers closest
    to its key, so "who holds it" is a node lookup, not a value that racing
    announcers overwrite (a plain key-value DHT keeps only the last writer).
    Concurrent announcements are the k concurrent PUTs of one publish; expiry
    is liveness: a peer that stops answering drops out of the lookup, and only
    it. Its place is taken by the next closest peer, which repair then fills.
    """
    config = settings(rpc_timeout=0.3)
    async with swarm_of(tmp_path, 6, config) as swarm:
        async with swarm.client() as client:
            await client.publish(tiny_model(4), "many/tiny")
            (shard_id,) = (await client.manifest("many/tiny")).shards()
        holders = [p for p in swarm.peers if shard_id in p.store]
        asker = next(p for p in swarm.peers if p not in holders)
        assert len(holders) == 3
        key = shard_key(shard_id)
        owners = await asker.dht.closest(key, 3)
        assert ids(owners) == ids(holders)
        for owner in owners:
            assert await asker.transfer.has(owner, [shard_id]) == {shard_id}

        gone = holders[1]
        await swarm.stop(gone)
        owners = await asker.dht.closest(key, 3)
        assert gone.node_id not in ids(owners)
        assert ids(owners) & ids(holders) == ids(holders) - {gone.node_id}
        assert len(owners) == 3  # the next closest live peer fills the set
        assert ids(owners) == closest_ids([p.node_id for p in swarm.peers], key, 3)


# --- lookups without faults ---------------------------------------------------


async def test_lookup_matches_global_truth(tmp_path: Path) -> None:
    config = settings()
    async with swarm_of(tmp_path, 12, config) as swarm:
        every = [p.node_id for p in swarm.peers]
        async with swarm.client() as client:
            for _ in range(10):
                key = os.urandom(KEY_BYTES)
                found, hops = await client.dht.lookup(key, 4)
                assert [c.id for c in found] == sorted(
                    closest_ids(every, key, 4),
                    key=lambda i: int.from_bytes(i, "big") ^ int.from_bytes(key, "big"),
                )
                assert 1 <= hops <= 4


# --- owners of many keys ------------------------------------------------------


def test_rank_many_matches_an_exact_ranking() -> None:
    shared = os.urandom(8)  # half the ids tie on their top 64 bits
    view = [
        Contact(
            (shared if i % 2 else os.urandom(8)) + os.urandom(12), "127.0.0.1", i + 1
        )
        for i in range(40)
    ]
    keys = [os.urandom(KEY_BYTES) for _ in range(300)] + [shared + os.urandom(12)]
    ranked = rank_many(view, keys, 3)
    for key in keys:
        exact = sorted(view, key=lambda c, key=key: c.distance(key))[:3]
        assert ranked[key] == exact
    assert rank_many([], keys[:2], 3) == {keys[0]: [], keys[1]: []}


async def test_owners_of_many_keys_from_one_crawl(tmp_path: Path) -> None:
    async with swarm_of(tmp_path, 10, settings()) as swarm:
        async with swarm.client() as client:
            keys = [os.urandom(KEY_BYTES) for _ in range(500)]
            owners = await client.dht.closest_many(keys, 3)
        everyone = [p.node_id for p in swarm.peers]
        for key in keys:
            assert {c.id for c in owners[key]} == closest_ids(everyone, key, 3)
            assert owners[key] == sorted(
                owners[key], key=lambda c, k=key: c.distance(k)
            )

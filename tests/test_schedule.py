"""The load's request plan: pull-based dispatch and endgame duplicates (no I/O)."""

from __future__ import annotations

from collections import Counter

from p2pshard.dht import Contact
from p2pshard.schedule import MAX_IN_FLIGHT, Dispatch, Duplicate


def peer(n: int) -> Contact:
    return Contact(bytes([n]) * 20, "127.0.0.1", 7000 + n)


A, B, C = peer(1), peer(2), peer(3)


def plan(
    holders: dict[str, list[Contact]],
    faults: dict[str, int] | None = None,
    concurrency: int = 8,
    per_peer: int = 4,
    owners: int = 3,
) -> Dispatch:
    sizes = dict.fromkeys(holders, 100)
    return Dispatch(holders, sizes, faults or {}, concurrency, per_peer, owners)


def test_a_peer_that_frees_a_slot_gets_the_next_shard_it_owns() -> None:
    p = plan({"s1": [A], "s2": [B], "s3": [A], "s4": [A]}, per_peer=1)
    assert p.next() == ("s1", A)
    assert p.next() == ("s2", B)
    assert p.next() is None  # A is busy, and every pending shard is A's
    p.finished("s1")
    assert p.next() == ("s3", A)


def test_work_spreads_by_bytes_in_flight_and_faults_go_last() -> None:
    shards = {f"s{i}": [A, B, C] for i in range(6)}
    p = plan(shards, faults={C.address: 1}, per_peer=2)
    firsts = [p.next() for _ in range(6)]
    assert [c for _, c in firsts] == [A, B, A, B, C, C]  # C only once A, B are full
    assert p.next() is None


def test_concurrency_bounds_requests_in_flight() -> None:
    p = plan({f"s{i}": [A] for i in range(5)}, concurrency=3)
    assert [p.next() is not None for _ in range(4)] == [True, True, True, False]


def test_concurrency_is_raised_to_two_requests_per_serving_peer() -> None:
    peers = [peer(10 + i) for i in range(20)]
    p = plan({f"s{i}": [c] for i, c in enumerate(peers * 3)}, concurrency=3)
    started = []
    while (step := p.next()) is not None:
        started.append(step)
    assert len(started) == MAX_IN_FLIGHT  # 2 x 20 peers, capped
    assert max(Counter(c for _, c in started).values()) <= 2


def test_only_the_owners_are_asked_first() -> None:
    p = plan({"s1": [A, B, C]}, owners=1)
    assert p.next() == ("s1", A)
    p = plan({"s1": [A, B], "s2": [A, B]}, owners=1, per_peer=1)
    assert p.next() == ("s1", A)
    assert p.next() is None  # B is only an extra: it may not hold them


def test_a_shard_nobody_owns_starts_at_once_to_look_for_holders() -> None:
    p = plan({"s1": [], "s2": [A]})
    assert p.next() == ("s1", None)
    assert p.next() == ("s2", A)


def test_endgame_duplicates_the_oldest_request_on_an_idle_owner_once() -> None:
    p = plan({"s1": [A, B], "s2": [B, A], "s3": [C]}, per_peer=1)
    assert [p.next() for _ in range(3)] == [("s1", A), ("s2", B), ("s3", C)]
    assert p.duplicate() is None  # every owner is busy
    p.finished("s2")
    assert p.duplicate() == Duplicate("s1", B, A)
    assert p.duplicate() is None  # s1 once; s3 has no other owner
    p.finished("s1")
    assert p.in_flight == 1 and p.duplicate() is None


def test_a_peer_out_of_work_duplicates_while_others_still_have_some() -> None:
    p = plan({"s1": [A, B], "s2": [A, B], "s3": [A]}, per_peer=1)
    assert p.next() == ("s1", A)
    assert p.next() == ("s2", B)
    assert p.next() is None and p.duplicate() is None  # both busy
    p.finished("s2")
    assert p.next() is None  # s3 waits for A
    assert p.duplicate() == Duplicate("s1", B, A)  # B has nothing left


def test_a_shard_others_could_take_later_is_left_to_them() -> None:
    # A owns s1 (with B, which has much else to do) and s2 (with C, which has
    # nothing else): A takes s1 and leaves s2 to C.
    shards = {"s2": [A, C], "s1": [A, B], **{f"b{i}": [B] for i in range(5)}}
    p = plan(shards, per_peer=1)
    assert p.next() == ("s1", A)


def test_equal_peers_finish_within_a_shard_of_the_best_split() -> None:
    """k=3 of 8 peers, owners within one half of the id space (as XOR gives),
    halves holding unequal bytes: the plan must split each half's work evenly
    among its peers, not first come, first served."""
    import heapq
    import itertools
    import random

    rand = random.Random(5)
    peers = [peer(20 + i) for i in range(8)]
    holders: dict[str, list[Contact]] = {}
    for n in range(200):
        half = 0 if n < 114 else 4  # 57% of the shards in the first half
        quarter = half + 2 * rand.randrange(2)
        sibling = (half + 2) if quarter == half else half
        owners = [
            peers[quarter],
            peers[quarter + 1],
            peers[sibling + rand.randrange(2)],
        ]
        rand.shuffle(owners)
        holders[f"s{n}"] = owners
    p = plan(holders, concurrency=64, per_peer=1)
    # Equal peers, one request each at a time, every shard takes one unit.
    now, busy, served = 0.0, [], {c.address: 0 for c in peers}
    while p.pending or busy:
        while (step := p.next()) is not None:
            heapq.heappush(busy, (now + 1.0, step[0], step[1].address))
        now, shard_id, address = heapq.heappop(busy)
        served[address] += 1
        p.finished(shard_id)
    best = max(
        sum(1 for o in holders.values() if {c.address for c in o} <= set(group))
        / len(group)
        for r in range(1, 9)
        for group in itertools.combinations([c.address for c in peers], r)
    )
    assert now <= best + 1, (now, best, served)

"""Tests of the tensor-aligned shard plans and of the shard lookup by byte range."""

from __future__ import annotations

import numpy as np
import pytest

from p2pshard.chunking import overlapping, plan_blob, plan_tensors

Range = tuple[int, int]


def layout(*sizes: int) -> list[Range]:
    """Contiguous tensor ranges of the given sizes, from offset 0."""
    out: list[Range] = []
    pos = 0
    for size in sizes:
        out.append((pos, pos + size))
        pos += size
    return out


def bounds_of(plan: list[Range]) -> list[int]:
    return [0, *(end for _, end in plan)]


def touched(plan: list[Range], start: int, end: int) -> list[int]:
    """Brute force: indexes of the shards sharing a byte with [start, end)."""
    if end <= start:
        return []
    return [i for i, (s, e) in enumerate(plan) if s < end and start < e]


def check_plan(
    tensors: list[Range], data_size: int, shard_size: int, plan: list[Range]
) -> None:
    """Every invariant a plan must keep, checked against the tensor layout."""
    pos = 0
    for start, end in plan:
        assert start == pos, f"gap or overlap at {pos}: {plan}"
        assert 0 < end - start <= shard_size, plan
        pos = end
    assert pos == data_size

    big_parts: set[int] = set()
    for start, end in tensors:
        if end == start:
            continue
        hit = touched(plan, start, end)
        if end - start <= shard_size:
            # A small tensor lies whole in one shard.
            assert len(hit) == 1, (start, end, plan)
        else:
            # A big tensor has shards of its own, cut from its own start.
            cuts = [
                (s, min(s + shard_size, end)) for s in range(start, end, shard_size)
            ]
            assert [plan[i] for i in hit] == cuts, (start, end, plan)
            big_parts.update(hit)

    # Packing is greedy: a pack is closed only when the next tensor overflows it.
    first_size = {s: e - s for s, e in tensors if e > s}
    for i in range(len(plan) - 1):
        if i in big_parts or i + 1 in big_parts:
            continue
        (s0, e0), (s1, _) = plan[i], plan[i + 1]
        assert (e0 - s0) + first_size[s1] > shard_size, (plan[i], plan[i + 1])


# --- plan_blob -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "shard_size", "expected"),
    [
        (0, 10, []),
        (1, 10, [(0, 1)]),
        (10, 10, [(0, 10)]),
        (11, 10, [(0, 10), (10, 11)]),
        (30, 10, [(0, 10), (10, 20), (20, 30)]),
        (5, 1, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    ],
)
def test_plan_blob(size: int, shard_size: int, expected: list[Range]) -> None:
    assert plan_blob(size, shard_size) == expected


@pytest.mark.parametrize("shard_size", [0, -1])
def test_shard_size_must_be_positive(shard_size: int) -> None:
    with pytest.raises(ValueError):
        plan_blob(10, shard_size)
    with pytest.raises(ValueError):
        plan_tensors(layout(10), 10, shard_size)


# --- plan_tensors --------------------------------------------------------------


def test_small_tensors_are_packed() -> None:
    tensors = layout(3, 3, 3, 3)
    assert plan_tensors(tensors, 12, 10) == [(0, 9), (9, 12)]


def test_pack_closes_when_next_tensor_overflows() -> None:
    tensors = layout(4, 4, 4, 6, 4)
    assert plan_tensors(tensors, 22, 10) == [(0, 8), (8, 18), (18, 22)]


def test_tensor_of_exactly_shard_size_gets_its_own_shard() -> None:
    tensors = layout(2, 10, 2)
    plan = plan_tensors(tensors, 14, 10)
    assert plan == [(0, 2), (2, 12), (12, 14)]
    check_plan(tensors, 14, 10, plan)


def test_big_tensor_is_cut_from_its_own_start() -> None:
    tensors = layout(3, 25, 2)
    plan = plan_tensors(tensors, 30, 10)
    assert plan == [(0, 3), (3, 13), (13, 23), (23, 28), (28, 30)]
    check_plan(tensors, 30, 10, plan)


def test_big_tensor_never_shares_a_shard() -> None:
    tensors = layout(1, 11, 1, 1, 20, 1)
    plan = plan_tensors(tensors, 35, 10)
    assert plan == [(0, 1), (1, 11), (11, 12), (12, 14), (14, 24), (24, 34), (34, 35)]
    check_plan(tensors, 35, 10, plan)


def test_empty_tensors_are_ignored() -> None:
    tensors = layout(0, 5, 0, 0, 3, 0)
    assert plan_tensors(tensors, 8, 10) == [(0, 8)]
    assert plan_tensors(layout(0, 0), 0, 10) == []
    assert plan_tensors([], 0, 10) == []


def test_order_of_input_does_not_matter() -> None:
    tensors = layout(4, 0, 15, 2, 2, 9, 1)
    data_size = tensors[-1][1]
    plan = plan_tensors(tensors, data_size, 8)
    assert plan_tensors(list(reversed(tensors)), data_size, 8) == plan
    assert plan_tensors(iter(tensors), data_size, 8) == plan


def test_identical_big_tensor_gives_identical_shards_at_any_offset() -> None:
    # Two versions of a model: the small tensors before the big one differ.
    v1 = layout(3, 40, 2)
    v2 = layout(7, 1, 40, 2)
    p1 = plan_tensors(v1, 45, 16)
    p2 = plan_tensors(v2, 50, 16)
    rel1 = [(s - 3, e - 3) for s, e in p1 if 3 <= s and e <= 43]
    rel2 = [(s - 8, e - 8) for s, e in p2 if 8 <= s and e <= 48]
    assert rel1 == rel2 == [(0, 16), (16, 32), (32, 40)]


def test_data_size_must_match_the_tensors() -> None:
    with pytest.raises(ValueError):
        plan_tensors(layout(5, 5), 11, 10)
    with pytest.raises(ValueError):
        plan_tensors(layout(5, 5), 9, 10)
    with pytest.raises(ValueError):
        plan_tensors([], 1, 10)


# --- overlapping ---------------------------------------------------------------


def test_overlapping_examples() -> None:
    bounds = [0, 10, 20, 25, 40]
    assert list(overlapping(bounds, 0, 10)) == [0]
    assert list(overlapping(bounds, 0, 11)) == [0, 1]
    assert list(overlapping(bounds, 9, 10)) == [0]
    assert list(overlapping(bounds, 10, 11)) == [1]
    assert list(overlapping(bounds, 19, 21)) == [1, 2]
    assert list(overlapping(bounds, 5, 40)) == [0, 1, 2, 3]
    assert list(overlapping(bounds, 39, 40)) == [3]
    assert list(overlapping(bounds, 0, 40)) == [0, 1, 2, 3]


@pytest.mark.parametrize(("start", "end"), [(0, 0), (10, 10), (40, 40), (30, 20)])
def test_overlapping_empty_range_needs_no_shard(start: int, end: int) -> None:
    assert list(overlapping([0, 10, 20, 25, 40], start, end)) == []
    assert list(overlapping([0], 0, 0)) == []


# --- randomized ----------------------------------------------------------------


def random_layout(rng: np.random.Generator) -> tuple[list[Range], int, int]:
    """A random tensor layout mixing empty, small, edge-sized and big tensors."""
    shard_size = int(rng.integers(1, 65))
    sizes: list[int] = []
    for _ in range(int(rng.integers(0, 25))):
        kind = int(rng.integers(0, 4))
        if kind == 0:
            size = 0
        elif kind == 1:
            size = int(rng.integers(1, shard_size + 1))
        elif kind == 2:
            size = max(0, shard_size + int(rng.integers(-1, 2)))
        else:
            size = int(rng.integers(shard_size + 1, 5 * shard_size + 2))
        sizes.append(size)
    tensors = layout(*sizes)
    data_size = tensors[-1][1] if tensors else 0
    return tensors, data_size, shard_size


def test_random_layouts(rng: np.random.Generator) -> None:
    for _ in range(300):
        tensors, data_size, shard_size = random_layout(rng)
        plan = plan_tensors(tensors, data_size, shard_size)
        check_plan(tensors, data_size, shard_size, plan)

        shuffled = [tensors[i] for i in rng.permutation(len(tensors))]
        assert plan_tensors(shuffled, data_size, shard_size) == plan

        blob = plan_blob(data_size, shard_size)
        check_plan([(0, data_size)], data_size, shard_size, blob)

        bounds = bounds_of(plan)
        for start, end in tensors:
            assert list(overlapping(bounds, start, end)) == touched(plan, start, end)
        for _ in range(5):
            a, b = sorted(int(x) for x in rng.integers(0, data_size + 1, size=2))
            assert list(overlapping(bounds, a, b)) == touched(plan, a, b)

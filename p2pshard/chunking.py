"""Tensor-aligned shard plans: where a file's bytes are cut into shards.

A shard is a contiguous byte range of one file's data region (for a
safetensors file, the bytes after its header; for any other file, all of it).
A tensor larger than the shard size is cut at fixed offsets from its own
start; smaller tensors are packed together, a new shard starting whenever the
next tensor would overflow the current one. So a tensor never shares a shard
with part of a large tensor, and a partial load fetches only the shards its
tensors overlap. Cuts depend only on the tensor layout and the shard size, so
identical tensors in two versions of a model give identical shards, unless
the publisher splits a shard further to even out the bytes each peer owns
(p2pshard.balance).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

__all__ = ["overlapping", "plan_blob", "plan_tensors"]

Range = tuple[int, int]


def plan_blob(size: int, shard_size: int) -> list[Range]:
    """Fixed-size ranges covering ``size`` bytes (none for an empty file)."""
    _check_shard_size(shard_size)
    return plan_blob_at(0, size, shard_size)


def plan_tensors(
    tensors: Iterable[Range], data_size: int, shard_size: int
) -> list[Range]:
    """Shard ranges for a data region whose tensors occupy ``tensors``.

    ``tensors`` are (start, end) ranges that tile ``[0, data_size)`` without
    holes or overlaps (the safetensors parser guarantees it); empty tensors
    take no bytes and are ignored. The returned ranges tile the same region.
    """
    _check_shard_size(shard_size)
    plan: list[Range] = []
    pack_start = pack_end = 0
    for start, end in sorted(tensors):
        if end == start:
            continue
        if end - start > shard_size:
            if pack_end > pack_start:
                plan.append((pack_start, pack_end))
            plan.extend(plan_blob_at(start, end, shard_size))
            pack_start = pack_end = end
            continue
        if end - pack_start > shard_size and pack_end > pack_start:
            plan.append((pack_start, pack_end))
            pack_start = start
        pack_end = end
    if pack_end > pack_start:
        plan.append((pack_start, pack_end))
    covered = plan[-1][1] if plan else 0
    if covered != data_size:
        raise ValueError(f"tensors cover {covered} of {data_size} data bytes")
    return plan


def plan_blob_at(start: int, end: int, shard_size: int) -> list[Range]:
    """Fixed-size ranges from ``start`` to ``end``."""
    return [(s, min(s + shard_size, end)) for s in range(start, end, shard_size)]


def overlapping(bounds: Sequence[int], start: int, end: int) -> range:
    """Indexes of the shards, with cumulative ``bounds``, that ``[start, end)`` needs.

    ``bounds`` has one more entry than there are shards: shard i spans
    ``[bounds[i], bounds[i+1])``. An empty range needs no shard.
    """
    if end <= start:
        return range(0)
    first = bisect_right(bounds, start) - 1
    last = bisect_right(bounds, end - 1) - 1
    return range(first, last + 1)


def _check_shard_size(shard_size: int) -> None:
    if shard_size < 1:
        raise ValueError("shard_size must be positive")

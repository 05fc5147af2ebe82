"""Placement: a shard belongs on the k live peers closest to its key.

These functions put shard bytes where they belong. A synchronous write waits
for a quorum of the k owners; an asynchronous write stores one copy and asks
that owner to complete the set; a peer completing a set first asks each owner,
in one request, whether it already holds the shard.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from .dht import Contact, Dht
from .errors import QuorumError
from .hashing import shard_key
from .store import ShardStore
from .transfer import PeerError, Transfer

__all__ = ["complete_owners", "offer_record", "store_first", "store_on_owners"]

log = logging.getLogger(__name__)

PUT_ERRORS = (PeerError, aiohttp.ClientError, TimeoutError, OSError)


async def _put_one(
    transfer: Transfer,
    local: ShardStore | None,
    me: Contact | None,
    contact: Contact,
    shard_id: str,
    data: bytes | bytearray | memoryview,
    replicas: int = 0,
) -> None:
    if local is not None and me is not None and contact.id == me.id:
        await local.put(shard_id, data)
    else:
        await transfer.put(contact, shard_id, data, replicas)


async def store_on_owners(
    dht: Dht,
    transfer: Transfer,
    shard_id: str,
    data: bytes | bytearray | memoryview,
    replicas: int,
    quorum: int,
    local: ShardStore | None = None,
) -> list[Contact]:
    """Write a shard to its owners; returns those that acknowledged.

    Raises QuorumError when fewer than ``quorum`` owners acknowledged.
    """
    owners = await dht.closest(shard_key(shard_id), replicas)
    results = await asyncio.gather(
        *(_put_one(transfer, local, dht.me, c, shard_id, data) for c in owners),
        return_exceptions=True,
    )
    acked = [c for c, r in zip(owners, results) if r is None]
    if len(acked) < quorum:
        failures = {
            c.address: str(r) or type(r).__name__
            for c, r in zip(owners, results)
            if isinstance(r, BaseException)
        }
        raise QuorumError(shard_id, quorum, len(acked), failures)
    return acked


async def store_first(
    dht: Dht,
    transfer: Transfer,
    shard_id: str,
    data: bytes | bytearray | memoryview,
    replicas: int,
) -> Contact:
    """Write one copy to the closest owner that takes it; it completes the set."""
    owners = await dht.closest(shard_key(shard_id), replicas)
    failures: dict[str, str] = {}
    for contact in owners:
        try:
            await transfer.put(contact, shard_id, data, replicas)
        except PUT_ERRORS as exc:
            failures[contact.address] = str(exc) or type(exc).__name__
            continue
        return contact
    raise QuorumError(shard_id, 1, 0, failures)


async def complete_owners(
    dht: Dht, transfer: Transfer, store: ShardStore, shard_id: str, replicas: int
) -> int:
    """Push a locally held shard to the owners that lack it; returns copies made."""
    owners = [
        c for c in await dht.closest(shard_key(shard_id), replicas) if c != dht.me
    ]
    held = await asyncio.gather(
        *(transfer.has(c, [shard_id]) for c in owners), return_exceptions=True
    )
    missing = [c for c, h in zip(owners, held) if isinstance(h, set) and not h]
    if not missing:
        return 0
    data = await store.read(shard_id)
    results = await asyncio.gather(
        *(transfer.put(c, shard_id, data) for c in missing), return_exceptions=True
    )
    for contact, result in zip(missing, results):
        if isinstance(result, BaseException):
            log.debug("copy of %s to %s failed: %r", shard_id, contact.address, result)
    return sum(1 for r in results if not isinstance(r, BaseException))


async def offer_record(transfer: Transfer, contact: Contact, data: bytes) -> bool:
    """Ask one peer to hold a name record too (it republishes what it holds)."""
    url = f"{contact.url}/v1/records"
    try:
        async with transfer.session.post(url, data=data) as resp:
            return resp.status == 200
    except PUT_ERRORS as exc:
        log.debug("record offer to %s failed: %s", contact.address, exc)
        return False

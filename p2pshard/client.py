"""The client: publish, load and inspect models in a swarm.

A client joins the DHT in client mode (peers answer it but never make it an
owner of anything) and talks HTTP to the peers for shard bytes::

    async with Client("127.0.0.1:7000") as client:
        await client.publish("path/to/model", name="minilm")
        arrays = await client.load("minilm", tensors=["encoder.layer.0.*"])
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .dht import Contact, Dht, parse_address
from .errors import NameNotFoundError, NoPeersError
from .hashing import check_name
from .loader import Loader, LoadStats, Progress
from .manifest import Manifest
from .publish import PublishResult, publish
from .records import NameRecord, RecordError
from .repair import owners_of
from .settings import Settings
from .transfer import PeerError, Transfer

__all__ = ["Client"]

log = logging.getLogger(__name__)


class Client:
    """A connection to a swarm; ``async with Client(bootstrap)`` opens it.

    bootstrap: one or more ``HOST:PORT`` of peers of the swarm.
    settings: tunables; ``replicas`` and ``write_quorum`` apply to publishing.
    """

    def __init__(
        self,
        bootstrap: str | Iterable[str | tuple[str, int]],
        settings: Settings | None = None,
    ) -> None:
        if isinstance(bootstrap, str):
            bootstrap = [bootstrap]
        self.bootstrap = [
            parse_address(b) if isinstance(b, str) else b for b in bootstrap
        ]
        if not self.bootstrap:
            raise NoPeersError("a client needs at least one bootstrap address")
        self.settings = settings or Settings()
        self.dht = Dht(self.settings)
        self.transfer = Transfer(self.settings)
        self.last_load: LoadStats | None = None

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        host = await _local_address(self.bootstrap[0])
        await self.transfer.__aenter__()
        try:
            await self.dht.start(host, 0)
            await self.dht.bootstrap(self.bootstrap)
            await self.dht.view()  # one crawl: owners of many shards come from it
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.dht.stop()
        await self.transfer.close()

    # --- models -----------------------------------------------------------

    async def publish(
        self,
        source: str | os.PathLike[str] | Mapping[str, np.ndarray],
        name: str,
        asynchronous: bool = False,
        progress: Progress | None = None,
    ) -> PublishResult:
        """Publish a safetensors file, a model directory or a dict of arrays.

        Synchronous (default): returns once every shard is on a write quorum of
        its k owners. Asynchronous: returns once every shard has one copy; the
        owners complete the set in the background.
        """
        return await publish(
            self.dht, self.transfer, self.settings, source, name, asynchronous, progress
        )

    async def load(
        self,
        name: str,
        tensors: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Load a model's tensors (all, or those matching glob patterns)."""
        loader = Loader(self.dht, self.transfer, self.settings, progress)
        _, manifest = await loader.resolve(check_name(name))
        arrays = await loader.arrays(manifest, tensors)
        self.last_load = loader.stats
        return arrays

    async def load_to(
        self,
        name: str,
        out: str | os.PathLike[str],
        tensors: Sequence[str] | None = None,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> LoadStats:
        """Write a model to ``out``, byte-identical to what was published.

        A published directory comes back as a directory, a file or a dict of
        arrays as one safetensors file. With ``tensors``, ``out`` is a
        safetensors file of the matching tensors only. A file whose ``out`` is
        a directory (or ends with a slash) goes inside it; ``stats.path`` says
        where it went.
        """
        loader = Loader(self.dht, self.transfer, self.settings, progress)
        _, manifest = await loader.resolve(check_name(name))
        written = await loader.to_path(manifest, out, tensors, overwrite)
        loader.stats.path = str(written)
        self.last_load = loader.stats
        return loader.stats

    async def resolve(self, name: str) -> NameRecord:
        """The current record of a name; NameNotFoundError if there is none."""
        record = await self.dht.get_record(check_name(name))
        if record is None:
            raise NameNotFoundError(name)
        return record

    async def manifest(self, name: str) -> Manifest:
        loader = Loader(self.dht, self.transfer, self.settings)
        return (await loader.resolve(check_name(name)))[1]

    # --- the swarm --------------------------------------------------------

    async def peers(self) -> list[Contact]:
        """Every live peer reachable from the bootstrap, found by a fresh crawl."""
        return sorted(await self.dht.crawl(), key=lambda c: (c.host, c.port))

    async def list(self) -> list[NameRecord]:
        """Every published name (newest version of each), from all peers."""
        peers = await self.peers()
        answers = await asyncio.gather(
            *(self.transfer.get_json(c, "/v1/records") for c in peers),
            return_exceptions=True,
        )
        newest: dict[str, NameRecord] = {}
        for answer in answers:
            for record in _records_from_json(answer):
                held = newest.get(record.name)
                if held is None or record.rank > held.rank:
                    newest[record.name] = record
        return sorted(newest.values(), key=lambda r: r.name)

    async def status(self, replicas: int | None = None) -> dict[str, Any]:
        """Peers seen, shards each holds, and shards short of k good owners."""
        k = replicas or self.settings.replicas
        peers = await self.peers()
        answers = await asyncio.gather(
            *(self._peer_state(c) for c in peers), return_exceptions=True
        )
        rows, holders = [], {}
        for contact, answer in zip(peers, answers):
            if isinstance(answer, BaseException):
                continue
            state, shards = answer
            rows.append(state)
            for shard_id, *_ in shards:
                holders.setdefault(shard_id, set()).add(contact.id)
        live = [c for c, a in zip(peers, answers) if not isinstance(a, BaseException)]
        short = 0
        for shard_id, held_by in holders.items():
            owners = owners_of(shard_id, live, k)
            if sum(1 for c in owners if c.id in held_by) < min(k, len(live)):
                short += 1
        held = [row["bytes"] for row in rows]
        mean = sum(held) / len(held) if held else 0
        return {
            "peers": len(rows),
            "replicas": k,
            "shards": len(holders),
            "copies": sum(len(h) for h in holders.values()),
            "replicas_short": short,
            "bytes_held": sum(held),
            "spread_max_over_mean": round(max(held) / mean, 3) if mean else None,
            "peer_list": rows,
        }

    async def _peer_state(self, contact: Contact) -> tuple[dict[str, Any], list[Any]]:
        state = await self.transfer.get_json(contact, "/v1/status")
        shards = await self.transfer.get_msgpack(contact, "/v1/shards")
        if not isinstance(state, dict) or not isinstance(shards, list):
            raise PeerError("malformed status")
        return state, shards


def _records_from_json(answer: Any) -> list[NameRecord]:
    if not isinstance(answer, list):
        return []
    records = []
    for row in answer:
        try:
            records.append(NameRecord.decode(NameRecord(**row).encode()))
        except (TypeError, ValueError, RecordError):
            continue
    return records


async def _local_address(address: tuple[str, int]) -> str:
    """The local IP that reaches ``address`` (no packet is sent)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        address[0], address[1], type=socket.SOCK_DGRAM
    )
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)
        return probe.getsockname()[0]

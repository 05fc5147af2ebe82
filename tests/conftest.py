"""Shared fixtures: local swarms of in-process peers on 127.0.0.1, port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from p2pshard import Client, Peer, Settings

FAST = Settings(
    rpc_timeout=1.0, connect_timeout=1.0, read_timeout=2.0, shard_size=64 * 1024
)


class Swarm:
    """Peers in this event loop, each with its own data directory."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.settings = settings
        self.peers: list[Peer] = []
        self._count = 0

    @property
    def bootstrap(self) -> list[str]:
        return [p.address for p in self.peers[:2]]

    async def add(self, data_dir: Path | None = None, **kwargs: object) -> Peer:
        if data_dir is None:
            data_dir = self.root / f"peer{self._count}"
            self._count += 1
        peer = Peer(
            data_dir, bootstrap=self.bootstrap, settings=self.settings, **kwargs
        )
        await peer.start()
        self.peers.append(peer)
        return peer

    async def grow(self, n: int) -> None:
        for _ in range(n):
            await self.add()
        # Every peer looks itself up once more so early peers learn late ones.
        await asyncio.gather(
            *(p.dht.closest(p.node_id, self.settings.dht_ksize) for p in self.peers)
        )

    async def stop(self, peer: Peer, handoff: bool = False) -> None:
        """Stop a peer; without ``handoff`` it vanishes as if it crashed."""
        await peer.stop(handoff=handoff)
        self.peers.remove(peer)

    def client(self, **overrides: object) -> Client:
        settings = self.settings
        if overrides:
            from dataclasses import replace

            settings = replace(settings, **overrides)
        return Client(self.bootstrap, settings)

    async def close(self) -> None:
        await asyncio.gather(*(p.stop(handoff=False) for p in self.peers))
        self.peers.clear()


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], limit: float
) -> None:
    """Poll ``condition`` until it holds, failing after ``limit`` seconds."""
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)  # the polling interval, not a wait for the event


@pytest.fixture
async def swarm(tmp_path: Path) -> AsyncIterator[Swarm]:
    s = Swarm(tmp_path / "swarm", FAST)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)

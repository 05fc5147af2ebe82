"""A peer: one host:port with a DHT member (UDP), a shard server (TCP) and a store.

The UDP and TCP sockets share one port number, so one address names a peer.
The node id and the shards live in the data directory and survive restarts,
so a restarted peer owns the same keys and still holds their shards.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import random
import socket
from collections.abc import Coroutine, Iterable
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from .dht import Contact, Dht, parse_address
from .errors import PeerSetupError
from .hashing import KEY_BYTES
from .records import RecordStore
from .repair import Repairer, RepairStats
from .replication import complete_owners
from .server import make_app
from .settings import Settings
from .store import ShardStore
from .transfer import Transfer

__all__ = ["Peer"]

log = logging.getLogger(__name__)

PORT_TRIES = 50
RECORD_FLUSH_SECONDS = 0.5  # a crash loses at most this much of new records


class Peer:
    """A member of the swarm; ``async with Peer(...)`` starts and stops it.

    host: the interface to bind; 127.0.0.1 unless told otherwise.
    port: the UDP and TCP port; 0 picks a free one (see ``peer.port``).
    bootstrap: ``HOST:PORT`` strings (or tuples) of peers already in the swarm.
    capacity: most bytes of shards to hold; ``None`` means the free disk space.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap: Iterable[str | tuple[str, int]] = (),
        settings: Settings | None = None,
        capacity: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.requested_port = port
        self.bootstrap_addresses = [
            parse_address(b) if isinstance(b, str) else b for b in bootstrap
        ]
        self.settings = settings or Settings()
        self.store = ShardStore(self.data_dir, capacity=capacity)
        self.records = RecordStore(self.data_dir / "records.msgpack")
        node_id = self._load_node_id()
        self._has_id = node_id is not None
        self.dht = Dht(self.settings, node_id or os.urandom(KEY_BYTES), self.records)
        self.transfer = Transfer(self.settings)
        self.repairer = Repairer(self)
        self.scrub_failures = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._replications: set[asyncio.Task[Any]] = set()
        self._started = False
        self._lock: TextIO | None = None

    # --- identity ---------------------------------------------------------

    def _load_node_id(self) -> bytes | None:
        """The node id kept in the data directory, if there is one."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PeerSetupError(
                f"cannot use data directory {self.data_dir}: {_why(exc)}"
            ) from exc
        path = self.data_dir / "node_id"
        if path.exists():
            try:
                node_id = bytes.fromhex(path.read_text().strip())
            except ValueError:
                node_id = b""
            if len(node_id) == KEY_BYTES:
                return node_id
            log.warning("replacing malformed node id in %s", path)
        return None

    def _save_node_id(self, node_id: bytes) -> None:
        path = self.data_dir / "node_id"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(node_id.hex() + "\n")
        os.replace(tmp, path)

    async def _choose_node_id(self) -> None:
        """Give a new peer an id that splits the largest share of the key space
        (see :func:`balanced_id`). Runs once, on first start."""
        if self._has_id:
            return
        node_id = self.node_id
        if self.bootstrap_addresses:
            probe = Dht(self.settings)
            try:
                await probe.start(self.host, 0)
                await probe.bootstrap(self.bootstrap_addresses)
                view = await probe.crawl()
            finally:
                await probe.stop()
            node_id = balanced_id([c.id for c in view]) or node_id
        self.dht = Dht(self.settings, node_id, self.records)
        self._save_node_id(node_id)
        self._has_id = True

    @property
    def node_id(self) -> bytes:
        return self.dht.node.id

    @property
    def port(self) -> int:
        return self.dht.port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, self.host, self.port)

    # --- lifecycle --------------------------------------------------------

    async def __aenter__(self) -> Peer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the store, bind both sockets, then join the swarm."""
        self._lock_data_dir()
        try:
            await asyncio.to_thread(self.store.open)
            self.records.load()
        except BaseException:
            self._unlock_data_dir()
            raise
        await self.transfer.__aenter__()
        try:
            await self._choose_node_id()
            try:
                sock = await self._bind()
            except OSError as exc:
                where = f"{self.host}:{self.requested_port or 'any port'}"
                raise PeerSetupError(f"cannot listen on {where}: {_why(exc)}") from exc
            self._runner = web.AppRunner(make_app(self), access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            self._started = True
            await self.dht.bootstrap(self.bootstrap_addresses)
        except BaseException:
            await self.stop(handoff=False)
            raise
        self.dht.on_contact = self.repairer.poke
        self.dht.on_lost = self.repairer.poke
        self.spawn(self.repairer.run())
        self.spawn(self._flush_records_forever())
        if self.settings.liveness_interval > 0:
            self.spawn(self._watch_neighbours())
        if self.settings.scrub_rate > 0:
            self.spawn(self.repairer.scrub())
        log.info("peer %s up at %s", self.node_id.hex()[:12], self.address)

    def _lock_data_dir(self) -> None:
        """Hold an exclusive lock on the data directory while running: two
        peers on one directory would share a node id and a store."""
        path = self.data_dir / "lock"
        try:
            handle = open(path, "a+")  # held, with its lock, until stop
        except OSError as exc:
            raise PeerSetupError(
                f"cannot use data directory {self.data_dir}: {_why(exc)}"
            ) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise PeerSetupError(
                f"data directory {self.data_dir} is in use by another peer "
                f"(pid {holder})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _unlock_data_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    async def _bind(self) -> socket.socket:
        """Bind UDP (DHT) and TCP (HTTP) on one port number."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(PORT_TRIES if self.requested_port == 0 else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.requested_port))
                port = sock.getsockname()[1]
                await self.dht.start(self.host, port)
            except OSError:
                sock.close()
                if self.requested_port:
                    raise
                continue
            sock.listen(128)
            sock.setblocking(False)
            return sock
        raise OSError(f"no port free for both UDP and TCP on {self.host}")

    async def stop(self, handoff: bool = True) -> None:
        """Leave the swarm: hand shards over (unless ``handoff`` is False, which
        is what a crash looks like to the others), then stop serving, cancel
        background work and close every socket."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if handoff and self._started:
            await self._handoff()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.dht.stop()
        await self.flush_records()
        await self.transfer.close()
        if self._started:
            log.info("peer %s stopped", self.address)
        self._started = False
        self._unlock_data_dir()

    async def _handoff(self) -> None:
        try:
            stats = await asyncio.wait_for(
                self.repairer.repair_once(leaving=True), self.settings.handoff_timeout
            )
        except TimeoutError:
            log.warning(
                "hand-off did not finish in %.0f s", self.settings.handoff_timeout
            )
            return
        try:
            await asyncio.wait_for(
                self.repairer.republish_records(), self.settings.handoff_timeout
            )
        except TimeoutError:
            log.warning("records not all handed off")
        log.info("handed off %d copies (%d bytes)", stats.pushed, stats.bytes_pushed)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run background work owned by this peer (cancelled on stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

    async def wait_replicated(self) -> None:
        """Wait until the owner sets this peer is completing now are complete."""
        while self._replications:
            await asyncio.gather(*list(self._replications), return_exceptions=True)

    # --- duties -----------------------------------------------------------

    def replicate_later(self, shard_id: str, replicas: int) -> None:
        """Complete the set of ``replicas`` owners of a shard in the background."""
        task = self.spawn(
            complete_owners(self.dht, self.transfer, self.store, shard_id, replicas)
        )
        self._replications.add(task)
        task.add_done_callback(self._replications.discard)

    async def flush_records(self) -> None:
        """Write the name records held here to disk if they changed."""
        data = self.records.snapshot()
        if data is not None:
            await asyncio.to_thread(self.records.write, data)

    async def _watch_neighbours(self) -> None:
        """Ping the nearest peers every ``liveness_interval`` (jittered): a
        crashed co-owner that nobody calls is evicted within about two RPC
        timeouts of the next round, which starts a repair pass, instead of
        waiting for the periodic pass."""
        nearest = max(8, 4 * self.settings.replicas)
        while True:
            interval = self.settings.liveness_interval * random.uniform(0.8, 1.2)
            await asyncio.sleep(interval)
            await self.dht.check_contacts(nearest)

    async def _flush_records_forever(self) -> None:
        while True:
            await asyncio.sleep(RECORD_FLUSH_SECONDS)
            await self.flush_records()

    async def repair_once(self) -> RepairStats:
        """Run one repair pass now (see :mod:`p2pshard.repair`)."""
        return await self.repairer.repair_once()

    async def republish_records(self) -> int:
        """Store every name record held here on the peers now closest to it."""
        return await self.repairer.republish_records()

    def status(self) -> dict[str, Any]:
        last = self.repairer.last
        return {
            "id": self.node_id.hex(),
            "host": self.host,
            "port": self.port,
            "shards": len(self.store),
            "bytes": self.store.total_bytes,
            "cached_bytes": self.store.cached_bytes,
            "records": len(self.records.all()),
            "contacts": len(self.dht.contacts()),
            "repair_passes": self.repairer.passes,
            "last_repair": None
            if last is None
            else {
                "checked": last.checked,
                "pushed": last.pushed,
                "bytes_pushed": last.bytes_pushed,
                "failed": last.failed,
                "seconds": round(last.seconds, 3),
            },
            "scrub_failures": self.scrub_failures,
        }


def balanced_id(ids: list[bytes]) -> bytes | None:
    """A new id that splits the largest share of the key space held by one peer.

    In the XOR metric a peer owns the keys under its shortest unique prefix in
    the binary trie of all ids. The new id keeps that prefix of the peer with
    the shortest one, flips the next bit and takes random bits after it, so the
    two split the region evenly. (Random ids leave some peers twice the mean
    share of shards; this keeps the most loaded near 1.1x at 16 peers.)
    """
    points = list({int.from_bytes(i, "big") for i in ids})
    if not points:
        return None
    bits = 8 * KEY_BYTES

    def unique_prefix(a: int) -> int:
        shared = max(
            (bits - (a ^ b).bit_length() for b in points if b != a), default=-1
        )
        return shared + 1

    depths = {a: unique_prefix(a) for a in points}
    shallowest = min(depths.values())
    if shallowest >= bits:
        return None
    owner = random.choice([a for a, d in depths.items() if d == shallowest])
    split = 1 << (bits - shallowest - 1)  # the first bit after the prefix
    prefix = owner & ~((split << 1) - 1) & ((1 << bits) - 1)
    low = int.from_bytes(os.urandom(KEY_BYTES), "big") & (split - 1)
    return (prefix | ((owner & split) ^ split) | low).to_bytes(KEY_BYTES, "big")


def _why(exc: OSError) -> str:
    """An OSError's reason without errno numbers or repeated paths."""
    return exc.strerror or str(exc) or type(exc).__name__

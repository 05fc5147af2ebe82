"""Tunables shared by peers and clients, with what each one means."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MIB", "Settings"]

MIB = 1024 * 1024
MAX_SHARD_SIZE = 256 * MIB  # what a peer's store accepts (store.DEFAULT_MAX_SHARD)


@dataclass(frozen=True)
class Settings:
    """Every knob of p2pshard in one place; the defaults suit a LAN cluster.

    replicas: k, the number of peers (the k closest to a shard's key) that hold
        each shard.
    write_quorum: replicas that must acknowledge each shard before a synchronous
        publish returns; ``None`` means all ``replicas``.
    shard_size: largest shard a publish cuts, in bytes. Large enough that the
        per-request cost vanishes, small enough to spread and retry cheaply.
    dht_ksize: kademlia bucket size and lookup width (k of the paper).
    dht_alpha: parallel queries per lookup round.
    record_replicas: peers (closest to the name's key) that store a name record.
    rpc_timeout: seconds to wait for one DHT datagram answer.
    connect_timeout: seconds to open an HTTP connection to a peer.
    read_timeout: seconds allowed between two bytes of an HTTP body; a peer that
        stalls longer is abandoned and the shard retried elsewhere.
    min_rate: bytes per second a shard body must average over every
        ``read_timeout`` window; a peer that trickles slower is abandoned.
    request_timeout: seconds for a whole shard request, as a last resort.
    fetch_concurrency: shard requests a load keeps in flight at once, at least:
        a load raises it to two per serving peer, up to 32
        (p2pshard.schedule).
    load_deadline: seconds a whole load may take; when it passes, the load
        fails with every shard still missing and the peers tried. ``None``: no
        deadline. With a deadline, a shard whose holders all failed is retried
        (holders looked up again) until the deadline.
    relookup_rounds: without a deadline, how many times the holders of a shard
        are looked up again after every known holder failed, before the load
        fails.
    per_peer_connections: keep-alive connections a client opens to one peer.
    max_manifest_size: largest manifest accepted from the network.
    repair_interval: seconds between a peer's repair passes (jittered by 20%).
    liveness_interval: seconds between pings of a peer's nearest neighbours
        (jittered), so a crashed one is noticed and repaired without waiting for
        the periodic pass; 0 turns it off.
    repair_delay: seconds a peer waits after a membership change (or its start)
        before a pass, so a burst of changes costs one pass.
    repair_rate: bytes per second a peer may push or pull for repair; loads are
        never rate-limited.
    scrub_rate: bytes per second a peer re-hashes its shards in the background;
        0 turns scrubbing off.
    handoff_timeout: seconds a stopping peer spends handing its shards to the
        peers that will own them next.
    balance: how far (0.03 = 3%) above its expected share of a model's bytes a
        peer may end up owning before a publish splits a shard to place its
        bytes again (see p2pshard.balance); ``None`` cuts shards by the tensor
        layout alone.
    """

    replicas: int = 3
    write_quorum: int | None = None
    shard_size: int = 16 * MIB
    dht_ksize: int = 20
    dht_alpha: int = 3
    record_replicas: int = 8
    rpc_timeout: float = 2.0
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    min_rate: float = 128 * 1024
    request_timeout: float = 120.0
    fetch_concurrency: int = 8
    load_deadline: float | None = None
    relookup_rounds: int = 2
    per_peer_connections: int = 4
    max_manifest_size: int = 64 * MIB
    repair_interval: float = 60.0
    repair_delay: float = 1.0
    liveness_interval: float = 5.0
    repair_rate: float = 200 * MIB
    scrub_rate: float = 0.0
    handoff_timeout: float = 30.0
    balance: float | None = 0.03

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        quorum = self.quorum
        if not 1 <= quorum <= self.replicas:
            raise ValueError(
                f"write quorum must be between 1 and replicas ({self.replicas}), "
                f"not {quorum}"
            )
        if not 1 <= self.shard_size <= MAX_SHARD_SIZE:
            raise ValueError(f"shard_size must be 1..{MAX_SHARD_SIZE} bytes")
        if self.liveness_interval < 0:
            raise ValueError("liveness_interval must be at least 0")
        if self.balance is not None and self.balance < 0:
            raise ValueError("balance must be None or at least 0")

    @property
    def quorum(self) -> int:
        return self.replicas if self.write_quorum is None else self.write_quorum

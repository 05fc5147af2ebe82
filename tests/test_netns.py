"""Peers on separate hosts: network namespaces on a bridge (scripts/netns.py).

Every peer runs in a namespace of its own with its own address and the same
port; clients publish and load from namespaces of their own. Skipped where
root or ``ip netns`` is missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pshard.formats.safetensors import write_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from netns import Host, NetnsLab, available, measure_mbit, tc_available

AVAILABLE, WHY = available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no netns lab: {WHY}")

PORT = 7000
PEERS = 5
READY_DEADLINE = 30.0
COMMAND_DEADLINE = 60.0
STATUS_DEADLINE = 30.0


@dataclass
class LabPeer:
    host: Host
    proc: subprocess.Popen[bytes]
    data: Path

    @property
    def address(self) -> str:
        return f"{self.host.address}:{PORT}"


@dataclass
class LabSwarm:
    lab: NetnsLab
    peers: list[LabPeer]
    publisher: Host
    loader: Host
    model: Path
    published: dict[str, Any]
    root: Path


def _wait_ready(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """The peer's JSON ready line, read before ``deadline``."""
    assert proc.stdout is not None
    fd, buffer = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "peer not ready in time"
            if not selector.select(min(left, 1.0)):
                continue
            chunk = os.read(fd, 4096)
            assert chunk, f"peer exited with {proc.wait(timeout=5)} before ready"
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("event") == "ready":
                        return event


def _cli(lab: NetnsLab, host: Host, *args: str) -> dict[str, Any]:
    argv = [sys.executable, "-m", "p2pshard", *args, "--json"]
    result = lab.run(host, argv, timeout=COMMAND_DEADLINE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _start_peer(lab: NetnsLab, host: Host, root: Path, bootstrap: list[str]) -> LabPeer:
    data = root / host.name
    argv = [
        sys.executable, "-m", "p2pshard", "peer", "--host", host.address,
        "--port", str(PORT), "--data", str(data), "--json",
    ]  # fmt: skip
    for address in bootstrap:
        argv += ["--bootstrap", address]
    log = open(root / f"{host.name}.log", "ab")
    try:
        proc = lab.popen(host, argv, stdout=subprocess.PIPE, stderr=log)
    finally:
        log.close()
    return LabPeer(host, proc, data)


def _make_model(path: Path) -> Path:
    rng = np.random.default_rng(7)
    arrays = {
        f"layer.{i}.weight": rng.standard_normal((256, 1024), dtype=np.float32)
        for i in range(4)
    }
    arrays["bias"] = rng.standard_normal(1000).astype(np.float32)
    write_file(path, arrays)
    return path


def _wait_peers(lab: NetnsLab, host: Host, bootstrap: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + STATUS_DEADLINE
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = _cli(lab, host, "status", "--bootstrap", bootstrap)
        if state["peers"] == n:
            break
    return state


@pytest.fixture(scope="module")
def lab_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabSwarm]:
    root = tmp_path_factory.mktemp("netns")
    with NetnsLab() as lab:
        hosts = [lab.add_host(f"peer{i}") for i in range(PEERS)]
        publisher, loader = lab.add_host("pub"), lab.add_host("load")
        deadline = time.monotonic() + READY_DEADLINE
        first = _start_peer(lab, hosts[0], root, [])
        ready = [_wait_ready(first.proc, deadline)]
        rest = [_start_peer(lab, h, root, [first.address]) for h in hosts[1:]]
        ready += [_wait_ready(p.proc, deadline) for p in rest]
        peers = [first, *rest]
        assert [r["address"] for r in ready] == [p.address for p in peers]

        state = _wait_peers(lab, publisher, first.address, PEERS)
        assert state["peers"] == PEERS, state
        model = _make_model(root / "model.safetensors")
        published = _cli(
            lab, publisher, "publish", str(model), "--name", "lab/model",
            "--bootstrap", peers[1].address, "--shard-size", "1",
        )  # fmt: skip
        yield LabSwarm(lab, peers, publisher, loader, model, published, root)
        # Graceful leaves are chaos.py's business: end the peers at once.
        for peer in peers:
            lab.kill(peer.proc)


def _load(swarm: LabSwarm, out: Path, bootstrap: list[str]) -> dict[str, Any]:
    args = ["load", "lab/model", "--out", str(out)]
    for address in bootstrap:
        args += ["--bootstrap", address]
    return _cli(swarm.lab, swarm.loader, *args)


def _holders(swarm: LabSwarm) -> dict[str, int]:
    """Shard files on disk per peer host."""
    return {
        p.host.name: sum(1 for f in (p.data / "shards").rglob("*") if f.is_file())
        for p in swarm.peers
    }


def test_every_peer_has_its_own_address(lab_swarm: LabSwarm) -> None:
    addresses = {p.host.address for p in lab_swarm.peers}
    assert len(addresses) == PEERS
    assert all(not a.startswith("127.") for a in addresses)
    state = _cli(
        lab_swarm.lab, lab_swarm.loader, "status", "--bootstrap",
        lab_swarm.peers[2].address,
    )  # fmt: skip
    seen = {f"{row['host']}:{row['port']}" for row in state["peer_list"]}
    assert seen == {p.address for p in lab_swarm.peers}


def test_publish_in_one_namespace_load_in_another(
    lab_swarm: LabSwarm, tmp_path: Path
) -> None:
    published = lab_swarm.published
    assert published["shards"] > 3
    holders = _holders(lab_swarm)
    assert sum(1 for n in holders.values() if n) >= 3, holders
    out = tmp_path / "loaded.safetensors"
    stats = _load(lab_swarm, out, [lab_swarm.peers[3].address])
    assert out.read_bytes() == lab_swarm.model.read_bytes()
    assert stats["bytes"] == published["bytes"]


@pytest.mark.skipif(not tc_available()[0], reason="`tc` (iproute2) is missing")
def test_capped_loader_is_held_to_its_rate(lab_swarm: LabSwarm, tmp_path: Path) -> None:
    mbit = 20.0
    lab_swarm.lab.set_rate(lab_swarm.loader, ingress_mbit=mbit)
    try:
        out = tmp_path / "capped.safetensors"
        stats = _load(lab_swarm, out, [lab_swarm.peers[4].address])
    finally:
        lab_swarm.lab.set_rate(lab_swarm.loader)
    assert out.read_bytes() == lab_swarm.model.read_bytes()
    floor = stats["bytes"] * 8 / (mbit * 1e6)
    assert stats["seconds"] >= 0.9 * floor, (stats, floor)


def test_load_survives_a_sigkilled_peer(lab_swarm: LabSwarm, tmp_path: Path) -> None:
    holders = _holders(lab_swarm)
    # The busiest holder that is not the first bootstrap goes down hard.
    victim = max(lab_swarm.peers[1:], key=lambda p: holders[p.host.name])
    assert holders[victim.host.name] > 0
    lab_swarm.lab.kill(victim.proc)
    assert victim.proc.returncode == -9
    live = [p.address for p in lab_swarm.peers if p is not victim]
    out = tmp_path / "after-kill.safetensors"
    _load(lab_swarm, out, live[:2])
    assert out.read_bytes() == lab_swarm.model.read_bytes()


@pytest.mark.skipif(not tc_available()[0], reason="`tc` (iproute2) is missing")
def test_tbf_cap_caps_egress() -> None:
    with NetnsLab() as lab:
        lab.add_host("src", egress_mbit=50)
        lab.add_host("dst")
        seen = measure_mbit(lab, "src", "dst", seconds=1.5)
    # TCP payload is about 96% of the bytes on the wire that tbf counts.
    assert 0.85 * 50 <= seen["mbit_per_s"] <= 1.01 * 50, seen


def test_close_kills_processes_and_removes_namespaces() -> None:
    lab = NetnsLab()
    with lab:
        host = lab.add_host("h")
        names = [lab.switch, host.netns]
        proc = lab.popen(host, [sys.executable, "-c", "import time; time.sleep(60)"])
        assert proc.poll() is None
        assert lab.subnet is not None
        assert ipaddress.ip_address(host.address) in lab.subnet
    assert proc.poll() is not None
    listed = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10
    ).stdout
    assert not [n for n in names if n in listed]

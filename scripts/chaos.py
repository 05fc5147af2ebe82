#!/usr/bin/env python3
"""Fault injection: a local swarm under churn, crashes and disk corruption.

    python scripts/chaos.py                      # defaults: 12 peers, 8 rounds
    python scripts/chaos.py --rounds 3 --seed 7 --model-mib 8

Starts a swarm of peers on 127.0.0.1 (one process each, short repair
intervals, scrubbing on), publishes a generated model synchronously (k=3),
then for a bounded number of rounds starts a load and, while it runs,
injects faults drawn at random (seeded):

- ``kill``: SIGKILL a peer;
- ``restart``: start a killed peer again on its data directory and port;
- ``add``: start a new peer;
- ``remove``: SIGTERM a peer, which hands off its shards before it exits;
- ``corrupt``: flip one byte of one shard file on a peer's disk.

The faults stay inside what k=3 promises to survive: at most 2 peers are down
at once, and no fault may leave an acknowledged shard without a good copy
(a hash-verified file) on a live peer, so at most k-1 copies of any shard are
lost at a time. A fault that would break this is skipped and counted.

Every load is compared byte for byte with the source. After the last round
the script waits for repair to settle (``p2pshard status`` reports no shard
short of k owners and every shard has k good files on its k owners), loads
the model once more, and prints one JSON line::

    {"rounds": 8, "faults": {"add": 2, "corrupt": 4, "kill": 6, ...},
     "loads_attempted": 9, "loads_identical": 9, "shards_acknowledged": 32,
     "shards_lost": 0, "under_replicated": 0, "under_replicated_on_disk": 0,
     "settle_seconds": 3.04, "leave_short": 0, "ok": true, ...}

``--final-kill`` (default 2) peers are left SIGKILLed before settling, so
``settle_seconds`` is the time repair takes to bring every shard back to k
good copies on its k live owners. ``leave_short`` counts shards that a
graceful leaver held and that fell below k good copies when it left (what
its hand-off missed).

Exit status: 0 when every load was identical, no shard was lost and nothing
is under-replicated after settling; 1 otherwise; 2 when the harness itself
failed (a peer would not start, the publish failed).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from p2pshard.formats.safetensors import write_file
from p2pshard.hashing import Hasher, shard_key
from p2pshard.manifest import Manifest

__all__ = ["ChaosError", "ChaosSwarm", "main"]

MODEL_NAME = "chaos/model"
K = 3
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LEAVE_TIMEOUT = 60.0
KILL_TIMEOUT = 5.0
COMMAND_TIMEOUT = 120.0
STATUS_TIMEOUT = 60.0
POLL = 0.2
MAX_DOWN = K - 1
FAULT_WEIGHTS = {"kill": 3, "restart": 3, "corrupt": 3, "add": 1.5, "remove": 1.5}
EXIT_OK, EXIT_FAILED, EXIT_HARNESS = 0, 1, 2
PR_SET_PDEATHSIG = 1


class ChaosError(RuntimeError):
    """The harness could not do its part (a peer, a publish, a status)."""


def log(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


# --- the swarm ----------------------------------------------------------------


@dataclass
class ChaosPeer:
    """One peer process; ``state`` is "up", "down" (killed) or "gone" (removed)."""

    index: int
    data: Path
    port: int = 0
    node_id: str = ""
    proc: subprocess.Popen[bytes] | None = None
    state: str = "up"
    out_offset: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def out_path(self) -> Path:
        return self.data.with_suffix(".out")

    @property
    def err_path(self) -> Path:
        return self.data.with_suffix(".log")


def _die_with_parent() -> None:
    """In the child: be killed if the launcher dies (a safety net on Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ChaosSwarm:
    """Peers on 127.0.0.1 that can be killed, restarted, added and removed."""

    def __init__(self, root: Path, peer_args: list[str]) -> None:
        self.root = root
        self.peer_args = peer_args
        self.peers: list[ChaosPeer] = []

    # --- views ------------------------------------------------------------

    def live(self) -> list[ChaosPeer]:
        return [p for p in self.peers if p.state == "up"]

    def down(self) -> list[ChaosPeer]:
        return [p for p in self.peers if p.state == "down"]

    def bootstraps(self, rng: random.Random, n: int = 3) -> list[str]:
        live = self.live()
        return [p.address for p in rng.sample(live, min(n, len(live)))]

    # --- lifecycle --------------------------------------------------------

    def start(self, count: int) -> None:
        """Peer 0 first, then the others all at once, bootstrapping from it."""
        first = self.add([])
        self.wait_ready([first])
        others = [
            self._spawn(self._new_peer(), [first.address]) for _ in range(1, count)
        ]
        self.wait_ready(others)

    def add(self, bootstrap: list[str]) -> ChaosPeer:
        return self._spawn(self._new_peer(), bootstrap)

    def _new_peer(self) -> ChaosPeer:
        peer = ChaosPeer(len(self.peers), self.root / f"peer-{len(self.peers)}")
        self.peers.append(peer)
        return peer

    def _spawn(self, peer: ChaosPeer, bootstrap: list[str]) -> ChaosPeer:
        cmd = [
            sys.executable, "-m", "p2pshard", "peer", "--host", "127.0.0.1",
            "--port", str(peer.port), "--data", str(peer.data), "--json",
            "--replicas", str(K), *self.peer_args,
        ]  # fmt: skip
        for address in bootstrap:
            cmd += ["--bootstrap", address]
        peer.data.mkdir(parents=True, exist_ok=True)
        peer.out_offset = peer.out_path.stat().st_size if peer.out_path.exists() else 0
        with open(peer.out_path, "ab") as out, open(peer.err_path, "ab") as err:
            peer.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        peer.state = "up"
        return peer

    def wait_ready(
        self, peers: list[ChaosPeer], timeout: float = READY_TIMEOUT
    ) -> None:
        """Read each peer's ready line (its port and id) before a deadline."""
        deadline = time.monotonic() + timeout
        waiting = list(peers)
        while waiting:
            for peer in list(waiting):
                ready = _ready_line(peer.out_path, peer.out_offset)
                if ready is not None:
                    peer.port = int(str(ready["address"]).rsplit(":", 1)[1])
                    peer.node_id = str(ready["id"])
                    waiting.remove(peer)
                elif peer.proc is not None and peer.proc.poll() is not None:
                    raise ChaosError(
                        f"peer {peer.index} exited with {peer.proc.returncode} "
                        f"before ready: {_tail(peer.err_path)}"
                    )
            if waiting and time.monotonic() > deadline:
                raise ChaosError(f"peers {[p.index for p in waiting]} not ready")
            if waiting:
                time.sleep(POLL)

    def kill(self, peer: ChaosPeer) -> None:
        assert peer.proc is not None
        with contextlib.suppress(ProcessLookupError):
            peer.proc.kill()
        peer.proc.wait(timeout=KILL_TIMEOUT)
        peer.state = "down"

    def restart(self, peer: ChaosPeer, bootstrap: list[str]) -> None:
        """Start a killed peer again, on its own data and port."""
        self._spawn(peer, bootstrap)
        try:
            self.wait_ready([peer])
        except ChaosError:
            self.kill(peer)
            raise

    def remove(self, peer: ChaosPeer, timeout: float = LEAVE_TIMEOUT) -> float | None:
        """SIGTERM a peer and wait for it to hand off and exit: the seconds it
        took, or None if it overran ``timeout`` (then it is SIGKILLed)."""
        assert peer.proc is not None
        started = time.monotonic()
        peer.state = "gone"
        peer.proc.send_signal(signal.SIGTERM)
        try:
            code = peer.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            peer.proc.kill()
            peer.proc.wait(timeout=KILL_TIMEOUT)
            return None
        if code != 0:
            log(f"peer {peer.index} left with status {code}")
        return time.monotonic() - started

    def close(self) -> None:
        """SIGTERM every peer still running, then SIGKILL the stragglers."""
        running = [p.proc for p in self.peers if p.proc and p.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        for proc in running:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_TIMEOUT)


def _ready_line(path: Path, offset: int) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(65536)
    except OSError:
        return None
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict) and event.get("event") == "ready":
                return event
    return None


def _tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# --- the model and its copies ------------------------------------------------


def make_model(folder: Path, mib: float, seed: int) -> Path:
    """A model directory: one safetensors file of mixed tensors, and a config."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    total, i = int(mib * 1024 * 1024), 0
    while total > 0:
        # Big tensors (cut across shards) with small ones (packed) among them.
        rows = 512 if i % 3 else 3
        n = min(rows * 1024, max(total // 4, 1))
        arrays[f"layers.{i}.weight"] = rng.standard_normal(n).astype(np.float32)
        total -= n * 4
        i += 1
    write_file(folder / "model.safetensors", arrays, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"layers": i, "seed": seed}))
    return folder


def shard_path(data: Path, shard_id: str, size: int) -> Path:
    return data / "shards" / shard_id[:2] / f"{shard_id}.{size}"


def is_good(path: Path, shard_id: str, size: int) -> bool:
    """True if ``path`` holds exactly the shard's bytes."""
    hasher = Hasher()
    try:
        with open(path, "rb") as f:
            read = 0
            while block := f.read(1 << 20):
                hasher.update(block)
                read += len(block)
    except OSError:
        return False
    return read == size and hasher.hexdigest() == shard_id


def good_copies(
    peers: Iterable[ChaosPeer], shards: dict[str, int]
) -> dict[str, set[int]]:
    """For each shard, the peers (by index) whose disk holds a good copy."""
    found: dict[str, set[int]] = {s: set() for s in shards}
    for peer in peers:
        for shard_id, size in shards.items():
            if is_good(shard_path(peer.data, shard_id, size), shard_id, size):
                found[shard_id].add(peer.index)
    return found


def owners(live: list[ChaosPeer], shard_id: str, k: int = K) -> list[ChaosPeer]:
    """The k live peers closest to the shard's key (XOR metric)."""
    key = int.from_bytes(shard_key(shard_id), "big")
    return sorted(live, key=lambda p: int(p.node_id, 16) ^ key)[:k]


def read_manifest(peers: list[ChaosPeer], manifest_id: str) -> tuple[Manifest, int]:
    """The published manifest, read from any peer's disk, and its size."""
    for peer in peers:
        for path in (peer.data / "shards" / manifest_id[:2]).glob(f"{manifest_id}.*"):
            size = int(path.name.rsplit(".", 1)[1])
            if is_good(path, manifest_id, size):
                return Manifest.decode(path.read_bytes()), size
    raise ChaosError(f"manifest {manifest_id} is on no peer's disk")


def same_tree(a: Path, b: Path) -> bool:
    """True if two folders hold the same files with the same bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


# --- the CLI -------------------------------------------------------------------


def cli(args: list[str], timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
    """``python -m p2pshard ARGS --json``; its JSON answer or ChaosError."""
    cmd = [sys.executable, "-m", "p2pshard", *args, "--json"]
    try:
        result = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ChaosError(f"`p2pshard {args[0]}` took over {timeout:g} s") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no message)"]
        raise ChaosError(f"`p2pshard {args[0]}` failed: {lines[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def peer_flags() -> set[str]:
    """The options ``p2pshard peer`` knows (repair and scrub flags may not exist)."""
    result = subprocess.run(
        [sys.executable, "-m", "p2pshard", "peer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return {w.strip(",") for w in result.stdout.split() if w.startswith("--")}


def bootstrap_args(addresses: list[str]) -> list[str]:
    return [a for address in addresses for a in ("--bootstrap", address)]


class BackgroundLoad:
    """``p2pshard load`` running as a child while faults are injected."""

    def __init__(self, out: Path, bootstrap: list[str], log_path: Path) -> None:
        self.out = out
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "p2pshard", "load", MODEL_NAME, "--out", str(out),
            *bootstrap_args(bootstrap), "--json",
        ]  # fmt: skip
        with open(log_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self.started = time.monotonic()

    def wait(self, timeout: float = COMMAND_TIMEOUT) -> tuple[bool, str]:
        """(loaded, reason); the child is killed if it overruns."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=KILL_TIMEOUT)
            return False, f"load took over {timeout:g} s"
        if self.proc.returncode != 0:
            return False, _tail(self.log_path, 1)
        return True, out.decode(errors="replace").strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=KILL_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- the run ---------------------------------------------------------------------


@dataclass
class Report:
    rounds: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    faults_skipped: int = 0
    loads_attempted: int = 0
    loads_identical: int = 0
    load_failures: list[str] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    leave_seconds: list[float] = field(default_factory=list)
    leave_timeouts: int = 0
    leave_short: int = 0
    shards_acknowledged: int = 0
    shards_lost: int = 0
    under_replicated: int | None = None
    under_replicated_on_disk: int | None = None
    settle_seconds: float | None = None
    settled: bool = False
    final_load_identical: bool = False

    def to_json(self, extra: dict[str, Any]) -> dict[str, Any]:
        out = {
            "rounds": self.rounds,
            "faults": dict(sorted(self.faults.items())),
            "faults_skipped": self.faults_skipped,
            "loads_attempted": self.loads_attempted,
            "loads_identical": self.loads_identical,
            "load_failures": self.load_failures[:5],
            "load_seconds_max": round(max(self.load_seconds, default=0.0), 2),
            "leave_seconds_max": round(max(self.leave_seconds, default=0.0), 2),
            "leave_timeouts": self.leave_timeouts,
            "leave_short": self.leave_short,
            "shards_acknowledged": self.shards_acknowledged,
            "shards_lost": self.shards_lost,
            "under_replicated": self.under_replicated,
            "under_replicated_on_disk": self.under_replicated_on_disk,
            "settle_seconds": self.settle_seconds,
            "settled": self.settled,
            "final_load_identical": self.final_load_identical,
        }
        out.update(extra)
        return out

    @property
    def ok(self) -> bool:
        return (
            self.loads_identical == self.loads_attempted
            and self.shards_lost == 0
            and self.under_replicated == 0
            and self.under_replicated_on_disk == 0
            and self.leave_timeouts == 0
        )


class Chaos:
    """Publishes, injects faults round by round, then checks what survived."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rng = random.Random(args.seed)
        flags = peer_flags()
        peer_args: list[str] = []
        self.repair_flags = "--repair-interval" in flags
        self.scrub_flag = "--scrub-rate" in flags
        if self.repair_flags:
            peer_args += ["--repair-interval", str(args.repair_interval)]
        if self.scrub_flag:
            peer_args += ["--scrub-rate", str(args.scrub_rate)]
        self.swarm = ChaosSwarm(root / "peers", peer_args)
        self.report = Report()
        self.source = root / "model"
        self.shards: dict[str, int] = {}
        self.schedule: list[str] = list(args.schedule)
        self._loads = 0

    # --- phases -----------------------------------------------------------

    def run(self) -> None:
        make_model(self.source, self.args.model_mib, self.args.seed)
        log(f"starting {self.args.peers} peers")
        self.swarm.start(self.args.peers)
        self.publish()
        for number in range(1, self.args.rounds + 1):
            self.round(number)
            self.report.rounds = number
        self.final_kills()
        self.settle()
        self.final_check()

    def publish(self) -> None:
        bootstrap = self.swarm.bootstraps(self.rng)
        self.wait_peers(len(self.swarm.live()))
        result = cli(
            [
                "publish", str(self.source), "--name", MODEL_NAME,
                "--shard-size", str(self.args.shard_mib), "--replicas", str(K),
                *bootstrap_args(bootstrap),
            ]
        )  # fmt: skip
        manifest, size = read_manifest(self.swarm.live(), result["manifest"])
        self.shards = dict(manifest.shards())
        self.shards[result["manifest"]] = size
        self.report.shards_acknowledged = len(self.shards)
        log(
            f"published {result['bytes']} bytes in {result['shards']} shards "
            f"(+ manifest) in {result['seconds']} s"
        )

    def round(self, number: int) -> None:
        load = self.start_load()
        try:
            for _ in range(self.args.faults_per_round):
                self.inject()
        finally:
            self.finish_load(load, f"round {number}")

    def final_kills(self) -> None:
        """Leave ``--final-kill`` peers down, so that settling measures repair."""
        while len(self.swarm.down()) < min(self.args.final_kill, MAX_DOWN):
            if not self.fault_kill():
                break
            self.report.faults["kill"] += 1

    def settle(self) -> None:
        """Wait until status and the disks agree every shard has k copies."""
        started = time.monotonic()
        deadline = started + self.args.settle_timeout
        short: int | None = None
        on_disk: int | None = None
        while True:
            live = self.swarm.live()
            short = None  # a status that fails or misses peers proves nothing
            with contextlib.suppress(ChaosError):
                state = self.status()
                if state["peers"] == len(live):
                    short = int(state["replicas_short"])
            on_disk = self.under_replicated_on_disk()
            if short == 0 and on_disk == 0:
                self.report.settled = True
                break
            if time.monotonic() > deadline:
                break
            time.sleep(POLL * 5)
        self.report.settle_seconds = round(time.monotonic() - started, 2)
        self.report.under_replicated = short
        self.report.under_replicated_on_disk = on_disk
        log(
            f"settled={self.report.settled} after {self.report.settle_seconds} s: "
            f"status short={short}, on disk short={on_disk}"
        )

    def final_check(self) -> None:
        copies = good_copies(self.swarm.live(), self.shards)
        self.report.shards_lost = sum(1 for held in copies.values() if not held)
        self.report.final_load_identical = self.finish_load(self.start_load(), "final")

    # --- loads --------------------------------------------------------------

    def start_load(self) -> BackgroundLoad:
        self._loads += 1
        out = self.root / "loads" / f"load-{self._loads}"
        out.parent.mkdir(exist_ok=True)
        log_path = self.root / "loads" / f"load-{self._loads}.log"
        return BackgroundLoad(out, self.swarm.bootstraps(self.rng), log_path)

    def finish_load(self, load: BackgroundLoad, what: str) -> bool:
        self.report.loads_attempted += 1
        try:
            loaded, reason = load.wait()
        finally:
            load.kill()
        took = time.monotonic() - load.started
        identical = loaded and same_tree(self.source, load.out)
        if identical:
            self.report.loads_identical += 1
            self.report.load_seconds.append(took)
        else:
            why = reason if not loaded else "bytes differ"
            self.report.load_failures.append(f"{what}: {why}")
        log(f"{what}: load {'identical' if identical else 'FAILED'} in {took:.1f} s")
        shutil.rmtree(load.out, ignore_errors=True)
        return identical

    # --- faults -------------------------------------------------------------

    def inject(self) -> None:
        if self.schedule:
            kind = self.schedule.pop(0)
            fault: Callable[[], bool] = getattr(self, f"fault_{kind}")
            if fault():
                self.report.faults[kind] += 1
                return
            log(f"scheduled {kind} does not fit now; drawing another fault")
        kinds = list(FAULT_WEIGHTS)
        weights = [FAULT_WEIGHTS[k] for k in kinds]
        tried: set[str] = set()
        while len(tried) < len(kinds):
            kind = self.rng.choices(kinds, weights)[0]
            if kind in tried:
                continue
            tried.add(kind)
            fault = getattr(self, f"fault_{kind}")
            if fault():
                self.report.faults[kind] += 1
                return
        self.report.faults_skipped += 1
        log("no fault fits the k-1 budget now; skipped")

    def live_copies(self) -> dict[str, set[int]]:
        """For each shard, the live peers with a good copy on disk."""
        return good_copies(self.swarm.live(), self.shards)

    @staticmethod
    def survives(
        copies: dict[str, set[int]], lost: int, shard: str | None = None
    ) -> bool:
        """True if every shard (or ``shard``) keeps a good copy on a live peer
        when peer ``lost`` goes away (or its copy goes bad)."""
        shards = copies if shard is None else {shard: copies[shard]}
        return all(held - {lost} for held in shards.values())

    def fault_kill(self) -> bool:
        if len(self.swarm.down()) >= MAX_DOWN:
            return False
        candidates = self.swarm.live()
        self.rng.shuffle(candidates)
        copies = self.live_copies()
        for peer in candidates:
            if self.survives(copies, peer.index):
                self.swarm.kill(peer)
                log(f"SIGKILL peer {peer.index} ({peer.address})")
                return True
        return False

    def fault_restart(self) -> bool:
        down = self.swarm.down()
        if not down:
            return False
        peer = self.rng.choice(down)
        try:
            self.swarm.restart(peer, self.swarm.bootstraps(self.rng, 2))
        except ChaosError as exc:
            log(f"restart of peer {peer.index} failed: {exc}")
            return False
        log(f"restarted peer {peer.index} on {peer.address}")
        return True

    def fault_add(self) -> bool:
        if len(self.swarm.live()) >= self.args.peers + self.args.max_extra:
            return False
        peer = self.swarm.add(self.swarm.bootstraps(self.rng, 2))
        self.swarm.wait_ready([peer])
        log(f"added peer {peer.index} on {peer.address}")
        return True

    def fault_remove(self) -> bool:
        standing = [p for p in self.swarm.peers if p.state != "gone"]
        if len(standing) <= self.args.peers or len(self.swarm.down()) >= MAX_DOWN:
            return False
        copies = self.live_copies()
        candidates = self.swarm.live()
        self.rng.shuffle(candidates)
        # A leaver that holds something is the interesting one.
        candidates.sort(key=lambda p: not any(p.index in h for h in copies.values()))
        for peer in candidates:
            if self.survives(copies, peer.index):
                self.leave(peer, copies)
                return True
        return False

    def leave(self, peer: ChaosPeer, before: dict[str, set[int]]) -> None:
        """SIGTERM ``peer``; then count the shards it held that fell below k
        good live copies although they had k before (what hand-off missed)."""
        took = self.swarm.remove(peer)
        if took is None:
            self.report.leave_timeouts += 1
            log(f"SIGTERM peer {peer.index}: still up after {LEAVE_TIMEOUT:g} s")
            return
        self.report.leave_seconds.append(took)
        held = {s: h for s, h in before.items() if peer.index in h and len(h) >= K}
        after = good_copies(self.swarm.live(), {s: self.shards[s] for s in held})
        short = sum(1 for copies in after.values() if len(copies) < K)
        self.report.leave_short += short
        log(
            f"SIGTERM peer {peer.index}: left in {took:.1f} s; of the {len(held)} "
            f"shards it held, {short} are now short of {K} good copies"
        )

    def fault_corrupt(self) -> bool:
        files = [
            (peer, path)
            for peer in self.swarm.peers
            if peer.state != "gone"
            for path in sorted((peer.data / "shards").glob("*/*"))
            if path.is_file()
        ]
        self.rng.shuffle(files)
        copies = self.live_copies()
        for peer, path in files:
            shard_id = path.name.partition(".")[0]
            if shard_id not in copies or not self.survives(
                copies, peer.index, shard_id
            ):
                continue
            if not flip_byte(path, self.rng):
                continue
            log(f"flipped a byte of {shard_id[:12]} on peer {peer.index}")
            return True
        return False

    # --- checks -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        args = ["status", "--replicas", str(K)]
        return cli(
            args + bootstrap_args(self.swarm.bootstraps(self.rng)), STATUS_TIMEOUT
        )

    def wait_peers(self, expected: int) -> None:
        deadline = time.monotonic() + STATUS_TIMEOUT
        while time.monotonic() < deadline:
            if self.status()["peers"] >= expected:
                return
            time.sleep(POLL)
        raise ChaosError(f"status never saw {expected} peers")

    def under_replicated_on_disk(self) -> int:
        live = self.swarm.live()
        copies = good_copies(live, self.shards)
        return sum(
            1
            for shard_id, held in copies.items()
            if sum(1 for p in owners(live, shard_id) if p.index in held)
            < min(K, len(live))
        )


def flip_byte(path: Path, rng: random.Random) -> bool:
    """Invert one byte of a file in place, as bit rot would; False if it can't."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        offset = rng.randrange(size)
        fd = os.open(path, os.O_RDWR)
        try:
            byte = os.pread(fd, 1, offset)
            os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


# --- the command ---------------------------------------------------------------


def _kinds(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    unknown = [k for k in kinds if k not in FAULT_WEIGHTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown fault kinds {unknown}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--peers", type=int, default=12, help="peers at start (>= 4)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of faults")
    p.add_argument("--faults-per-round", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--schedule",
        type=_kinds,
        default=[],
        metavar="KIND,...",
        help="first faults in this order (then random): " + ",".join(FAULT_WEIGHTS),
    )
    p.add_argument("--model-mib", type=float, default=24.0, help="model size")
    p.add_argument("--shard-mib", type=int, default=1, help="largest shard, MiB")
    p.add_argument("--max-extra", type=int, default=4, help="peers added at most")
    p.add_argument(
        "--repair-interval", type=float, default=2.0, help="peers' repair interval"
    )
    p.add_argument(
        "--scrub-rate",
        type=int,
        default=8 * 1024 * 1024,
        metavar="BYTES_PER_S",
        help="peers' scrub rate",
    )
    p.add_argument(
        "--final-kill",
        type=int,
        default=2,
        metavar="N",
        help="peers left SIGKILLed before settling (at most k-1)",
    )
    p.add_argument("--settle-timeout", type=float, default=120.0, metavar="S")
    p.add_argument("--workdir", type=Path, help="where peers keep data (temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.peers < 4 or args.rounds < 0 or args.faults_per_round < 0:
        parser.error("need --peers >= 4, --rounds >= 0, --faults-per-round >= 0")
    if args.model_mib <= 0 or args.shard_mib < 1:
        parser.error("need --model-mib > 0 and --shard-mib >= 1")
    root = Path(tempfile.mkdtemp(prefix="p2pshard-chaos-", dir=args.workdir))

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    chaos: Chaos | None = None
    error = None
    try:
        chaos = Chaos(args, root)
        chaos.run()
    except ChaosError as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        if chaos is not None:
            chaos.swarm.close()
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            log(f"work dir kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report = chaos.report if chaos is not None else Report()
    ok = error is None and report.ok
    extra = {
        "ok": ok,
        "error": error,
        "seed": args.seed,
        "peers_start": args.peers,
        "peers_live_end": len(chaos.swarm.live()) if chaos else 0,
        "repair_flags": bool(chaos and chaos.repair_flags),
        "scrub_flag": bool(chaos and chaos.scrub_flag),
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(report.to_json(extra)), flush=True)
    if error is not None:
        return EXIT_HARNESS
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

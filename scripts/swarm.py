#!/usr/bin/env python3
"""Run a swarm of local p2pshard peers, one process each, until told to stop.

    python scripts/swarm.py --peers 5 --base-port 0 --data demo-data

Peers start one after another; peer 0 is the bootstrap of the others (peer 1
too, once it is up). When every peer is ready the first line of stdout is the
bootstrap address ``HOST:PORT``, and stderr has one line per peer::

    peer 0 pid=4242 address=127.0.0.1:41234 data=demo-data/peer-0

SIGINT or SIGTERM stops every peer (SIGTERM, then SIGKILL after 10 s) and exits
0. The children run in their own sessions, so a Ctrl-C at the terminal reaches
only this launcher, which then stops them in order.

From Python (scripts/ is not a package: put this folder on ``sys.path``)::

    from swarm import LocalSwarm

    with LocalSwarm(5, data="demo-data") as swarm:
        print(swarm.bootstrap)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

__all__ = ["LocalSwarm", "PeerProcess", "SwarmError", "main"]

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
MAX_READY_BYTES = 64 * 1024
POLL_SECONDS = 1.0


class SwarmError(RuntimeError):
    """A peer did not come up, or the swarm was interrupted while starting."""


def _log_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In a peer before exec: get SIGTERM if the launcher dies, even by SIGKILL,
    so no peer outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class PeerProcess:
    """One peer process of a local swarm."""

    index: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    address: str = ""
    node_id: str = ""
    ready: dict[str, Any] = field(default_factory=dict)
    reported_dead: bool = False
    stdout_closed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


class LocalSwarm:
    """N peers on this machine, each a ``python -m p2pshard peer`` process.

    peers: how many peers to run.
    base_port: peer i listens on ``base_port + i``; 0 lets each pick a free port.
    data: peer i keeps its data in ``data/peer-i``.
    host: interface the peers bind (127.0.0.1 by default; ``::1`` works too).
    replicas: passed to every peer as ``--replicas`` when given.
    ready_timeout: seconds each peer has to print its ready line.
    stderr: where the peers' own stderr goes (a file object); this process's
        stderr when ``None``.
    log: called with one line per event (peer ready, peer died); stderr by
        default.
    """

    def __init__(
        self,
        peers: int,
        data: str | os.PathLike[str],
        base_port: int = 0,
        host: str = "127.0.0.1",
        replicas: int | None = None,
        ready_timeout: float = READY_TIMEOUT,
        stderr: IO[Any] | None = None,
        log: Callable[[str], None] | None = _log_stderr,
        python: str = sys.executable,
    ) -> None:
        if peers < 1:
            raise ValueError("a swarm needs at least one peer")
        if base_port and not 0 < base_port + peers - 1 < 65536:
            raise ValueError(f"ports {base_port}..{base_port + peers - 1} invalid")
        self.count = peers
        self.data = Path(data)
        self.base_port = base_port
        self.host = host
        self.replicas = replicas
        self.ready_timeout = ready_timeout
        self.stderr = stderr
        self.log = log or (lambda line: None)
        self.python = python
        self.peers: list[PeerProcess] = []
        self._cancelled = False

    # --- lifecycle --------------------------------------------------------

    def __enter__(self) -> LocalSwarm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def bootstrap(self) -> str:
        """Peer 0's address, ``HOST:PORT``."""
        if not self.peers or not self.peers[0].address:
            raise SwarmError("the swarm is not started")
        return self.peers[0].address

    @property
    def addresses(self) -> list[str]:
        return [p.address for p in self.peers]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.peers]

    def cancel(self) -> None:
        """Make a ``start()`` in progress give up (safe from a signal handler)."""
        self._cancelled = True

    def start(self) -> None:
        """Start every peer, one after another; stop them all on any failure."""
        if self.peers:
            raise SwarmError("the swarm is already started")
        try:
            for index in range(self.count):
                self._start_peer(index)
        except BaseException:
            self.stop()
            raise

    def _start_peer(self, index: int) -> None:
        if self._cancelled:
            raise SwarmError("interrupted while starting")
        data_dir = self.data / f"peer-{index}"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = self.base_port + index if self.base_port else 0
        cmd = [
            self.python,
            "-m",
            "p2pshard",
            "peer",
            "--host",
            self.host,
            "--port",
            str(port),
            "--data",
            str(data_dir),
            "--json",
        ]
        for address in self.addresses[:2]:
            cmd += ["--bootstrap", address]
        if self.replicas is not None:
            cmd += ["--replicas", str(self.replicas)]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            start_new_session=True,
            preexec_fn=_stop_with_parent,
        )
        peer = PeerProcess(index, data_dir, proc)
        self.peers.append(peer)
        peer.ready = self._wait_ready(peer)
        peer.address = str(peer.ready["address"])
        peer.node_id = str(peer.ready.get("id", ""))
        self.log(f"peer {index} pid={peer.pid} address={peer.address} data={data_dir}")

    def _wait_ready(self, peer: PeerProcess) -> dict[str, Any]:
        """The peer's ready line, read within ``ready_timeout`` seconds."""
        assert peer.proc.stdout is not None
        fd = peer.proc.stdout.fileno()
        deadline = time.monotonic() + self.ready_timeout
        buffer = b""
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if self._cancelled:
                    raise SwarmError("interrupted while starting")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SwarmError(
                        f"peer {peer.index} (pid {peer.pid}) not ready after "
                        f"{self.ready_timeout:g} s"
                    )
                if not selector.select(min(left, POLL_SECONDS)):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = peer.proc.wait(timeout=KILL_TIMEOUT)
                    raise SwarmError(
                        f"peer {peer.index} exited with status {code} before ready"
                    )
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    ready = _ready_event(line)
                    if ready is not None:
                        return ready
                if len(buffer) > MAX_READY_BYTES:
                    raise SwarmError(f"peer {peer.index} printed no ready line")

    def stop(self) -> None:
        """SIGTERM every peer, wait up to 10 s, SIGKILL the rest; idempotent."""
        for peer in self.peers:
            with contextlib.suppress(ProcessLookupError):
                peer.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for peer in self.peers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                peer.proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        for peer in self.peers:
            if peer.alive():
                self.log(f"peer {peer.index} pid={peer.pid} ignored SIGTERM; killing")
                with contextlib.suppress(ProcessLookupError):
                    peer.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    peer.proc.wait(timeout=KILL_TIMEOUT)
        for peer in self.peers:
            if peer.proc.stdout is not None:
                peer.proc.stdout.close()
        self.peers = []

    # --- watching ---------------------------------------------------------

    def newly_dead(self) -> list[PeerProcess]:
        """Peers that exited since the last call (each reported once)."""
        dead = []
        for peer in self.peers:
            if not peer.reported_dead and not peer.alive():
                peer.reported_dead = True
                dead.append(peer)
        return dead

    def all_dead(self) -> bool:
        return all(not p.alive() for p in self.peers)

    def wait_event(self, timeout: float, extra_fds: Sequence[int] = ()) -> None:
        """Return when a peer's stdout closes, an extra fd is readable, or after
        ``timeout`` seconds, whichever is first."""
        with selectors.DefaultSelector() as selector:
            for peer in self.peers:
                stdout = peer.proc.stdout
                if stdout is not None and not peer.stdout_closed:
                    selector.register(stdout.fileno(), selectors.EVENT_READ, peer)
            for fd in extra_fds:
                selector.register(fd, selectors.EVENT_READ)
            if not selector.get_map():
                return
            for key, _ in selector.select(timeout):
                if key.data is None:
                    continue
                # A peer prints nothing after its ready line: drain what comes,
                # and stop watching a stdout that has closed (the peer is ending).
                try:
                    chunk = os.read(key.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    key.data.stdout_closed = True


def _ready_event(line: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if (
        isinstance(event, dict)
        and event.get("event") == "ready"
        and event.get("address")
    ):
        return event
    return None


# --- the command -----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run N local p2pshard peers until SIGINT or SIGTERM."
    )
    parser.add_argument("--peers", type=int, required=True, help="number of peers")
    parser.add_argument(
        "--base-port",
        type=int,
        required=True,
        metavar="P",
        help="peer i on port P+i; 0: each picks a free port",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="peer i keeps its data in DIR/peer-i",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface of the peers (default 127.0.0.1)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        metavar="K",
        help="copies of each shard (passed to every peer)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        metavar="S",
        help="seconds each peer has to come up",
    )
    parser.add_argument(
        "--lifetime",
        type=float,
        metavar="S",
        help="stop by itself after S seconds (default: run until SIGINT or SIGTERM)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.peers < 1:
        print("swarm: error: --peers must be at least 1", file=sys.stderr)
        return 2
    if args.replicas is not None and args.replicas < 1:
        print("swarm: error: --replicas must be at least 1", file=sys.stderr)
        return 2

    swarm = LocalSwarm(
        args.peers,
        args.data,
        args.base_port,
        args.host,
        args.replicas,
        args.ready_timeout,
    )
    stopping: list[str] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.append(signal.Signals(signum).name)
        swarm.cancel()
        with contextlib.suppress(OSError):
            os.write(wake_w, b"\0")

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        try:
            swarm.start()
        except (SwarmError, OSError) as exc:
            if stopping:
                _log_stderr(f"{stopping[0]} received while starting; stopped")
                return 0
            print(f"swarm: error: {exc}", file=sys.stderr, flush=True)
            return 1
        print(swarm.bootstrap, flush=True)
        _log_stderr(f"swarm of {args.peers} peers ready; bootstrap {swarm.bootstrap}")
        deadline = None if args.lifetime is None else time.monotonic() + args.lifetime
        while not stopping:
            if deadline is not None and time.monotonic() >= deadline:
                _log_stderr(f"lifetime of {args.lifetime:g} s over; stopping")
                break
            left = POLL_SECONDS if deadline is None else deadline - time.monotonic()
            swarm.wait_event(max(min(left, POLL_SECONDS), 0.0), [wake_r])
            for peer in swarm.newly_dead():
                _log_stderr(
                    f"peer {peer.index} pid={peer.pid} address={peer.address}"
                    f" died unexpectedly (status {peer.proc.returncode})"
                )
            if swarm.all_dead():
                _log_stderr("swarm: error: every peer has died")
                return 1
        if stopping:
            _log_stderr(f"{stopping[0]} received; stopping {args.peers} peers")
        return 0
    finally:
        swarm.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(wake_r)
        os.close(wake_w)


if __name__ == "__main__":
    sys.exit(main())

"""scripts/swarm.py: starts local peers, prints the bootstrap, stops them all."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SWARM = ROOT / "scripts" / "swarm.py"
PEER_LINE = re.compile(r"^peer (\d+) pid=(\d+) address=(\S+)")
ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})$")
START_DEADLINE = 60.0
STOP_DEADLINE = 30.0
STATUS_DEADLINE = 30.0
# A safety net: a launcher orphaned by a broken test stops by itself.
LIFETIME = "110"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="uses /proc and POSIX signals"
)


class Launcher:
    """scripts/swarm.py as a child process, with its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SWARM), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            cwd=ROOT,
        )
        self.out = b""
        self.err = b""
        self.child_pids: set[int] = set()

    def read_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Read stdout and stderr until ``done()`` is true, both close, or the
        deadline passes; true if ``done()`` became true."""
        streams = {self.proc.stdout: "out", self.proc.stderr: "err"}
        with selectors.DefaultSelector() as selector:
            for stream in streams:
                assert stream is not None
                selector.register(
                    stream.fileno(), selectors.EVENT_READ, streams[stream]
                )
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or not selector.get_map():
                    return False
                for key, _ in selector.select(min(left, 1.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                    elif key.data == "out":
                        self.out += chunk
                    else:
                        self.err += chunk
                self._note_children()
        return True

    def _note_children(self) -> None:
        for line in self.err.decode(errors="replace").splitlines():
            match = PEER_LINE.match(line)
            if match:
                self.child_pids.add(int(match.group(2)))
        self.child_pids.update(_children_of(self.proc.pid))

    def peer_lines(self) -> list[re.Match[str]]:
        lines = self.err.decode(errors="replace").splitlines()
        return [m for m in map(PEER_LINE.match, lines) if m]

    def first_line(self) -> str | None:
        if b"\n" not in self.out:
            return None
        return self.out.split(b"\n", 1)[0].decode()

    def close(self) -> None:
        """Leave nothing running, whatever state the test left things in."""
        with contextlib.suppress(Exception):
            self._note_children()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_DEADLINE)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        for pid in self.child_pids:
            if _is_our_peer(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (from /proc; empty where unreadable)."""
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                # Fields after the parenthesised command: state, ppid, ...
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
    return found


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_our_peer(pid: int) -> bool:
    if not _running(pid):
        return False
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"p2pshard" in cmdline and b"peer" in cmdline
    return False


def _status(address: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "p2pshard", "status", "--bootstrap", address, "--json"],
        capture_output=True,
        text=True,
        timeout=STATUS_DEADLINE,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_peers(address: str, expected: int) -> dict[str, object]:
    """Status until it sees ``expected`` peers (a few tries, one deadline)."""
    deadline = time.monotonic() + STATUS_DEADLINE
    state: dict[str, object] = {}
    for _ in range(10):
        state = _status(address)
        if state["peers"] == expected or time.monotonic() > deadline:
            break
    return state


def _launch(tmp_path: Path, peers: int) -> Launcher:
    return Launcher(
        "--peers", str(peers), "--base-port", "0", "--data", str(tmp_path),
        "--lifetime", LIFETIME,
    )  # fmt: skip


def _ready(launcher: Launcher, tmp_path: Path, peers: int) -> tuple[str, list[int]]:
    """Wait for the bootstrap line; check it and the per-peer lines."""
    ready = launcher.read_until(
        lambda: (
            launcher.first_line() is not None and len(launcher.peer_lines()) >= peers
        ),
        time.monotonic() + START_DEADLINE,
    )
    assert ready, launcher.err.decode(errors="replace")
    address = launcher.first_line()
    assert address is not None
    assert ADDRESS.match(address), address
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and 0 < int(port) < 65536

    lines = launcher.peer_lines()
    assert [int(m.group(1)) for m in lines] == list(range(peers))
    assert lines[0].group(3) == address
    assert len({m.group(3) for m in lines}) == peers
    pids = [int(m.group(2)) for m in lines]
    assert set(pids) == _children_of(launcher.proc.pid)
    assert all(_is_our_peer(pid) for pid in pids)
    for i in range(peers):
        assert (tmp_path / f"peer-{i}" / "node_id").is_file()
    return address, pids


def _stop(launcher: Launcher, sig: signal.Signals, pids: list[int]) -> None:
    launcher.proc.send_signal(sig)
    launcher.read_until(lambda: False, time.monotonic() + STOP_DEADLINE)
    assert launcher.proc.wait(timeout=STOP_DEADLINE) == 0, launcher.err
    assert not [pid for pid in pids if _running(pid)]
    assert f"{sig.name} received".encode() in launcher.err


def _run_and_stop(tmp_path: Path, sig: signal.Signals) -> None:
    peers = 3
    launcher = _launch(tmp_path, peers)
    try:
        address, pids = _ready(launcher, tmp_path, peers)
        state = _wait_peers(address, peers)
        assert state["peers"] == peers, state
        assert state["shards"] == 0 and state["replicas_short"] == 0
        _stop(launcher, sig, pids)
        assert launcher.out.decode().splitlines() == [address]
    finally:
        launcher.close()


def test_sigterm_stops_every_peer(tmp_path: Path) -> None:
    _run_and_stop(tmp_path, signal.SIGTERM)


def test_sigint_stops_every_peer(tmp_path: Path) -> None:
    _run_and_stop(tmp_path, signal.SIGINT)


def test_peer_that_cannot_start_fails_the_launch(tmp_path: Path) -> None:
    # A port held over TCP: the peer there cannot bind and exits.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        launcher = Launcher(
            "--peers", "2", "--base-port", str(port), "--data", str(tmp_path),
            "--ready-timeout", "30", "--lifetime", LIFETIME,
        )  # fmt: skip
        try:
            launcher.read_until(lambda: False, time.monotonic() + START_DEADLINE)
            assert launcher.proc.wait(timeout=STOP_DEADLINE) != 0
            assert launcher.out == b""
            errors = [
                line
                for line in launcher.err.decode(errors="replace").splitlines()
                if line.startswith("swarm: error:")
            ]
            assert len(errors) == 1 and "peer 0" in errors[0], launcher.err
        finally:
            launcher.close()


def test_dead_peer_is_reported_and_the_rest_keep_running(tmp_path: Path) -> None:
    peers = 2
    launcher = _launch(tmp_path, peers)
    try:
        _, pids = _ready(launcher, tmp_path, peers)
        os.kill(pids[1], signal.SIGKILL)
        reported = launcher.read_until(
            lambda: b"peer 1 pid=" in launcher.err and b"died" in launcher.err,
            time.monotonic() + START_DEADLINE,
        )
        assert reported, launcher.err
        assert launcher.proc.poll() is None
        assert _is_our_peer(pids[0])
        _stop(launcher, signal.SIGTERM, pids)
    finally:
        launcher.close()

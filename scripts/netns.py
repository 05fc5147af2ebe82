#!/usr/bin/env python3
"""A test bed of many hosts on one machine: network namespaces on a bridge.

Needs root and iproute2 (``ip``, and ``tc`` for rate caps). Every host is a
network namespace with one interface, ``eth0``, joined by a veth pair to a
bridge that lives in a namespace of its own (the switch). Hosts get addresses
in a private /24 (``10.213.X.0/24`` with X random and unused on this machine)
that exists only inside these namespaces: nothing is created in, or routed
through, the machine's own namespace. ::

    from netns import NetnsLab, available

    ok, why = available()
    with NetnsLab() as lab:
        a = lab.add_host("a", egress_mbit=100)   # a's uploads capped by tc tbf
        b = lab.add_host("b")
        server = lab.popen(b, [sys.executable, "-m", "http.server", "--bind",
                               b.address, "8000"])

Closing the lab kills every process it started (by PID), then deletes its
namespaces, which takes their veths, bridge and qdiscs with them. It closes
itself at interpreter exit too, and a new lab first deletes the namespaces
left by labs whose process has died (names carry the creator's PID).

This kernel has no ``netem``: latency and loss must come from the test's own
servers; ``tbf`` caps rates precisely.

From the shell::

    python scripts/netns.py check                 # can this machine run a lab?
    python scripts/netns.py measure --mbit 100    # does a 100 Mbit cap cap?

scripts/ is not a package: put this folder on ``sys.path`` to import it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Host",
    "NetnsError",
    "NetnsLab",
    "available",
    "cleanup_stale",
    "measure_mbit",
    "tc_available",
]

PREFIX = "p2pshard"
NAME_PATTERN = re.compile(r"[a-z0-9]{1,12}")
OUR_NETNS = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]{{6}}-[a-z0-9]+$")
IP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
SUBNET_TRIES = 64
MAX_HOSTS = 250
SCRIPT = Path(__file__).resolve()
PR_SET_PDEATHSIG = 1


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be created, or a lab is misused."""


def _ip_run(
    argv: Sequence[str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run one iproute2 command (``ip ...`` or ``tc ...``) with a deadline."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and result.returncode != 0:
        message = result.stderr.strip().splitlines() or ["(no message)"]
        raise NetnsError(f"`{' '.join(argv)}` failed: {message[-1]}")
    return result


def _die_with_parent() -> None:
    """In a child before exec: ask for SIGKILL when the parent dies."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_names() -> list[str]:
    result = _ip_run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Delete the namespaces of labs whose creating process has died.

    Only names this module makes (``p2pshard-<pid>-<token>-<host>``) are
    considered, so no other namespace on the machine is ever touched.
    """
    removed = []
    for name in _netns_names():
        match = OUR_NETNS.match(name)
        if match and not _pid_alive(int(match.group(1))):
            if _ip_run(["ip", "netns", "del", name], check=False).returncode == 0:
                removed.append(name)
    return removed


def available() -> tuple[bool, str]:
    """Whether a lab can be built here, and if not, why (for a test's skip)."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, "network namespaces need root (run the tests as root)"
    if shutil.which("ip") is None:
        return False, "`ip` (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(3)}-probe"
    steps = [
        ["ip", "netns", "add", probe],
        ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"],
        ["ip", "-n", probe, "link", "add", "va", "type", "veth", "peer", "vb"],
    ]
    try:
        for step in steps:
            result = _ip_run(step, check=False)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines() or ["(no message)"]
                return False, f"`{' '.join(step)}` failed: {lines[-1]}"
    except NetnsError as exc:
        return False, str(exc)
    finally:
        with contextlib.suppress(NetnsError):
            _ip_run(["ip", "netns", "del", probe], check=False)
    return True, "ok"


def tc_available() -> tuple[bool, str]:
    """Whether ``tc`` is installed (rate caps need it)."""
    if shutil.which("tc") is None:
        return False, "`tc` (iproute2) is not installed"
    return True, "ok"


@dataclass
class Host:
    """One host of a lab: a namespace with ``eth0`` at ``address``."""

    name: str
    netns: str
    address: str
    switch_port: str
    egress_mbit: float | None = None
    ingress_mbit: float | None = None
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)


class NetnsLab:
    """Hosts in network namespaces on one bridge; a context manager.

    subnet: an IPv4 /24 used only inside the lab's namespaces; by default a
        random ``10.213.X.0/24`` that no interface or route of this machine
        (nor of another live lab) uses.
    """

    def __init__(self, subnet: str | None = None) -> None:
        self.token = secrets.token_hex(3)
        self._requested_subnet = subnet
        self.subnet: ipaddress.IPv4Network | None = None
        self.switch = self._netns_name("switch")
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._open = False

    # --- lifecycle --------------------------------------------------------

    def __enter__(self) -> NetnsLab:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        ok, why = available()
        if not ok:
            raise NetnsError(why)
        cleanup_stale()
        atexit.register(self.close)
        self._open = True
        try:
            self.subnet = self._pick_subnet()
            self._add_netns(self.switch)
            self._ip_n(self.switch, "link", "add", "br0", "type", "bridge")
            self._ip_n(self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Kill the lab's processes by PID and delete its namespaces; idempotent."""
        if not self._open:
            return
        self._open = False
        self._stop_processes()
        errors = []
        for name in reversed(self._namespaces):
            result = _ip_run(["ip", "netns", "del", name], check=False)
            if result.returncode != 0 and name in _netns_names():
                errors.append(f"{name}: {result.stderr.strip()}")
        self._namespaces.clear()
        self.hosts.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if errors:
            raise NetnsError("could not delete " + "; ".join(errors))

    def _stop_processes(self) -> None:
        procs = [p for p in self._procs if p.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_TIMEOUT)
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()

    # --- hosts ------------------------------------------------------------

    def add_host(
        self,
        name: str,
        egress_mbit: float | None = None,
        ingress_mbit: float | None = None,
    ) -> Host:
        """A new host on the bridge with the next free address of the subnet.

        egress_mbit: cap on what the host sends (tbf on its ``eth0``).
        ingress_mbit: cap on what it receives (tbf on the switch's port to it).
        """
        self._check_open()
        if not NAME_PATTERN.fullmatch(name):
            raise NetnsError(f"host name {name!r}: use 1-12 of a-z and 0-9")
        if name in self.hosts:
            raise NetnsError(f"host {name!r} exists")
        if len(self.hosts) >= MAX_HOSTS:
            raise NetnsError(f"a lab holds at most {MAX_HOSTS} hosts")
        assert self.subnet is not None
        index = len(self.hosts) + 2  # .1 stays unused: there is no gateway
        address = str(self.subnet.network_address + index)
        netns = self._netns_name(name)
        port = f"p{index}"
        self._add_netns(netns)
        # Both ends are created straight inside the lab's namespaces.
        self._ip_n(
            self.switch, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", netns,
        )  # fmt: skip
        self._ip_n(self.switch, "link", "set", port, "master", "br0")
        self._ip_n(self.switch, "link", "set", port, "up")
        prefix = self.subnet.prefixlen
        self._ip_n(netns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
        self._ip_n(netns, "link", "set", "eth0", "up")
        self._ip_n(netns, "link", "set", "lo", "up")
        host = Host(name, netns, address, port)
        self.hosts[name] = host
        self.set_rate(host, egress_mbit, ingress_mbit)
        return host

    def set_rate(
        self,
        host: Host,
        egress_mbit: float | None = None,
        ingress_mbit: float | None = None,
    ) -> None:
        """Cap (or, with None, uncap) a host's egress and ingress."""
        self._check_open()
        _set_tbf(host.netns, "eth0", egress_mbit, host.egress_mbit is not None)
        _set_tbf(
            self.switch, host.switch_port, ingress_mbit, host.ingress_mbit is not None
        )
        host.egress_mbit = egress_mbit
        host.ingress_mbit = ingress_mbit

    # --- processes --------------------------------------------------------

    def popen(
        self, host: Host | str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside a host (``ip netns exec``); the lab owns it.

        ``ip netns exec`` execs ``argv`` in place, so the PID is the program's.
        Children run in their own session unless told otherwise, so a Ctrl-C
        at the terminal reaches only the test, which then closes the lab.
        """
        self._check_open()
        host = self.host(host)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        # A safety net: should this process die without closing the lab, the
        # kernel kills the children (the lab's next opening deletes namespaces).
        kwargs.setdefault("preexec_fn", _die_with_parent)
        proc = subprocess.Popen(["ip", "netns", "exec", host.netns, *argv], **kwargs)
        self._procs.append(proc)
        host.procs.append(proc)
        return proc

    def run(
        self, host: Host | str, argv: Sequence[str], timeout: float, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside a host to the end (killed after ``timeout`` s)."""
        proc = self.popen(
            host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            **kwargs,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=KILL_TIMEOUT)
            raise NetnsError(f"`{' '.join(argv)}` took over {timeout:g} s") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill(self, proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> int:
        """Signal one of the lab's processes and wait for it; its exit status."""
        if proc not in self._procs:
            raise NetnsError("not a process of this lab")
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        return proc.wait(timeout=STOP_TIMEOUT + KILL_TIMEOUT)

    def host(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise NetnsError(f"no host {host!r}") from None

    # --- helpers ----------------------------------------------------------

    def _check_open(self) -> None:
        if not self._open:
            raise NetnsError("the lab is not open")

    def _netns_name(self, name: str) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.token}-{name}"

    def _add_netns(self, name: str) -> None:
        _ip_run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    @staticmethod
    def _ip_n(netns: str, *args: str) -> None:
        _ip_run(["ip", "-n", netns, *args])

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        if self._requested_subnet is not None:
            subnet = ipaddress.IPv4Network(self._requested_subnet)
            if not subnet.is_private or subnet.prefixlen > 29:
                raise NetnsError(f"{subnet}: use a private subnet of /29 or larger")
            if subnet in _subnets_in_use():
                raise NetnsError(f"{subnet} is in use on this machine")
            return subnet
        used = _subnets_in_use()
        for _ in range(SUBNET_TRIES):
            subnet = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(256)}.0/24")
            if not any(subnet.overlaps(u) for u in used):
                return subnet
        raise NetnsError("no unused 10.213.X.0/24 found")


def _set_tbf(netns: str, dev: str, mbit: float | None, had: bool) -> None:
    if had:
        _ip_run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
    if mbit is None:
        return
    if mbit <= 0:
        raise NetnsError(f"rate {mbit} Mbit/s must be positive")
    ok, why = tc_available()
    if not ok:
        raise NetnsError(why)
    rate_bytes = mbit * 1e6 / 8
    # A bucket of 10 ms of traffic (at least a few full frames) keeps the
    # rate exact over short windows; 50 ms of queue bounds the added delay.
    burst = max(int(rate_bytes / 100), 16 * 1024)
    _ip_run(
        [
            "tc", "-n", netns, "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{int(mbit * 1000)}kbit", "burst", str(burst),
            "latency", "50ms",
        ]
    )  # fmt: skip


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of this machine's addresses and routes, and of live labs."""
    used: list[ipaddress.IPv4Network] = []
    sources = [["ip", "-o", "-4", "addr", "show"], ["ip", "-4", "route", "show"]]
    for name in _netns_names():
        if OUR_NETNS.match(name):
            sources.append(["ip", "-n", name, "-o", "-4", "addr", "show"])
    for argv in sources:
        text = _ip_run(argv, check=False).stdout
        for token in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?\b", text):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.IPv4Network(token, strict=False))
    return used


# --- rate measurement ------------------------------------------------------


def measure_mbit(
    lab: NetnsLab, src: Host | str, dst: Host | str, seconds: float = 2.0
) -> dict[str, float]:
    """Send from ``src`` to ``dst`` over TCP for ``seconds``; the rate seen.

    The receiver times from its first byte to its last, so connection set-up
    and the sender's start are not counted.
    """
    src, dst = lab.host(src), lab.host(dst)
    limit = seconds + 20.0
    receiver = lab.popen(
        dst,
        [sys.executable, str(SCRIPT), "_recv", dst.address, str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert receiver.stdout is not None
    line = _read_line(receiver.stdout.fileno(), time.monotonic() + 15.0)
    port = int(json.loads(line)["port"])
    sender = lab.popen(
        src,
        [sys.executable, str(SCRIPT), "_send", dst.address, str(port), str(seconds)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = sender.communicate(timeout=limit)
        if sender.returncode != 0:
            raise NetnsError(f"sender failed: {err.decode(errors='replace')[-300:]}")
        line = _read_line(receiver.stdout.fileno(), time.monotonic() + limit)
        result = json.loads(line)
    finally:
        for proc in (sender, receiver):
            if proc.poll() is None:
                lab.kill(proc)
    took = float(result["seconds"])
    return {
        "bytes": int(result["bytes"]),
        "seconds": round(took, 3),
        "mbit_per_s": round(result["bytes"] * 8 / max(took, 1e-9) / 1e6, 2),
    }


def _read_line(fd: int, deadline: float) -> str:
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetnsError("no answer from the measuring process in time")
            if selector.select(min(left, 1.0)):
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise NetnsError("the measuring process ended without answer")
                buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


def _recv(address: str, limit: float) -> int:
    """Accept one connection, read it to its end; print bytes and seconds."""
    with socket.create_server((address, 0)) as server:
        server.settimeout(limit)
        print(json.dumps({"port": server.getsockname()[1]}), flush=True)
        conn, _ = server.accept()
    total, first, last = 0, 0.0, 0.0
    buffer = bytearray(1 << 20)
    deadline = time.monotonic() + limit
    with conn:
        conn.settimeout(limit)
        while time.monotonic() < deadline:
            n = conn.recv_into(buffer)
            if not n:
                break
            last = time.monotonic()
            if not total:
                first = last
            total += n
    print(json.dumps({"bytes": total, "seconds": last - first}), flush=True)
    return 0


def _send(address: str, port: int, seconds: float) -> int:
    """Send zeros to ``address:port`` for ``seconds``, then close."""
    block = bytes(256 * 1024)
    with socket.create_connection((address, port), timeout=10.0) as conn:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            conn.sendall(block)
    return 0


# --- the command -----------------------------------------------------------


def _cmd_measure(args: argparse.Namespace) -> int:
    with NetnsLab() as lab:
        lab.add_host("src", egress_mbit=args.mbit)
        lab.add_host("dst")
        lab.add_host("free")
        capped = measure_mbit(lab, "src", "dst", args.seconds)
        free = measure_mbit(lab, "free", "dst", args.seconds)
        out = {
            "subnet": str(lab.subnet),
            "cap_mbit": args.mbit,
            "capped": capped,
            "uncapped": free,
            "cap_ratio": round(capped["mbit_per_s"] / args.mbit, 4),
        }
    print(json.dumps(out, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="can a lab be built here?")
    p = sub.add_parser("measure", help="measure a tbf egress cap between two hosts")
    p.add_argument("--mbit", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=3.0)
    p = sub.add_parser("_recv")
    p.add_argument("address")
    p.add_argument("limit", type=float)
    p = sub.add_parser("_send")
    p.add_argument("address")
    p.add_argument("port", type=int)
    p.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    if args.command == "check":
        ok, why = available()
        print(json.dumps({"available": ok, "reason": why, "tc": tc_available()[0]}))
        return 0 if ok else 1
    if args.command == "_recv":
        return _recv(args.address, args.limit)
    if args.command == "_send":
        return _send(args.address, args.port, args.seconds)
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must be in (0, 60]")
    try:
        return _cmd_measure(args)
    except NetnsError as exc:
        print(f"netns: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

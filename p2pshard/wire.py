"""Blocking HTTP/1.1 GETs of shard bodies, run in worker threads.

Why not the event loop: over loopback one event loop that receives several
bodies at once does every copy on one core and tops out near 1 GB/s, hashing
included. Worker threads that receive with blocking ``recv_into``, hash what
arrived (blake3 releases the GIL) and put it in place let both cores work.
Where the bytes land matters: measured here (2 cores, 1 GiB from 4 local peers,
client CPU seconds), receiving alone costs 0.5, hashing 0.24 more, copying
from a small reused buffer into fresh memory 0.73 more (mostly the kernel
faulting the fresh pages in), while receiving straight into the destination
and hashing it there costs 0.6 more in all. So a memory destination receives
directly, 4 MiB per read; a file destination goes through a reused buffer
(``pwrite`` releases the GIL).

What a response must be, strictly: ``HTTP/1.x`` and a three-digit status; for
200 one ``Content-Length`` equal to the shard's size (no transfer coding: a
body whose length is not announced cannot be checked as it streams, so it is
refused); exactly that many bytes, hashing to the shard id. Anything else is
a :class:`PeerError`; bytes already passed to the sink are simply overwritten
by the next attempt (the caller never uses them before the hash matched).

Timeouts, from :class:`Limits`, run only while this request owns its socket,
so time spent queueing for a local connection or thread is never blamed on
the peer: ``connect_timeout``, ``read_timeout`` between two reads,
``min_rate`` bytes/s over every ``read_timeout`` window (a trickle is a
stall), and ``request_timeout`` for the whole request.

Keep-alive connections are pooled per peer. A pooled connection the peer
closed meanwhile is detected before reuse, or by the request failing before
the first byte of its answer, and then replaced by a fresh one once.
"""

from __future__ import annotations

import contextlib
import errno
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from .hashing import Hasher

__all__ = [
    "Aborted",
    "BadBytes",
    "Limits",
    "NotHeld",
    "PeerError",
    "Pool",
    "Request",
    "Sink",
]

BUFFER_SIZE = 256 * 1024  # the reused receive buffer of each worker thread
MAX_HEAD = 16 * 1024
MAX_ERROR_BODY = 64 * 1024  # an error body up to this size is drained for reuse
STATUS_LINE = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [\x09\x20-\x7e\x80-\xff]*)?"
)
TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
RETRYABLE_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}

DIRECT_READ = 4 * 1024 * 1024  # bytes per read straight into a memory destination


class Sink(Protocol):
    """Where one shard's body goes; used in a worker thread.

    ``memory``: a writable buffer of exactly the shard's size to receive
    straight into, or None, and then ``write(offset, piece)`` is called with
    each piece, which it must not keep (the buffer is reused).
    """

    @property
    def memory(self) -> memoryview | None: ...

    def prepare(self) -> None:
        """Called before the body is received (e.g. to fault memory in)."""

    def write(self, offset: int, piece: memoryview) -> None: ...


class PeerError(Exception):
    """One peer failed one request; the shard goes to the next replica."""


class NotHeld(PeerError):
    """The peer answered that it does not hold the shard: no fault of its own."""


class BadBytes(PeerError):
    """The peer served the wrong bytes or announced the wrong length: it is not
    asked for this shard again."""


class Aborted(Exception):
    """The request was abandoned by its caller (cancelled or closing)."""


class _StaleConnection(Exception):
    """A reused keep-alive connection was dead before its answer began."""


@dataclass(frozen=True)
class Limits:
    """Timeouts of one request; see the module docstring."""

    connect_timeout: float
    read_timeout: float
    min_rate: float
    request_timeout: float


@dataclass
class _Head:
    status: int
    length: int | None
    keep_alive: bool
    coded: bool  # a Transfer-Encoding was announced
    rest: memoryview  # bytes after the head that arrived with it


class Pool:
    """Keep-alive connections per peer, shared by worker threads.

    It bounds the idle connections kept per peer; the caller bounds how many
    are in use at once. ``active`` counts connections handed out and not yet
    given back: zero whenever no request runs.
    """

    def __init__(self, max_idle_per_peer: int) -> None:
        self.max_idle = max_idle_per_peer
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.active = 0

    def acquire(
        self, address: tuple[str, int], timeout: float, reuse: bool = True
    ) -> tuple[socket.socket, bool]:
        """A connection to ``address`` and whether it is a reused one."""
        with self._lock:
            if self._closed:
                raise Aborted("pool closed")
            idle = self._idle.get(address, [])
            while reuse and idle:
                sock = idle.pop()
                if _quiet(sock):
                    self.active += 1
                    return sock, True
                sock.close()
            self.active += 1
        try:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            with self._lock:
                self.active -= 1
            raise
        return sock, False

    def release(
        self, address: tuple[str, int], sock: socket.socket, reuse: bool
    ) -> None:
        """Give a connection back: kept for reuse, or closed."""
        with self._lock:
            self.active -= 1
            idle = self._idle.setdefault(address, [])
            if reuse and not self._closed and len(idle) < self.max_idle:
                idle.append(sock)
                return
        sock.close()

    def idle(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        """Close every idle connection; connections in use close on release."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()


def _quiet(sock: socket.socket) -> bool:
    """Nothing waiting on a connection. An idle keep-alive connection becomes
    readable only when the peer closed it or sent bytes nobody asked for, and
    a complete body followed by more bytes is a peer sending too much: either
    way the connection cannot carry another request."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


_local = threading.local()


def _buffer() -> memoryview:
    """This thread's receive buffer, reused by every request it runs."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(BUFFER_SIZE))
    return buffer


class Request:
    """One GET of one shard from one peer, abortable from another thread.

    ``run()`` blocks until the verified body has gone to the sink, or raises a
    :class:`PeerError` (or :class:`Aborted`; an OSError of the sink itself
    propagates as is: it is no fault of the peer). ``received`` counts body
    bytes read, good or bad.
    """

    def __init__(
        self,
        pool: Pool,
        address: tuple[str, int],
        shard_id: str,
        size: int,
        sink: Sink,
        limits: Limits,
    ) -> None:
        self.pool = pool
        self.address = address
        self.shard_id = shard_id
        self.size = size
        self.sink = sink
        self.limits = limits
        self.received = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._aborted = False

    def abort(self) -> None:
        """Make ``run()`` stop soon: the socket in use is shut down."""
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        # Errors are raised outside the handlers that caught them: an error
        # raised inside one would keep the caught one (and its frames, and so
        # the sink and its buffer) alive as its context, in a reference cycle.
        local: OSError | None = None
        try:
            stale = False
            try:
                self._attempt(reuse=True)
            except _StaleConnection:
                stale = True
            if stale:
                self._attempt(reuse=False)
        except _SinkFailed as failure:
            local = failure.error
        if local is not None:
            try:
                raise local
            finally:
                del local

    # --- one attempt on one connection --------------------------------------

    def _attempt(self, reuse: bool) -> None:
        self._check_aborted()
        sock, reused = self._connect(reuse)
        keep, refusal = False, None
        try:
            with self._lock:
                if self._aborted:
                    raise Aborted("aborted")
                self._sock = sock
            keep, refusal = self._exchange(sock, reused)
        except TimeoutError:
            self._check_aborted()
            failed = f"stalled: nothing for {self.limits.read_timeout} s"
        except OSError as exc:
            self._check_aborted()
            failed = f"connection failed: {exc.strerror or exc}"
        else:
            failed = ""
        finally:
            with self._lock:
                self._sock = None
            self.pool.release(self.address, sock, keep and not self._aborted)
        if failed:
            raise PeerError(failed)
        if refusal is not None:
            try:
                raise refusal
            finally:
                del refusal  # else this frame, in its traceback, holds it: a cycle

    def _check_aborted(self) -> None:
        if self._aborted:
            raise Aborted("aborted")

    def _connect(self, reuse: bool) -> tuple[socket.socket, bool]:
        try:
            return self.pool.acquire(self.address, self.limits.connect_timeout, reuse)
        except TimeoutError as exc:
            raise PeerError("connect timed out") from exc
        except OSError as exc:
            raise PeerError(f"connect failed: {exc.strerror or exc}") from exc

    def _exchange(
        self, sock: socket.socket, reused: bool
    ) -> tuple[bool, PeerError | None]:
        """Send the request and take its answer: whether the socket is reusable,
        and the refusal when the answer was not a 200."""
        sock.settimeout(self.limits.read_timeout)
        host = self.address[0]
        host = f"[{host}]" if ":" in host else host
        request = (
            f"GET /v1/shards/{self.shard_id} HTTP/1.1\r\n"
            f"Host: {host}:{self.address[1]}\r\n"
            "Accept-Encoding: identity\r\n\r\n"
        ).encode("ascii")
        buffer = _buffer()
        try:
            sock.sendall(request)
            head = self._read_head(sock, buffer)
        except _StaleConnection:
            if reused:
                raise
            raise PeerError("connection closed before an answer") from None
        except OSError as exc:
            if reused and exc.errno in RETRYABLE_ERRNOS:
                raise _StaleConnection() from exc
            raise
        if head.status != 200:
            return self._refusal(sock, head, buffer)
        if head.coded or head.length is None:
            raise PeerError("no plain Content-Length: the body cannot be checked")
        if head.length != self.size:
            raise BadBytes(f"announced {head.length} bytes of {self.size}")
        self._read_body(sock, head.rest, buffer)
        return head.keep_alive and _quiet(sock), None

    def _read_head(self, sock: socket.socket, buffer: memoryview) -> _Head:
        filled = 0
        limit = min(len(buffer), MAX_HEAD)
        while True:
            got = sock.recv_into(buffer[filled:limit])
            if got == 0:
                self._check_aborted()
                raise _StaleConnection()
            filled += got
            end = bytes(buffer[:filled]).find(b"\r\n\r\n")
            if end >= 0:
                head = _parse_head(bytes(buffer[:end]))
                head.rest = buffer[end + 4 : filled]
                return head
            if filled >= limit:
                raise PeerError("response head too large")

    def _refusal(
        self, sock: socket.socket, head: _Head, buffer: memoryview
    ) -> tuple[bool, PeerError]:
        """A non-200 answer; its body is drained when small, to reuse the socket."""
        drained = False
        if not head.coded and head.length is not None and head.length <= MAX_ERROR_BODY:
            remaining = head.length - len(head.rest)
            while remaining > 0:
                got = sock.recv_into(buffer[: min(len(buffer), remaining)])
                if got == 0:
                    break
                remaining -= got
            drained = remaining == 0
        if head.status == 404:
            error: PeerError = NotHeld("not held")
        else:
            error = PeerError(f"HTTP {head.status}")
        return drained and head.keep_alive and _quiet(sock), error

    def _read_body(
        self, sock: socket.socket, first: memoryview, buffer: memoryview
    ) -> None:
        size, limits, memory = self.size, self.limits, self.sink.memory
        if len(first) > size:
            raise BadBytes(f"body longer than {size} bytes")
        self.sink.prepare()
        hasher = Hasher(max_threads=1)
        began = window_start = time.monotonic()
        window_bytes = position = 0
        piece, in_place = first, False  # in_place: received straight into memory
        while True:
            if piece:
                hasher.update(piece)
                if not in_place:
                    self._put(memory, position, piece)
                position += len(piece)
                window_bytes += len(piece)
                self.received += len(piece)
            if position == size:
                break
            now = time.monotonic()
            if now - window_start >= limits.read_timeout:
                rate = window_bytes / (now - window_start)
                if rate < limits.min_rate:
                    raise PeerError(f"too slow: {rate:.0f} bytes/s")
                window_start, window_bytes = now, 0
            if now - began > limits.request_timeout:
                raise PeerError(f"request took over {limits.request_timeout} s")
            if memory is not None:
                target = memory[position : position + min(DIRECT_READ, size - position)]
            else:
                target = buffer[: min(len(buffer), size - position)]
            got = sock.recv_into(target)
            if got == 0:
                self._check_aborted()
                raise PeerError(f"short body: {position} of {size} bytes")
            piece, in_place = target[:got], memory is not None
        actual = hasher.hexdigest()
        if actual != self.shard_id:
            raise BadBytes(f"bytes hash to {actual}")

    def _put(self, memory: memoryview | None, position: int, piece: memoryview) -> None:
        if memory is not None:
            memory[position : position + len(piece)] = piece
            return
        try:
            self.sink.write(position, piece)
        except OSError as exc:
            raise _SinkFailed(exc) from exc


class _SinkFailed(Exception):
    """The sink raised OSError (a local disk fault): not the peer's doing."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _parse_head(raw: bytes) -> _Head:
    lines = raw.split(b"\r\n")
    match = STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise PeerError(f"malformed status line {lines[0][:80]!r}")
    minor, status = match.group(1), int(match.group(2))
    length: int | None = None
    coded = False
    connection: set[bytes] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not TOKEN.fullmatch(name):
            raise PeerError(f"malformed header line {line[:80]!r}")
        name, value = name.lower(), value.strip(b" \t")
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise PeerError(f"malformed Content-Length {value[:40]!r}")
            if length is not None and int(value) != length:
                raise PeerError("conflicting Content-Length headers")
            length = int(value)
        elif name == b"transfer-encoding":
            coded = True
        elif name == b"connection":
            connection.update(t.strip().lower() for t in value.split(b","))
    if minor == b"1":
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection
    return _Head(status, length, keep_alive and not coded, coded, memoryview(b""))

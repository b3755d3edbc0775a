"""One proxied client connection: its upstream socket, its two directions, its faults.

A ``Link`` is served by one selector thread that alone closes its sockets; the
``FaultProxy`` that accepted it reaches it only through ``blackhole()`` and
``reset()``, which set a flag and wake the thread through a ``Wakeup`` socket pair.
Each ``Direction`` holds the bytes read from one side until they are due (latency)
and the other side takes them (backpressure). Under a rate limit a direction reads
from its source only as its token bucket allows and holds little more than what is
in flight, so the sender's own socket feels the slow link.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import Protocol

__all__ = ["Direction", "Link", "Owner", "Wakeup", "rst_close"]

# The proxy's logger: a link's messages belong to the proxy that owns it.
logger = logging.getLogger("agent_factory.testing.faultproxy")

_CHUNK = 65536
_MAX_QUEUED = 1 << 20  # bytes in flight per direction before we stop reading: backpressure
# A throttled direction reads about _TICK seconds of its rate at a time (so a slow link
# neither spins on tiny reads nor bursts), and queues at most _CHUNK beyond what its
# latency keeps in flight: the sender's kernel holds the rest, as behind a real link.
_TICK = 0.01
_MIN_READ = 1024
_CONNECT_TIMEOUT = 10.0


def rst_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, as a crashed peer or a middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Wakeup:
    """A socket pair whose read end makes a blocked ``select`` return."""

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)

    def wake(self) -> None:
        # A full buffer already guarantees a wake-up; a closed one means the loop ended.
        with contextlib.suppress(OSError):
            self._writer.send(b"!")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()


class Owner(Protocol):
    """What a link needs of the proxy that accepted it (a `FaultProxy`)."""

    upstream: tuple[str, int]

    @property
    def port(self) -> int: ...

    @property
    def latency(self) -> float: ...

    @property
    def rate(self) -> float | None: ...

    def _forget(self, link: Link) -> None: ...


class Direction:
    """Bytes from ``src`` waiting for their delivery time, then for ``dst`` to take them."""

    def __init__(self, src: socket.socket, dst: socket.socket | None) -> None:
        self.src, self.dst = src, dst
        self.pending: deque[tuple[float, bytes]] = deque()
        self.out = bytearray()
        self.queued = 0
        self.last_due = 0.0
        self.eof = False
        self.shut = False
        self.rate: float | None = None
        self.tokens = 0.0  # bytes the bucket allows; negative: a read not yet paid for
        self.stamp = 0.0

    def throttle(self, rate: float | None, now: float) -> None:
        """Refill the token bucket at ``rate`` bytes per second (None: unlimited)."""
        if rate is None:
            self.rate = None
            return
        size = _read_size(rate)
        tokens = size if self.rate is None else self.tokens + (now - self.stamp) * rate
        # Idle time saves up one read at most; a rate change forgives older debt.
        self.tokens = min(float(size), max(tokens, float(-size)))
        self.rate, self.stamp = rate, now

    def wants_read(self, latency: float) -> bool:
        if self.eof:
            return False
        if self.rate is None:
            return self.queued < _MAX_QUEUED
        room = min(_MAX_QUEUED, _CHUNK + self.rate * latency)
        return self.tokens >= 0 and self.queued < room

    def read_size(self) -> int:
        return _CHUNK if self.rate is None else _read_size(self.rate)

    def spend(self, nbytes: int) -> None:
        if self.rate is not None:
            self.tokens -= nbytes

    def ready_at(self) -> float | None:
        """When a throttled source, now out of tokens, may be read again."""
        if self.rate is None or self.eof or self.tokens >= 0:
            return None
        return self.stamp - self.tokens / self.rate

    def push(self, data: bytes, due: float) -> None:
        # Never earlier than the previous chunk: lowering the latency keeps the order.
        self.last_due = max(due, self.last_due)
        self.pending.append((self.last_due, data))
        self.queued += len(data)

    def drop(self) -> None:
        self.pending.clear()
        self.out.clear()
        self.queued = 0

    def flush(self, now: float) -> None:
        """Move what is due to ``out`` and send what the socket accepts; OSError on failure."""
        while self.pending and self.pending[0][0] <= now:
            self.out += self.pending.popleft()[1]
        if self.out and self.dst is not None:
            try:
                sent = self.dst.send(self.out)
            except BlockingIOError:
                sent = 0
            del self.out[:sent]
            self.queued -= sent
        if self.eof and not self.queued and not self.shut and self.dst is not None:
            self.dst.shutdown(socket.SHUT_WR)
            self.shut = True

    def next_due(self) -> float | None:
        return self.pending[0][0] if self.pending else None


class Link:
    """One client connection and its upstream, served by one selector thread."""

    def __init__(
        self, proxy: Owner, client: socket.socket, blackholed: bool, client_port: int
    ) -> None:
        self.client_port = client_port
        self._proxy = proxy
        self._client = client
        self._blackholed = blackholed
        self._reset = False
        self._wakeup = Wakeup()
        self.thread = threading.Thread(
            target=self._run, name=f"faultproxy-{proxy.port}-link", daemon=True
        )

    def blackhole(self) -> None:
        self._blackholed = True
        self._wakeup.wake()

    def reset(self) -> None:
        self._reset = True
        self._wakeup.wake()

    def wake(self) -> None:
        """Make the link re-read the proxy's settings (e.g. a new rate) at once."""
        self._wakeup.wake()

    def _run(self) -> None:
        upstream: socket.socket | None = None
        clean = False
        try:
            self._client.setblocking(False)
            self._client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._blackholed:
                upstream = _start_connect(self._proxy.upstream)
            clean = self._pump(upstream)
        except OSError as exc:
            logger.debug("faultproxy %d: connection ended: %s", self._proxy.port, exc)
        finally:
            # A failure on one side is mirrored as an RST on the other.
            for sock in (self._client, upstream):
                if sock is not None and clean:
                    sock.close()
                elif sock is not None:
                    rst_close(sock)
            self._wakeup.close()
            self._proxy._forget(self)

    def _pump(self, upstream: socket.socket | None) -> bool:
        """Forward until both sides are done (True) or a side fails or is reset (False)."""
        to_up = Direction(self._client, upstream)
        to_client = Direction(upstream, self._client) if upstream is not None else None
        connect_deadline: float | None = time.monotonic() + _CONNECT_TIMEOUT
        connecting = upstream is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wakeup.reader, selectors.EVENT_READ)
            registered: dict[socket.socket, int] = {}
            while True:
                if self._reset:
                    return False
                now = time.monotonic()
                rate, latency = self._proxy.rate, self._proxy.latency
                for direction in (to_up, to_client):
                    if direction is not None:
                        direction.throttle(rate, now)
                if self._blackholed:
                    # Not even an EOF gets through: the client must see silence.
                    to_up.drop()
                    if to_client is not None:
                        to_client.drop()
                elif not connecting:
                    to_up.flush(now)
                    if to_client is not None:
                        to_client.flush(now)
                if to_up.shut and (to_client is None or to_client.shut):
                    return True
                if self._blackholed and to_up.eof:
                    return True  # the client left; nothing will ever be forwarded
                wanted = self._interest(to_up, to_client, connecting, latency)
                _update(sel, registered, wanted)
                deadline = connect_deadline if connecting else None
                if deadline is not None and now > deadline:
                    raise TimeoutError("upstream connect timed out")
                events = sel.select(self._timeout(now, to_up, to_client, deadline))
                for key, mask in events:
                    if key.fileobj is self._wakeup.reader:
                        self._wakeup.drain()
                    elif connecting and key.fileobj is upstream:
                        error = upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:
                            raise ConnectionRefusedError(error, "upstream connect failed")
                        connecting = False
                    elif mask & selectors.EVENT_READ:
                        self._receive(to_up if key.fileobj is self._client else to_client)

    def _receive(self, direction: Direction | None) -> None:
        assert direction is not None
        try:
            data = direction.src.recv(direction.read_size())
        except BlockingIOError:
            return
        direction.spend(len(data))
        if not data:
            direction.eof = True
        elif not self._blackholed:
            direction.push(data, time.monotonic() + self._proxy.latency)

    def _interest(
        self, to_up: Direction, to_client: Direction | None, connecting: bool, latency: float
    ) -> dict[socket.socket, int]:
        wanted: dict[socket.socket, int] = {}
        for direction in (to_up, to_client):
            if direction is None:
                continue
            if direction.wants_read(latency):
                wanted[direction.src] = wanted.get(direction.src, 0) | selectors.EVENT_READ
            if direction.out and direction.dst is not None and not connecting:
                wanted[direction.dst] = wanted.get(direction.dst, 0) | selectors.EVENT_WRITE
        upstream = to_up.dst
        if connecting and upstream is not None:
            wanted[upstream] = selectors.EVENT_WRITE  # writable = connected (or failed)
        return wanted

    @staticmethod
    def _timeout(
        now: float, to_up: Direction, to_client: Direction | None, deadline: float | None
    ) -> float | None:
        """Sleep until a chunk is due or a throttled source may be read again.

        While connecting, only until the deadline: nothing can be delivered then, so
        due chunks must not make us spin.
        """
        if deadline is not None:
            return max(0.0, deadline - now)
        directions = [d for d in (to_up, to_client) if d is not None]
        dues = [d.next_due() for d in directions] + [d.ready_at() for d in directions]
        times = [due for due in dues if due is not None]
        return max(0.0, min(times) - now) if times else None


def _read_size(rate: float) -> int:
    return int(min(_CHUNK, max(_MIN_READ, rate * _TICK)))


def _start_connect(address: tuple[str, int]) -> socket.socket:
    """Begin a non-blocking connect, so a reset can interrupt a slow upstream."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    error = sock.connect_ex(address)
    if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
        sock.close()
        raise OSError(error, f"connect to upstream failed: {os.strerror(error)}")
    return sock


def _update(
    sel: selectors.BaseSelector,
    registered: dict[socket.socket, int],
    wanted: dict[socket.socket, int],
) -> None:
    """Bring the selector's registrations to ``wanted`` (it refuses zero-event entries)."""
    for sock in list(registered):
        if sock not in wanted:
            sel.unregister(sock)
            del registered[sock]
    for sock, events in wanted.items():
        if sock not in registered:
            sel.register(sock, events)
        elif registered[sock] != events:
            sel.modify(sock, events)
        registered[sock] = events

"""A TCP proxy that injects network faults between a client and PostgreSQL.

Each mode reproduces what a client sees from a failing provider:

- ``pass``: bytes flow both ways, optionally delayed by ``set_latency()``.
- ``blackhole``: connections are accepted and kept open but every byte is read and
  dropped, like a server behind a dead link. A blackholed connection has lost bytes
  and so has no usable protocol state: it stays blackholed when the mode goes back to
  ``pass``; only connections accepted afterwards are forwarded again.
- ``reset``: open connections are closed with a TCP RST, new ones are reset at once.
- ``refuse``: nothing listens (ECONNREFUSED) and open connections are reset; any
  other mode listens again on the same port.

One accept thread plus one selector thread per connection, all daemons. Sockets are
only ever closed by the thread that polls them (closing a socket under another
thread's ``select`` neither wakes it nor frees the port), so control goes through
wake-up socket pairs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections import deque
from types import TracebackType
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "Mode"]

logger = logging.getLogger("agent_factory.faultproxy")

Mode = Literal["pass", "blackhole", "reset", "refuse"]
_MODES: tuple[Mode, ...] = ("pass", "blackhole", "reset", "refuse")
_CHUNK = 65536
_MAX_QUEUED = 1 << 20  # bytes in flight per direction before we stop reading: backpressure
_CONNECT_TIMEOUT = 10.0
_JOIN_TIMEOUT = 2.0


def _rst_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, as a crashed peer or a middlebox would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Wakeup:
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


class _Direction:
    """Bytes from ``src`` waiting for their delivery time, then for ``dst`` to take them."""

    def __init__(self, src: socket.socket, dst: socket.socket | None) -> None:
        self.src, self.dst = src, dst
        self.pending: deque[tuple[float, bytes]] = deque()
        self.out = bytearray()
        self.queued = 0
        self.last_due = 0.0
        self.eof = False
        self.shut = False

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


class _Link:
    """One client connection and its upstream, served by one selector thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, blackholed: bool) -> None:
        self._proxy = proxy
        self._client = client
        self._blackholed = blackholed
        self._reset = False
        self._wakeup = _Wakeup()
        self.thread = threading.Thread(
            target=self._run, name=f"faultproxy-{proxy.port}-link", daemon=True
        )

    def blackhole(self) -> None:
        self._blackholed = True
        self._wakeup.wake()

    def reset(self) -> None:
        self._reset = True
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
                    _rst_close(sock)
            self._wakeup.close()
            self._proxy._forget(self)

    def _pump(self, upstream: socket.socket | None) -> bool:
        """Forward until both sides are done (True) or a side fails or is reset (False)."""
        to_up = _Direction(self._client, upstream)
        to_client = _Direction(upstream, self._client) if upstream is not None else None
        connect_deadline: float | None = time.monotonic() + _CONNECT_TIMEOUT
        connecting = upstream is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._wakeup.reader, selectors.EVENT_READ)
            registered: dict[socket.socket, int] = {}
            while True:
                if self._reset:
                    return False
                now = time.monotonic()
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
                wanted = self._interest(to_up, to_client, connecting)
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

    def _receive(self, direction: _Direction | None) -> None:
        assert direction is not None
        try:
            data = direction.src.recv(_CHUNK)
        except BlockingIOError:
            return
        if not data:
            direction.eof = True
        elif not self._blackholed:
            direction.push(data, time.monotonic() + self._proxy.latency)

    def _interest(
        self, to_up: _Direction, to_client: _Direction | None, connecting: bool
    ) -> dict[socket.socket, int]:
        wanted: dict[socket.socket, int] = {}
        for direction in (to_up, to_client):
            if direction is None:
                continue
            if not direction.eof and direction.queued < _MAX_QUEUED:
                wanted[direction.src] = wanted.get(direction.src, 0) | selectors.EVENT_READ
            if direction.out and direction.dst is not None and not connecting:
                wanted[direction.dst] = wanted.get(direction.dst, 0) | selectors.EVENT_WRITE
        upstream = to_up.dst
        if connecting and upstream is not None:
            wanted[upstream] = selectors.EVENT_WRITE  # writable = connected (or failed)
        return wanted

    @staticmethod
    def _timeout(
        now: float, to_up: _Direction, to_client: _Direction | None, deadline: float | None
    ) -> float | None:
        """Sleep until the next chunk is due, or while connecting until the deadline.

        While connecting nothing can be delivered: due chunks must not make us spin.
        """
        if deadline is not None:
            return max(0.0, deadline - now)
        dues = [d.next_due() for d in (to_up, to_client) if d is not None]
        times = [due for due in dues if due is not None]
        return max(0.0, min(times) - now) if times else None


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


class FaultProxy:
    """Forward ``listen_host:port`` to the upstream server, with switchable faults.

    ``set_mode()`` returns once the mode is in force: listening or not, and every
    connection it resets closed.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        if not 0 < upstream_port < 65536:
            raise ValueError(f"upstream port out of range: {upstream_port}")
        if not 0 <= listen_port < 65536:
            raise ValueError(f"listen port out of range: {listen_port}")
        self.upstream = (upstream_host, upstream_port)
        self.host = listen_host
        self._port = listen_port
        self._mode: Mode = "pass"
        self._latency = 0.0
        self._lock = threading.Condition()
        self._links: set[_Link] = set()
        self._generation = 0
        self._applied = 0
        self._listen_error: OSError | None = None
        self._state: Literal["new", "started", "closed"] = "new"
        self._wakeup: _Wakeup | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._state == "new":
            raise RuntimeError("FaultProxy.port is known only after start()")
        return self._port

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def latency(self) -> float:
        return self._latency

    @property
    def connection_count(self) -> int:
        """Open client connections, blackholed ones included."""
        with self._lock:
            return len(self._links)

    def start(self) -> None:
        """Listen (the port is then known) and serve in background threads."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"FaultProxy cannot start: it is {self._state}")
            listener = self._listen()
            self._port = listener.getsockname()[1]
            self._wakeup = _Wakeup()
            self._thread = threading.Thread(
                target=self._accept_loop, args=(listener, self._wakeup),
                name=f"faultproxy-{self._port}-accept", daemon=True,
            )
            self._state = "started"
            self._thread.start()
        logger.info("faultproxy %s:%d -> %s:%d", self.host, self._port, *self.upstream)

    def set_mode(self, mode: Mode) -> None:
        """Switch fault mode; see the module docstring for what each one does."""
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {_MODES}")
        with self._lock:
            if self._state == "closed":
                raise RuntimeError("FaultProxy is closed")
            self._mode = mode
            self._generation += 1
            generation = self._generation
            links = list(self._links)
            for link in links:
                if mode in ("reset", "refuse"):
                    link.reset()
                elif mode == "blackhole":
                    link.blackhole()
            if self._wakeup is not None:
                self._wakeup.wake()
                self._lock.wait_for(lambda: self._applied >= generation, _JOIN_TIMEOUT)
            error, self._listen_error = self._listen_error, None
        logger.info("faultproxy %d: mode %s", self._port, mode)
        if mode in ("reset", "refuse"):
            _join([link.thread for link in links])
        if error is not None:
            raise error

    def set_latency(self, seconds: float) -> None:
        """Delay each chunk by ``seconds`` in each direction (so a round trip by twice it)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {seconds!r}")
        self._latency = float(seconds)

    def url_for(self, url: str) -> str:
        """Return ``url`` with its host and port replaced by this proxy's."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a postgresql:// URL")
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = f"{host}:{self.port}"
        if "@" in parts.netloc:
            netloc = parts.netloc.rpartition("@")[0] + "@" + netloc
        return urlunsplit(parts._replace(netloc=netloc))

    def close(self) -> None:
        """Stop listening and reset every connection; returns within a few seconds."""
        with self._lock:
            if self._state == "closed":
                return
            was_started, self._state = self._state == "started", "closed"
            links = list(self._links)
            for link in links:
                link.reset()
            if self._wakeup is not None:
                self._wakeup.wake()
        if was_started:
            threads = [link.thread for link in links]
            _join([t for t in (self._thread, *threads) if t is not None])
        logger.info("faultproxy %d: closed", self._port)

    def __enter__(self) -> FaultProxy:
        if self._state == "new":
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FaultProxy({self.host}:{self._port} -> {self.upstream[0]}:{self.upstream[1]}, "
                f"mode={self._mode}, latency={self._latency})")

    def _listen(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Rebinding after "refuse" must not wait for old connections' TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _accept_loop(self, listener: socket.socket | None, wakeup: _Wakeup) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(wakeup.reader, selectors.EVENT_READ)
            if listener is not None:
                sel.register(listener, selectors.EVENT_READ)
            try:
                while True:
                    with self._lock:
                        if self._state == "closed":
                            return
                        listener = self._apply_listening(sel, listener)
                        self._applied = self._generation
                        self._lock.notify_all()
                    for key, _ in sel.select():
                        if key.fileobj is wakeup.reader:
                            wakeup.drain()
                        elif listener is not None:
                            self._accept(listener)
            finally:
                if listener is not None:
                    listener.close()
                wakeup.close()

    def _apply_listening(
        self, sel: selectors.BaseSelector, listener: socket.socket | None
    ) -> socket.socket | None:
        """Open or close the listener to match the mode; called with the lock held."""
        if self._mode == "refuse" and listener is not None:
            sel.unregister(listener)
            listener.close()  # the kernel resets connections still in the backlog
            return None
        if self._mode != "refuse" and listener is None:
            try:
                listener = self._listen()
            except OSError as exc:
                logger.error("faultproxy %d: cannot listen again: %s", self._port, exc)
                self._listen_error = exc
                return None
            sel.register(listener, selectors.EVENT_READ)
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: drop this round, keep serving
                logger.warning("faultproxy %d: accept failed: %s", self._port, exc)
                return
            # Decide and register under the lock, so set_mode() sees every link.
            with self._lock:
                if self._mode in ("reset", "refuse") or self._state == "closed":
                    _rst_close(client)
                    continue
                link = _Link(self, client, blackholed=self._mode == "blackhole")
                self._links.add(link)
                link.thread.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)


def _join(threads: list[threading.Thread]) -> None:
    """Join within one shared deadline: a stuck thread must not hang the caller."""
    deadline = time.monotonic() + _JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning("thread %s did not stop in time", thread.name)

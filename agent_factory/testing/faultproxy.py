"""A TCP proxy that injects network faults between a client and PostgreSQL.

Each mode reproduces what a client sees from a failing provider:

- ``pass``: bytes flow both ways, optionally delayed by ``set_latency()`` and
  limited to a bandwidth by ``set_rate()``.
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

import logging
import math
import selectors
import socket
import threading
import time
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from .faultlink import Link, Wakeup, rst_close

__all__ = ["FaultProxy", "Mode"]

logger = logging.getLogger("agent_factory.testing.faultproxy")

Mode = Literal["pass", "blackhole", "reset", "refuse"]
_MODES: tuple[Mode, ...] = ("pass", "blackhole", "reset", "refuse")
_JOIN_TIMEOUT = 2.0


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
        self._rate: float | None = None
        self._lock = threading.Condition()
        self._links: set[Link] = set()
        self._generation = 0
        self._applied = 0
        self._listen_error: OSError | None = None
        self._state: Literal["new", "started", "closed"] = "new"
        self._wakeup: Wakeup | None = None
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
    def rate(self) -> float | None:
        """Bytes per second allowed in each direction of each link; None: unlimited."""
        return self._rate

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
            self._wakeup = Wakeup()
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

    def blackhole_client(self, client_port: int) -> None:
        """Silence one open connection, the one whose client uses ``client_port``.

        Like a NAT or firewall that forgot that connection: its bytes are
        dropped from now on, while the other connections and new ones flow.
        """
        with self._lock:
            links = [link for link in self._links if link.client_port == client_port]
            if not links:
                raise ValueError(f"no open connection from client port {client_port}")
            for link in links:
                link.blackhole()

    def set_latency(self, seconds: float) -> None:
        """Delay each chunk by ``seconds`` in each direction (so a round trip by twice it)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {seconds!r}")
        self._latency = float(seconds)

    def set_rate(self, bytes_per_second: float | None) -> None:
        """Limit each direction of every link, open or new, to ``bytes_per_second``.

        Like a slow link, not a slow reader: the proxy reads from a sender only as
        the rate allows and queues little more than the latency keeps in flight, so
        the sender's own writes block and its kernel send queue drains slowly.
        ``None`` lifts the limit.
        """
        if bytes_per_second is not None and not (
            math.isfinite(bytes_per_second) and bytes_per_second > 0
        ):
            raise ValueError(f"rate must be a finite number > 0 or None, got {bytes_per_second!r}")
        with self._lock:
            self._rate = None if bytes_per_second is None else float(bytes_per_second)
            for link in self._links:
                link.wake()  # a link sleeping until its next token must see the change

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

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FaultProxy({self.host}:{self._port} -> {self.upstream[0]}:{self.upstream[1]}, "
                f"mode={self._mode}, latency={self._latency}, rate={self._rate})")

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

    def _accept_loop(self, listener: socket.socket | None, wakeup: Wakeup) -> None:
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
                client, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: drop this round, keep serving
                logger.warning("faultproxy %d: accept failed: %s", self._port, exc)
                return
            # Decide and register under the lock, so set_mode() sees every link.
            with self._lock:
                if self._mode in ("reset", "refuse") or self._state == "closed":
                    rst_close(client)
                    continue
                link = Link(self, client, blackholed=self._mode == "blackhole",
                            client_port=peer[1])
                self._links.add(link)
                link.thread.start()

    def _forget(self, link: Link) -> None:
        with self._lock:
            self._links.discard(link)


def _join(threads: list[threading.Thread]) -> None:
    """Join within one shared deadline: a stuck thread must not hang the caller."""
    deadline = time.monotonic() + _JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            logger.warning("thread %s did not stop in time", thread.name)

"""A client-side deadline that really interrupts a call blocked on a silent server.

libpq's timeouts do not cover a server that accepted TCP and then stopped
answering (SIGSTOP, a blackhole): a query waits forever. The watchdog keeps
the socket of every call in flight and, when the call's deadline passes,
shuts that socket down; the blocked psycopg call then fails at once with a
connection error, which the manager treats as the provider being down.

The unit is one *call*: one round of I/O psycopg performs on a connection
(a statement, a fetch from a server-side cursor or a stream, a COPY block,
COMMIT), watched from its start to its end by the pool's connection class
(see `provider.watched_wait`). Think time in a transaction, the gaps between
statements and a LISTEN waiting for notifications are not calls.

Two kinds of deadline:

* *liveness*: a call may take as long as it likes while it has news. The
  deadline is ``hang_timeout`` after the later of the call's start and its
  last news. What counts as news for a call:

  - its socket made progress. On Linux (TCP) its counters of bytes
    acknowledged by the peer and bytes received moved, sampled here for
    calls without other news — this also sees the tail of a large upload
    drain from the kernel's send queue while psycopg already waits for the
    answer. Elsewhere, psycopg was woken because bytes arrived or the kernel
    took more of the request (`provider.watched`);
  - a probe on a separate connection saw the call's server process at work
    (`vouches`): running, or waiting on a lock. A process that sits idle
    since the call was sent has answered and the answer was lost; one that
    is gone from ``pg_stat_activity`` has lost the connection; one idle
    since before the call was sent has not received it, which the socket
    decides on Linux and which counts as the server's liveness elsewhere;
  - behind a connection pooler (no backend to look at): a query that
    completed through the pooler, a probe or another call
    (`Liveness.last_alive`). The pooler answering with an error, or
    accepting a connection, proves nothing about the database behind it.

  When a call has waited ``probe_after`` without news, the watchdog asks
  its provider for a probe.
* *hard*: an absolute deadline, used for the probes themselves.

Either deadline is moved once when, at the moment it passes, the call's
answer (or the server's close) already waits unread in the socket: the
server answered, and the caller's thread has not run since — a busy machine
(a process with many threads, two cores shared with other work) can starve
it for seconds. Calling that a hang would be a false outage.

Firing is atomic with the call's end: a call's socket is shut down only
while the call is still in progress, and a call that ends meanwhile waits
for the shutdown to finish before its connection can go back to a pool, so
the next user of that connection (or of a reused file descriptor) is never
cut.

One daemon thread serves a whole manager; it starts on first use, holds no
manager-wide lock while shutting sockets, and stops on `close()`.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from psycopg import pq

logger = logging.getLogger("agent_factory.core.database_manager")

_ACTIVE = pq.TransactionStatus.ACTIVE

#: TCP_INFO's tcpi_bytes_acked and tcpi_bytes_received (Linux 4.1 and later).
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCP_COUNTERS = struct.Struct("=QQ")
_TCP_COUNTERS_AT = 120
#: Whether this platform gives the transport evidence (the README says what
#: the others fall back to).
TRANSPORT_EVIDENCE = _TCP_INFO is not None


class Liveness(Protocol):
    """What the watchdog needs to know about a provider."""

    name: str
    #: The last query that completed on the provider (monotonic seconds).
    last_alive: float
    hang_timeout: float
    #: Probes report on each watched call's server process (direct sessions,
    #: not behind a pooler), so a call's news is its own.
    tracks_backends: bool

    def request_probe(self, watch: Watch | None = None) -> None: ...


class Watch:
    """One call in flight.

    ``pgconn`` (data-path calls): the connection, whose server process a
    probe can look at and whose socket shows progress; its news is then
    ``alive``, rather than the provider's ``last_alive`` (direct sessions).
    """

    # What a call that ends in time never changes, as class defaults: the
    # per-statement path stores only what differs (see `Watchdog.watch_call`).
    probed = 0.0
    fired = False
    done = False
    pgconn: Any = None
    #: The call's server process (0: none known); read at the start, while
    #: the connection is surely open.
    pid = 0
    alive = 0.0
    #: The last TCP counters seen (None: not sampled yet or unavailable).
    tcp: int | None = None
    #: Set by the watchdog before it decides to shut the socket, and set
    #: (the event) once it is done: see `Watchdog._fire`.
    shutting: threading.Event | None = None
    #: The deadline was moved once because the answer sat unread (see `_fire`).
    extended = False

    def __init__(
        self, fd: int, started: float, target: Liveness, hard_deadline: float | None,
        pgconn: Any = None,
    ) -> None:
        self.fd = fd
        self.started = started
        self.target = target
        self.hard_deadline = hard_deadline
        if pgconn is not None:
            self.pgconn = pgconn
            self.pid = pgconn.backend_pid

    def news(self) -> float:
        """The call's last sign of life."""
        t = self.target
        if self.pgconn is not None and t.tracks_backends:
            return max(self.started, self.alive)
        return max(self.started, self.alive, t.last_alive)

    def deadline(self) -> float:
        if self.hard_deadline is not None:
            return self.hard_deadline
        return self.news() + self.target.hang_timeout

    def probe_due(self, probe_after: float) -> float | None:
        """When to ask for a probe, or None for hard deadlines."""
        if self.hard_deadline is not None:
            return None
        return max(self.news(), self.probed) + probe_after

    def waiting(self) -> bool:
        """The client waits for the server (not a LISTEN idling for notifications)."""
        pgconn = self.pgconn
        return pgconn is None or pgconn.transaction_status == _ACTIVE


#: A `Watch` without running its ``__init__`` (`Watchdog.watch_call` fills it in).
_call_watch = object.__new__


def vouches(
    state: str | None, idle_for: float | None, waited: float, present: bool, counted: bool
) -> bool:
    """Whether a probe's view of a call's server process is news for the call.

    ``present``: the process is in ``pg_stat_activity``; ``state`` and
    ``idle_for`` (seconds since its last state change, on the server's
    clock) as the probe read them; ``waited``: how long the call had been in
    progress when the probe was sent (client clock). Durations only, so the
    two clocks need not agree: ``idle_for < waited`` means the process went
    idle after the call began. ``counted``: the call's socket has TCP
    counters (Linux, TCP) that show its progress.
    """
    if not present:
        return False  # its server process is gone: the connection is lost
    if state is None or idle_for is None:
        return True  # not visible to the probing role: the server's liveness
    if not state.startswith("idle"):
        return True  # running, or waiting on a lock
    if idle_for < waited:
        return False  # it finished after the call was sent: the answer was lost
    # Idle since before the call was sent: the request has not arrived. Where
    # the socket's counters show its progress they decide; elsewhere nothing
    # tells a slow link from a lost request, so the server's liveness counts.
    return not counted


@contextmanager
def borrowed_socket(handle: int) -> Iterator[socket.socket | None]:
    """A socket object over a connection's socket ``handle``, never closing it (None: unusable).

    ``pgconn.socket`` is a file descriptor on POSIX but a Winsock SOCKET
    handle on Windows, which ``os.dup`` refuses; a socket object takes
    either. libpq owns the handle, so the object is detached, never closed.
    The family given does not matter for shutdown and getsockopt; it spares
    the lookups socket() would do to find it.
    """
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=handle)
    except (OSError, ValueError):  # closed, or not a socket at all
        yield None
        return
    try:
        yield s
    finally:
        s.detach()


def tcp_progress(fd: int) -> int | None:
    """Bytes the peer acknowledged plus bytes received on socket ``fd`` (Linux; else None)."""
    if _TCP_INFO is None:
        return None
    with borrowed_socket(fd) as s:
        if s is None:
            return None
        try:
            raw = s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
        except OSError:
            return None  # not TCP (a Unix socket) or closed
    if len(raw) < _TCP_COUNTERS_AT + _TCP_COUNTERS.size:
        return None
    acked, received = _TCP_COUNTERS.unpack_from(raw, _TCP_COUNTERS_AT)
    return int(acked + received)


def answer_waiting(handle: int) -> bool:
    """Whether bytes, or the peer's close, wait unread on socket ``handle``."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(handle, select.POLLIN)
        try:
            events = poller.poll(0)
        except OSError:
            return False
        return any(ev & (select.POLLIN | select.POLLHUP | select.POLLERR) for _, ev in events)
    with borrowed_socket(handle) as s:  # pragma: no cover - platforms without poll
        if s is None:
            return False
        try:
            readable, _, _ = select.select([s], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)


class Watchdog:
    """Shuts down the sockets of calls whose deadline passed.

    ``before_shutdown`` (tests): called with each call about to be
    abandoned, between the decision and the shutdown (the call, if it ends
    meanwhile, waits).
    """

    def __init__(
        self,
        *,
        probe_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe_after = probe_after
        # The thread wakes at least this often, so a new call never needs to
        # wake it (its first action is due probe_after later).
        self._tick = min(0.1, probe_after / 2)
        self._next_wake = 0.0
        self.clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.before_shutdown: Callable[[Watch], None] | None = None

    def watch(
        self, fd: int, target: Liveness, hard_deadline: float | None = None, *,
        pgconn: Any = None,
    ) -> Watch:
        """Watch a call on socket ``fd``; pass its ``pgconn`` so probes can vouch for it."""
        now = self.clock()
        w = Watch(fd, now, target, hard_deadline, pgconn)
        if self._closed:
            return w
        # set.add and set.discard are atomic under the GIL: no lock (and no
        # contention between caller threads) on the per-statement path.
        self._watches.add(w)
        due = now + self._probe_after if hard_deadline is None else hard_deadline
        if self._thread is None or due < self._next_wake:
            # Rare: the first call, or a deadline before the thread's next
            # wake (a probe). Otherwise it wakes by itself at least every tick.
            with self._cond:
                if self._thread is None:
                    self._start()
                self._cond.notify()
        return w

    def watch_call(self, pgconn: Any, target: Liveness, since: float | None = None) -> Watch:
        """Watch a data-path call on ``pgconn``: its socket and server process give news.

        ``since``: when the call really began, for one that goes on under a new
        wait (the drain of a hedged read that lost: its silence so far counts).
        `watch` in one frame, for the per-statement path: a call has no hard
        deadline, and its first action is due ``probe_after`` later, after the
        thread's next wake once it runs (it wakes by itself at least every tick).
        """
        w = _call_watch(Watch)
        w.fd = pgconn.socket
        w.started = self.clock() if since is None else since
        w.target = target
        w.hard_deadline = None
        w.pgconn = pgconn
        w.pid = pgconn.backend_pid
        if not self._closed:
            self._watches.add(w)
            if self._thread is None:
                with self._cond:
                    if self._thread is None:
                        self._start()
        return w

    def unwatch(self, w: Watch) -> None:
        """The call ended; if its socket is being shut down, wait for that to finish.

        No lock on this per-statement path: with `_fire`, a handshake of two
        flags (each side sets its own, then reads the other's; the GIL orders
        them), so that either the watchdog sees the call done and leaves its
        socket alone, or the call sees the shutdown coming and waits for it.
        """
        self._watches.discard(w)
        w.done = True
        shutting = w.shutting
        if shutting is not None:
            shutting.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._watches.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="agent-factory-watchdog", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            to_fire: list[Watch] = []
            to_probe: list[Watch] = []
            with self._cond:
                if self._closed:
                    return
                now = self.clock()
                wake = self._scan(now, to_fire, to_probe)
                if not to_fire and not to_probe:
                    tick = now + self._tick
                    self._next_wake = tick if wake is None else min(wake, tick)
                    self._cond.wait(max(self._next_wake - now, 0.001))
                    continue
            for w in to_probe:
                w.target.request_probe(w)
            for w in to_fire:
                self._fire(w)

    def _scan(self, now: float, to_fire: list[Watch], to_probe: list[Watch]) -> float | None:
        wake: float | None = None
        for w in list(self._watches):
            if w.hard_deadline is None:
                self._gather_news(w, now)
            due = w.deadline()
            if now >= due:
                self._watches.discard(w)
                to_fire.append(w)
                continue
            probe_at = w.probe_due(self._probe_after)
            if probe_at is not None:
                if now >= probe_at:
                    w.probed = now
                    to_probe.append(w)
                    probe_at = now + self._probe_after
                due = min(due, probe_at)
            wake = due if wake is None else min(wake, due)
        return wake

    def _gather_news(self, w: Watch, now: float) -> None:
        """The evidence this thread can see itself: the client idle, the socket moving."""
        if w.pgconn is None or now - w.news() < self._tick:
            return
        if not w.waiting():
            w.alive = now
            return
        if w.done:
            return
        # The fd may belong to another socket by now (the call just ended):
        # harmless, it only reads counters, and this call is gone anyway.
        seen = tcp_progress(w.fd)
        if seen is not None and w.tcp is not None and seen != w.tcp:
            w.alive = now
        w.tcp = seen

    def _fire(self, w: Watch) -> None:
        shutting = w.shutting = threading.Event()
        try:
            if w.done:
                return  # it ended meanwhile: its connection is someone else's now
            now = self.clock()
            if now < w.deadline():
                self._watches.add(w)  # news arrived since the scan
                return
            if not w.extended and answer_waiting(w.fd):
                # The server has answered (or closed the connection) and the
                # answer waits unread: this process, not the server, is slow —
                # a busy machine starving the calling thread. News, once per
                # call: a caller that still does not read is cut at the next
                # deadline.
                w.extended = True
                w.alive = now
                if w.hard_deadline is not None:
                    w.hard_deadline = now + w.target.hang_timeout
                self._watches.add(w)
                logger.info("provider %r answered a call its caller has not read yet; "
                            "giving the caller time", w.target.name,
                            extra={"event": "late_reader", "provider": w.target.name})
                return
            w.fired = True
            hook = self.before_shutdown
            if hook is not None:
                hook(w)
            _shutdown(w.fd, w.target.name)
        finally:
            w.shutting = None
            shutting.set()


def _shutdown(fd: int, provider: str) -> bool:
    """Shut the call's socket down so that the blocked call fails; False if it could not be."""
    logger.warning("provider %r gave no answer within its deadline; abandoning the call",
                   provider, extra={"event": "hang", "provider": provider})
    with borrowed_socket(fd) as s:
        if s is not None:
            try:
                s.shutdown(socket.SHUT_RDWR)
                return True
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    return True  # the peer is gone already: the call fails by itself
                error: object = exc
        else:
            error = "not a socket handle"
    # A hang detector that cannot interrupt must say so, not pass for working.
    logger.error("provider %r: could not shut down the socket of an abandoned call (%s); "
                 "the call stays blocked", provider, error,
                 extra={"event": "hang", "provider": provider})
    return False

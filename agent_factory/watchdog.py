"""A client-side deadline that really interrupts a call blocked on a silent server.

libpq's timeouts do not cover a server that accepted TCP and then stopped
answering (SIGSTOP, a blackhole): a query waits forever. The watchdog keeps
the socket of every call in flight and, when the call's deadline passes,
shuts that socket down; the blocked psycopg call then fails at once with a
connection error, which the manager treats as the provider being down.

Two kinds of deadline:

* *liveness*: a query may run as long as it likes while its server shows
  signs of life *for this call*. The deadline is ``hang_timeout`` after the
  later of the call's start and its last news. When a call has waited
  ``probe_after`` without news, the watchdog asks the provider for a probe on
  a separate connection. The probe answers for the server and, when the
  provider can tell (`Liveness.tracks_backends`), for the call's own server
  process: a live server whose process for this connection sits idle while
  the client waits has lost the call (a NAT or firewall that dropped the
  connection, bytes lost on the way), so that probe is no news for it.
  Without backend tracking (behind a connection pooler) any sign of life of
  the server counts.
* *hard*: an absolute deadline, used for the probes themselves.

One daemon thread serves a whole manager; it starts on first use, holds no
lock while shutting sockets, and stops on `close()`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from psycopg import pq

logger = logging.getLogger("agent_factory.core.database_manager")

_ACTIVE = pq.TransactionStatus.ACTIVE


class Liveness(Protocol):
    """What the watchdog needs to know about a provider."""

    name: str
    last_alive: float
    hang_timeout: float
    #: Probes report on each watched call's server process (direct sessions,
    #: not behind a pooler), so a call's news is its own.
    tracks_backends: bool

    def request_probe(self, watch: Watch | None = None) -> None: ...


class Watch:
    """One call in flight.

    ``pgconn`` (data-path calls on a direct session): the connection, whose
    server process a probe can look at; its news is then ``alive``, set by
    those probes, rather than the provider's ``last_alive``.
    """

    __slots__ = ("fd", "started", "target", "hard_deadline", "probed", "fired",
                 "pgconn", "pid", "alive")

    def __init__(
        self, fd: int, started: float, target: Liveness, hard_deadline: float | None,
        pgconn: Any = None,
    ) -> None:
        self.fd = fd
        self.started = started
        self.target = target
        self.hard_deadline = hard_deadline
        self.probed = 0.0
        self.fired = False
        self.pgconn = pgconn
        self.pid: int = pgconn.backend_pid if pgconn is not None else 0
        self.alive = 0.0

    def news(self) -> float:
        """The call's last sign of life."""
        t = self.target
        own = self.pgconn is not None and t.tracks_backends
        return max(self.started, self.alive if own else t.last_alive)

    def deadline(self) -> float:
        if self.hard_deadline is not None:
            return self.hard_deadline
        return self.news() + self.target.hang_timeout

    def probe_due(self, probe_after: float) -> float | None:
        """When to ask for a probe, or None for hard deadlines."""
        if self.hard_deadline is not None:
            return None
        return max(self.news(), self.probed) + probe_after

    def in_call(self) -> bool:
        """The client is waiting for an answer (not the application thinking in a transaction)."""
        pgconn = self.pgconn
        return pgconn is not None and pgconn.transaction_status == _ACTIVE


class Watchdog:
    """Shuts down the sockets of calls whose deadline passed."""

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
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(
        self, fd: int, target: Liveness, hard_deadline: float | None = None, *,
        pgconn: Any = None,
    ) -> Watch:
        """Watch a call on socket ``fd``; pass its ``pgconn`` so probes can vouch for it."""
        now = self._clock()
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

    def watch_call(self, pgconn: Any, target: Liveness) -> Watch:
        """Watch a data-path call on ``pgconn``: probes can vouch for its server process."""
        return self.watch(pgconn.socket, target, pgconn=pgconn)

    def unwatch(self, w: Watch) -> None:
        self._watches.discard(w)

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
                now = self._clock()
                wake = self._scan(now, to_fire, to_probe)
                if not to_fire and not to_probe:
                    tick = now + self._tick
                    self._next_wake = tick if wake is None else min(wake, tick)
                    self._cond.wait(max(self._next_wake - now, 0.001))
                    continue
            for w in to_probe:
                w.target.request_probe(w)
            for w in to_fire:
                _shutdown(w.fd, w.target.name)

    def _scan(self, now: float, to_fire: list[Watch], to_probe: list[Watch]) -> float | None:
        wake: float | None = None
        for w in list(self._watches):
            due = w.deadline()
            if now >= due:
                w.fired = True
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


def _shutdown(fd: int, provider: str) -> None:
    logger.warning("provider %r gave no answer within its deadline; abandoning the call", provider)
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


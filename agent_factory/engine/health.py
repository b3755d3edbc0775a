"""The health of one provider: breaker, liveness, latency, writability, prober.

Shared by the sync and async providers: it does its own I/O only on a
dedicated monitor connection, from a daemon prober thread (or the caller of
`probe()`), never on the caller's pool. A failure anywhere opens the
breaker (after ``failure_threshold`` failures in ``failure_window``); the
prober then probes every ``probe_interval`` until ``recovery_probes`` probes
in a row pass. While the provider is up it is probed every
``monitor_interval`` to measure latency and notice a demoted (read-only)
server, and on request of the watchdog when a call waits long.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg

from .hedge import is_suspect
from .lag import Lag, LagMonitor
from .latency import Latency
from .policy import Breaker
from .settings import ProviderSettings, Tuning
from .stats import HealthStats
from .watchdog import Watch, Watchdog, vouches

logger = logging.getLogger("agent_factory.core.database_manager")

HealthCallback = Callable[[str, bool, "str | None"], None]
# One round trip: role; (on a publisher) its WAL position and how far each
# subscriber of ours has received and applied (pg_current_wal_lsn() fails during
# recovery, hence the CASEs); our session's pid, to tell a direct session
# from a pooler's; and the state of each given server process (a waiting
# call's), with how long it has been in that state.
_PROBE = (
    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
    "CASE WHEN pg_is_in_recovery() THEN NULL ELSE (SELECT json_agg(json_build_array("
    "application_name, pg_wal_lsn_diff(write_lsn, '0/0')::bigint)) FROM pg_stat_replication "
    "WHERE application_name LIKE 'agent\\_factory\\_%%') END, pg_backend_pid(), "
    "(SELECT json_agg(json_build_array(pid, state, "
    "extract(epoch FROM clock_timestamp() - state_change)::float8)) "
    "FROM pg_stat_activity WHERE pid = ANY(%s::int4[])), CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint END"
)


class ProviderHealth:
    """Breaker, liveness and probes of one provider."""

    def __init__(
        self,
        target: ProviderSettings,
        tuning: Tuning,
        watchdog: Watchdog,
        *,
        on_change: HealthCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = target.name
        self.target = target
        self.tuning = tuning
        self.hang_timeout = tuning.hang_timeout
        self.breaker = Breaker(tuning.failure_threshold, tuning.failure_window)
        #: The last query that completed here (a probe or a call): the only
        #: proof that the database, not just a pooler in front of it, is alive.
        self.last_alive = 0.0
        #: Probes can vouch for each call's own server process (see watchdog):
        #: a direct session, confirmed by the probe; never behind a pooler.
        self.tracks_backends = False
        #: Failures of the prober's own work (failback gate, pool renewal).
        self.prober_errors = 0
        self.writable = True
        self.in_flight = 0
        self.waiting = 0
        self.errors = 0
        self.latency = Latency()
        #: When the watchdog last asked for a probe about a silent call, and when
        #: a probe last answered: the provider is suspect once the first is later by
        #: more than its usual probe round trip (hedged reads then go beyond their
        #: budget, see hedge.is_suspect).
        self.suspected_at = -1.0
        self.probed_at = -1.0
        #: The last failed pool connect: ends the waits that began before it,
        #: even while the breaker (threshold > 1) stays closed.
        self.connect_error: str | None = None
        self.connect_failed_at = -1.0
        self.connect_timeouts = 0  # timed-out connects left to a probe to judge
        #: Called (by the prober) just before the breaker closes, so that the
        #: I/O shell can replace its pool before traffic returns.
        self.before_recovery: Callable[[], None] | None = None
        #: The manager's failback: may veto this recovery (False: stay open and
        #: retry at the next probe); `after_recovery` always follows a True.
        self.gate_recovery: Callable[[str], bool] | None = None
        self.after_recovery: Callable[[str], None] | None = None
        #: Probes pass again but the failback's veto still holds the breaker
        #: open (the backups' changes are being brought back): the primary's
        #: data is a consistent history, a backup's may not be (see
        #: `Failover.route`). Its pool is already renewed.
        self.returning = False
        #: Replication lag of our subscribers, when this provider publishes.
        self.lag = LagMonitor()
        self._watchdog = watchdog
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._probe_wanted = False
        self._suspects: set[Watch] = set()
        self._prober: threading.Thread | None = None
        self._monitor: psycopg.Connection[Any] | None = None
        self._closed = False
        self.conninfo = target.conninfo(
            connect_timeout=str(max(2, math.ceil(tuning.connect_timeout)))
        )
        if tuning.monitor_interval > 0:
            # A first probe at once: the monitor connection is open (and
            # whether calls can be vouched for one by one is known) before a
            # slow link or a hang makes opening it slow.
            self._wake_prober(want_probe=True)

    # -- state seen by the data path --------------------------------------------

    @property
    def replication(self) -> dict[str, Lag]:
        """Our subscribers' last lag, when this provider publishes (see `lag`)."""
        return self.lag.replication

    @property
    def subscribers(self) -> set[str]:
        return self.lag.subscribers

    @property
    def latency_ewma(self) -> float | None:
        return self.latency.ewma

    @property
    def suspect(self) -> bool:
        """A call has waited without news and the probe asked for then is overdue
        (`hedge.is_suspect`: a slow but live server answers it, a hung one does not)."""
        at = self.suspected_at
        if at <= self.probed_at:
            return False
        return is_suspect(at, self.probed_at, self._clock(), self.latency.recent_p99,
                       self.tuning.hang_timeout)

    @property
    def up(self) -> bool:
        return self.breaker.up

    @property
    def last_error(self) -> str | None:
        return self.breaker.last_error

    def mark_down(self, reason: str) -> None:
        """Record a failure; the breaker may open (logged, reported)."""
        with self._lock:
            self.errors += 1
            self.returning = False
            opened = self.breaker.fail(reason, self._clock())
        if opened:
            logger.warning("provider %r is down: %s", self.name, reason,
                           extra={"event": "provider_down", "provider": self.name})
            self._notify(False, reason)
        self._wake_prober(want_probe=False)

    def mark_read_only(self, reason: str) -> None:
        """The server refused a write: send writes elsewhere until a probe says otherwise."""
        if self.writable:
            logger.warning("provider %r is read-only: %s", self.name, reason,
                           extra={"event": "provider_read_only", "provider": self.name})
        self.writable = False
        self.request_probe()

    def failure_reason(self, exc: BaseException, hung: bool = False) -> str:
        if hung:
            return f"no answer within {self.hang_timeout:g}s (server hung or unreachable)"
        text = str(exc).strip()
        return self.redact(text.splitlines()[0] if text else type(exc).__name__)

    def redact(self, text: str) -> str:
        password = self.target.password
        return text.replace(password, "***") if password else text

    def connected(self) -> None:
        """A pool's connection attempt succeeded: proof of life, unless through a pooler."""
        if not self.target.pooler:
            self.last_alive = self._clock()

    def connect_failed(self, exc: BaseException) -> None:
        """A pool's connection attempt failed (reported by the I/O shell)."""
        if self._closed:
            return
        reason = self.failure_reason(exc)
        self.connect_error = reason
        if (isinstance(exc, psycopg.errors.ConnectionTimeout) and self._monitor is not None
                and self.up):
            # Slow, not refused: a busy machine or a saturated link can make a
            # login outlast connect_timeout while the server answers. The open
            # monitor connection decides within hang_timeout; a hung or cut
            # server fails that probe and is marked down by it.
            logger.info("connecting to provider %r timed out (%s); probing it before "
                        "calling it down", self.name, reason,
                        extra={"event": "connect_timeout", "provider": self.name})
            self.connect_timeouts += 1
            self.request_probe()
            return
        self.connect_failed_at = self._clock()
        self.mark_down(reason)

    def _notify(self, up: bool, reason: str | None) -> None:
        if self._on_change is not None:
            self._on_change(self.name, up, reason)

    # -- probes ------------------------------------------------------------------

    def health_check(self, *, max_age: float | None = None) -> bool:
        """Cached health, re-probed when older than ``health_ttl`` (or max_age)."""
        ttl = self.tuning.health_ttl if max_age is None else max_age
        b = self.breaker
        if b.checked and self._clock() - b.last_check < ttl:
            return b.up
        self.probe()
        return self.breaker.up

    def probe(self) -> bool:
        """One bounded probe on the monitor connection: liveness, latency, role."""
        with self._probe_lock:
            if self._closed:
                return False
            t0 = self._clock()
            try:
                conn = self._monitor or self._connect_monitor()  # bounded by connect_timeout
                # The deadline covers the answer, not the connect: a slow but
                # live link is not a hang.
                with self._cond:
                    suspects, self._suspects = self._suspects, set()
                t0 = self._clock()
                sent = self._watchdog.clock()
                w = self._watchdog.watch(conn.pgconn.socket, self, sent + self.hang_timeout)
                try:
                    row = conn.execute(_PROBE, ([s.pid for s in suspects],)).fetchone()
                finally:
                    self._watchdog.unwatch(w)
                if w.fired:
                    # Cut as the answer was being read: the answer counts, the
                    # shut connection is not used again.
                    self._drop_monitor()
            except psycopg.Error as exc:
                # An error, even with a SQLSTATE, is no proof of life: behind a
                # pooler it may be the pooler's own ("server login has been failing").
                self._drop_monitor()
                hung = self._clock() - t0 >= self.hang_timeout
                self.mark_down(self.failure_reason(exc, hung))
                return False
            now = self._clock()
            self.last_alive = now
            self.probed_at = now
            if row is not None:
                self.tracks_backends = (
                    not self.target.pooler and row[3] == conn.pgconn.backend_pid
                )
                if self.tracks_backends:
                    _vouch(suspects, row[4] or [], sent, self._watchdog.clock())
        if row is not None and not row[0]:
            self.lag.record(row[2] or [], row[5], now)
        self.latency.record(now - t0)
        self._set_writable(row is not None and not row[0] and row[1] == "off")
        self._probe_passed(now - t0)
        return True

    def _set_writable(self, writable: bool) -> None:
        if writable != self.writable:
            state = "writable again" if writable else "read-only (in recovery or demoted)"
            event = "provider_writable" if writable else "provider_read_only"
            logger.warning("provider %r is %s", self.name, state,
                           extra={"event": event, "provider": self.name})
        self.writable = writable

    def _probe_passed(self, latency: float) -> None:
        required = self.tuning.recovery_probes
        if not self.breaker.closes_on_next_success(required):
            with self._lock:
                self.breaker.succeed(self._clock(), latency, required)
            return
        gate = self.gate_recovery
        if gate is not None:
            if not self.returning:
                # Reads come back before the gate lets writes back (see
                # `returning`): they get the fresh pool now.
                with self._lock:
                    self._renew_pool()
                    self.returning = True
            if not self._run_gate(gate):
                return  # stays half-open; the next probe tries again
        try:
            with self._lock:
                if gate is None:
                    self._renew_pool()
                closed = self.breaker.succeed(self._clock(), latency, required)
                self.returning = False
            if closed:
                logger.warning("provider %r is healthy again (%d consecutive probes)",
                               self.name, required,
                               extra={"event": "provider_up", "provider": self.name})
                self._notify(True, None)
        finally:
            if gate is not None and self.after_recovery is not None:
                self.after_recovery(self.name)

    def _renew_pool(self) -> None:
        if self.before_recovery is not None:
            # A fresh pool before traffic returns: connections from before the
            # outage may sit on a dead or blackholed socket.
            self.before_recovery()

    def _run_gate(self, gate: Callable[[str], bool]) -> bool:
        """The failback's veto; a failure in it vetoes (logged, counted) and resumes writes."""
        try:
            return gate(self.name)
        except Exception:
            self.prober_errors += 1
            logger.exception("failback before %r takes traffic failed; retrying at the next "
                             "probe", self.name,
                             extra={"event": "failback_failed", "provider": self.name})
            if self.after_recovery is not None:
                self.after_recovery(self.name)  # never leave writes paused
            return False

    def request_probe(self, watch: Watch | None = None) -> None:
        """Ask the prober thread for a probe soon (non-blocking), to vouch for ``watch``."""
        if watch is not None and watch.pgconn is not None:
            self.suspected_at = self._clock()
            with self._cond:
                self._suspects.add(watch)
        self._wake_prober(want_probe=True)

    def _wake_prober(self, *, want_probe: bool) -> None:
        with self._cond:
            if self._closed:
                return
            self._probe_wanted = self._probe_wanted or want_probe
            if self._prober is None:
                self._prober = threading.Thread(
                    target=_probe_loop,
                    args=(weakref.ref(self),),
                    name=f"agent-factory-prober-{self.name}",
                    daemon=True,
                )
                self._prober.start()
            self._cond.notify()

    def _next_probe(self) -> bool:
        """Wait until a probe is due; False when closed.

        While up: on request (the watchdog asks when a call waits long) or
        every ``monitor_interval``. While down: every ``probe_interval``
        whatever was requested, so ``recovery_probes`` good probes really
        span that much time.
        """
        with self._cond:
            if self.breaker.up:
                every = self.tuning.monitor_interval or None
                deadline = None if every is None else self._clock() + every
                while not (self._probe_wanted or self._closed or not self.breaker.up):
                    left = None if deadline is None else deadline - self._clock()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
            else:
                deadline = self._clock() + self.tuning.probe_interval
                while not self._closed and (left := deadline - self._clock()) > 0:
                    self._cond.wait(left)
            self._probe_wanted = False
            return not self._closed

    def _connect_monitor(self) -> psycopg.Connection[Any]:
        # No prepared statements: preparing costs the fifth probe a round trip.
        self._monitor = psycopg.Connection.connect(
            self.conninfo, autocommit=True, prepare_threshold=None
        )
        return self._monitor

    def _drop_monitor(self) -> None:
        conn, self._monitor = self._monitor, None
        if conn is not None:
            conn.close()

    # -- introspection and lifecycle ---------------------------------------------

    def stats(self) -> HealthStats:
        b = self.breaker
        return {
            "healthy": b.up,
            "breaker": b.state.value,
            "writable": self.writable,
            "last_error": b.last_error,
            "consecutive_failures": b.consecutive_failures,
            "errors": self.errors,
            "last_latency_ms": _ms(b.last_latency),
            "latency_avg_ms": _ms(self.latency.ewma),
            "latency_p99_ms": _ms(self.latency.p99()),
            "in_flight": self.in_flight,
            "pool_waiting": self.waiting,
            "weight": self.tuning.weight,
            "serverless": self.tuning.serverless,
            "per_call_hang_check": self.tracks_backends,
            "prober_errors": self.prober_errors,
            "checked": b.checked,
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=self.hang_timeout + self.tuning.connect_timeout + 1.0)
        with self._probe_lock:
            self._drop_monitor()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)


def _vouch(suspects: set[Watch], rows: list[list[Any]], sent: float, now: float) -> None:
    """News for each waiting call whose server process the probe saw at work (see watchdog)."""
    seen = {int(pid): (state, idle_for) for pid, state, idle_for in rows}
    for w in suspects:
        state, idle_for = seen.get(w.pid, (None, None))
        if vouches(state, idle_for, sent - w.started, w.pid in seen, w.tcp is not None):
            w.alive = now


def _probe_loop(ref: weakref.ReferenceType[ProviderHealth]) -> None:
    # Holds only a weak reference between probes, so a forgotten provider is
    # collected and this thread ends. Nothing the probe runs (the failback
    # gate, a pool renewal) may end it: an error is logged, counted, and the
    # next probe tries again.
    while True:
        health = ref()
        if health is None or not health._next_probe():
            return
        try:
            health.probe()
        except Exception:
            health.prober_errors += 1
            logger.exception("probe of %r failed; retrying at the next probe", health.name,
                             extra={"event": "probe_failed", "provider": health.name})
        del health

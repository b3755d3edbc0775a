"""One provider: its connection pool, its health, and its liveness probe.

The I/O shell around `policy.Health`. A failure anywhere (a query, a pool
connection attempt, a probe) marks the provider down at once; a daemon
prober thread then probes it every ``probe_interval`` on a dedicated
connection until it passes ``recovery_probes`` probes in a row, and the pool
is renewed so no connection from before the outage is reused.
"""

from __future__ import annotations

import logging
import math
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import psycopg
from psycopg import pq
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from .errors import HangTimeoutError, OutcomeUnknownError, ProviderUnavailableError
from .policy import Health, Kind, classify, may_retry_after_send
from .settings import ProviderSettings, Settings
from .watchdog import Watchdog

logger = logging.getLogger("agent_factory.core.database_manager")

Fetch = Callable[[psycopg.Cursor[Any]], Any]
FetchMode = Literal["all", "one", "none"]
HealthCallback = Callable[["DatabaseProvider", bool, "str | None"], None]

# How often a caller waiting for a pooled connection looks whether the
# provider went down meanwhile (a pool connection attempt failed): first
# after 20 ms, then at doubling intervals up to 250 ms.
_FIRST_SLICE = 0.02
_MAX_SLICE = 0.25


def _fetch_all(cur: psycopg.Cursor[Any]) -> Any:
    return cur.fetchall() if cur.description is not None else []


def _fetch_one(cur: psycopg.Cursor[Any]) -> Any:
    return cur.fetchone() if cur.description is not None else None


def _fetch_none(cur: psycopg.Cursor[Any]) -> None:
    return None


FETCHERS: dict[str, Fetch] = {"all": _fetch_all, "one": _fetch_one, "none": _fetch_none}


class Unavailable(Exception):
    """Internal: the provider could not serve; ``sent`` says if the statement left."""

    def __init__(self, reason: str, *, sent: bool, hung: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.hung = hung


class DatabaseProvider:
    """A named PostgreSQL target with a pool, health state and a prober.

    ``DatabaseProvider(name, url)`` works alone (original API); the manager
    passes its shared settings and watchdog.
    """

    def __init__(
        self,
        name: str,
        connection_string: str | ProviderSettings,
        *,
        settings: Settings | None = None,
        watchdog: Watchdog | None = None,
        on_health_change: HealthCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if isinstance(connection_string, ProviderSettings):
            target = connection_string
        else:
            target = Settings.build({name: connection_string}).providers[name]
        self.name = name
        self.target = target
        self._settings = settings or Settings(
            providers={name: target}, primary=name, failover_order=(name,)
        )
        s = self._settings
        self.hang_timeout = s.hang_timeout
        self._clock = clock
        self._own_watchdog = watchdog is None
        self._watchdog = watchdog or Watchdog(probe_after=s.hang_timeout / 4, clock=clock)
        self._on_change = on_health_change
        self.health = Health()
        self.last_alive = 0.0
        self.errors = 0
        self._waiting = 0
        self._generation = 0
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._probe_wanted = False
        self._prober: threading.Thread | None = None
        self._monitor: psycopg.Connection[Any] | None = None
        self._closed = False
        self._conninfo = target.conninfo(connect_timeout=str(max(2, math.ceil(s.connect_timeout))))
        self._pool = self._new_pool()

    # -- data path -----------------------------------------------------------

    def run(self, query: Any, params: Any, fetch: Fetch) -> Any:
        """Run one statement in autocommit mode; raise `Unavailable` or the SQL error."""
        pool, conn = self.checkout()
        w = self._watchdog.watch(conn.pgconn.socket, self)
        try:
            result = fetch(conn.execute(query, params))
        except psycopg.Error as exc:
            if classify(exc) is Kind.SQL:
                self.tag(exc)
                raise
            raise Unavailable(self.failure_reason(exc, w.fired), sent=True, hung=w.fired) from exc
        finally:
            self._watchdog.unwatch(w)
            pool.putconn(conn)
        self.last_alive = self._clock()
        return result

    def execute_query(
        self, query: Any, params: Any = None, fetch_mode: FetchMode = "all"
    ) -> Any:
        """Run one statement on this provider only (no failover)."""
        fetch = FETCHERS.get(fetch_mode)
        if fetch is None:
            raise ValueError(f"fetch_mode must be 'all', 'one' or 'none', got {fetch_mode!r}")
        try:
            return self.run(query, params, fetch)
        except Unavailable as exc:
            self.mark_down(exc.reason)
            if exc.sent and not may_retry_after_send(query, None, None):
                raise OutcomeUnknownError(self.name, exc.reason) from exc.__cause__
            error = HangTimeoutError if exc.hung else ProviderUnavailableError
            raise error(self.name, exc.reason) from exc.__cause__

    def checkout(self) -> tuple[ConnectionPool[Any], psycopg.Connection[Any]]:
        """A live pooled connection, or `Unavailable` (never sent) within the deadline."""
        pool = self._pool
        try:
            conn = pool.getconn(timeout=_FIRST_SLICE)
        except (PoolTimeout, PoolClosed):
            return self._checkout_slow()
        if _is_dead(conn):
            pool.putconn(conn)
            return self._checkout_slow()
        return pool, conn

    def _checkout_slow(self) -> tuple[ConnectionPool[Any], psycopg.Connection[Any]]:
        # Wait in growing slices so that a provider marked down meanwhile (a
        # pool connect failed) ends the wait early; each timed-out slice
        # leaves a stale waiter in psycopg_pool's queue, hence not too many.
        deadline = self._clock() + self._settings.checkout_timeout
        slice_ = _FIRST_SLICE
        with self._lock:
            self._waiting += 1
        try:
            while True:
                pool = self._pool
                try:
                    conn = pool.getconn(timeout=slice_)
                except PoolTimeout:
                    if not self.health.up:
                        raise Unavailable(self.health.last_error or "down", sent=False) from None
                    if self._clock() >= deadline:
                        raise Unavailable(
                            f"no connection within {self._settings.checkout_timeout:g}s "
                            "(pool exhausted or server not answering)",
                            sent=False,
                        ) from None
                    slice_ = min(slice_ * 2, _MAX_SLICE)
                    continue
                except PoolClosed:
                    if self._closed or pool is self._pool:
                        raise Unavailable("closed", sent=False) from None
                    continue
                if _is_dead(conn):
                    # Closed by the server while idle (crash, restart, idle
                    # timeout). The pool replaces it; a failed reconnect
                    # marks the provider down and ends the wait above.
                    pool.putconn(conn)
                    continue
                return pool, conn
        finally:
            with self._lock:
                self._waiting -= 1

    def tag(self, exc: BaseException) -> None:
        """Name the provider on an error that propagates unchanged."""
        exc.provider = self.name  # type: ignore[attr-defined]
        if sys.version_info >= (3, 11):
            exc.add_note(f"(on database provider {self.name!r})")

    def failure_reason(self, exc: BaseException, hung: bool = False) -> str:
        if hung:
            return f"no answer within {self.hang_timeout:g}s (server hung or unreachable)"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return self.redact(text)

    def redact(self, text: str) -> str:
        password = self.target.password
        return text.replace(password, "***") if password else text

    # -- health --------------------------------------------------------------

    def mark_down(self, reason: str) -> None:
        with self._lock:
            self.errors += 1
            changed = self.health.fail(reason, self._clock())
        if changed:
            logger.warning("provider %r is down: %s", self.name, reason)
            self._notify(False, reason)
        self._wake_prober(want_probe=False)

    def _mark_probe_ok(self, latency: float) -> None:
        required = self._settings.recovery_probes
        with self._lock:
            h = self.health
            old = None
            if not h.up and h.probe_successes + 1 >= required:
                # Fresh pool before traffic returns: connections from before
                # the outage may sit on a dead or blackholed socket.
                old, self._pool = self._pool, self._new_pool()
            changed = h.succeed(self._clock(), latency, required)
        if changed:
            logger.warning(
                "provider %r is healthy again (%d consecutive probes)", self.name, required
            )
            self._notify(True, None)
        if old is not None:
            old.close(timeout=1.0)

    def _notify(self, up: bool, reason: str | None) -> None:
        if self._on_change is not None:
            self._on_change(self, up, reason)

    def health_check(self, *, max_age: float | None = None) -> bool:
        """Cached health, re-probed when older than ``health_ttl`` (or max_age)."""
        ttl = self._settings.health_ttl if max_age is None else max_age
        h = self.health
        if h.checked and self._clock() - h.last_check < ttl:
            return h.up
        self.probe()
        return self.health.up

    def probe(self) -> bool:
        """One bounded liveness probe (``SELECT 1``) on the monitor connection."""
        with self._probe_lock:
            if self._closed:
                return False
            t0 = self._clock()
            try:
                conn = self._monitor or self._connect_monitor()
                w = self._watchdog.watch(conn.pgconn.socket, self, t0 + self.hang_timeout)
                try:
                    conn.execute("SELECT 1").fetchone()
                finally:
                    self._watchdog.unwatch(w)
            except psycopg.Error as exc:
                self._drop_monitor()
                if exc.sqlstate:  # the server answered: alive, but not usable
                    self.last_alive = self._clock()
                hung = self._clock() - t0 >= self.hang_timeout
                self.mark_down(self.failure_reason(exc, hung))
                return False
            now = self._clock()
            self.last_alive = now
        self._mark_probe_ok(now - t0)
        return True

    def request_probe(self) -> None:
        """Ask the prober thread for a probe soon (non-blocking)."""
        self._wake_prober(want_probe=True)

    def _wake_prober(self, *, want_probe: bool) -> None:
        # A down provider is probed every probe_interval anyway; waking the
        # prober makes it switch from idle waiting to that cadence.
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

        While up, probes run on request only (the watchdog asks when a call
        waits long). While down, probes are spaced by ``probe_interval``
        whatever was requested, so ``recovery_probes`` good probes really
        span that much time.
        """
        with self._cond:
            if self.health.up:
                while not (self._probe_wanted or self._closed or not self.health.up):
                    self._cond.wait()
            else:
                deadline = self._clock() + self._settings.probe_interval
                while not self._closed and (left := deadline - self._clock()) > 0:
                    self._cond.wait(left)
            self._probe_wanted = False
            return not self._closed

    def _connect_monitor(self) -> psycopg.Connection[Any]:
        self._monitor = psycopg.Connection.connect(self._conninfo, autocommit=True)
        return self._monitor

    def _drop_monitor(self) -> None:
        conn, self._monitor = self._monitor, None
        if conn is not None:
            conn.close()

    # -- pool ----------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool[Any]:
        s = self._settings
        self._generation += 1
        pool: ConnectionPool[Any] = ConnectionPool(
            self._conninfo,
            connection_class=_observed_class(self, self._generation),
            kwargs={"autocommit": True},
            min_size=s.pool_min_size,
            max_size=s.pool_max_size,
            timeout=s.checkout_timeout,
            name=f"agent-factory-{self.name}",
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _connect_failed(self, generation: int, exc: BaseException) -> None:
        # A connect started by a pool replaced since (at recovery) says
        # nothing about the provider now.
        if self._closed or generation != self._generation:
            return
        if isinstance(exc, psycopg.Error) and exc.sqlstate:
            self.last_alive = self._clock()
        self.mark_down(self.failure_reason(exc))

    def _connected(self) -> None:
        self.last_alive = self._clock()

    # -- introspection and lifecycle ------------------------------------------

    @property
    def pool_active(self) -> bool:
        return not self._closed and not self._pool.closed

    def stats(self) -> dict[str, Any]:
        h = self.health
        p = self._pool.get_stats()
        return {
            "healthy": h.up,
            "connection_string_host": self.target.host,
            "port": self.target.port,
            "database": self.target.params.get("dbname", ""),
            "pool_active": self.pool_active,
            "pool_size": p.get("pool_size", 0),
            "pool_idle": p.get("pool_available", 0),
            "pool_waiting": self._waiting,
            "pool_max": self._settings.pool_max_size,
            "last_error": h.last_error,
            "consecutive_failures": h.consecutive_failures,
            "errors": self.errors,
            "last_latency_ms": None if h.last_latency is None else round(h.last_latency * 1e3, 3),
            "checked": h.checked,
        }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            prober = self._prober
        if prober is not None and prober is not threading.current_thread():
            prober.join(timeout=self.hang_timeout + self._settings.connect_timeout + 1.0)
        with self._probe_lock:
            self._drop_monitor()
        self._pool.close(timeout=1.0)
        if self._own_watchdog:
            self._watchdog.close()

    def __repr__(self) -> str:
        state = "up" if self.health.up else "down"
        return f"<DatabaseProvider {self.name!r} {self.target.describe()} {state}>"


def _probe_loop(ref: weakref.ReferenceType[DatabaseProvider]) -> None:
    # Holds only a weak reference between probes, so a forgotten provider is
    # collected and this thread ends.
    while True:
        provider = ref()
        if provider is None or not provider._next_probe():
            return
        provider.probe()
        del provider


def _is_dead(conn: psycopg.Connection[Any]) -> bool:
    """True when an idle connection was closed by the server (no round trip)."""
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return True
    readable, _, _ = select.select([pgconn.socket], [], [], 0)
    if not readable:
        return False
    try:
        pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return pgconn.status != pq.ConnStatus.OK


def _observed_class(provider: DatabaseProvider, generation: int) -> type[psycopg.Connection[Any]]:
    """A connection class that tells the provider how one pool's connects go."""
    ref = weakref.ref(provider)

    class ObservedConnection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = super().connect(conninfo, **kwargs)
            except Exception as exc:
                p = ref()
                if p is not None:
                    p._connect_failed(generation, exc)
                raise
            p = ref()
            if p is not None:
                p._connected()
            return conn

    return ObservedConnection

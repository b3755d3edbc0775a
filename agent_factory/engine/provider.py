"""One provider for the sync manager: its connection pool around a `ProviderHealth`.

The I/O shell: checkout of a live pooled connection within a deadline, one
statement under the watchdog, and translation of a failure into
`Unavailable` (try elsewhere) or the SQL error (raise unchanged). The pool is
replaced when the provider recovers, so no connection from before an outage
is reused.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Literal

import psycopg
from psycopg import pq
from psycopg.abc import RV, PQGen
from psycopg.errors import _WaitTimeout as WaitTimeout
from psycopg.generators import fetch_many
from psycopg.rows import RowFactory
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ..errors import HangTimeoutError, OutcomeUnknownError, ProviderUnavailableError
from .connections import (
    JOURNAL_LOCAL,
    ConnectionSetup,
    journal_switch,
    pool_kwargs,
    send,
    setup_for,
    still_current,
)
from .health import HealthCallback, ProviderHealth
from .hedge import CANCEL_TIMEOUT, TICK, HedgeLost, Side, raced
from .policy import Kind, classify, may_retry_after_send
from .settings import ProviderSettings, Settings
from .stats import ShellStats, pool_stats
from .watchdog import Watch, Watchdog, tcp_progress

Fetch = Callable[[psycopg.Cursor[Any]], Any]
FetchMode = Literal["all", "one", "none"]

# A caller waiting for a pooled connection looks whether the provider went
# down meanwhile (a pool connection attempt failed): first after 20 ms, then
# at doubling intervals up to 250 ms. Each timed-out wait leaves a stale
# waiter in psycopg_pool's queue (skipped later), hence not too many.
FIRST_SLICE = 0.02
MAX_SLICE = 0.25


_ROWS = pq.ExecStatus.TUPLES_OK


# `pgresult.status` rather than `description`, which builds column objects.
def _fetch_all(cur: psycopg.Cursor[Any]) -> Any:
    res = cur.pgresult
    return cur.fetchall() if res is not None and res.status == _ROWS else []


def _fetch_one(cur: psycopg.Cursor[Any]) -> Any:
    res = cur.pgresult
    return cur.fetchone() if res is not None and res.status == _ROWS else None


def _fetch_none(cur: psycopg.Cursor[Any]) -> None:
    return None


FETCHERS: dict[str, Fetch] = {"all": _fetch_all, "one": _fetch_one, "none": _fetch_none}


def fetcher(fetch_mode: str) -> Fetch:
    fetch = FETCHERS.get(fetch_mode)
    if fetch is None:
        raise ValueError(f"fetch_mode must be 'all', 'one' or 'none', got {fetch_mode!r}")
    return fetch


class Unavailable(Exception):
    """Internal: the provider could not serve.

    ``sent``: the statement may have been applied there. ``down``: the
    provider is unavailable (a read-only refusal is not). ``busy``: its pool
    had no free connection in time -- the client's own load, not an outage.
    """

    def __init__(self, reason: str, *, sent: bool, hung: bool = False, down: bool = True,
                 busy: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.hung = hung
        self.down = down
        self.busy = busy


def translate(health: ProviderHealth, exc: psycopg.Error, hung: bool) -> Unavailable:
    """The one place where a driver error becomes a failover decision (or not)."""
    kind = classify(exc)
    if kind is Kind.SQL:
        tag(exc, health.name)
        raise exc
    if kind is Kind.READ_ONLY:
        reason = health.failure_reason(exc)
        health.mark_read_only(reason)
        return Unavailable(reason, sent=False, down=False)
    return Unavailable(health.failure_reason(exc, hung), sent=True, hung=hung)


def tag(exc: BaseException, provider: str) -> None:
    """Name the provider on an error that propagates unchanged."""
    exc.provider = provider  # type: ignore[attr-defined]
    if sys.version_info >= (3, 11):
        exc.add_note(f"(on database provider {provider!r})")


def standalone(name: str, connection_string: str | ProviderSettings) -> Settings:
    """Settings for a provider used on its own (the original API)."""
    if isinstance(connection_string, ProviderSettings):
        target = connection_string
    else:
        target = Settings.build({name: connection_string}).providers[name]
    return Settings(providers={name: target}, primary=name, failover_order=(name,))


class DatabaseProvider:
    """A named PostgreSQL target: a pool of autocommit connections and its health.

    ``DatabaseProvider(name, url)`` works alone (original API); the manager
    passes its settings and shared watchdog.
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
        s = settings or standalone(name, connection_string)
        self.name = name
        self.target = s.providers[name]
        self.tuning = s.tuning(name)
        self._clock = clock
        self._own_watchdog = watchdog is None
        self._watchdog = watchdog or Watchdog(probe_after=self.tuning.hang_timeout / 4)
        self.health = ProviderHealth(
            self.target, self.tuning, self._watchdog, on_change=on_health_change, clock=clock
        )
        self.health.before_recovery = self._renew_pool
        self.setup = setup_for(name, self.tuning.configure, self.health)
        self._generation = 0
        self._closed = False
        self._pool = self._new_pool()

    # -- data path -------------------------------------------------------------------

    def run(self, query: Any, params: Any, fetch: Fetch, *, journal: bool | None = None,
            row_factory: RowFactory[Any] | None = None, race: Side | None = None) -> Any:
        """Run one statement in autocommit mode; raise `Unavailable` or the SQL error.

        ``journal``: a write that the backup's journal records (True), or a
        write that it must not (False); None for a read. ``row_factory``:
        this call's, instead of the connection's. ``race``: a hedged read's
        side (`HedgeLost` when the other side answered first; the call is
        then cancelled and its connection given back in the background).
        """
        conn: Any  # an ObservedConnection: its race is set below
        pool, conn = self.checkout(race)
        health = self.health
        health.in_flight += 1
        lost = False
        if race is not None:
            conn.race = race  # its wait looks at the race (see hedge.Side)
        try:
            if journal is None:  # a read: no journal state to set
                result = fetch(conn.execute(query, params) if row_factory is None
                               else send(conn, query, params, row_factory))
            elif journal and self.tuning.pooler:
                # Session state does not outlive a transaction behind the pooler.
                with conn.transaction():
                    conn.execute(JOURNAL_LOCAL)
                    result = fetch(send(conn, query, params, row_factory))
            else:
                switch = journal_switch(conn, journal)
                if switch is not None:
                    conn.execute(switch)
                result = fetch(send(conn, query, params, row_factory))
        except psycopg.Error as exc:
            raise translate(health, exc, abandoned(conn)) from exc
        except HedgeLost:
            lost = True
            raise
        finally:
            health.in_flight -= 1
            if race is not None:
                conn.race = None
            if lost:
                threading.Thread(target=settle, args=(pool, conn, health), daemon=True,
                                 name=f"agent-factory-settle-{self.name}").start()
            else:
                pool.putconn(conn)
        health.last_alive = self._clock()
        return result

    def execute_query(
        self, query: Any, params: Any = None, fetch_mode: FetchMode = "all"
    ) -> Any:
        """Run one statement on this provider only (no failover)."""
        fetch = fetcher(fetch_mode)
        try:
            return self.run(query, params, fetch)
        except Unavailable as exc:
            if exc.down:
                self.health.mark_down(exc.reason)
            raise unavailable_error(self.name, query, exc) from exc.__cause__

    def checkout(
        self, race: Side | None = None
    ) -> tuple[ConnectionPool[Any], psycopg.Connection[Any]]:
        """A live pooled connection, or `Unavailable` (never sent) within the deadline.

        A hedged read's wait here counts towards its ``hedge_after`` (see `Side.at_checkout`).
        """
        started = self._clock()
        pool = self._pool
        try:
            conn = pool.getconn(timeout=FIRST_SLICE)
        except (PoolTimeout, PoolClosed):
            return self._checkout_slow(started, race)
        if is_dead(conn):
            pool.putconn(conn)
            return self._checkout_slow(started, race)
        return pool, conn

    def _checkout_slow(
        self, started: float, race: Side | None
    ) -> tuple[ConnectionPool[Any], psycopg.Connection[Any]]:
        health = self.health
        deadline = started + self.tuning.checkout_timeout
        slice_ = FIRST_SLICE
        health.waiting += 1
        try:
            while True:
                pool = self._pool
                try:
                    conn = pool.getconn(timeout=slice_)
                except PoolTimeout:
                    check_wait(health, started, self._clock(), deadline, self.setup)
                    slice_ = next_slice(slice_, race)
                    continue
                except PoolClosed:
                    if self._closed or pool is self._pool:
                        raise Unavailable("closed", sent=False) from None
                    continue
                if is_dead(conn):
                    # Closed by the server while idle (crash, restart, idle
                    # timeout). The pool replaces it; a failed reconnect marks
                    # the provider down and ends the wait above.
                    pool.putconn(conn)
                    continue
                return pool, conn
        finally:
            health.waiting -= 1

    # -- pool ------------------------------------------------------------------------

    def _new_pool(self) -> ConnectionPool[Any]:
        t = self.tuning
        self._generation += 1
        kwargs = pool_kwargs(t)
        configure = None
        if self.setup is not None:
            configure = self.setup.hook(still_current(self))
        pool: ConnectionPool[Any] = ConnectionPool(
            self.health.conninfo,
            connection_class=_observed_class(
                self.health, self, self._generation, self._watchdog
            ),
            kwargs=kwargs,
            min_size=t.pool_min_size,
            max_size=t.pool_max_size,
            timeout=t.checkout_timeout,
            name=f"agent-factory-{self.name}",
            configure=configure,
            open=False,
        )
        pool.open(wait=False)
        return pool

    def _renew_pool(self) -> None:
        old, self._pool = self._pool, self._new_pool()
        # Its workers may be stuck in a connect to a blackholed address for
        # up to connect_timeout: close it in the background.
        threading.Thread(
            target=old.close,
            kwargs={"timeout": self.tuning.connect_timeout + 1.0},
            name=f"agent-factory-close-{self.name}",
            daemon=True,
        ).start()

    def current_generation(self) -> int:
        return self._generation

    # -- introspection and lifecycle ---------------------------------------------------

    @property
    def pool_active(self) -> bool:
        return not self._closed and not self._pool.closed

    def health_check(self, *, max_age: float | None = None) -> bool:
        return self.health.health_check(max_age=max_age)

    def stats(self) -> ShellStats:
        pool = pool_stats(self.target, self.tuning, self.health.up, self.pool_active,
                          self._pool.get_stats(), self.setup)
        return {**pool, **self.health.stats()}

    def close(self) -> None:
        self._closed = True
        self.health.close()
        self._pool.close(timeout=1.0)
        if self._own_watchdog:
            self._watchdog.close()

    def __repr__(self) -> str:
        state = "up" if self.health.up else "down"
        return f"<DatabaseProvider {self.name!r} {self.target.describe()} {state}>"


def check_wait(health: ProviderHealth, started: float, now: float, deadline: float,
               setup: ConnectionSetup | None = None) -> None:
    """Between two slices of a checkout wait: give up when down, unreachable, out of
    time, or when new connections fail the user's ``configure`` (`ConfigurationError`)."""
    if setup is not None:
        setup.check()
    # A returning primary serves reads on its renewed pool while its breaker is
    # still open (the failback window): a wait for that pool's first connections
    # is no outage.
    if not health.up and not health.returning:
        raise Unavailable(health.last_error or "down", sent=False)
    if health.connect_failed_at >= started:
        raise Unavailable(health.connect_error or "connect failed", sent=False)
    if now >= deadline:
        # The pool is exhausted by the client's own load: the statement moves
        # on, but the provider is not marked down for it (a dead or silent
        # server is caught by its failed connects and by the watchdog).
        raise Unavailable(
            f"no free pooled connection within {health.tuning.checkout_timeout:g}s",
            sent=False,
            down=False,
            busy=True,
        )


def next_slice(slice_: float, race: Side | None) -> float:
    """The next wait for a pooled connection; a hedged read looks at its race between them."""
    if race is None:
        return min(slice_ * 2, MAX_SLICE)
    race.at_checkout()
    return FIRST_SLICE


def settle(pool: ConnectionPool[Any], conn: psycopg.Connection[Any],
           health: ProviderHealth) -> None:
    """Cancel a losing call and give its connection back to ``pool``.

    A live server answers the cancel and the connection is kept; a hung one
    does not (the request has its own short timeout). The drain, meanwhile,
    is the lost call going on under the watchdog (silent since it began): the
    watchdog, not the lost race, decides whether the provider is down (and
    the connection goes).
    """
    canceller = threading.Thread(target=cancel, args=(conn,), daemon=True,
                                 name=f"agent-factory-cancel-{health.name}")
    canceller.start()
    try:
        conn.wait(fetch_many(conn.pgconn))
    except psycopg.Error as exc:
        settle_failed(health, exc, abandoned(conn))
    finally:
        canceller.join()
        drained(conn)
        pool.putconn(conn)


def drained(conn: Any) -> None:
    """A lost call's drain is over: the connection's next call is a call of its own."""
    conn.resumed = None


def cancel(conn: psycopg.Connection[Any]) -> None:
    """Ask the server to cancel ``conn``'s statement, for at most `CANCEL_TIMEOUT`."""
    # A silent server never answers: the drain stays under the watchdog.
    with contextlib.suppress(psycopg.Error):
        conn.cancel_safe(timeout=CANCEL_TIMEOUT)


def settle_failed(health: ProviderHealth, exc: psycopg.Error, hung: bool) -> None:
    """The drain of a losing call failed: down if its connection was lost, as for any call."""
    if classify(exc) is Kind.UNAVAILABLE:
        health.mark_down(health.failure_reason(exc, hung))


def unavailable_error(name: str, query: Any, exc: Unavailable) -> Exception:
    """The public error for a single provider that could not serve."""
    text = query if isinstance(query, str) else ""
    if exc.sent and not may_retry_after_send(text, None, None):
        return OutcomeUnknownError(name, exc.reason)
    if exc.hung:
        return HangTimeoutError(name, exc.reason)
    return ProviderUnavailableError(name, exc.reason)


def is_dead(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """True when an idle connection was closed by the server (no round trip).

    A non-blocking read of whatever the server sent: nothing (EAGAIN) on a
    live idle connection, EOF or an error on a closed one. It does not
    release the GIL, unlike select(), so it costs caller threads no hand-over.
    """
    pgconn = conn.pgconn
    if pgconn.status != pq.ConnStatus.OK:
        return True
    try:
        pgconn.consume_input()
    except psycopg.OperationalError:
        return True
    return pgconn.status != pq.ConnStatus.OK


def watched(gen: PQGen[RV], w: Watch, clock: Callable[[], float]) -> PQGen[RV]:
    """Forward psycopg's generator, noting each time the call's socket made progress.

    psycopg resumes the generator with a non-zero ``ready`` only when the
    socket became readable (bytes arrived) or writable (the kernel took
    more of the request): the call's own news, on every platform.
    """
    try:
        wait_for = next(gen)
        while True:
            ready = yield wait_for
            if ready:
                w.alive = clock()
            wait_for = gen.send(ready)
    except StopIteration as ex:
        return ex.value  # type: ignore[no-any-return]


class WatchedCalls:
    """What both pool connection classes add: each call under the watchdog.

    A mixin for `psycopg.Connection` and `psycopg.AsyncConnection`; their
    ``wait`` brackets each call with `Watchdog.watch_call` and `Watchdog.unwatch`.
    """

    #: Set once the watchdog shut this connection's socket.
    abandoned = False
    #: Its socket has TCP counters (the watchdog reads its progress there);
    #: otherwise each wait is wrapped to see it. Known at the first call.
    counted: bool | None = None
    #: The session carries ``agent_factory.journal = on``: its writes are
    #: recorded by the backup's journal (set while its provider stands in
    #: for the primary; see continuity/journal.py). None: unknown (see
    #: `connections.give_back`).
    journal_on: bool | None = False
    #: A hedged read's side while its statement runs (see hedge.py).
    race: Side | None = None
    #: When the call that lost its race began (its drain is watched from then).
    resumed: float | None = None
    pgconn: Any

    def uncounted(self, gen: PQGen[RV], w: Watch, watchdog: Watchdog) -> PQGen[RV]:
        """The generator to wait on for a call whose socket may have no TCP counters
        (known at the first call): wrapped, so that its wake-ups are its news."""
        if self.counted is None:
            self.counted = tcp_progress(self.pgconn.socket) is not None
            if self.counted:
                return gen
        return watched(gen, w, watchdog.clock)


def abandoned(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether the watchdog abandoned a call of ``conn`` (its socket was shut down)."""
    return bool(getattr(conn, "abandoned", False))


def _observed_class(
    health: ProviderHealth, owner: Any, generation: int, watchdog: Watchdog
) -> type[psycopg.Connection[Any]]:
    """The pool's connection class: every call under the watchdog, connects reported.

    Each round of I/O psycopg does (`Connection.wait`: a statement, a
    fetch, a COPY block, COMMIT) is one watched call, so inside a
    transaction the deadline covers a statement, never the gaps between
    them. A connect started by a pool replaced since (at recovery) says
    nothing about the provider now, so it is ignored.
    """
    health_ref = weakref.ref(health)
    owner_ref = weakref.ref(owner)

    def report(exc: BaseException | None) -> None:
        h, o = health_ref(), owner_ref()
        if h is None or o is None or o.current_generation() != generation:
            return
        if exc is None:
            h.connected()
        else:
            h.connect_failed(exc)

    class ObservedConnection(WatchedCalls, psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = super().connect(conninfo, **kwargs)
            except Exception as exc:
                report(exc)
                raise
            report(None)
            return conn

        def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
            h = health_ref()
            if h is None:
                return super().wait(gen, *args, **kwargs)
            # Each call under the watchdog (inline: the per-statement path).
            w = watchdog.watch_call(self.pgconn, h, self.resumed)
            if not self.counted:
                gen = self.uncounted(gen, w, watchdog)
            try:
                side = self.race
                if side is None:
                    return super().wait(gen, *args, **kwargs)
                quiet = side.hedge_at - w.started  # the checkout's wait counted
                if quiet > 0:
                    try:
                        # psycopg's own wait until hedge_after: a healthy read ends here.
                        return super().wait(gen, interval=quiet, timeout=quiet)
                    except WaitTimeout:
                        pass  # the same generator goes on below (as after a Ctrl-C)
                if not side.due():  # nowhere to hedge: wait on as without a race
                    self.race = None
                    return super().wait(gen, *args, **kwargs)
                return super().wait(raced(gen, side), interval=TICK)
            except HedgeLost:
                self.resumed = w.started  # the drain that follows is the same call
                raise
            finally:
                watchdog.unwatch(w)  # after a shutdown in progress, if any
                if w.fired:
                    self.abandoned = True

    return ObservedConnection

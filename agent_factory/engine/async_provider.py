"""One provider for the async manager: an `AsyncConnectionPool` around a `ProviderHealth`.

The twin of `provider.DatabaseProvider`. Everything that decides (health,
breaker, error translation, the dead-connection test, the wait slices) is
shared; only the waiting is ``await``-ed. The health's prober and the
watchdog are threads, so a hung server is noticed even when the event loop
is busy, and a blocked ``await`` is interrupted by shutting its socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import psycopg
from psycopg import pq
from psycopg.abc import RV, PQGen
from psycopg.errors import _WaitTimeout as WaitTimeout
from psycopg.generators import fetch_many
from psycopg.rows import RowFactory
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from .connections import JOURNAL_LOCAL, journal_switch, pool_kwargs, setup_for, still_current
from .health import HealthCallback, ProviderHealth
from .hedge import CANCEL_TIMEOUT, TICK, HedgeLost, Side, raced
from .provider import (
    FIRST_SLICE,
    Unavailable,
    WatchedCalls,
    abandoned,
    check_wait,
    drained,
    is_dead,
    next_slice,
    settle_failed,
    translate,
)
from .settings import Settings
from .stats import ShellStats, pool_stats
from .watchdog import Watchdog

_ROWS = pq.ExecStatus.TUPLES_OK
AsyncFetch = Callable[[psycopg.AsyncCursor[Any]], Awaitable[Any]]


async def _fetch_all(cur: psycopg.AsyncCursor[Any]) -> Any:
    res = cur.pgresult
    return await cur.fetchall() if res is not None and res.status == _ROWS else []


async def _fetch_one(cur: psycopg.AsyncCursor[Any]) -> Any:
    res = cur.pgresult
    return await cur.fetchone() if res is not None and res.status == _ROWS else None


async def _fetch_none(cur: psycopg.AsyncCursor[Any]) -> None:
    return None


ASYNC_FETCHERS: dict[str, AsyncFetch] = {
    "all": _fetch_all,
    "one": _fetch_one,
    "none": _fetch_none,
}


async def send(conn: psycopg.AsyncConnection[Any], query: Any, params: Any,
               row_factory: RowFactory[Any] | None) -> psycopg.AsyncCursor[Any]:
    """``conn.execute``, with this call's row factory if it has one."""
    if row_factory is None:
        return await conn.execute(query, params)
    # psycopg types a row factory for async cursors apart; the same functions serve both.
    return await conn.cursor(row_factory=cast(Any, row_factory)).execute(query, params)


def async_fetcher(fetch_mode: str) -> AsyncFetch:
    fetch = ASYNC_FETCHERS.get(fetch_mode)
    if fetch is None:
        raise ValueError(f"fetch_mode must be 'all', 'one' or 'none', got {fetch_mode!r}")
    return fetch


class AsyncProvider:
    """A named PostgreSQL target with an async pool; opened by `open()`."""

    def __init__(
        self,
        name: str,
        *,
        settings: Settings,
        watchdog: Watchdog,
        on_health_change: HealthCallback | None = None,
    ) -> None:
        self.name = name
        self.target = settings.providers[name]
        self.tuning = settings.tuning(name)
        self._watchdog = watchdog
        self.health = ProviderHealth(
            self.target, self.tuning, watchdog, on_change=on_health_change
        )
        # Called from the prober thread: the pool itself is renewed by the
        # next caller, on the event loop.
        self.health.before_recovery = self._mark_stale
        self.setup = setup_for(name, self.tuning.configure, self.health)
        self._stale = False
        self._generation = 0
        self._closed = False
        self._pool: AsyncConnectionPool[Any] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        if self._pool is None:
            self._pool = await self._new_pool()

    # -- data path -------------------------------------------------------------------

    async def run(
        self, query: Any, params: Any, fetch: AsyncFetch, *, journal: bool | None = None,
        row_factory: RowFactory[Any] | None = None, race: Side | None = None,
    ) -> Any:
        """Like `DatabaseProvider.run`, awaited (a losing call is settled in a task)."""
        conn: Any  # an ObservedConnection: its race is set below
        pool, conn = await self.checkout(race)
        health = self.health
        health.in_flight += 1
        lost = False
        if race is not None:
            conn.race = race  # its wait looks at the race (see hedge.Side)
        try:
            if journal is None:  # a read: no journal state to set
                result = await fetch(await (conn.execute(query, params) if row_factory is None
                                            else send(conn, query, params, row_factory)))
            elif journal and self.tuning.pooler:
                async with conn.transaction():
                    await conn.execute(JOURNAL_LOCAL)
                    result = await fetch(await send(conn, query, params, row_factory))
            else:
                switch = journal_switch(conn, journal)
                if switch is not None:
                    await conn.execute(switch)
                result = await fetch(await send(conn, query, params, row_factory))
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
                task = asyncio.get_running_loop().create_task(settle(pool, conn, health))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                await pool.putconn(conn)
        health.last_alive = time.monotonic()
        return result

    async def checkout(
        self, race: Side | None = None
    ) -> tuple[AsyncConnectionPool[Any], psycopg.AsyncConnection[Any]]:
        started = time.monotonic()
        pool = self._pool
        if pool is None or self._stale:
            pool = await self._current_pool()
        try:
            conn = await pool.getconn(timeout=FIRST_SLICE)
        except (PoolTimeout, PoolClosed):
            return await self._checkout_slow(started, race)
        if is_dead(conn):
            await pool.putconn(conn)
            return await self._checkout_slow(started, race)
        return pool, conn

    async def _checkout_slow(
        self, started: float, race: Side | None
    ) -> tuple[AsyncConnectionPool[Any], psycopg.AsyncConnection[Any]]:
        health = self.health
        deadline = started + self.tuning.checkout_timeout
        slice_ = FIRST_SLICE
        health.waiting += 1
        try:
            while True:
                pool = await self._current_pool()
                try:
                    conn = await pool.getconn(timeout=slice_)
                except PoolTimeout:
                    check_wait(health, started, time.monotonic(), deadline, self.setup)
                    slice_ = next_slice(slice_, race)
                    continue
                except PoolClosed:
                    if self._closed or pool is self._pool:
                        raise Unavailable("closed", sent=False) from None
                    continue
                if is_dead(conn):
                    await pool.putconn(conn)
                    continue
                return pool, conn
        finally:
            health.waiting -= 1

    # -- pool ------------------------------------------------------------------------

    def _mark_stale(self) -> None:
        self._stale = True
        self._generation += 1  # connects of the old pool are ignored from now on

    async def _current_pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            raise Unavailable("not opened: use 'async with AsyncDatabaseManager(...)'",
                              sent=False, down=False)
        if self._stale and not self._closed:
            self._stale = False
            old, self._pool = self._pool, await self._new_pool()
            task = asyncio.get_running_loop().create_task(
                old.close(timeout=self.tuning.connect_timeout + 1.0)
            )
            self._closing.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._closing.discard)
        return self._pool

    async def _new_pool(self) -> AsyncConnectionPool[Any]:
        t = self.tuning
        configure = None
        if self.setup is not None:
            configure = self.setup.async_hook(still_current(self))
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self.health.conninfo,
            connection_class=_observed_async_class(self, self._generation),
            kwargs=pool_kwargs(t),
            configure=configure,
            min_size=t.pool_min_size,
            max_size=t.pool_max_size,
            timeout=t.checkout_timeout,
            name=f"agent-factory-async-{self.name}",
            open=False,
        )
        await pool.open(wait=False)
        return pool

    # -- introspection and lifecycle ---------------------------------------------------

    def stats(self) -> ShellStats:
        active = self._pool is not None and not self._pool.closed
        counts = self._pool.get_stats() if self._pool is not None else {}
        pool = pool_stats(self.target, self.tuning, self.health.up, active, counts, self.setup)
        return {**pool, **self.health.stats()}

    async def close(self) -> None:
        self._closed = True
        await asyncio.to_thread(self.health.close)
        if self._pool is not None:
            await self._pool.close(timeout=1.0)


async def settle(pool: AsyncConnectionPool[Any], conn: psycopg.AsyncConnection[Any],
                 health: ProviderHealth) -> None:
    """Like `provider.settle`: cancel a losing call while it drains under the watchdog,
    then give its connection back."""
    canceller = asyncio.get_running_loop().create_task(cancel(conn))
    try:
        await conn.wait(fetch_many(conn.pgconn))
    except psycopg.Error as exc:
        settle_failed(health, exc, abandoned(conn))
    finally:
        await canceller
        drained(conn)
        await pool.putconn(conn)


async def cancel(conn: psycopg.AsyncConnection[Any]) -> None:
    """Like `provider.cancel`, awaited."""
    with contextlib.suppress(psycopg.Error):
        await conn.cancel_safe(timeout=CANCEL_TIMEOUT)


def _observed_async_class(
    provider: AsyncProvider, generation: int
) -> type[psycopg.AsyncConnection[Any]]:
    """The async pool's connection class: every call watched, connects reported.

    Like `provider._observed_class`: each ``wait`` (a statement, a fetch, a
    COPY block, COMMIT) is one call under the watchdog.
    """
    ref = weakref.ref(provider)
    watchdog = provider._watchdog

    def report(exc: BaseException | None) -> None:
        p = ref()
        if p is None or p._generation != generation:
            return
        if exc is None:
            p.health.connected()
        else:
            p.health.connect_failed(exc)

    class ObservedAsyncConnection(WatchedCalls, psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Any:
            try:
                conn = await super().connect(conninfo, **kwargs)
            except Exception as exc:
                report(exc)
                raise
            report(None)
            return conn

        async def wait(self, gen: PQGen[RV], *args: Any, **kwargs: Any) -> RV:
            p = ref()
            if p is None:
                return await super().wait(gen, *args, **kwargs)
            w = watchdog.watch_call(self.pgconn, p.health, self.resumed)
            if not self.counted:
                gen = self.uncounted(gen, w, watchdog)
            try:
                side = self.race
                if side is None:
                    return await super().wait(gen, *args, **kwargs)
                quiet = side.hedge_at - w.started  # the checkout's wait counted
                if quiet > 0:
                    try:
                        # psycopg's own wait until hedge_after: a healthy read ends here.
                        return await super().wait(gen, interval=quiet, timeout=quiet)
                    except WaitTimeout:
                        pass  # the same generator goes on below (as after a Ctrl-C)
                if not side.due():  # nowhere to hedge: wait on as without a race
                    self.race = None
                    return await super().wait(gen, *args, **kwargs)
                return await super().wait(raced(gen, side), interval=TICK)
            except HedgeLost:
                self.resumed = w.started  # the drain that follows is the same call
                raise
            finally:
                watchdog.unwatch(w)
                if w.fired:
                    self.abandoned = True

    return ObservedAsyncConnection

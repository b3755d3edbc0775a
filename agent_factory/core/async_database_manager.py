"""AsyncDatabaseManager: the `DatabaseManager` semantics for asyncio.

The same `Failover` decisions, the same provider health, breaker, prober and
watchdog; only the pools are `psycopg_pool.AsyncConnectionPool`. Use it as
``async with AsyncDatabaseManager(...) as db:`` (or ``await db.open()`` and
``await db.close()``). Cancelling a task that waits on a query is safe: the
connection goes back to its pool (or is discarded) and nothing is retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import psycopg
from psycopg.rows import RowFactory
from psycopg_pool import AsyncConnectionPool

from ..engine.async_provider import AsyncFetch, AsyncProvider, async_fetcher
from ..engine.failover import Route
from ..engine.health import HealthCallback
from ..engine.hedge import TICK, HedgeDue
from ..engine.hedged import HedgedRead
from ..engine.provider import FetchMode, Unavailable, abandoned
from ..engine.settings import Settings, check_row_factory
from ..engine.watchdog import Watchdog
from ..errors import ManagerClosedError
from .base import BaseManager

__all__ = ["AsyncDatabaseManager"]


_CLOSED = "AsyncDatabaseManager is closed; create a new one"


class AsyncDatabaseManager(BaseManager[AsyncProvider]):
    """Runs queries on the primary provider and fails over when it is down (asyncio)."""

    _kind = "AsyncDatabaseManager"

    #: The pools are opened by `open()` (or the first call, or ``async with``).
    _opened = False
    #: Hedges in flight (asyncio keeps only weak references to tasks).
    _hedges: set[asyncio.Task[None]] | None = None

    def _new_provider(
        self, name: str, settings: Settings, watchdog: Watchdog, on_change: HealthCallback
    ) -> AsyncProvider:
        return AsyncProvider(name, settings=settings, watchdog=watchdog,
                             on_health_change=on_change)

    async def open(self) -> None:
        """Open the pools (they connect in the background)."""
        if self._core.closed:
            raise ManagerClosedError(_CLOSED)
        for provider in self.providers.values():
            await provider.open()
        self._opened = True

    # -- queries ---------------------------------------------------------------------

    async def execute_query(
        self,
        query: Any,
        params: Any = None,
        fetch_mode: FetchMode = "all",
        *,
        read_only: bool | None = None,
        idempotent: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> Any:
        """Like `DatabaseManager.execute_query`, awaited."""
        fetch = async_fetcher(fetch_mode)
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        if row_factory is not None:
            check_row_factory(row_factory)
        if not self._opened:
            await self.open()
        route = core.route(query, read_only=read_only, idempotent=idempotent)
        if route.write and core.track_writes:
            if await self._enter_write():
                # After a failback pause: the primary may be back.
                route = core.route(query, read_only=read_only, idempotent=idempotent)
            try:
                return await self._run(route, query, params, fetch, row_factory)
            finally:
                core.exit_write()
        return await self._run(route, query, params, fetch, row_factory)

    async def _enter_write(self) -> bool:
        """Count a write in without blocking the event loop; True if it had to wait.

        While writes are paused (a failback switch, rarely over a fraction of a
        second) it polls: a task cancelled meanwhile has counted nothing in.
        """
        core = self._core
        deadline = time.monotonic() + core.settings.write_pause_timeout
        waited = core.enter_write(block=False)
        while waited is None:
            if time.monotonic() >= deadline:
                core.enter_write(block=False, force=True)
                return True
            await asyncio.sleep(0.01)
            waited = core.enter_write(block=False)
            if waited is not None:
                return True
        return waited

    async def _prepare_backup_write_async(self, name: str) -> None:
        if self._failback_ready(name):
            self._witness.check(name)
        else:
            await asyncio.to_thread(self._prepare_backup_write, name)

    async def _run(
        self, route: Route[AsyncProvider], query: Any, params: Any, fetch: AsyncFetch,
        row_factory: RowFactory[Any] | None,
    ) -> Any:
        core = self._core
        failures: dict[str, str] = {}
        hedge_at = core.hedge_at(route) if core.hedging else None
        for provider in route.providers:
            if provider.name in failures:
                continue  # a hedge that failed
            epoch = core.epoch
            t0 = time.perf_counter() if self._events.query_listeners else None
            served = provider
            race: HedgedRead[AsyncProvider] | None = None
            try:
                journal = self._journal(provider.name, True) if route.write else None
                if journal:
                    await self._prepare_backup_write_async(provider.name)
                if hedge_at is not None:  # the first attempt of a read that may be hedged
                    race = HedgedRead(hedge_at, core, route, failures, provider,
                                      (query, params, fetch, row_factory), self._start_hedge)
                    hedge_at = None
                try:
                    result = await provider.run(query, params, fetch, journal=journal,
                                                row_factory=row_factory, race=race)
                except BaseException as exc:
                    if race is None:
                        raise
                    served, result = await self._race_failed(race, exc)
                else:
                    # Once a hedge has started, the first of the two answers is the read's.
                    if race is not None and race.started and not race.first_answered(result):
                        served, result = race.answer()
            except Unavailable as exc:
                error = core.attempt_unavailable(provider, exc, route=route, failures=failures,
                                                 t0=t0)
                if error is not None:
                    raise error from exc.__cause__
                continue
            except Exception as exc:
                core.attempt_error(provider, exc, t0=t0)
                raise
            core.attempt_ok(served, epoch, failures,
                            route if served is provider else core.hedged(route), t0)
            return result
        raise core.all_failed(failures, write=route.write)

    async def _race_failed(self, race: HedgedRead[AsyncProvider], exc: BaseException
                           ) -> tuple[AsyncProvider, Any]:
        """Like `DatabaseManager._race_failed`: the hedge is a task of its own, awaited
        without blocking the loop (a losing first call settles in the background)."""
        if isinstance(exc, HedgeDue):  # nothing sent yet: the read goes to the hedge alone
            return await self._instead(race)
        if race.awaits_hedge(exc):
            while not race.wait_hedge(0):
                await asyncio.sleep(TICK)
        if race.first_failed(exc):
            return race.answer()
        raise exc

    def _start_hedge(self, race: HedgedRead[AsyncProvider]) -> None:
        task = asyncio.get_running_loop().create_task(self._second(race))
        if self._hedges is None:
            self._hedges = set()
        self._hedges.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._hedges.discard)

    @staticmethod
    async def _second(race: HedgedRead[AsyncProvider]) -> None:
        """Like `DatabaseManager._second`, awaited."""
        query, params, fetch, row_factory = race.call
        try:
            result = await race.second_provider().run(query, params, fetch,
                                                      row_factory=row_factory,
                                                      race=race.second())
        except Exception as exc:
            race.second_failed(exc)
            return
        race.second_answered(result)

    @staticmethod
    async def _instead(race: HedgedRead[AsyncProvider]) -> tuple[AsyncProvider, Any]:
        """Like `DatabaseManager._instead`, awaited."""
        query, params, fetch, row_factory = race.call
        try:
            result = await race.second_provider().run(query, params, fetch,
                                                      row_factory=row_factory)
        except Unavailable as exc:
            first = race.instead_failed(exc)
            return first, await first.run(query, params, fetch, row_factory=row_factory)
        return race.instead_answered(result)

    async def read(self, query: Any, params: Any = None, fetch_mode: FetchMode = "all", *,
                   row_factory: RowFactory[Any] | None = None) -> Any:
        """A read routed by the ``read_routing`` policy (``read_only=True``)."""
        return await self.execute_query(query, params, fetch_mode, read_only=True,
                                        row_factory=row_factory)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Several statements in one transaction, pinned to one provider."""
        async with self._writer() as route, self._pinned(route) as conn:
            yield conn

    @asynccontextmanager
    async def _writer(self) -> AsyncIterator[Route[AsyncProvider]]:
        """Like `DatabaseManager._writer` (the pools opened first if need be)."""
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        if not self._opened:
            await self.open()
        if core.track_writes:
            await self._enter_write()
        try:
            yield core.route("", read_only=False, idempotent=False)
        finally:
            if core.track_writes:
                core.exit_write()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Like `DatabaseManager.connection`: ``async with db.connection() as conn``."""
        async with self._writer() as route:
            provider, pool, conn = await self._checkout(route)
            try:
                first = self._lend(conn, provider.name)
                if first is not None:
                    await conn.execute(first)
                yield conn
            except psycopg.Error as exc:
                error = self._lent_error(provider, exc, abandoned(conn))
                if error is None:
                    raise
                raise error from exc
            finally:
                self._give_back(conn, lent=True)
                await pool.putconn(conn)
            provider.health.last_alive = time.monotonic()

    async def _checkout(
        self, route: Route[AsyncProvider]
    ) -> tuple[AsyncProvider, AsyncConnectionPool[Any], psycopg.AsyncConnection[Any]]:
        """Like `DatabaseManager._checkout`, awaited."""
        core = self._core
        failures: dict[str, str] = {}
        for provider in route.providers:
            try:
                if self._journal(provider.name, True):
                    await self._prepare_backup_write_async(provider.name)
                pool, conn = await provider.checkout()
            except Unavailable as exc:
                core.checkout_refused(provider, exc, failures)
                continue
            core.succeeded(provider, epoch=core.epoch, failures=failures or None, write=True)
            return provider, pool, conn
        raise core.all_failed(failures, write=True)

    @asynccontextmanager
    async def _pinned(
        self, route: Route[AsyncProvider]
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        core = self._core
        provider, pool, conn = await self._checkout(route)
        health = provider.health
        # Each statement of the block is watched by the connection itself
        # (see provider._observed_class): the gaps between them are not calls.
        phase = "body"
        try:
            async with conn.transaction():
                switch = self._journal_local(conn, provider.name)
                if switch is not None:
                    await conn.execute(switch)
                yield conn
                phase = "commit"
        except psycopg.Error as exc:
            error = core.transaction_error(provider, exc, phase=phase, hung=abandoned(conn))
            if error is None:
                raise
            raise error from exc
        finally:
            self._give_back(conn, lent=False)
            await pool.putconn(conn)
        health.last_alive = time.monotonic()
        core.last_write = time.monotonic()

    # -- health and stats --------------------------------------------------------------

    async def health_check(self, name: str | None = None) -> bool:
        provider = self.providers.get(name or self._core.primary)
        if provider is None:
            return False
        return await asyncio.to_thread(provider.health.health_check)

    async def health_check_all(self, *, max_age: float | None = None) -> dict[str, bool]:
        names = list(self.providers)
        results = await asyncio.gather(
            *(
                asyncio.to_thread(self.providers[n].health.health_check, max_age=max_age)
                for n in names
            )
        )
        return dict(zip(names, results, strict=True))

    # -- lifecycle ---------------------------------------------------------------------

    async def close(self) -> None:
        """Close every pool and stop the background threads. Idempotent."""
        if self._core.closed:
            return
        self._core.closed = True
        for provider in self.providers.values():
            await provider.close()
        if self._failback is not None:
            await asyncio.to_thread(self._failback.close)
        await asyncio.to_thread(self._witness.close)
        await asyncio.to_thread(self._watchdog.close)

    async def __aenter__(self) -> AsyncDatabaseManager:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> Literal[False]:
        await self.close()
        return False


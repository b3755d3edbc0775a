"""DatabaseManager: one API over several PostgreSQL providers, with failover.

Queries run on the primary provider. When it is unavailable (refused, reset,
hung, shutting down, out of connections) they move to the next provider in
the failover order, and come back to the primary once it has passed
consecutive probes. SQL errors are never retried elsewhere. A statement that
was sent and then lost its connection is retried elsewhere only when it is
read-only or declared idempotent; otherwise `OutcomeUnknownError` says so.

The decisions live in `agent_factory.engine.failover` (shared with
`AsyncDatabaseManager`); this module is the thin synchronous shell.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import psycopg
from psycopg.rows import RowFactory
from psycopg_pool import ConnectionPool

from ..engine.failover import Route
from ..engine.health import HealthCallback
from ..engine.hedge import HedgeDue
from ..engine.hedged import HedgedRead
from ..engine.provider import DatabaseProvider, Fetch, FetchMode, Unavailable, abandoned, fetcher
from ..engine.settings import Settings, check_row_factory
from ..engine.watchdog import Watchdog
from ..errors import ManagerClosedError
from .base import BaseManager

__all__ = ["DatabaseManager", "DatabaseProvider", "FetchMode"]


_CLOSED = "DatabaseManager is closed; create a new one"


class DatabaseManager(BaseManager[DatabaseProvider]):
    """Runs queries on the primary provider and fails over when it is down.

    ``DatabaseManager()`` reads the environment (and ``.env``);
    ``DatabaseManager(providers={"a": url, "b": url2}, order=["a", "b"])``
    reads nothing. A provider may also be ``{"url": ..., "weight": 2,
    "serverless": True, ...}``. Keyword options override `Settings` fields,
    e.g. ``hang_timeout=2.0``. Thread-safe; close it with `close_all()` or
    use it as a context manager.
    """

    def _new_provider(
        self, name: str, settings: Settings, watchdog: Watchdog, on_change: HealthCallback
    ) -> DatabaseProvider:
        return DatabaseProvider(
            name, settings.providers[name], settings=settings, watchdog=watchdog,
            on_health_change=on_change,
        )

    # -- queries ---------------------------------------------------------------------

    def execute_query(
        self,
        query: Any,
        params: Any = None,
        fetch_mode: FetchMode = "all",
        *,
        read_only: bool | None = None,
        idempotent: bool | None = None,
        row_factory: RowFactory[Any] | None = None,
    ) -> Any:
        """Run one statement (its own transaction) on the first available provider.

        Returns a list of rows for ``"all"``, a row or None for ``"one"``,
        None for ``"none"``; rows are tuples unless ``row_factory`` (this
        call's, else the manager's) makes them something else, e.g.
        ``psycopg.rows.dict_row``. ``read_only``/``idempotent`` tell whether the
        statement may be retried on another provider after its connection
        broke mid-flight; by default plain SELECTs (calling only known
        side-effect-free functions) are, writes are not. ``idempotent=False``
        always routes as a write (write gate, ``max_replication_lag``,
        read-your-writes, failback tracking). ``read_only=True`` also lets the
        read routing policy choose the provider (see ``read_routing``).
        """
        fetch = fetcher(fetch_mode)
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        if row_factory is not None:
            check_row_factory(row_factory)
        route = core.route(query, read_only=read_only, idempotent=idempotent)
        if route.write and core.track_writes:
            if core.enter_write():
                # After a failback pause: the primary may be back.
                route = core.route(query, read_only=read_only, idempotent=idempotent)
            try:
                return self._run(route, query, params, fetch, row_factory)
            finally:
                core.exit_write()
        return self._run(route, query, params, fetch, row_factory)

    def _run(self, route: Route[DatabaseProvider], query: Any, params: Any, fetch: Fetch,
             row_factory: RowFactory[Any] | None) -> Any:
        core = self._core
        failures: dict[str, str] = {}
        hedge_at = core.hedge_at(route) if core.hedging else None
        for provider in route.providers:
            if provider.name in failures:
                continue  # a hedge that failed
            epoch = core.epoch
            t0 = time.perf_counter() if self._events.query_listeners else None
            served = provider
            race: HedgedRead[DatabaseProvider] | None = None
            try:
                journal = self._journal(provider.name, True) if route.write else None
                if journal:
                    self._prepare_backup_write(provider.name)
                if hedge_at is not None:  # the first attempt of a read that may be hedged
                    race = HedgedRead(hedge_at, core, route, failures, provider,
                                      (query, params, fetch, row_factory), self._start_hedge)
                    hedge_at = None
                try:
                    result = provider.run(query, params, fetch, journal=journal,
                                          row_factory=row_factory, race=race)
                except BaseException as exc:
                    if race is None:
                        raise
                    served, result = self._race_failed(race, exc)
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

    def _race_failed(self, race: HedgedRead[DatabaseProvider], exc: BaseException
                     ) -> tuple[DatabaseProvider, Any]:
        """The first call of a read that may be hedged raised ``exc``: (the provider that
        answered, its rows) if the read still has an answer, else ``exc`` is raised.

        Until ``race.hedge_at`` the first call is any read; once it has been
        silent that long, the hedge is decided (`HedgedRead.due`), the call
        wakes every tick (see hedge.raced), starts the hedge on a thread of its
        own when the budget allows, and leaves as soon as the hedge has
        answered (`HedgeLost`). The decisions are `HedgedRead`'s.
        """
        if isinstance(exc, HedgeDue):  # nothing sent yet: the read goes to the hedge alone
            return self._instead(race)
        if race.awaits_hedge(exc):
            race.wait_hedge(None)
        if race.first_failed(exc):
            return race.answer()
        raise exc

    def _start_hedge(self, race: HedgedRead[DatabaseProvider]) -> None:
        threading.Thread(target=self._second, args=(race,), name="agent-factory-hedge",
                         daemon=True).start()

    @staticmethod
    def _second(race: HedgedRead[DatabaseProvider]) -> None:
        """The hedge: its answer claims the race, its failure leaves it to the first call."""
        query, params, fetch, row_factory = race.call
        try:
            result = race.second_provider().run(query, params, fetch,
                                                row_factory=row_factory, race=race.second())
        except Exception as exc:
            race.second_failed(exc)
            return
        race.second_answered(result)

    @staticmethod
    def _instead(race: HedgedRead[DatabaseProvider]) -> tuple[DatabaseProvider, Any]:
        """A read whose hedge came due at checkout: on the hedge's provider, else the first
        after all."""
        query, params, fetch, row_factory = race.call
        try:
            result = race.second_provider().run(query, params, fetch, row_factory=row_factory)
        except Unavailable as exc:
            first = race.instead_failed(exc)
            return first, first.run(query, params, fetch, row_factory=row_factory)
        return race.instead_answered(result)

    def read(self, query: Any, params: Any = None, fetch_mode: FetchMode = "all", *,
             row_factory: RowFactory[Any] | None = None) -> Any:
        """A read routed by the ``read_routing`` policy (``read_only=True``)."""
        return self.execute_query(query, params, fetch_mode, read_only=True,
                                  row_factory=row_factory)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """Several statements in one transaction, pinned to one provider.

        The provider is chosen like for a write (only a provider that gave a
        live connection is used). If the connection is lost inside the block,
        nothing was committed and `ProviderUnavailableError` is raised; if it
        is lost during COMMIT, `OutcomeUnknownError`. The block is never
        replayed: retry it yourself if that is safe.
        """
        with self._writer() as route, self._pinned(route) as conn:
            yield conn

    @contextmanager
    def _writer(self) -> Iterator[Route[DatabaseProvider]]:
        """A pinned write path's frame: the manager open, the write counted in (a
        failback switch waits for it), and the route of a write."""
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        if core.track_writes:
            core.enter_write()
        try:
            yield core.route("", read_only=False, idempotent=False)
        finally:
            if core.track_writes:
                core.exit_write()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled autocommit connection of the first available provider, for the block.

        Chosen like a write at checkout: a dead primary gives the next provider
        in order. On a backup the split-brain fence applies at checkout and
        every statement is journaled for failback (docs/configuration.md,
        "Connections"). Nothing is retried inside the block: a connection lost
        there raises `OutcomeUnknownError` (each statement commits on its own).
        The row factory is the manager's; the connection goes back to the pool
        after the block.
        """
        with self._writer() as route:
            provider, pool, conn = self._checkout(route)
            try:
                first = self._lend(conn, provider.name)
                if first is not None:
                    conn.execute(first)
                yield conn
            except psycopg.Error as exc:
                error = self._lent_error(provider, exc, abandoned(conn))
                if error is None:
                    raise
                raise error from exc
            finally:
                self._give_back(conn, lent=True)
                pool.putconn(conn)
            provider.health.last_alive = time.monotonic()

    def _checkout(self, route: Route[DatabaseProvider]
                  ) -> tuple[DatabaseProvider, ConnectionPool[Any], psycopg.Connection[Any]]:
        """A live connection of the first provider of ``route`` that gives one (fenced and
        journal-ready on a backup)."""
        core = self._core
        failures: dict[str, str] = {}
        for provider in route.providers:
            try:
                if self._journal(provider.name, True):
                    self._prepare_backup_write(provider.name)
                pool, conn = provider.checkout()
            except Unavailable as exc:
                core.checkout_refused(provider, exc, failures)
                continue
            core.succeeded(provider, epoch=core.epoch, failures=failures or None, write=True)
            return provider, pool, conn
        raise core.all_failed(failures, write=True)

    @contextmanager
    def _pinned(self, route: Route[DatabaseProvider]) -> Iterator[psycopg.Connection[Any]]:
        core = self._core
        provider, pool, conn = self._checkout(route)
        health = provider.health
        # Each statement of the block is watched by the connection itself
        # (see provider._observed_class): the gaps between them are not calls.
        phase = "body"
        try:
            with conn.transaction():
                switch = self._journal_local(conn, provider.name)
                if switch is not None:
                    conn.execute(switch)
                yield conn
                phase = "commit"
        except psycopg.Error as exc:
            error = core.transaction_error(provider, exc, phase=phase, hung=abandoned(conn))
            if error is None:
                raise
            raise error from exc
        finally:
            self._give_back(conn, lent=False)
            pool.putconn(conn)
        health.last_alive = time.monotonic()
        core.last_write = time.monotonic()

    # -- health and stats --------------------------------------------------------------

    def health_check(self, name: str | None = None) -> bool:
        """Health of one provider (the primary by default), cached for health_ttl."""
        provider = self.providers.get(name or self._core.primary)
        if provider is None:
            return False
        return provider.health_check()

    def health_check_all(self, *, max_age: float | None = None) -> dict[str, bool]:
        """``{name: healthy}`` for every provider, probed in parallel (bounded)."""
        results: dict[str, bool] = {}

        def check(p: DatabaseProvider) -> None:
            results[p.name] = p.health_check(max_age=max_age)

        threads = [
            threading.Thread(target=check, args=(p,), daemon=True) for p in self.providers.values()
        ]
        for t in threads:
            t.start()
        s = self._core.settings
        limit = time.monotonic() + s.serverless_connect_timeout + s.hang_timeout + 2
        for t in threads:
            t.join(timeout=max(0.0, limit - time.monotonic()))
        return {name: results.get(name, False) for name in self.providers}

    # -- lifecycle ---------------------------------------------------------------------

    def close_all(self) -> None:
        """Close every pool and stop the background threads. Idempotent."""
        if self._core.closed:
            return
        self._core.closed = True
        for provider in self.providers.values():
            provider.close()
        if self._failback is not None:
            self._failback.close()
        self._witness.close()
        self._watchdog.close()

    close = close_all

    def __enter__(self) -> DatabaseManager:
        if self._core.closed:
            raise ManagerClosedError(_CLOSED)
        return self

    def __exit__(self, *exc_info: object) -> Literal[False]:
        self.close_all()
        return False

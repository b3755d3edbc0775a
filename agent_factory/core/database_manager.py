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

from ..engine.failover import Route
from ..engine.health import HealthCallback
from ..engine.provider import DatabaseProvider, Fetch, FetchMode, Unavailable, abandoned, fetcher
from ..engine.settings import Settings
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
    ) -> Any:
        """Run one statement (its own transaction) on the first available provider.

        Returns a list of tuples for ``"all"``, a tuple or None for ``"one"``,
        None for ``"none"``. ``read_only``/``idempotent`` tell whether the
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
        route = core.route(query, read_only=read_only, idempotent=idempotent)
        if route.write and core.track_writes:
            if core.enter_write():
                # After a failback pause: the primary may be back.
                route = core.route(query, read_only=read_only, idempotent=idempotent)
            try:
                return self._run(route, query, params, fetch)
            finally:
                core.exit_write()
        return self._run(route, query, params, fetch)

    def _run(self, route: Route[DatabaseProvider], query: Any, params: Any, fetch: Fetch) -> Any:
        core = self._core
        events = self._events
        t0: float | None = None
        failures: dict[str, str] = {}
        for provider in route.providers:
            epoch = core.epoch
            if events.query_listeners:
                t0 = time.perf_counter()
            try:
                journal = self._journal(provider.name, route.write)
                if journal:
                    self._prepare_backup_write(provider.name)
                result = provider.run(query, params, fetch, journal=journal)
            except Unavailable as exc:
                error = core.attempt_unavailable(provider, exc, route=route, failures=failures,
                                                 t0=t0)
                if error is not None:
                    raise error from exc.__cause__
                continue
            except Exception as exc:
                core.attempt_error(provider, exc, t0=t0)
                raise
            core.attempt_ok(provider, epoch=epoch, failures=failures, route=route, t0=t0)
            return result
        raise core.all_failed(failures, write=route.write)

    def read(self, query: Any, params: Any = None, fetch_mode: FetchMode = "all") -> Any:
        """A read routed by the ``read_routing`` policy (``read_only=True``)."""
        return self.execute_query(query, params, fetch_mode, read_only=True)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """Several statements in one transaction, pinned to one provider.

        The provider is chosen like for a write (only a provider that gave a
        live connection is used). If the connection is lost inside the block,
        nothing was committed and `ProviderUnavailableError` is raised; if it
        is lost during COMMIT, `OutcomeUnknownError`. The block is never
        replayed: retry it yourself if that is safe.
        """
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        if core.track_writes:
            core.enter_write()
        try:
            with self._pinned(core.route("", read_only=False, idempotent=False)) as conn:
                yield conn
        finally:
            if core.track_writes:
                core.exit_write()

    @contextmanager
    def _pinned(self, route: Route[DatabaseProvider]) -> Iterator[psycopg.Connection[Any]]:
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
            break
        else:
            raise core.all_failed(failures, write=True)
        core.succeeded(provider, epoch=core.epoch, failures=failures or None, write=True)
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

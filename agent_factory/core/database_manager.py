"""DatabaseManager: one API over several PostgreSQL providers, with failover.

Queries run on the primary provider. When it is unavailable (refused, reset,
hung, shutting down, out of connections) they move to the next provider in
the failover order, and come back to the primary once it has passed
consecutive probes. SQL errors are never retried elsewhere. A statement that
was sent and then lost its connection is retried elsewhere only when it is
read-only or declared idempotent; otherwise `OutcomeUnknownError` says so.

The decisions live in `agent_factory.failover` (shared with
`AsyncDatabaseManager`); this module is the thin synchronous shell.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psycopg

from ..errors import (
    ManagerClosedError,
)
from ..events import Dispatcher, Listener
from ..failback import Failback
from ..failover import Failover, Route
from ..provider import DatabaseProvider, Fetch, FetchMode, Unavailable, fetcher
from ..settings import Settings
from ..watchdog import Watchdog

__all__ = ["DatabaseManager", "DatabaseProvider", "FetchMode", "resolve_settings"]

_CLOSED = "DatabaseManager is closed; create a new one"


def resolve_settings(
    providers: Mapping[str, Any] | None,
    order: list[str] | tuple[str, ...] | None,
    primary: str | None,
    failover_enabled: bool | None,
    settings: Settings | None,
    dotenv: str | Path | None,
    options: dict[str, Any],
) -> Settings:
    """The settings a manager's constructor arguments describe."""
    if settings is None:
        if providers is not None:
            settings = Settings.build(providers, order=order, primary=primary, **options)
        else:
            settings = Settings.from_env(dotenv=dotenv)
            overrides: dict[str, Any] = dict(options)
            if order is not None:
                overrides["failover_order"] = tuple(order)
            if primary is not None:
                overrides["primary"] = primary
            settings = settings.replace(**overrides) if overrides else settings
    if failover_enabled is not None:
        settings = settings.replace(failover_enabled=failover_enabled)
    return settings


class DatabaseManager:
    """Runs queries on the primary provider and fails over when it is down.

    ``DatabaseManager()`` reads the environment (and ``.env``);
    ``DatabaseManager(providers={"a": url, "b": url2}, order=["a", "b"])``
    reads nothing. A provider may also be ``{"url": ..., "weight": 2,
    "serverless": True, ...}``. Keyword options override `Settings` fields,
    e.g. ``hang_timeout=2.0``. Thread-safe; close it with `close_all()` or
    use it as a context manager.
    """

    def __init__(
        self,
        providers: Mapping[str, Any] | None = None,
        *,
        order: list[str] | tuple[str, ...] | None = None,
        primary: str | None = None,
        failover_enabled: bool | None = None,
        settings: Settings | None = None,
        listeners: tuple[Listener, ...] | list[Listener] = (),
        dotenv: str | Path | None = ".env",
        **options: Any,
    ) -> None:
        settings = resolve_settings(
            providers, order, primary, failover_enabled, settings, dotenv, options
        )
        self._events = Dispatcher(listeners)
        self._watchdog = Watchdog(probe_after=settings.hang_timeout / 4)
        self.providers: dict[str, DatabaseProvider] = {}
        self._core: Failover[DatabaseProvider] = Failover(settings, self.providers, self._events)
        # Pools start connecting (and may report failures) from here on.
        for name, target in settings.providers.items():
            self.providers[name] = DatabaseProvider(
                name,
                target,
                settings=settings,
                watchdog=self._watchdog,
                on_health_change=self._on_health_change,
            )
        self._core.replan()
        self._failback = Failback(
            self._core,
            {n: p.health.conninfo for n, p in self.providers.items()},
            self._events,
            self._watchdog,
        )
        for provider in self.providers.values():
            provider.health.gate_recovery = self._failback.before_return
            provider.health.after_recovery = self._failback.after_return

    # -- configuration ---------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._core.settings

    @property
    def primary_provider(self) -> str:
        return self._core.primary

    @property
    def failover_enabled(self) -> bool:
        return self._core.failover_enabled

    @failover_enabled.setter
    def failover_enabled(self, value: bool) -> None:
        self._core.failover_enabled = bool(value)
        self._core.replan()

    @property
    def failover_order(self) -> list[str]:
        return list(self._core.order)

    @failover_order.setter
    def failover_order(self, value: list[str]) -> None:
        self._core.set_order(value)

    def set_provider(self, name: str) -> None:
        """Make ``name`` the primary: queries go there first from now on."""
        self._core.set_primary(name)

    def add_listener(self, listener: Listener) -> None:
        self._events.add(listener)

    def register_table(self, table: str) -> None:
        """Also bring ``table``'s rows back to the primary at failback.

        The table needs a primary key column ``id`` (UUIDs recommended) and an
        ``updated_at`` column that every write sets; sequences it owns are
        moved past what a backup used.
        """
        self._failback.register_table(table)

    def _on_health_change(self, name: str, up: bool, reason: str | None) -> None:
        self._core.on_health_change(name, up, reason)
        if up and hasattr(self, "_failback"):
            self._failback.backup_healthy(name)

    def remove_listener(self, listener: Listener) -> None:
        self._events.remove(listener)

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
        broke mid-flight; by default plain SELECTs are, writes are not.
        ``read_only=True`` also lets the read routing policy choose the
        provider (see ``read_routing``).
        """
        fetch = fetcher(fetch_mode)
        core = self._core
        if core.closed:
            raise ManagerClosedError(_CLOSED)
        route = core.route(query, read_only, idempotent)
        if route.write and core.track_writes:
            if core.enter_write():
                route = core.route(query, read_only, idempotent)  # after a failback pause
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
                result = provider.run(query, params, fetch)
            except Unavailable as exc:
                error = core.attempt_unavailable(provider, exc, route, failures, t0)
                if error is not None:
                    raise error from exc.__cause__
                continue
            except Exception as exc:
                core.attempt_error(provider, exc, t0)
                raise
            core.attempt_ok(provider, epoch, failures, route, t0)
            return result
        raise core.all_failed(failures, route.write)

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
            with self._pinned(core.route("", False, False)) as conn:
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
                pool, conn = provider.checkout()
            except Unavailable as exc:
                failures[provider.name] = exc.reason
                provider.health.mark_down(exc.reason)
                continue
            break
        else:
            raise core.all_failed(failures, True)
        core.succeeded(provider, core.epoch, failures or None, True)
        health = provider.health
        w = self._watchdog.watch(conn.pgconn.socket, health)
        phase = "body"
        try:
            with conn.transaction():
                yield conn
                phase = "commit"
        except psycopg.Error as exc:
            error = core.transaction_error(provider, exc, phase, w.fired)
            if error is None:
                raise
            raise error from exc
        finally:
            self._watchdog.unwatch(w)
            pool.putconn(conn)
        health.last_alive = time.monotonic()
        core.last_write = time.monotonic()

    # -- health and stats --------------------------------------------------------------

    @property
    def serving_provider(self) -> str | None:
        """The provider that served the last statement (None before the first)."""
        return self._core.serving

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

    def get_provider_stats(self) -> dict[str, dict[str, Any]]:
        """Per provider: health, role, breaker, host, pool usage, last error, latency."""
        out = {}
        for name, provider in self.providers.items():
            stats = provider.stats()
            stats.update(self._core.describe(provider))
            out[name] = stats
        return out

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._core.closed

    def close_all(self) -> None:
        """Close every pool and stop the background threads. Idempotent."""
        if self._core.closed:
            return
        self._core.closed = True
        for provider in self.providers.values():
            provider.close()
        self._watchdog.close()

    close = close_all

    def __enter__(self) -> DatabaseManager:
        if self._core.closed:
            raise ManagerClosedError(_CLOSED)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        self.close_all()
        return False

    def __repr__(self) -> str:
        core = self._core
        state = "closed" if core.closed else f"serving={core.serving!r}"
        names = list(self.providers)
        return f"<DatabaseManager primary={core.primary!r} providers={names} {state}>"

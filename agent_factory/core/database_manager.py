"""DatabaseManager: one API over several PostgreSQL providers, with failover.

Queries run on the primary provider. When it is unavailable (refused, reset,
hung, shutting down, out of connections) they move to the next provider in
the failover order, and come back to the primary once it has passed
consecutive probes. SQL errors are never retried elsewhere. A statement that
was sent and then lost its connection is retried elsewhere only when it is
read-only or declared idempotent; otherwise `OutcomeUnknownError` says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import psycopg

from ..errors import (
    AllProvidersUnavailableError,
    ConfigurationError,
    HangTimeoutError,
    ManagerClosedError,
    OutcomeUnknownError,
    ProviderUnavailableError,
)
from ..events import Dispatcher, Listener
from ..policy import Kind, candidates, classify, may_retry_after_send
from ..provider import FETCHERS, DatabaseProvider, FetchMode, Unavailable
from ..settings import Settings
from ..watchdog import Watchdog

__all__ = ["DatabaseManager", "DatabaseProvider", "FetchMode"]

logger = logging.getLogger("agent_factory.core.database_manager")



class DatabaseManager:
    """Runs queries on the primary provider and fails over when it is down.

    ``DatabaseManager()`` reads the environment (and ``.env``);
    ``DatabaseManager(providers={"a": url, "b": url2}, order=["a", "b"])``
    reads nothing. Keyword options override `Settings` fields, e.g.
    ``hang_timeout=2.0``. Thread-safe; close it with `close_all()` or use it
    as a context manager.
    """

    def __init__(
        self,
        providers: Mapping[str, str] | None = None,
        *,
        order: list[str] | tuple[str, ...] | None = None,
        primary: str | None = None,
        failover_enabled: bool | None = None,
        settings: Settings | None = None,
        listeners: tuple[Listener, ...] | list[Listener] = (),
        dotenv: str | Path | None = ".env",
        **options: Any,
    ) -> None:
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
        self._settings = settings
        self._events = Dispatcher(listeners)
        self._lock = threading.Lock()
        self._closed = False
        self._watchdog = Watchdog(probe_after=settings.hang_timeout / 4)
        self._primary = settings.primary
        self._failover_enabled = settings.failover_enabled
        self._order = tuple(settings.failover_order)
        self._serving: str | None = None
        self._epoch = 0  # bumped on every health change
        self._next_failover_log = 0.0
        self._suppressed_logs = 0
        # Pools start connecting (and may report failures) from here on.
        self.providers: dict[str, DatabaseProvider] = {
            name: DatabaseProvider(
                name,
                target,
                settings=settings,
                watchdog=self._watchdog,
                on_health_change=self._on_health_change,
            )
            for name, target in settings.providers.items()
        }
        self._plan: tuple[DatabaseProvider, ...] = ()
        self._replan()

    # -- configuration ---------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def primary_provider(self) -> str:
        return self._primary

    @property
    def failover_enabled(self) -> bool:
        return self._failover_enabled

    @failover_enabled.setter
    def failover_enabled(self, value: bool) -> None:
        self._failover_enabled = bool(value)
        self._replan()

    @property
    def failover_order(self) -> list[str]:
        return list(self._order)

    @failover_order.setter
    def failover_order(self, value: list[str]) -> None:
        unknown = [n for n in value if n not in self.providers]
        if unknown:
            raise ConfigurationError(
                f"failover_order names unconfigured providers {unknown}; "
                f"available: {', '.join(self.providers)}"
            )
        self._order = tuple(value)
        self._replan()

    def set_provider(self, name: str) -> None:
        """Make ``name`` the primary: queries go there first from now on."""
        if name not in self.providers:
            raise ValueError(
                f"Provider {name!r} not configured. Available: {', '.join(self.providers)}"
            )
        logger.info("primary provider set to %r", name)
        self._primary = name
        self._replan()

    def _replan(self) -> None:
        names = candidates(self._primary, self._order, self._failover_enabled)
        self._plan = tuple(self.providers[n] for n in names)

    def add_listener(self, listener: Listener) -> None:
        self._events.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._events.remove(listener)

    # -- queries ---------------------------------------------------------------

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
        """
        fetch = FETCHERS.get(fetch_mode)
        if fetch is None:
            raise ValueError(f"fetch_mode must be 'all', 'one' or 'none', got {fetch_mode!r}")
        if self._closed:
            raise ManagerClosedError("DatabaseManager is closed; create a new one")
        failures: dict[str, str] | None = None
        timed = bool(self._events.query_listeners)
        for provider in self._plan:
            if not provider.health.up:
                continue
            epoch = self._epoch
            t0 = time.perf_counter() if timed else 0.0
            try:
                result = provider.run(query, params, fetch)
            except Unavailable as exc:
                failures = failures or {}
                failures[provider.name] = exc.reason
                provider.mark_down(exc.reason)
                unknown = exc.sent and not may_retry_after_send(query, read_only, idempotent)
                if timed:
                    outcome = "outcome_unknown" if unknown else "unavailable"
                    self._events.query_done(provider.name, time.perf_counter() - t0, outcome)
                if unknown:
                    raise OutcomeUnknownError(provider.name, exc.reason) from exc.__cause__
                continue
            except Exception as exc:
                if timed:
                    self._events.query_done(provider.name, time.perf_counter() - t0, "sql_error")
                if self._events:
                    self._emit_query_error(provider.name, exc)
                raise
            if timed:
                self._events.query_done(provider.name, time.perf_counter() - t0, "ok")
            # A call that started before the last health change (e.g. stuck
            # on a hung primary that just resumed) says nothing about where
            # traffic goes now.
            if epoch == self._epoch and (
                provider.name != self._serving or provider.name != self._primary
            ):
                self._served_by(provider.name, failures)
            return result
        raise self._all_failed(failures)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """Several statements in one transaction, pinned to one provider.

        The provider is chosen like for `execute_query` (only a provider that
        gave a live connection is used). If the connection is lost inside the
        block, nothing was committed and `ProviderUnavailableError` is raised;
        if it is lost during COMMIT, `OutcomeUnknownError`. The block is never
        replayed: retry it yourself if that is safe.
        """
        if self._closed:
            raise ManagerClosedError("DatabaseManager is closed; create a new one")
        failures: dict[str, str] = {}
        for provider in self._plan:
            if not provider.health.up:
                continue
            try:
                pool, conn = provider.checkout()
            except Unavailable as exc:
                failures[provider.name] = exc.reason
                provider.mark_down(exc.reason)
                continue
            break
        else:
            raise self._all_failed(failures)
        self._served_by(provider.name, failures or None)
        w = self._watchdog.watch(conn.pgconn.socket, provider)
        phase = "body"
        try:
            with conn.transaction():
                yield conn
                phase = "commit"
        except psycopg.Error as exc:
            if classify(exc) is Kind.SQL:
                provider.tag(exc)
                raise
            reason = provider.failure_reason(exc, w.fired)
            provider.mark_down(reason)
            if phase == "commit":
                raise OutcomeUnknownError(provider.name, reason) from exc
            error = HangTimeoutError if w.fired else ProviderUnavailableError
            raise error(
                provider.name,
                reason,
                f"transaction on provider {provider.name!r} lost its connection before "
                f"COMMIT ({reason}); nothing was committed",
            ) from exc
        finally:
            self._watchdog.unwatch(w)
            pool.putconn(conn)
        provider.last_alive = time.monotonic()

    def _emit_query_error(self, name: str, error: BaseException) -> None:
        self._events.emit(lambda li: li.on_query_error(name, error))

    def _all_failed(self, failures: dict[str, str] | None) -> Exception:
        if self._closed:
            return ManagerClosedError("DatabaseManager is closed; create a new one")
        reasons = dict(failures or {})
        for provider in self._plan:
            if provider.name not in reasons:
                reasons[provider.name] = f"down: {provider.health.last_error or 'unavailable'}"
        return AllProvidersUnavailableError(reasons)

    def _served_by(self, name: str, failures: dict[str, str] | None) -> None:
        primary = self._primary
        with self._lock:
            previous, self._serving = self._serving, name
        if name == primary:
            if previous is not None and previous != primary:
                logger.warning("returned to primary provider %r (from %r)", primary, previous)
                self._events.emit(lambda li: li.on_return_to_primary(primary, previous))
            return
        reason = (failures or {}).get(primary) or self.providers[primary].health.last_error
        if previous != name:
            self._events.emit(lambda li: li.on_failover(previous or primary, name, reason))
        now = time.monotonic()
        if now < self._next_failover_log:
            self._suppressed_logs += 1
            return
        self._next_failover_log = now + self._settings.failover_log_interval
        more = f" ({self._suppressed_logs} more since last log)" if self._suppressed_logs else ""
        self._suppressed_logs = 0
        logger.warning(
            "Executed on failover provider %r (primary %r unavailable: %s)%s",
            name,
            primary,
            reason,
            more,
        )

    def _on_health_change(self, provider: DatabaseProvider, up: bool, reason: str | None) -> None:
        self._epoch += 1
        name = provider.name
        self._events.emit(lambda li: li.on_health_change(name, up, reason))

    # -- health and stats ------------------------------------------------------

    @property
    def serving_provider(self) -> str | None:
        """The provider that served the last statement (None before the first)."""
        return self._serving

    def health_check(self, name: str | None = None) -> bool:
        """Health of one provider (the primary by default), cached for health_ttl."""
        provider = self.providers.get(name or self._primary)
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
        limit = time.monotonic() + self._settings.connect_timeout + self._settings.hang_timeout + 2
        for t in threads:
            t.join(timeout=max(0.0, limit - time.monotonic()))
        return {name: results.get(name, False) for name in self.providers}

    def get_provider_stats(self) -> dict[str, dict[str, Any]]:
        """Per provider: health, host, pool usage, last error and latency, role."""
        out = {}
        for name, provider in self.providers.items():
            stats = provider.stats()
            stats["role"] = self._role(provider)
            out[name] = stats
        return out

    def _role(self, provider: DatabaseProvider) -> str:
        if not provider.health.up:
            return "down"
        if provider.name == self._primary:
            return "primary"
        return "serving" if provider.name == self._serving else "backup"

    # -- lifecycle ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close_all(self) -> None:
        """Close every pool and stop the background threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for provider in self.providers.values():
            provider.close()
        self._watchdog.close()

    close = close_all

    def __enter__(self) -> DatabaseManager:
        if self._closed:
            raise ManagerClosedError("DatabaseManager is closed; create a new one")
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
        state = "closed" if self._closed else f"serving={self._serving!r}"
        return (
            f"<DatabaseManager primary={self._primary!r} "
            f"providers={list(self.providers)} {state}>"
        )

"""What the sync and async managers share: wiring, configuration, listeners, stats.

`BaseManager` builds the providers (through a factory the shell passes),
the `Failover` decisions, the failback and the watchdog, and answers every
question that needs no I/O. `DatabaseManager` and `AsyncDatabaseManager` add
only the calls that wait on a database.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic

import psycopg

from ..continuity.failback import Failback
from ..continuity.peek import Peeker
from ..continuity.witness import Witness
from ..engine.connections import JOURNAL_LOCAL, check_configure, give_back, lend
from ..engine.environment import settings_from_env
from ..engine.events import Dispatcher, Listener
from ..engine.failover import Failover, P
from ..engine.health import HealthCallback
from ..engine.settings import Settings
from ..engine.stats import ProviderStats
from ..engine.watchdog import Watchdog


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
            settings = settings_from_env(dotenv=dotenv)
            overrides: dict[str, Any] = dict(options)
            if order is not None:
                overrides["failover_order"] = tuple(order)
            if primary is not None:
                overrides["primary"] = primary
            settings = settings.replace(**overrides) if overrides else settings
    if failover_enabled is not None:
        settings = settings.replace(failover_enabled=failover_enabled)
    return settings


class BaseManager(Generic[P]):
    """The parts of a manager without I/O."""

    _kind = "DatabaseManager"

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
        check_configure(settings, asynchronous=self._kind != "DatabaseManager")
        self._events = Dispatcher(listeners)
        self._watchdog = Watchdog(probe_after=settings.hang_timeout / 4)
        self.providers: dict[str, P] = {}
        self._core: Failover[P] = Failover(settings, self.providers, self._events)
        self._failback: Failback | None = None
        # Pools start connecting (and may report failures) from here on.
        for name in settings.providers:
            self.providers[name] = self._new_provider(
                name, settings, self._watchdog, self._on_health_change
            )
        self._core.replan()
        conninfos = {n: p.health.conninfo for n, p in self.providers.items()}
        self._failback = Failback(
            self._core,
            conninfos,
            self._events,
            self._watchdog,
        )
        for provider in self.providers.values():
            provider.health.gate_recovery = self._failback.before_return
            provider.health.after_recovery = self._failback.after_return
        self._failback.start()
        settings = self._core.settings
        self._witness = Witness(self._core, conninfos, Peeker(
            conninfos, self._watchdog, settings.hang_timeout, settings.connect_timeout))
        self._witness.start()

    def _new_provider(
        self, name: str, settings: Settings, watchdog: Watchdog, on_change: HealthCallback
    ) -> P:
        """One provider of this manager's kind (the shells say which)."""
        raise NotImplementedError

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

    def remove_listener(self, listener: Listener) -> None:
        self._events.remove(listener)

    def register_table(self, table: str) -> None:
        """Journal ``table`` on every provider, so failback brings back its changes.

        The table needs a primary key (client-chosen or derived keys
        recommended, see the README's "Replication and failback"); a table
        without one is a `ConfigurationError`. Sequences it owns are kept
        apart between the primary and the backups.
        """
        assert self._failback is not None
        self._failback.register_table(table)

    def _journal(self, name: str, write: bool) -> bool | None:
        """How a statement on provider ``name`` meets the journal: recorded (a write
        standing in for the primary), not recorded (a write on the primary), or a read."""
        if not write or not self._core.track_writes:
            return None
        return name != self._core.primary

    def _failback_ready(self, name: str) -> bool:
        """A write may go to backup ``name`` without I/O first (journal and witness known)."""
        return (self._failback is None or self._failback.journaled(name)) and (
            self._witness.known(name))

    def _prepare_backup_write(self, name: str) -> None:
        """Before a write goes to backup ``name``: its journal is installed, and the
        split-brain fence lets it through (else `SplitBrainRefusedError`). May do I/O
        once per backup (see `_failback_ready`)."""
        assert self._failback is not None
        self._failback.ensure_journaled(name)
        if not self._witness.known(name):
            self._witness.look(name)
        self._witness.check(name)

    def _journal_local(self, conn: Any, name: str) -> str | None:
        """What a transaction on provider ``name`` runs first for the journal, if anything."""
        if self._journal(name, True):
            return JOURNAL_LOCAL
        if getattr(conn, "journal_on", False) is not False:  # on, or unknown
            return "SELECT set_config('agent_factory.journal', 'off', true)"
        return None

    # -- connections handed out whole (connection(), the SQLAlchemy engine) ------------

    def _lend(self, conn: Any, name: str) -> str | None:
        """Prepare a pooled connection of provider ``name`` for `connection()`: journaled
        when ``name`` stands in for the primary. The statement to run on it first, if any."""
        return lend(conn, self._journal(name, True), self._core.settings.providers[name].pooler)

    def _give_back(self, conn: Any, *, lent: bool) -> None:
        """Before a pinned connection goes back to its pool (see `connections.give_back`)."""
        give_back(conn, self._core.settings.row_factory, lent=lent)

    def _lent_error(self, provider: P, exc: psycopg.Error, hung: bool) -> Exception | None:
        """Why a statement on a `connection()` failed; None for a SQL error (re-raise it).
        Each statement there commits on its own, so a lost connection leaves the
        outcome of the one in flight unknown."""
        return self._core.transaction_error(provider, exc, phase="commit", hung=hung)

    def _direct_journal(self, name: str) -> bool:
        """Whether a connection of its own to provider ``name`` must journal its writes
        (``name`` stands in for the primary). Fenced first, like every write path:
        `SplitBrainRefusedError` while the primary may be alive for others."""
        if not self._journal(name, True):
            return False
        self._prepare_backup_write(name)
        return True

    def failback_status(self) -> dict[str, Any]:
        """Per backup: changes pending in its journal, oldest, last drain, last error;
        and the conflicts this process's drains met (``pending``/``conflicts`` by backup)."""
        assert self._failback is not None
        backups = {n: st.as_dict() for n, st in self._failback.status.items()
                   if n != self._core.primary}
        return {
            "pending": {n: b["pending"] for n, b in backups.items()},
            "conflicts": {n: b["conflicts"] for n, b in backups.items()},
            "backups": backups,
            "policy": self._core.settings.conflict_policy,
        }

    def failback_now(self) -> int:
        """Drain every reachable backup's journal into the primary now, as the drainer
        thread does every ``drain_interval``; the changes moved. Failures are not
        raised: they are in `failback_status` (``last_error``), logged and counted."""
        assert self._failback is not None
        return self._failback.drain_now()

    def _on_health_change(self, name: str, up: bool, reason: str | None) -> None:
        self._core.on_health_change(name, up, reason)
        if up and self._failback is not None:
            self._failback.backup_healthy(name)

    # -- state -------------------------------------------------------------------------

    @property
    def serving_provider(self) -> str | None:
        """The provider that served the last statement (None before the first)."""
        return self._core.serving

    @property
    def closed(self) -> bool:
        return self._core.closed

    def get_hedge_stats(self) -> dict[str, int]:
        """Hedged reads so far: sent, won (answered first), refused by the budget."""
        return self._core.budget.stats()

    def get_provider_stats(self) -> dict[str, ProviderStats]:
        """Per provider: health, role, breaker, host, pool usage, last error, latency, lag.

        Each entry is a `ProviderStats` (keys and types in `engine.stats`).
        """
        assert self._failback is not None
        status = self._failback.status
        return {
            name: {**provider.stats(), **self._core.describe(provider), **status[name].stats()}
            for name, provider in self.providers.items()
        }

    def __repr__(self) -> str:
        core = self._core
        state = "closed" if core.closed else f"serving={core.serving!r}"
        names = list(self.providers)
        return f"<{self._kind} primary={core.primary!r} providers={names} {state}>"

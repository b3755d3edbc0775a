"""What the tests observe of a manager: who served a call, the rows, the events.

A provider is recognised by its server's port (``inet_server_port()``), which
the fault proxy in front of it does not change.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.events import Listener
from agent_factory.testing.fleet import Fleet


def provider_of(fleet: Fleet, port: int) -> str:
    """The provider whose server listens on ``port``."""
    return next(m.name for m in fleet if m.server.port == port)


def served_by(db: DatabaseManager, fleet: Fleet, **kw: Any) -> str:
    """Run a read and say which provider's server answered it."""
    (port,) = db.execute_query("SELECT inet_server_port()", fetch_mode="one", **kw)
    return provider_of(fleet, port)


async def served_by_async(db: AsyncDatabaseManager, fleet: Fleet) -> str:
    """`served_by` for the async manager."""
    (port,) = await db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    return provider_of(fleet, port)


def count_rows(fleet: Fleet, name: str, table: str) -> int:
    """Rows of ``table`` on provider ``name``'s server (read directly, not through its proxy)."""
    with psycopg.connect(fleet[name].direct_url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


class Recorder(Listener):
    """Every event a manager reports, in order: (kind, provider, ...).

    Kinds: "failover" (from, to), "failback" (primary, from), "health"
    (provider, healthy), "query_error" (provider, error type) and "query"
    (provider, outcome).
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()

    def _add(self, *event: Any) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self) -> set[str]:
        with self._lock:
            return {e[0] for e in self.events}

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self._add("failover", from_provider, to_provider)

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self._add("failback", primary, from_provider)

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self._add("health", provider, healthy)

    def on_query_error(self, provider: str, error: BaseException) -> None:
        self._add("query_error", provider, type(error).__name__)

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        self._add("query", provider, outcome)


class HealthLog(Listener):
    """Every health change a manager reported, in order: (provider, healthy, reason)."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, bool, str | None]] = []

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self.changes.append((provider, healthy, reason))

    def downs(self) -> list[str]:
        """The providers marked down, in order (once per change)."""
        return [provider for provider, healthy, _ in self.changes if not healthy]


class Reconciled(Listener):
    """Every failback reconciliation: (primary, source, rows brought back)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []

    def on_reconcile(self, primary: str, source: str, rows: int) -> None:
        self.events.append((primary, source, rows))

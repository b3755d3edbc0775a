"""What the tests observe of a manager: who served a call, the rows, the events.

A provider is recognised by its server's port (``inet_server_port()``), which
the fault proxy in front of it does not change.
"""

from __future__ import annotations

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

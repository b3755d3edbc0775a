"""A SQLAlchemy engine on the manager's providers: it follows failover and the return.

    from agent_factory.integrations.sqlalchemy import create_engine

    engine = create_engine(db)          # db: a DatabaseManager
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))

New connections go to the first provider, in the manager's failover order,
that accepts one (healthy providers first): that is SQLAlchemy's ``creator=``.
``pool_pre_ping`` replaces a pooled connection whose server died, so the
first statement after a crash already reaches the backup. When the manager
fails over or its primary comes back, a listener disposes the engine's pool,
so every connection after that goes to the provider the manager now prefers.

A connection opened on a backup (a provider other than the manager's
primary) is fenced and journaled like the manager's own writes: the
split-brain witness must let writes through first (else the creator raises
`SplitBrainRefusedError`), and the connection carries the journal setting
for its whole life, so what it writes comes back to the primary at
failback, even if SQLAlchemy keeps it after the primary returned
(docs/integrations.md). Needs ``pip install 'agent-factory[sqlalchemy]'``.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import psycopg

from ..core.database_manager import DatabaseManager
from ..engine.connections import prepare_direct
from ..engine.events import Listener
from ..engine.provider import Unavailable
from ..errors import MissingDependencyError, SplitBrainRefusedError

try:
    import sqlalchemy
    from sqlalchemy.engine import Engine
except ImportError as exc:
    raise MissingDependencyError(
        "agent_factory.integrations.sqlalchemy needs SQLAlchemy: "
        "pip install 'agent-factory[sqlalchemy]'"
    ) from exc

__all__ = ["ProviderConnector", "create_engine"]


class ProviderConnector:
    """SQLAlchemy's ``creator``: a new connection to the provider the manager prefers.

    ``current`` names the provider of the last connection it opened.
    """

    def __init__(self, db: DatabaseManager) -> None:
        self._db = db
        self.current: str | None = None

    def candidates(self) -> list[str]:
        """Providers to try, in failover order, the ones the manager sees healthy first."""
        db = self._db
        order = db.failover_order if db.failover_enabled else [db.primary_provider]
        stats = db.get_provider_stats()
        return sorted(order, key=lambda name: not stats[name]["healthy"])

    def __call__(self) -> psycopg.Connection[Any]:
        errors: list[str] = []
        settings = self._db.settings
        for name in self.candidates():
            target = settings.providers[name]
            timeout = max(1, math.ceil(settings.tuning(name).connect_timeout))
            try:
                # On a backup: its journal installed, and the fence asked first.
                journal = self._db._direct_journal(name)
                conn = psycopg.connect(target.conninfo(connect_timeout=timeout))
            except SplitBrainRefusedError:
                raise  # SQLAlchemy wraps it (``exc.orig``); no backup may take writes now
            except Unavailable as exc:
                errors.append(f"{name}: {exc.reason}")
                continue
            except psycopg.Error as exc:
                # libpq's messages name host and port, never the password.
                errors.append(f"{name}: {str(exc).strip()}")
                continue
            if journal:
                try:
                    prepare_direct(conn, target.pooler)
                except psycopg.Error as exc:
                    conn.close()
                    errors.append(f"{name}: {str(exc).strip()}")
                    continue
            self.current = name
            return conn
        raise psycopg.OperationalError("no provider accepted a connection: " + "; ".join(errors))


class DisposeOnSwitch(Listener):
    """Disposes the engine's pool when the manager's preferred provider changes.

    Holds the engine weakly: a forgotten engine is collected, and this
    listener then does nothing.
    """

    def __init__(self, engine: Engine, connector: ProviderConnector, db: DatabaseManager
                 ) -> None:
        self._engine = weakref.ref(engine)
        self._connector = connector
        self._db = db
        self._lock = threading.Lock()

    def _dispose(self) -> None:
        engine = self._engine()
        if engine is not None:
            with self._lock:
                engine.dispose()

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self._dispose()

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self._dispose()

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        # Traffic through the engine alone need not move the manager's own
        # routing, so health decides too: the engine's provider went down, or
        # one it prefers came back.
        current = self._connector.current
        if current is None:
            return
        order = self._db.failover_order
        if (not healthy and provider == current) or (
                healthy and provider in order and current in order
                and order.index(provider) < order.index(current)):
            self._dispose()


def create_engine(db: DatabaseManager, **options: Any) -> Engine:
    """A SQLAlchemy engine whose connections come from ``db``'s providers.

    ``options`` go to `sqlalchemy.create_engine` (``pool_size``, ``echo``...);
    ``pool_pre_ping`` defaults to True. The engine's listener stays on ``db``
    until ``db`` closes.
    """
    options.setdefault("pool_pre_ping", True)
    connector = ProviderConnector(db)
    engine = sqlalchemy.create_engine("postgresql+psycopg://", creator=connector, **options)
    db.add_listener(DisposeOnSwitch(engine, connector, db))
    return engine

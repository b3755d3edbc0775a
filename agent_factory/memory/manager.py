"""The manager a store queries through: given, or created from the environment on first use."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from ..core.async_database_manager import AsyncDatabaseManager
from ..core.database_manager import DatabaseManager

M = TypeVar("M", DatabaseManager, AsyncDatabaseManager)


class _Managed(Generic[M]):
    """Holds the store's manager, created by ``_factory`` on first use if none was given."""

    _factory: type[M]

    def __init__(self, db: M | None) -> None:
        self._db: M | None = db
        self._owns_db = db is None
        self._lock = threading.Lock()

    @property
    def db(self) -> M:
        """The manager queries go through (created from the environment if none was given)."""
        if self._db is None:
            with self._lock:
                if self._db is None:
                    self._db = self._factory()
        return self._db


class ManagedStore(_Managed[DatabaseManager]):
    """A sync store's :class:`DatabaseManager`; ``close()`` closes it only if we created it."""

    _factory = DatabaseManager

    def close(self) -> None:
        """Close the manager if this store created it."""
        if self._owns_db and self._db is not None:
            self._db.close_all()


class AsyncManagedStore(_Managed[AsyncDatabaseManager]):
    """An async store's :class:`AsyncDatabaseManager`; ``await close()`` closes one we created.

    Creating the manager starts no I/O on the event loop: its pools open on the
    first awaited query.
    """

    _factory = AsyncDatabaseManager

    async def close(self) -> None:
        """Close the manager if this store created it."""
        if self._owns_db and self._db is not None:
            await self._db.close()

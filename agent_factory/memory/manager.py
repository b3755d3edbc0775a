"""The manager a store queries through: given, or created from the environment on first use."""

from __future__ import annotations

import threading

from ..core.database_manager import DatabaseManager


class ManagedStore:
    """Holds the store's :class:`DatabaseManager`; ``close()`` closes it only if we created it."""

    def __init__(self, db: DatabaseManager | None) -> None:
        self._db = db
        self._owns_db = db is None
        self._lock = threading.Lock()

    @property
    def db(self) -> DatabaseManager:
        """The manager queries go through (created from the environment if none was given)."""
        if self._db is None:
            with self._lock:
                if self._db is None:
                    self._db = DatabaseManager()
        return self._db

    def close(self) -> None:
        """Close the manager if this store created it."""
        if self._owns_db and self._db is not None:
            self._db.close_all()

"""The storage interface for sessions, and two local storages.

Every storage follows the same rules. ``save_session`` stores the session's
fields (the last save wins) and *merges* its messages by `Message.id`: a
message saved again replaces its earlier copy, messages stored by someone
else are kept. So saving twice never duplicates, and two writers appending
to the same session lose nothing. A save never removes messages: to rewrite
a session, ``delete_session`` it first. Loaded messages are ordered by their
position in the saving session, then timestamp, then id.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .history import Message

if TYPE_CHECKING:
    from .session import Session

__all__ = ["InMemoryStorage", "MemoryStorage", "SQLiteStorage", "merge_messages"]


class MemoryStorage(ABC):
    """Where sessions live: save, load, delete and list them."""

    @abstractmethod
    def save_session(self, session: Session) -> None:
        """Store the session; its messages are merged with the stored ones by id."""

    @abstractmethod
    def load_session(self, session_id: str) -> Session | None:
        """The stored session bound to this storage, or None if there is none."""

    @abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Remove the session; True if there was something to remove."""

    @abstractmethod
    def list_sessions(self, user_id: str | None = None) -> list[str]:
        """Sorted ids of the stored sessions, of one user when ``user_id`` is given."""


def merge_messages(stored: Iterable[Message], incoming: Iterable[Message]) -> list[Message]:
    """Union by id (``incoming`` wins), ordered by (position, timestamp, id)."""
    ranked: dict[str, tuple[int, Message]] = {}
    for source in (stored, incoming):
        for position, message in enumerate(source):
            ranked[message.id] = (position, message)
    ordered = sorted(ranked.values(), key=lambda r: (r[0], r[1].timestamp, r[1].id))
    return [message for _, message in ordered]


def _merged_dict(stored: dict[str, Any] | None, session: Session) -> dict[str, Any]:
    from .session import Session

    data = session.to_dict()
    if stored is None:
        return data
    old = Session.from_dict(stored).history.get_messages()
    data["history"] = {
        "messages": [m.to_dict() for m in merge_messages(old, session.history.get_messages())]
    }
    return data


class InMemoryStorage(MemoryStorage):
    """Sessions in a dict of this process: fast, gone when the process ends."""

    def __init__(self) -> None:
        self._sessions: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def save_session(self, session: Session) -> None:
        with self._lock:
            stored = self._sessions.get(session.session_id)
            # A JSON round trip: the stored copy shares nothing with the live session.
            self._sessions[session.session_id] = json.loads(
                json.dumps(_merged_dict(stored, session))
            )

    def load_session(self, session_id: str) -> Session | None:
        from .session import Session

        with self._lock:
            data = self._sessions.get(session_id)
            data = None if data is None else json.loads(json.dumps(data))
        return None if data is None else Session.from_dict(data, storage=self)

    def delete_session(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def list_sessions(self, user_id: str | None = None) -> list[str]:
        with self._lock:
            return sorted(
                sid
                for sid, data in self._sessions.items()
                if user_id is None or data.get("user_id") == user_id
            )


class SQLiteStorage(MemoryStorage):
    """Sessions in a local SQLite file, one JSON document per session.

    Table ``sessions`` (session_id PRIMARY KEY, user_id, data, created_at,
    last_active), as in the original module. Safe for several threads and
    processes: a save reads, merges and writes under SQLite's write lock.
    """

    def __init__(self, db_path: str | Path = "sessions.db", *, timeout: float = 30.0) -> None:
        self.db_path = str(db_path)
        self._timeout = timeout
        with self._connect() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS sessions ("
                " session_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, data TEXT NOT NULL,"
                " created_at TEXT NOT NULL, last_active TEXT NOT NULL)"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a write transaction (BEGIN IMMEDIATE), committed on success."""
        with closing(
            sqlite3.connect(self.db_path, timeout=self._timeout, isolation_level=None)
        ) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.db_path, timeout=self._timeout)) as conn:
            return conn.execute(sql, params).fetchall()

    def save_session(self, session: Session) -> None:
        with self._connect() as conn:
            row = conn.execute(
                "SELECT data FROM sessions WHERE session_id = ?", (session.session_id,)
            ).fetchone()
            data = _merged_dict(None if row is None else json.loads(row[0]), session)
            conn.execute(
                "INSERT OR REPLACE INTO sessions"
                " (session_id, user_id, data, created_at, last_active) VALUES (?, ?, ?, ?, ?)",
                (session.session_id, session.user_id, json.dumps(data),
                 data["created_at"], data["last_active"]),
            )

    def load_session(self, session_id: str) -> Session | None:
        from .session import Session

        rows = self._read("SELECT data FROM sessions WHERE session_id = ?", (session_id,))
        return Session.from_dict(json.loads(rows[0][0]), storage=self) if rows else None

    def delete_session(self, session_id: str) -> bool:
        with self._connect() as conn:
            return conn.execute(
                "DELETE FROM sessions WHERE session_id = ?", (session_id,)
            ).rowcount > 0

    def list_sessions(self, user_id: str | None = None) -> list[str]:
        if user_id is None:
            rows = self._read("SELECT session_id FROM sessions ORDER BY session_id")
        else:
            rows = self._read(
                "SELECT session_id FROM sessions WHERE user_id = ? ORDER BY session_id",
                (user_id,),
            )
        return [r[0] for r in rows]

"""SQLite storage for sessions, and the rules every storage follows.

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
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from .session import MemoryStorage, Session, _merged_dict

__all__ = ["SQLiteStorage"]


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

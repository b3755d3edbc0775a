"""Sessions in the ``session_memories`` table, through `DatabaseManager` (with failover).

One metadata row per session (``memory_type='session_metadata'``) and one
row per message (``message_<role>``, keyed by ``(session_id, message_id)``).
A save is a single statement, so one round trip, atomic, and idempotent: it
upserts the metadata row and every message, and may therefore be retried on
another provider after a lost connection. A load is a single SELECT.

Providers are independent databases: a session saved while a backup served
is on that backup only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from ..core.database_manager import DatabaseManager
from ..errors import InvalidMemoryError
from .calls import Call, run
from .history import ROLES, Message, MessageHistory, parse_timestamp, row_id, to_utc
from .manager import ManagedStore
from .session import AsyncMemoryStorage, MemoryStorage, Session

__all__ = ["ATOM_TYPES", "PostgresMemoryStorage", "SessionCalls"]

# memory_type values of free-form memory atoms (the schema's CHECK allows these).
ATOM_TYPES = ("context", "decision", "action", "issue", "log")


def check_atom_type(memory_type: str) -> None:
    """Refuse a memory type that is not one of the free-form atom types."""
    if memory_type not in ATOM_TYPES:
        raise InvalidMemoryError(
            f"memory_type {memory_type!r} is not an atom type; allowed: {', '.join(ATOM_TYPES)}"
        )

_SAVE = """
WITH meta AS (
    INSERT INTO {t} AS s (id, session_id, user_id, memory_type, content, created_at)
    VALUES (%(meta_id)s::uuid, %(sid)s::text, %(uid)s::text, 'session_metadata',
            %(meta)s::jsonb, %(created)s)
    ON CONFLICT (session_id) WHERE memory_type = 'session_metadata'
    DO UPDATE SET user_id = EXCLUDED.user_id, content = EXCLUDED.content,
                  created_at = EXCLUDED.created_at
    RETURNING 1
), msgs AS (
    INSERT INTO {t} AS s
        (id, session_id, user_id, memory_type, message_id, message_index, content, created_at)
    SELECT m.rid, %(sid)s::text, %(uid)s::text, 'message_' || m.role, m.id, m.idx, m.body, m.ts
    FROM jsonb_to_recordset(%(msgs)s::jsonb)
        AS m(rid uuid, id text, role text, idx integer, body jsonb, ts timestamptz)
    ON CONFLICT (session_id, message_id) DO UPDATE SET
        user_id = EXCLUDED.user_id, memory_type = EXCLUDED.memory_type,
        message_index = EXCLUDED.message_index, content = EXCLUDED.content,
        created_at = EXCLUDED.created_at
    WHERE (s.user_id, s.memory_type, s.message_index, s.content, s.created_at)
        IS DISTINCT FROM (EXCLUDED.user_id, EXCLUDED.memory_type, EXCLUDED.message_index,
                          EXCLUDED.content, EXCLUDED.created_at)
    RETURNING 1
)
SELECT (SELECT count(*) FROM meta), (SELECT count(*) FROM msgs)
"""

_LOAD = """
SELECT memory_type, user_id, coalesce(message_id, id::text), content, created_at
FROM {t}
WHERE session_id = %s
  AND (memory_type = 'session_metadata' OR starts_with(memory_type, 'message_'))
ORDER BY memory_type <> 'session_metadata', message_index, created_at, message_id
"""

_DELETE = """
WITH gone AS (DELETE FROM {t} WHERE session_id = %s RETURNING 1)
SELECT count(*) FROM gone
"""

_LIST = """
SELECT session_id FROM {t}
WHERE memory_type = 'session_metadata' AND (%(uid)s::text IS NULL OR user_id = %(uid)s)
ORDER BY session_id
"""

_ATOM_COLUMNS = "id::text, session_id, user_id, memory_type, content, metadata, created_at"

_SAVE_ATOM = f"""
INSERT INTO {{t}} AS s (id, session_id, user_id, memory_type, content, metadata)
VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb)
ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content
RETURNING {_ATOM_COLUMNS}
"""

_QUERY_ATOMS = f"""
SELECT {_ATOM_COLUMNS} FROM {{t}}
WHERE (%(sid)s::text IS NULL OR session_id = %(sid)s)
  AND (%(uid)s::text IS NULL OR user_id = %(uid)s)
  AND (memory_type = %(type)s OR %(type)s::text IS NULL AND memory_type = ANY(%(atoms)s))
ORDER BY created_at DESC, id
LIMIT %(limit)s
"""


def _render(template: str, table: str) -> str:
    return sql.SQL(template).format(t=sql.Identifier(*table.split("."))).as_string()


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMemoryError(f"{what} is not JSON-serializable: {exc}") from exc


def message_rows(session_id: str, messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages as ``session_memories`` rows (one per id: the last copy wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for index, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidMemoryError(
                f"message role {m.role!r} cannot be stored; allowed: {', '.join(ROLES)}"
            )
        body = {**m.to_dict(), "message_index": index}
        rows.pop(m.id, None)
        rows[m.id] = {"rid": row_id(session_id, "message", m.id), "id": m.id,
                      "role": m.role, "idx": index, "body": body, "ts": body["timestamp"]}
    return list(rows.values())


def session_content(session: Session) -> dict[str, Any]:
    """The metadata row's ``content`` (the original module's layout)."""
    return {
        "created_at": session.created_at.isoformat(),
        "last_active": session.last_active.isoformat(),
        "metadata": session.metadata,
        "message_count": len(session.history),
    }


def session_from_rows(
    session_id: str, rows: Sequence[tuple[Any, ...]],
    storage: MemoryStorage | AsyncMemoryStorage,
) -> Session | None:
    """Rebuild a session from (memory_type, user_id, message_id, content, created_at) rows."""
    if not rows or rows[0][0] != "session_metadata":
        return None
    _, user_id, _, meta, meta_created = rows[0]
    history = MessageHistory(
        Message(
            role=body.get("role", memory_type.removeprefix("message_")),
            content=body["content"],
            timestamp=to_utc(created),
            metadata=body.get("metadata") or {},
            id=message_id,
        )
        for memory_type, _, message_id, body, created in rows[1:]
    )
    return Session(
        session_id=session_id,
        user_id=user_id,
        history=history,
        metadata=dict(meta.get("metadata") or {}),
        created_at=parse_timestamp(meta.get("created_at") or meta_created),
        last_active=parse_timestamp(meta.get("last_active") or meta_created),
        storage=storage,
    )


_CLEAR = """
WITH gone AS (
    DELETE FROM {t} WHERE session_id = %s
      AND (memory_type = 'session_metadata' OR starts_with(memory_type, 'message_'))
    RETURNING 1
)
SELECT count(*) FROM gone
"""


def _count(row: tuple[Any, ...] | None) -> int:
    return int(row[0]) if row else 0


class SessionCalls:
    """The statements of a sessions table, as `Call` objects both storage twins run."""

    def __init__(self, table_name: str) -> None:
        self.table_name = table_name
        self._sql = {
            name: _render(template, table_name)
            for name, template in (("save", _SAVE), ("load", _LOAD), ("delete", _DELETE),
                                   ("clear", _CLEAR), ("list", _LIST), ("save_atom", _SAVE_ATOM),
                                   ("query_atoms", _QUERY_ATOMS))
        }

    def save(self, session: Session) -> Call[None]:
        """Upsert the metadata row and every message in one atomic statement."""
        params = {
            "sid": session.session_id,
            "meta_id": row_id(session.session_id, "session_metadata"),
            "uid": session.user_id,
            "meta": _json(session_content(session), "session metadata"),
            "created": session.created_at,
            "msgs": _json(message_rows(session.session_id, session.history.get_messages()),
                          "a message"),
        }
        return Call(self._sql["save"], params, "one", lambda _: None, idempotent=True)

    def load(self, session_id: str, storage: MemoryStorage | AsyncMemoryStorage
             ) -> Call[Session | None]:
        return Call(self._sql["load"], (session_id,), "all",
                    lambda rows: session_from_rows(session_id, rows, storage), read_only=True)

    def delete(self, session_id: str) -> Call[bool]:
        return Call(self._sql["delete"], (session_id,), "one", lambda row: _count(row) > 0,
                    idempotent=True)

    def clear_messages(self, session_id: str) -> Call[int]:
        return Call(self._sql["clear"], (session_id,), "one", _count, idempotent=True)

    def list_sessions(self, user_id: str | None) -> Call[list[str]]:
        return Call(self._sql["list"], {"uid": user_id}, "all",
                    lambda rows: [r[0] for r in rows], read_only=True)

    def save_atom(self, session_id: str, user_id: str, memory_type: str,
                  content: dict[str, Any], metadata: dict[str, Any] | None
                  ) -> Call[dict[str, Any]]:
        check_atom_type(memory_type)
        params = (uuid.uuid4(), session_id, user_id, memory_type,
                  _json(content, "atom content"), _json(metadata or {}, "atom metadata"))
        return Call(self._sql["save_atom"], params, "one", _atom, idempotent=True)

    def query_atoms(self, session_id: str | None, user_id: str | None,
                    memory_type: str | None, limit: int) -> Call[list[dict[str, Any]]]:
        params = {"sid": session_id, "uid": user_id, "type": memory_type,
                  "atoms": list(ATOM_TYPES), "limit": limit}
        return Call(self._sql["query_atoms"], params, "all",
                    lambda rows: [_atom(r) for r in rows], read_only=True)


class PostgresMemoryStorage(ManagedStore, MemoryStorage):
    """Sessions and memory atoms in PostgreSQL, on the providers of a `DatabaseManager`.

    ``db=None`` creates ``DatabaseManager()`` (from the environment) on first
    use, and `close()` closes it; a manager passed in is left open.
    `AsyncPostgresMemoryStorage` is the same storage for asyncio.
    """

    def __init__(
        self, db: DatabaseManager | None = None, *, table_name: str = "session_memories"
    ) -> None:
        super().__init__(db)
        self.table_name = table_name
        self._calls = SessionCalls(table_name)

    # -- sessions ----------------------------------------------------------------

    def save_session(self, session: Session) -> None:
        """Upsert the metadata row and every message in one atomic statement."""
        run(self.db, self._calls.save(session))

    def load_session(self, session_id: str) -> Session | None:
        return run(self.db, self._calls.load(session_id, self))

    def delete_session(self, session_id: str) -> bool:
        """Delete every row of the session (messages and memory atoms too)."""
        return run(self.db, self._calls.delete(session_id))

    def clear_messages(self, session_id: str) -> int:
        """Delete the session's messages and metadata row, keeping its memory atoms.

        Returns how many rows went.
        """
        return run(self.db, self._calls.clear_messages(session_id))

    def list_sessions(self, user_id: str | None = None) -> list[str]:
        return run(self.db, self._calls.list_sessions(user_id))

    # -- memory atoms ------------------------------------------------------------

    def save_memory_atom(
        self,
        session_id: str,
        user_id: str,
        memory_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store a free-form atom (context, decision, action, issue, log); returns the row."""
        return run(self.db, self._calls.save_atom(session_id, user_id, memory_type, content,
                                                  metadata))

    def query_memory_atoms(
        self,
        session_id: str | None = None,
        user_id: str | None = None,
        memory_type: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Atoms matching every given filter, newest first.

        ``memory_type=None`` means any atom type (not the session's own rows).
        """
        return run(self.db, self._calls.query_atoms(session_id, user_id, memory_type, limit))

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> PostgresMemoryStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresMemoryStorage table={self.table_name!r} db={self._db!r}>"


def _atom(row: tuple[Any, ...]) -> dict[str, Any]:
    keys = ("id", "session_id", "user_id", "memory_type", "content", "metadata", "created_at")
    atom = dict(zip(keys, row, strict=True))
    atom["created_at"] = to_utc(atom["created_at"])
    return atom

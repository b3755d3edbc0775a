"""Sessions in ``session_memories`` through Supabase's REST API (PostgREST).

The backward-compatible storage of the original module, on the official
``supabase`` client (``pip install supabase``), imported only when a storage
is created. Rows have the same layout as `PostgresMemoryStorage`'s, so
either can read what the other wrote. There is no failover here: REST goes
to the one Supabase project.

A save is two or three requests: the messages in one upsert (atomic, keyed
by ``(session_id, message_id)``), then the metadata row. The metadata row is
written last so that a session is visible only with its messages; its
unique index is partial, which PostgREST's ``on_conflict`` cannot name, so
it is updated, or inserted when missing (a concurrent insert is retried as
an update).
"""

from __future__ import annotations

import importlib
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.environment import load_environment
from ..engine.settings import is_placeholder
from ..errors import (
    ConfigurationError,
    MemoryStorageError,
    MissingDependencyError,
)
from .history import ROLES, parse_timestamp
from .postgres import ATOM_TYPES, check_atom_type, message_rows, session_content, session_from_rows
from .session import MemoryStorage, Session

__all__ = ["SupabaseMemoryStorage"]

KEY_VARIABLES = ("SUPABASE_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_ANON_KEY")
_MESSAGE_TYPES = tuple(f"message_{role}" for role in ROLES)
_LOAD_COLUMNS = "memory_type,user_id,message_id,id,content,created_at"
_ATOM_COLUMNS = "id,session_id,user_id,memory_type,content,metadata,created_at"
_UNIQUE_VIOLATION = "23505"
_FRACTION = re.compile(r"\.(\d{1,6})(?=[+-]|$)")


def _setting(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or is_placeholder(value) else value


def parse_rest_timestamp(value: str) -> datetime:
    """A timestamp as PostgREST writes it (``Z``, 1-6 fraction digits) as aware UTC."""
    text = value.replace("Z", "+00:00").replace(" ", "T", 1)
    text = _FRACTION.sub(lambda m: "." + m.group(1).ljust(6, "0"), text)
    return parse_timestamp(text)


class SupabaseMemoryStorage(MemoryStorage):
    """Sessions and memory atoms through the Supabase REST API.

    ``supabase_url`` defaults to ``SUPABASE_URL``; ``supabase_key`` to the
    first of ``SUPABASE_KEY``, ``SUPABASE_SERVICE_ROLE_KEY``,
    ``SUPABASE_ANON_KEY`` that is set. They are read like `DatabaseManager`
    reads its own: the environment over the ``dotenv`` file (None: no file).
    Reads are fetched ``page_size`` rows per request (Supabase caps
    responses at 1000 rows by default).
    """

    def __init__(
        self,
        supabase_url: str | None = None,
        supabase_key: str | None = None,
        *,
        table_name: str = "session_memories",
        page_size: int = 1000,
        dotenv: str | Path | None = ".env",
    ) -> None:
        try:
            supabase = importlib.import_module("supabase")
            postgrest = importlib.import_module("postgrest")
            httpx = importlib.import_module("httpx")
        except ImportError as exc:
            raise MissingDependencyError(
                "SupabaseMemoryStorage needs the 'supabase' package: pip install supabase "
                "(or use PostgresMemoryStorage, which needs no extra package)"
            ) from exc
        env = {} if supabase_url and supabase_key else load_environment(dotenv=dotenv)
        url = supabase_url or _setting(env, "SUPABASE_URL")
        key = supabase_key or next(
            filter(None, (_setting(env, var) for var in KEY_VARIABLES)), None)
        if not url or not key:
            raise ConfigurationError(
                "Supabase credentials not found: set SUPABASE_URL and SUPABASE_KEY (or "
                "SUPABASE_SERVICE_ROLE_KEY, or SUPABASE_ANON_KEY) in the environment or the "
                ".env file, or pass supabase_url and supabase_key to SupabaseMemoryStorage"
            )
        if page_size < 1:
            raise ConfigurationError(f"page_size must be at least 1, got {page_size}")
        self.supabase_url = url
        self.table_name = table_name
        self.page_size = page_size
        self._errors: tuple[type[BaseException], ...] = (
            postgrest.APIError,
            httpx.HTTPError,
        )
        self._minimal = postgrest.ReturnMethod.minimal
        self._exact = postgrest.CountMethod.exact
        self.client: Any = supabase.create_client(url, key)

    def __repr__(self) -> str:  # never the key
        return f"<SupabaseMemoryStorage url={self.supabase_url!r} table={self.table_name!r}>"

    # -- plumbing ----------------------------------------------------------------

    def _table(self) -> Any:
        return self.client.table(self.table_name)

    def _run(self, request: Any, action: str) -> Any:
        """Execute a request; REST and HTTP failures become `MemoryStorageError` here only."""
        try:
            return request.execute()
        except self._errors as exc:
            code = getattr(exc, "code", None)
            detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise MemoryStorageError(
                f"Supabase REST {action} on {self.table_name!r} failed: "
                f"{f'[{code}] ' if code else ''}{detail}",
                code=str(code) if code else None,
            ) from exc

    def _pages(self, build: Any, action: str) -> Iterator[dict[str, Any]]:
        start = 0
        while True:
            page = self._run(build().range(start, start + self.page_size - 1), action).data
            yield from page
            if len(page) < self.page_size:
                return
            start += self.page_size

    # -- sessions ----------------------------------------------------------------

    def save_session(self, session: Session) -> None:
        sid, uid = session.session_id, session.user_id
        rows = [
            {
                "session_id": sid,
                "user_id": uid,
                "memory_type": f"message_{r['role']}",
                "message_id": r["id"],
                "message_index": r["idx"],
                "content": r["body"],
                "created_at": r["ts"],
            }
            for r in message_rows(sid, session.history.get_messages())
        ]
        for i in range(0, len(rows), self.page_size):
            batch = rows[i:i + self.page_size]
            request = self._table().upsert(
                batch, on_conflict="session_id,message_id", returning=self._minimal
            )
            self._run(request, "message upsert")
        meta = {"user_id": uid, "content": session_content(session),
                "created_at": session.created_at.isoformat()}
        if self._update_metadata(sid, meta):
            return
        try:
            self._run(
                self._table().insert({**meta, "session_id": sid, "memory_type": "session_metadata"},
                                     returning=self._minimal),
                "metadata insert",
            )
        except MemoryStorageError as exc:
            if exc.code != _UNIQUE_VIOLATION or not self._update_metadata(sid, meta):
                raise

    def _update_metadata(self, session_id: str, meta: dict[str, Any]) -> bool:
        request = (self._table().update(meta).eq("session_id", session_id)
                   .eq("memory_type", "session_metadata"))
        return bool(self._run(request, "metadata update").data)

    def load_session(self, session_id: str) -> Session | None:
        def build() -> Any:
            return (
                self._table().select(_LOAD_COLUMNS)
                .eq("session_id", session_id)
                .in_("memory_type", ["session_metadata", *_MESSAGE_TYPES])
                .order("message_index", nullsfirst=True).order("created_at").order("message_id")
            )

        rows = [
            (
                r["memory_type"],
                r["user_id"],
                r["message_id"] or r["id"],
                r["content"],
                _row_time(r),
            )
            for r in self._pages(build, "session load")
        ]
        return session_from_rows(session_id, rows, self)

    def delete_session(self, session_id: str) -> bool:
        """Delete every row of the session (messages and memory atoms too)."""
        request = (self._table().delete(count=self._exact, returning=self._minimal)
                   .eq("session_id", session_id))
        return bool(self._run(request, "session delete").count)

    def list_sessions(self, user_id: str | None = None) -> list[str]:
        def build() -> Any:
            request = self._table().select("session_id").eq("memory_type", "session_metadata")
            if user_id is not None:
                request = request.eq("user_id", user_id)
            return request.order("session_id")

        return [r["session_id"] for r in self._pages(build, "session list")]

    # -- memory atoms ------------------------------------------------------------

    def save_memory_atom(
        self,
        session_id: str,
        user_id: str,
        memory_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        check_atom_type(memory_type)
        row = {"id": str(uuid.uuid4()), "session_id": session_id, "user_id": user_id,
               "memory_type": memory_type, "content": content, "metadata": metadata or {}}
        data = self._run(self._table().insert(row), "memory atom insert").data
        return _atom(data[0])

    def query_memory_atoms(
        self,
        session_id: str | None = None,
        user_id: str | None = None,
        memory_type: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Atoms matching every given filter, newest first (None: any atom type)."""
        request = self._table().select(_ATOM_COLUMNS)
        for column, value in (("session_id", session_id), ("user_id", user_id),
                              ("memory_type", memory_type)):
            if value is not None:
                request = request.eq(column, value)
        if memory_type is None:
            request = request.in_("memory_type", list(ATOM_TYPES))
        request = request.order("created_at", desc=True).order("id").limit(limit)
        return [_atom(r) for r in self._run(request, "memory atom query").data]


def _row_time(row: dict[str, Any]) -> datetime:
    stamp = row["content"].get("timestamp") if isinstance(row["content"], dict) else None
    return parse_timestamp(stamp) if stamp else parse_rest_timestamp(row["created_at"])


def _atom(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "session_id", "user_id", "memory_type", "content", "metadata", "created_at")
    atom = {k: row.get(k) for k in keys}
    atom["created_at"] = parse_rest_timestamp(row["created_at"])
    return atom

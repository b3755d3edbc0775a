"""A user's conversation session, and where sessions live.

`Session` (history, metadata), the `MemoryStorage` interface every storage
implements, and the in-process `InMemoryStorage` a session uses by default.
The other storages (SQLite, PostgreSQL, Supabase) build on this module.
"""

from __future__ import annotations

import json
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .history import Message, MessageHistory, parse_timestamp, to_utc, utc_now

__all__ = ["AsyncMemoryStorage", "InMemoryStorage", "MemoryStorage", "Session", "merge_messages"]


def _default_storage() -> MemoryStorage:
    return InMemoryStorage()


def _new_session_id() -> str:
    return "session_" + uuid.uuid4().hex[:12]


@dataclass
class Session:
    """One conversation of one user, saved to and loaded from a `MemoryStorage`.

    ``storage=None`` means a private `InMemoryStorage`. Adding a message or
    setting metadata updates ``last_active``; ``save()`` persists the session
    (``await asave()`` when the storage is an `AsyncMemoryStorage`).
    """

    session_id: str = field(default_factory=_new_session_id)
    user_id: str = ""
    history: MessageHistory = field(default_factory=MessageHistory)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utc_now)
    last_active: datetime = field(default_factory=utc_now)
    storage: MemoryStorage | AsyncMemoryStorage | None = field(
        default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.created_at = to_utc(self.created_at)
        self.last_active = to_utc(self.last_active)
        if self.storage is None:
            self.storage = _default_storage()

    # -- messages --------------------------------------------------------------

    def add_message(
        self, role: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Message:
        message = self.history.add_message(role, content, metadata)
        self.last_active = message.timestamp
        return message

    def add_user_message(self, content: str, metadata: dict[str, Any] | None = None) -> Message:
        return self.add_message("user", content, metadata)

    def add_assistant_message(
        self, content: str, metadata: dict[str, Any] | None = None
    ) -> Message:
        return self.add_message("assistant", content, metadata)

    def add_system_message(self, content: str, metadata: dict[str, Any] | None = None) -> Message:
        return self.add_message("system", content, metadata)

    def get_full_context(self, max_tokens: int | None = None) -> list[Message]:
        """All messages, or the most recent ones that fit in ``max_tokens``."""
        if max_tokens is None:
            return self.history.get_messages()
        return self.history.get_context_window(max_tokens)

    def get_recent_messages(self, limit: int = 10) -> list[Message]:
        return self.history.get_messages(limit=limit)

    # -- metadata --------------------------------------------------------------

    def get_metadata(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def set_metadata(self, key: str, value: Any) -> None:
        self.metadata[key] = value
        self.last_active = utc_now()

    # -- persistence -------------------------------------------------------------

    def save(self) -> None:
        """Persist to this session's storage (messages are merged by id)."""
        if self.storage is None:
            self.storage = _default_storage()
        if isinstance(self.storage, AsyncMemoryStorage):
            # Blocking the event loop here would stall every other task of the app.
            raise TypeError("this session's storage is async: use `await session.asave()`")
        self.storage.save_session(self)

    async def asave(self) -> None:
        """Persist to this session's storage, awaited if the storage is async."""
        if isinstance(self.storage, AsyncMemoryStorage):
            await self.storage.save_session(self)
        else:
            self.save()

    @classmethod
    def load(cls, session_id: str, storage: MemoryStorage | None = None) -> Session | None:
        """The stored session, or None. ``storage=None`` looks in a new, empty InMemoryStorage."""
        return (storage if storage is not None else _default_storage()).load_session(session_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "user_id": self.user_id,
            "history": self.history.to_dict(),
            "metadata": self.metadata,
            "created_at": self.created_at.isoformat(),
            "last_active": self.last_active.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], storage: MemoryStorage | None = None) -> Session:
        return cls(
            session_id=data["session_id"],
            user_id=data.get("user_id", ""),
            history=MessageHistory.from_dict(data.get("history", {})),
            metadata=dict(data.get("metadata") or {}),
            created_at=parse_timestamp(data["created_at"]),
            last_active=parse_timestamp(data["last_active"]),
            storage=storage,
        )

    def __len__(self) -> int:
        return len(self.history)


# -- where sessions live ------------------------------------------------------


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


class AsyncMemoryStorage(ABC):
    """`MemoryStorage` for asyncio: the same four operations and rules, awaited."""

    @abstractmethod
    async def save_session(self, session: Session) -> None:
        """Store the session; its messages are merged with the stored ones by id."""

    @abstractmethod
    async def load_session(self, session_id: str) -> Session | None:
        """The stored session bound to this storage, or None if there is none."""

    @abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Remove the session; True if there was something to remove."""

    @abstractmethod
    async def list_sessions(self, user_id: str | None = None) -> list[str]:
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

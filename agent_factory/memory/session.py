"""A user's conversation session: its history, metadata and storage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .history import Message, MessageHistory, parse_timestamp, to_utc, utc_now

if TYPE_CHECKING:
    from .storage import MemoryStorage

__all__ = ["Session"]


def _default_storage() -> MemoryStorage:
    from .storage import InMemoryStorage  # storage imports this module

    return InMemoryStorage()


def _new_session_id() -> str:
    return "session_" + uuid.uuid4().hex[:12]


@dataclass
class Session:
    """One conversation of one user, saved to and loaded from a `MemoryStorage`.

    ``storage=None`` means a private `InMemoryStorage`. Adding a message or
    setting metadata updates ``last_active``; ``save()`` persists the session.
    """

    session_id: str = field(default_factory=_new_session_id)
    user_id: str = ""
    history: MessageHistory = field(default_factory=MessageHistory)
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=utc_now)
    last_active: datetime = field(default_factory=utc_now)
    storage: MemoryStorage | None = field(default=None, compare=False, repr=False)

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
        self.storage.save_session(self)

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

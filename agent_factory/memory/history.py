"""Messages, a conversation's history, and fitting it into a token window.

Every timestamp is timezone-aware UTC. A naive datetime given by the caller
is read as local time (Python's own convention, and what the original
module stored) and converted. Every message carries a stable ``id`` (uuid4
hex) from its creation on: storages use it so that saving a session twice,
or from two processes, never duplicates or loses a message.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "ROLES",
    "ContextManager",
    "Message",
    "MessageHistory",
    "TokenCounter",
    "parse_timestamp",
    "row_id",
    "to_utc",
    "utc_now",
]

# The roles the session_memories schema can store (memory_type 'message_<role>').
ROLES = ("user", "assistant", "system", "tool")

TokenCounter = Callable[["Message"], int]

# Namespace for ids given to messages that were serialized without one
# (data written by the original module), so that reloading them is stable.
_LEGACY_IDS = uuid.UUID("6f1d2b9c-4a47-4f3e-9a7e-2d5c1b0e8a11")


# Namespace of the primary keys the stores derive from a row's natural key.
_ROW_IDS = uuid.UUID("0c6f5a8e-3b1d-4d7a-8f52-9e4b7c2a1d60")


def row_id(*natural_key: str) -> str:
    """The ``id`` of the row with this natural key: the same on every try and provider.

    A retried insert (its first try's outcome unknown, or its first provider
    failed before replicating it) then carries the same primary key, so the
    failback drain and logical replication meet one row, never two rows with
    one natural key (which stops a subscription on a duplicate key).
    """
    return str(uuid.uuid5(_ROW_IDS, "\n".join(natural_key)))


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def to_utc(value: datetime) -> datetime:
    """The same instant as an aware UTC datetime (naive values are local time)."""
    return value.astimezone(timezone.utc)


def parse_timestamp(value: str | datetime) -> datetime:
    """An ISO 8601 string (or a datetime) as an aware UTC datetime."""
    if isinstance(value, datetime):
        return to_utc(value)
    return to_utc(datetime.fromisoformat(value))


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Message:
    """One message of a conversation.

    ``role`` is usually ``user``, ``assistant``, ``system`` or ``tool``;
    ``id`` is generated at creation and identifies the message in storage.
    ``metadata`` is always a dict after creation (None becomes ``{}``).
    """

    role: str
    content: str
    timestamp: datetime = field(default_factory=utc_now)
    metadata: dict[str, Any] | None = None
    id: str = field(default_factory=_new_id)

    def __post_init__(self) -> None:
        self.timestamp = to_utc(self.timestamp)
        if self.metadata is None:
            self.metadata = {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "timestamp": self.timestamp.isoformat(),
            "metadata": self.metadata or {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Message:
        timestamp = parse_timestamp(data["timestamp"])
        message_id = data.get("id") or _legacy_id(data["role"], data["content"], timestamp)
        return cls(
            role=data["role"],
            content=data["content"],
            timestamp=timestamp,
            metadata=data.get("metadata"),
            id=message_id,
        )

    def __repr__(self) -> str:
        preview = self.content[:50] + "..." if len(self.content) > 50 else self.content
        return f"Message(role={self.role!r}, content={preview!r}, id={self.id!r})"


def _legacy_id(role: str, content: str, timestamp: datetime) -> str:
    return uuid.uuid5(_LEGACY_IDS, f"{role}\0{timestamp.isoformat()}\0{content}").hex


def _quarter_length(message: Message) -> int:
    return len(message.content) // 4


class MessageHistory:
    """The ordered messages of one conversation."""

    def __init__(self, messages: Iterable[Message] = ()) -> None:
        self._messages: list[Message] = list(messages)

    def add_message(
        self,
        role: str,
        content: str,
        metadata: dict[str, Any] | None = None,
        timestamp: datetime | None = None,
    ) -> Message:
        """Append a new message (timestamp: now unless given) and return it."""
        message = Message(role=role, content=content, metadata=metadata,
                          timestamp=timestamp if timestamp is not None else utc_now())
        self._messages.append(message)
        return message

    def append(self, message: Message) -> None:
        """Append an existing message, keeping its id and timestamp."""
        self._messages.append(message)

    def get_messages(self, limit: int | None = None, role: str | None = None) -> list[Message]:
        """A copy of the messages, optionally of one role, the ``limit`` most recent."""
        messages = [m for m in self._messages if role is None or m.role == role]
        if limit is not None:
            messages = messages[-limit:] if limit > 0 else []
        return messages

    def get_context_window(
        self, max_tokens: int, token_counter: TokenCounter | None = None
    ) -> list[Message]:
        """The most recent messages whose tokens add up to at most ``max_tokens``.

        Tokens are estimated at 4 characters each unless ``token_counter`` is given;
        the result is in chronological order.
        """
        count = token_counter or _quarter_length
        kept: list[Message] = []
        total = 0
        for message in reversed(self._messages):
            tokens = count(message)
            if total + tokens > max_tokens:
                break
            kept.append(message)
            total += tokens
        kept.reverse()
        return kept

    def clear(self) -> None:
        self._messages.clear()

    def to_dict(self) -> dict[str, Any]:
        return {"messages": [m.to_dict() for m in self._messages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MessageHistory:
        return cls(Message.from_dict(m) for m in data.get("messages", []))

    def to_langchain_format(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self._messages]

    def to_openai_format(self) -> list[dict[str, str]]:
        return self.to_langchain_format()

    def __iter__(self) -> Iterator[Message]:
        return iter(list(self._messages))

    def __len__(self) -> int:
        return len(self._messages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageHistory):
            return NotImplemented
        return self._messages == other._messages

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MessageHistory({len(self._messages)} messages)"


def _overhead_length(message: Message) -> int:
    return len(message.content) // 4 + 4  # +4: role and framing


class ContextManager:
    """Fits a conversation into a model's token window.

    Keeps the most recent messages that fit in ``max_tokens`` (minus what is
    reserved for the answer), always keeping system messages when
    ``preserve_system``; messages come back in chronological order.
    """

    def __init__(
        self,
        max_tokens: int = 4000,
        token_counter: TokenCounter | None = None,
        preserve_system: bool = True,
    ) -> None:
        self.max_tokens = max_tokens
        self.preserve_system = preserve_system
        self.token_counter: TokenCounter = token_counter or _overhead_length

    def count_tokens(self, messages: Iterable[Message]) -> int:
        return sum(self.token_counter(m) for m in messages)

    def fit_to_window(self, history: MessageHistory, reserve_tokens: int = 0) -> list[Message]:
        available = self.max_tokens - reserve_tokens
        messages = history.get_messages()
        keep = [self.preserve_system and m.role == "system" for m in messages]
        used = self.count_tokens(m for m, k in zip(messages, keep, strict=True) if k)
        for i in range(len(messages) - 1, -1, -1):
            if keep[i]:
                continue
            tokens = self.token_counter(messages[i])
            if used + tokens > available:
                break
            keep[i] = True
            used += tokens
        return [m for m, k in zip(messages, keep, strict=True) if k]

    def truncate_message(self, message: Message, max_tokens: int, suffix: str = "...") -> Message:
        """The message itself if it fits, else a copy (same id) cut to about ``max_tokens``."""
        if self.token_counter(message) <= max_tokens:
            return message
        keep = max(0, max_tokens * 4 - len(suffix))
        return dataclasses.replace(message, content=message.content[:keep] + suffix)

    def summarize_old_messages(
        self,
        messages: list[Message],
        summary_prompt: str = "Summarize the above conversation concisely.",
    ) -> str:
        """A one-line placeholder summary (counts by role); plug an LLM in for real ones."""
        users = sum(1 for m in messages if m.role == "user")
        assistants = sum(1 for m in messages if m.role == "assistant")
        return f"[Previous conversation: {users} user messages, {assistants} assistant messages]"

    def estimate_tokens(self, text: str) -> int:
        return len(text) // 4

    def __repr__(self) -> str:
        return f"ContextManager(max_tokens={self.max_tokens})"

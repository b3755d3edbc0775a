"""`BaseChatMessageHistory` over a session of the memory storages.

A LangChain message is stored as one `Message` of the session: its role
(``human`` -> ``user``, ``ai`` -> ``assistant``, ``system``, ``tool`` and
``function`` -> ``tool``), its text as ``content``, and the whole LangChain
message (``message_to_dict``) under ``metadata["langchain"]``, so it comes back
exactly as added. Messages written through the `Session` API read as the
matching LangChain message types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
    message_to_dict,
    messages_from_dict,
)

from ...memory import AsyncPostgresMemoryStorage, PostgresMemoryStorage
from ...memory.history import ROLES, Message
from ...memory.session import AsyncMemoryStorage, MemoryStorage, Session

__all__ = ["SessionChatMessageHistory", "from_langchain", "to_langchain"]

#: Where a LangChain message keeps its own serialization in `Message.metadata`.
KEY = "langchain"

_ROLE_OF_TYPE = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool",
                 "function": "tool"}


def from_langchain(message: BaseMessage) -> Message:
    """The session `Message` that stores ``message`` (see the module docstring)."""
    role = _ROLE_OF_TYPE.get(message.type)
    if role is None:  # a ChatMessage: its own role if the schema can store it
        role = str(getattr(message, "role", ""))
        role = role if role in ROLES else "user"
    text = message.content if isinstance(message.content, str) else str(message.text)
    stored = Message(role=role, content=text, metadata={KEY: message_to_dict(message)})
    if message.id:
        # The caller's id keeps a re-added message one row (saves merge by id).
        stored.id = message.id
    return stored


def to_langchain(message: Message) -> BaseMessage:
    """The LangChain message a stored `Message` stands for."""
    saved = (message.metadata or {}).get(KEY)
    if isinstance(saved, dict):
        return messages_from_dict([saved])[0]
    meta = message.metadata or {}
    if message.role == "assistant":
        return AIMessage(content=message.content, id=message.id)
    if message.role == "system":
        return SystemMessage(content=message.content, id=message.id)
    if message.role == "tool":
        return ToolMessage(content=message.content, id=message.id,
                           tool_call_id=str(meta.get("tool_call_id", "")))
    return HumanMessage(content=message.content, id=message.id)


def _messages(session: Session | None) -> list[BaseMessage]:
    return [] if session is None else [to_langchain(m) for m in session.history.get_messages()]


def _appended(stored: Session | None, session_id: str, user_id: str,
              storage: MemoryStorage | AsyncMemoryStorage,
              messages: Sequence[BaseMessage]) -> Session:
    """The stored session (or a new one) with ``messages`` at its end."""
    session = stored or Session(session_id=session_id, user_id=user_id, storage=storage)
    for message in messages:
        stored_message = from_langchain(message)
        session.history.append(stored_message)
        session.last_active = stored_message.timestamp
    return session


class SessionChatMessageHistory(BaseChatMessageHistory):
    """The messages of one session (``session_id``) as a LangChain chat history.

    ``storage`` is any `MemoryStorage` (`PostgresMemoryStorage` for failover);
    ``async_storage`` an `AsyncMemoryStorage` the async methods await (without
    one they run the sync calls in a thread, LangChain's default). A new
    session is created on the first added message, owned by ``user_id``.
    ``clear()`` removes the messages and keeps the session's memory atoms
    (on the Postgres storages; the others delete the whole session).
    """

    def __init__(
        self,
        session_id: str,
        storage: MemoryStorage | None = None,
        *,
        async_storage: AsyncMemoryStorage | None = None,
        user_id: str = "",
    ) -> None:
        if storage is None and async_storage is None:
            raise ValueError("SessionChatMessageHistory needs storage= or async_storage=")
        self.session_id = session_id
        self.user_id = user_id
        self.storage = storage
        self.async_storage = async_storage

    def _sync(self) -> MemoryStorage:
        if self.storage is None:
            raise TypeError("this history has only an async storage: use the a* methods "
                            "(aget_messages, aadd_messages, aclear)")
        return self.storage

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        return _messages(self._sync().load_session(self.session_id))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append the messages: one load and one idempotent save (a single statement)."""
        storage = self._sync()
        stored = storage.load_session(self.session_id)
        storage.save_session(_appended(stored, self.session_id, self.user_id, storage,
                                       messages))

    def clear(self) -> None:
        storage = self._sync()
        if isinstance(storage, PostgresMemoryStorage):
            storage.clear_messages(self.session_id)
        else:
            storage.delete_session(self.session_id)

    async def aget_messages(self) -> list[BaseMessage]:
        if self.async_storage is None:
            return await super().aget_messages()
        return _messages(await self.async_storage.load_session(self.session_id))

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        storage = self.async_storage
        if storage is None:
            await super().aadd_messages(messages)
            return
        stored = await storage.load_session(self.session_id)
        await storage.save_session(_appended(stored, self.session_id, self.user_id, storage,
                                             messages))

    async def aclear(self) -> None:
        storage = self.async_storage
        if storage is None:
            await super().aclear()
        elif isinstance(storage, AsyncPostgresMemoryStorage):
            await storage.clear_messages(self.session_id)
        else:
            await storage.delete_session(self.session_id)

    def __repr__(self) -> str:
        return f"<SessionChatMessageHistory session_id={json.dumps(self.session_id)}>"



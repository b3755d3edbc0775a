"""Conversation memory: messages, sessions, and where they are stored.

    from agent_factory.memory import Session, PostgresMemoryStorage

    storage = PostgresMemoryStorage()          # DatabaseManager() on first use: failover
    session = Session(user_id="alice", storage=storage)
    session.add_user_message("Hello")
    session.save()                             # one statement, idempotent
    loaded = storage.load_session(session.session_id)

Storages: `InMemoryStorage`, `SQLiteStorage` (a local file),
`PostgresMemoryStorage` (``session_memories`` through `DatabaseManager`),
`SupabaseMemoryStorage` (the same table through Supabase's REST API; needs
``pip install supabase``). `KnowledgeStore` holds `KnowledgeAtom` rows with
pgvector embeddings. `AsyncPostgresMemoryStorage` and `AsyncKnowledgeStore`
are the same two on `AsyncDatabaseManager`, for asyncio. Importing this
package imports neither psycopg nor supabase and opens nothing: the
database-backed classes load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..engine.exports import lazy_exports
from .history import ContextManager, Message, MessageHistory
from .session import AsyncMemoryStorage, InMemoryStorage, MemoryStorage, Session
from .storage import SQLiteStorage

if TYPE_CHECKING:
    from .async_stores import AsyncKnowledgeStore, AsyncPostgresMemoryStorage
    from .knowledge import AtomMatch, KnowledgeAtom, KnowledgeStore
    from .postgres import PostgresMemoryStorage
    from .supabase import SupabaseMemoryStorage

__all__ = [
    "AsyncKnowledgeStore",
    "AsyncMemoryStorage",
    "AsyncPostgresMemoryStorage",
    "AtomMatch",
    "ContextManager",
    "InMemoryStorage",
    "KnowledgeAtom",
    "KnowledgeStore",
    "MemoryStorage",
    "Message",
    "MessageHistory",
    "PostgresMemoryStorage",
    "SQLiteStorage",
    "Session",
    "SupabaseMemoryStorage",
]

_LAZY = {
    "AsyncKnowledgeStore": "async_stores",
    "AsyncPostgresMemoryStorage": "async_stores",
    "AtomMatch": "knowledge",
    "KnowledgeAtom": "knowledge",
    "KnowledgeStore": "knowledge",
    "PostgresMemoryStorage": "postgres",
    "SupabaseMemoryStorage": "supabase",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

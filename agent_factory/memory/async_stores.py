"""The Postgres storages for asyncio, on an `AsyncDatabaseManager` (with failover).

`AsyncPostgresMemoryStorage` and `AsyncKnowledgeStore` run the very `Call`
objects their sync twins run (`SessionCalls`, `KnowledgeCalls`): the same
statements, parameters, routing hints and parsing, awaited. So a session or
an atom written by one is read back identically by the other, and a call
never blocks the event loop. tests/memory/test_memory_async.py checks the
twins keep the same methods and signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.async_database_manager import AsyncDatabaseManager
from .calls import arun
from .knowledge import AtomMatch, KnowledgeAtom, KnowledgeCalls, search_filters
from .manager import AsyncManagedStore
from .postgres import SessionCalls
from .session import AsyncMemoryStorage, Session

__all__ = ["AsyncKnowledgeStore", "AsyncPostgresMemoryStorage"]


class AsyncPostgresMemoryStorage(AsyncManagedStore, AsyncMemoryStorage):
    """`PostgresMemoryStorage` for asyncio: sessions and memory atoms, awaited.

    ``db=None`` creates ``AsyncDatabaseManager()`` (from the environment) on
    first use, and ``await close()`` closes it; a manager passed in is left open.
    Loaded sessions are bound to this storage: save them with ``await session.asave()``.
    """

    def __init__(
        self, db: AsyncDatabaseManager | None = None, *, table_name: str = "session_memories"
    ) -> None:
        super().__init__(db)
        self.table_name = table_name
        self._calls = SessionCalls(table_name)

    async def save_session(self, session: Session) -> None:
        """Upsert the metadata row and every message in one atomic statement."""
        await arun(self.db, self._calls.save(session))

    async def load_session(self, session_id: str) -> Session | None:
        return await arun(self.db, self._calls.load(session_id, self))

    async def delete_session(self, session_id: str) -> bool:
        """Delete every row of the session (messages and memory atoms too)."""
        return await arun(self.db, self._calls.delete(session_id))

    async def clear_messages(self, session_id: str) -> int:
        """Delete the session's messages and metadata row, keeping its memory atoms."""
        return await arun(self.db, self._calls.clear_messages(session_id))

    async def list_sessions(self, user_id: str | None = None) -> list[str]:
        return await arun(self.db, self._calls.list_sessions(user_id))

    async def save_memory_atom(
        self,
        session_id: str,
        user_id: str,
        memory_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store a free-form atom (context, decision, action, issue, log); returns the row."""
        return await arun(self.db, self._calls.save_atom(session_id, user_id, memory_type,
                                                         content, metadata))

    async def query_memory_atoms(
        self,
        session_id: str | None = None,
        user_id: str | None = None,
        memory_type: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Atoms matching every given filter, newest first."""
        return await arun(self.db, self._calls.query_atoms(session_id, user_id, memory_type,
                                                           limit))

    async def __aenter__(self) -> AsyncPostgresMemoryStorage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncPostgresMemoryStorage table={self.table_name!r} db={self._db!r}>"


class AsyncKnowledgeStore(AsyncManagedStore):
    """`KnowledgeStore` for asyncio: upsert, fetch, filter and search atoms, awaited."""

    def __init__(
        self, db: AsyncDatabaseManager | None = None, *, table_name: str = "knowledge_atoms"
    ) -> None:
        super().__init__(db)
        self.table_name = table_name
        self._calls = KnowledgeCalls(table_name)

    async def upsert(self, atom: KnowledgeAtom) -> KnowledgeAtom:
        """Insert or replace the atom with this ``atom_id``; returns it as stored."""
        return await arun(self.db, self._calls.upsert(atom))

    async def upsert_many(self, atoms: Iterable[KnowledgeAtom], *, batch_size: int = 500) -> int:
        """Upsert atoms, ``batch_size`` per statement; returns how many were sent."""
        sent = 0
        for call in self._calls.upsert_batches(atoms, batch_size):
            sent += await arun(self.db, call)
        return sent

    async def get(self, atom_id: str) -> KnowledgeAtom | None:
        return await arun(self.db, self._calls.get(atom_id))

    async def get_many(self, atom_ids: Sequence[str]) -> list[KnowledgeAtom]:
        """The atoms that exist, in the order of ``atom_ids``, in one statement."""
        return await arun(self.db, self._calls.get_many(atom_ids))

    async def delete(self, atom_id: str) -> bool:
        """Delete the atom; True if it existed (on the provider that served)."""
        return await arun(self.db, self._calls.delete([atom_id])) > 0

    async def delete_many(self, atom_ids: Sequence[str]) -> int:
        """Delete the atoms in one statement; how many existed."""
        return await arun(self.db, self._calls.delete(atom_ids))

    async def filter(
        self,
        *,
        atom_type: str | None = None,
        manufacturer: str | None = None,
        product_family: str | None = None,
        keywords: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int = 100,
    ) -> list[KnowledgeAtom]:
        """Atoms matching every given filter, by atom_id (see `KnowledgeStore.filter`)."""
        filters = search_filters(atom_type, manufacturer, product_family, keywords, metadata)
        return await arun(self.db, self._calls.filter(filters, limit))

    async def search(
        self,
        embedding: Iterable[float] | Any,
        k: int = 5,
        *,
        atom_type: str | None = None,
        manufacturer: str | None = None,
        product_family: str | None = None,
        keywords: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        with_embeddings: bool = False,
    ) -> list[AtomMatch]:
        """The ``k`` atoms nearest by cosine distance (see `KnowledgeStore.search`)."""
        filters = search_filters(atom_type, manufacturer, product_family, keywords, metadata)
        return await arun(self.db, self._calls.search(embedding, k, filters, ef_search,
                                                      with_embeddings))

    async def count(self) -> int:
        return await arun(self.db, self._calls.count())

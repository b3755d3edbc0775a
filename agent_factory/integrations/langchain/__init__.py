"""LangChain adapters: chat history over the session memory, a vector store over the knowledge.

    from agent_factory.integrations.langchain import (
        KnowledgeVectorStore, SessionChatMessageHistory)

    history = SessionChatMessageHistory("session-42", PostgresMemoryStorage(db))
    store = KnowledgeVectorStore(embeddings, KnowledgeStore(db))

Both fail over with the manager under them. Pass the async storages
(``async_storage=``/``async_store=``) and LangChain's async methods await
`AsyncDatabaseManager` instead of running the sync calls in a thread.
Needs ``pip install 'agent-factory[langchain]'`` (langchain-core); see
docs/integrations.md for how these differ from langchain-postgres.
"""

from __future__ import annotations

from ...errors import MissingDependencyError

try:
    import langchain_core  # noqa: F401
except ImportError as exc:
    raise MissingDependencyError(
        "agent_factory.integrations.langchain needs langchain-core: "
        "pip install 'agent-factory[langchain]'"
    ) from exc

from .chat_history import SessionChatMessageHistory, from_langchain, to_langchain
from .vectorstore import KnowledgeVectorStore

__all__ = ["KnowledgeVectorStore", "SessionChatMessageHistory", "from_langchain",
           "to_langchain"]

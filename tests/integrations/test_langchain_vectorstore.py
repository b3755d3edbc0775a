"""KnowledgeVectorStore against LangChain's standard VectorStore suite (langchain-tests),
sync on KnowledgeStore and async on AsyncKnowledgeStore, over real pgvector servers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
import pytest_asyncio
from databases import schema_databases
from langchain_core.documents import Document
from langchain_tests.integration_tests.vectorstores import (
    EMBEDDING_SIZE,
    VectorStoreIntegrationTests,
)

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.integrations.langchain import KnowledgeVectorStore
from agent_factory.memory import AsyncKnowledgeStore, KnowledgeStore
from agent_factory.testing.fleet import Fleet

FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}

# The suite's async tests carry no mark of their own; the mark on a class reaches its
# sync tests too, where pytest-asyncio only warns.
standard = pytest.mark.filterwarnings(
    "ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function")


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "lcvec", EMBEDDING_SIZE) as made:
        yield made


def empty_tables(urls: dict[str, str]) -> None:
    """Each standard test starts from an empty store (on every provider)."""
    for url in urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE knowledge_atoms")


@standard
@pytest.mark.asyncio
class TestKnowledgeVectorStoreSync(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, db: DatabaseManager, urls: dict[str, str]) -> KnowledgeVectorStore:
        empty_tables(urls)
        return KnowledgeVectorStore(self.get_embeddings(), KnowledgeStore(db))

    @property
    def has_async(self) -> bool:
        return False  # the async methods run on AsyncKnowledgeStore: the class below


@standard
@pytest.mark.asyncio
class TestKnowledgeVectorStoreAsync(VectorStoreIntegrationTests):
    @pytest_asyncio.fixture
    async def vectorstore(self, healthy_fleet: Fleet, urls: dict[str, str]
                          ) -> AsyncIterator[KnowledgeVectorStore]:
        empty_tables(urls)
        async with AsyncDatabaseManager(urls, order=list(healthy_fleet.names), **FAST) as adb:
            # No sync store: a sync call would fail, so the suite proves the
            # async methods never fall back to a thread.
            yield KnowledgeVectorStore(self.get_embeddings(),
                                       async_store=AsyncKnowledgeStore(adb))

    @property
    def has_sync(self) -> bool:
        return False


@pytest.fixture
def store(db: DatabaseManager, urls: dict[str, str]) -> KnowledgeVectorStore:
    empty_tables(urls)
    return KnowledgeVectorStore(TestKnowledgeVectorStoreSync.get_embeddings(),
                                KnowledgeStore(db), atom_type="concept")


def test_scores_are_cosine_distances_and_relevance_is_one_minus(
        store: KnowledgeVectorStore) -> None:
    store.add_texts(["alpha", "beta"], ids=["a", "b"])
    [(doc, distance)] = store.similarity_search_with_score("alpha", k=1)
    assert doc.id == "a" and distance == pytest.approx(0.0, abs=1e-5)
    [(_, relevance)] = store.similarity_search_with_relevance_scores("alpha", k=1)
    assert relevance == pytest.approx(1.0, abs=1e-5)


def test_filter_is_metadata_containment_and_column_options_pass_on(
        store: KnowledgeVectorStore, db: DatabaseManager) -> None:
    store.add_texts(["one", "two", "three"], [{"lang": "en", "n": 1}, {"lang": "de"},
                                               {"lang": "en", "title": "Three"}],
                    ids=["1", "2", "3"])
    found = store.similarity_search("one", k=5, filter={"lang": "en"})
    assert sorted(d.id or "" for d in found) == ["1", "3"]
    assert store.similarity_search("one", k=5, atom_type="fault") == []
    atom = KnowledgeStore(db).get("3")
    assert atom is not None and atom.title == "Three" and atom.atom_type == "concept"
    with pytest.raises(NotImplementedError, match="operators"):
        store.similarity_search("one", filter={"n": {"$gt": 0}})
    with pytest.raises(TypeError, match="unknown search options"):
        store.similarity_search("one", score_treshold=0.5)


def test_documents_written_by_the_knowledge_store_read_as_documents(
        store: KnowledgeVectorStore, db: DatabaseManager) -> None:
    from agent_factory.memory import KnowledgeAtom

    vector = TestKnowledgeVectorStoreSync.get_embeddings().embed_query("pump")
    KnowledgeStore(db).upsert(KnowledgeAtom(atom_id="k-1", atom_type="procedure", title="T",
                                            content="pump", metadata={"src": "manual"},
                                            embedding=vector))
    assert store.similarity_search("pump", k=1) == [
        Document(id="k-1", page_content="pump", metadata={"src": "manual"})]


def test_needs_a_store_and_refuses_delete_without_ids() -> None:
    embeddings = TestKnowledgeVectorStoreSync.get_embeddings()
    with pytest.raises(ValueError, match="store= or async_store="):
        KnowledgeVectorStore(embeddings)
    only_async = KnowledgeVectorStore(embeddings, async_store=AsyncKnowledgeStore(
        AsyncDatabaseManager({"x": "postgresql://u@127.0.0.1:1/x"}, failover_enabled=False)))
    try:
        with pytest.raises(TypeError, match="only an async store"):
            only_async.similarity_search("q")
    finally:
        import asyncio

        assert only_async.async_store is not None
        asyncio.run(only_async.async_store.db.close())

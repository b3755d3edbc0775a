"""`VectorStore` over the knowledge store: documents as `KnowledgeAtom` rows.

A `Document` is stored as one atom: ``id`` -> ``atom_id`` (a uuid4 when the
document has none), ``page_content`` -> ``content``, ``metadata`` -> the
atom's ``metadata`` (jsonb, returned exactly), ``metadata["title"]`` (when a
string) -> ``title``, and the embedding of the page content. Every atom
written gets the store's ``atom_type``. Atoms written by other code read as
documents the same way.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from langchain_core.vectorstores import VectorStore

from ...memory import AsyncKnowledgeStore, AtomMatch, KnowledgeAtom, KnowledgeStore

__all__ = ["KnowledgeVectorStore"]

#: The keyword arguments a search passes on to `KnowledgeStore.search`.
SEARCH_OPTIONS = frozenset({"atom_type", "manufacturer", "product_family", "keywords",
                            "ef_search"})


def _document(atom: KnowledgeAtom) -> Document:
    return Document(id=atom.atom_id, page_content=atom.content, metadata=dict(atom.metadata))


def _scored(hits: list[AtomMatch]) -> list[tuple[Document, float]]:
    # Cosine distance, lower is closer: what PGVector returns for its cosine strategy.
    return [(_document(hit.atom), 1.0 - hit.similarity) for hit in hits]


def _search_options(filter: Mapping[str, Any] | None, options: dict[str, Any]
                    ) -> dict[str, Any]:
    """`KnowledgeStore.search` keywords from LangChain's ``filter`` and extra kwargs."""
    unknown = set(options) - SEARCH_OPTIONS
    if unknown:
        raise TypeError(f"unknown search options {sorted(unknown)}; "
                        f"allowed: {sorted(SEARCH_OPTIONS)} and filter=")
    if filter:
        for key, value in filter.items():
            if key.startswith("$") or (isinstance(value, Mapping)
                                       and any(str(k).startswith("$") for k in value)):
                raise NotImplementedError(
                    "filter operators ($in, $gt, $and...) are not supported: a filter is "
                    "a dict of values the metadata must contain (jsonb @>)")
    return {**options, "metadata": dict(filter) if filter else None}


class KnowledgeVectorStore(VectorStore):
    """A LangChain vector store on ``knowledge_atoms`` (cosine distance, HNSW index).

    ``store`` serves the sync methods, ``async_store`` the async ones (without
    it they run the sync calls in a thread, LangChain's default); give at
    least one. ``filter=`` in searches is a dict the metadata must contain;
    ``atom_type``, ``manufacturer``, ``product_family``, ``keywords`` and
    ``ef_search`` pass on to `KnowledgeStore.search`.
    """

    def __init__(
        self,
        embeddings: Embeddings,
        store: KnowledgeStore | None = None,
        *,
        async_store: AsyncKnowledgeStore | None = None,
        atom_type: str = "reference",
        batch_size: int = 500,
    ) -> None:
        if store is None and async_store is None:
            raise ValueError("KnowledgeVectorStore needs store= or async_store=")
        self._embeddings = embeddings
        self.store = store
        self.async_store = async_store
        self.atom_type = atom_type
        self.batch_size = batch_size

    @property
    def embeddings(self) -> Embeddings:
        return self._embeddings

    def _sync(self) -> KnowledgeStore:
        if self.store is None:
            raise TypeError("this vector store has only an async store: use the a* methods")
        return self.store

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return self._cosine_relevance_score_fn

    # -- shared between the twins: no I/O ---------------------------------------------

    def _atoms(self, texts: Sequence[str], metadatas: Sequence[dict[str, Any]] | None,
               ids: Sequence[str | None] | None, vectors: list[list[float]]
               ) -> tuple[list[str], list[KnowledgeAtom]]:
        """The ids in order, and one atom per distinct id (the last copy wins)."""
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        out_ids: list[str] = []
        atoms: dict[str, KnowledgeAtom] = {}
        for i, text in enumerate(texts):
            atom_id = (ids[i] if ids is not None else None) or str(uuid.uuid4())
            metadata = dict(metadatas[i]) if metadatas is not None else {}
            title = metadata.get("title")
            atoms.pop(atom_id, None)
            atoms[atom_id] = KnowledgeAtom(
                atom_id=atom_id, atom_type=self.atom_type,
                title=title if isinstance(title, str) else "", content=text,
                metadata=metadata, embedding=vectors[i])
            out_ids.append(atom_id)
        return out_ids, list(atoms.values())

    # -- sync ---------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Embed and upsert the texts (an existing id is replaced); returns their ids."""
        texts = list(texts)
        out_ids, atoms = self._atoms(texts, metadatas, ids,
                                     self._embeddings.embed_documents(texts))
        self._sync().upsert_many(atoms, batch_size=self.batch_size)
        return out_ids

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [_document(atom) for atom in self._sync().get_many(ids)]

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete the documents with these ids (missing ones are ignored)."""
        if ids is None:
            raise ValueError("delete() needs ids: the knowledge table has no collections "
                             "to drop")
        self._sync().delete_many(ids)
        return True

    def similarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        """The ``k`` nearest documents with their cosine distance (lower is closer)."""
        return _scored(self._sync().search(embedding, k, **_search_options(filter, kwargs)))

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        return self.similarity_search_with_score_by_vector(
            self._embeddings.embed_query(query), k, filter, **kwargs)

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        return [doc for doc, _ in
                self.similarity_search_with_score_by_vector(embedding, k, filter, **kwargs)]

    def similarity_search(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Document]:
        return self.similarity_search_by_vector(
            self._embeddings.embed_query(query), k, filter, **kwargs)

    # -- async: the same steps, awaited --------------------------------------------------

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        if self.async_store is None:
            return await super().aadd_texts(texts, metadatas, ids=ids, **kwargs)
        texts = list(texts)
        out_ids, atoms = self._atoms(texts, metadatas, ids,
                                     await self._embeddings.aembed_documents(texts))
        await self.async_store.upsert_many(atoms, batch_size=self.batch_size)
        return out_ids

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        if self.async_store is None:
            return await super().aget_by_ids(ids)
        return [_document(atom) for atom in await self.async_store.get_many(ids)]

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        if self.async_store is None:
            return await super().adelete(ids, **kwargs)
        if ids is None:
            raise ValueError("adelete() needs ids: the knowledge table has no collections "
                             "to drop")
        await self.async_store.delete_many(ids)
        return True

    async def asimilarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[tuple[Document, float]]:
        if self.async_store is None:
            return await run_in_executor(None, self.similarity_search_with_score_by_vector,
                                         embedding, k, filter, **kwargs)
        options = _search_options(filter, kwargs)
        return _scored(await self.async_store.search(embedding, k, **options))

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        return await self.asimilarity_search_with_score_by_vector(
            await self._embeddings.aembed_query(query), k, filter, **kwargs)

    async def asimilarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        scored = await self.asimilarity_search_with_score_by_vector(embedding, k, filter,
                                                                    **kwargs)
        return [doc for doc, _ in scored]

    async def asimilarity_search(
        self, query: str, k: int = 4, filter: dict[str, Any] | None = None, **kwargs: Any
    ) -> list[Document]:
        return await self.asimilarity_search_by_vector(
            await self._embeddings.aembed_query(query), k, filter, **kwargs)

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> KnowledgeVectorStore:
        """A store over ``kwargs["store"]`` (and/or ``async_store``) with the texts added."""
        store = cls(embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def __repr__(self) -> str:
        return f"<KnowledgeVectorStore atom_type={self.atom_type!r} store={self.store!r}>"

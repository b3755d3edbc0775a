"""A small retrieval-augmented loop: LangChain documents in the knowledge store, with failover.

    python examples/rag_loop.py

Starts two embedded PostgreSQL servers (the 'embedded' extra, or PG_BIN),
deploys the schema with a 64-dimension embedding, stores a handful of
documents through `KnowledgeVectorStore`, and answers questions from the
nearest ones. The embedding is a fake, deterministic bag of hashed words (no
model, no network), so the run is the same every time; put a real
`Embeddings` (OpenAI, Ollama...) and an LLM in its place. Needs the
'langchain' extra.
"""

from __future__ import annotations

import hashlib
import math
import re

from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.integrations.langchain import KnowledgeVectorStore
from agent_factory.memory import KnowledgeStore

DIM = 64

DOCUMENTS = [
    Document(id="pump-prime", page_content="Prime the pump by filling the casing with water "
             "before starting it.", metadata={"title": "Priming", "topic": "pump"}),
    Document(id="pump-noise", page_content="A grinding noise from the pump means worn "
             "bearings: replace the bearings.", metadata={"title": "Noise", "topic": "pump"}),
    Document(id="vfd-fault", page_content="Fault F0001 on the drive is an overcurrent: "
             "check the motor cable.", metadata={"title": "F0001", "topic": "drive"}),
    Document(id="plc-reset", page_content="To reset the PLC, hold the reset button for five "
             "seconds.", metadata={"title": "Reset", "topic": "plc"}),
]

QUESTIONS = [
    "why is my pump making a grinding noise?",
    "what does fault F0001 on the drive mean?",
    "how do I reset the PLC?",
]


class HashEmbeddings(Embeddings):
    """Words hashed into ``dim`` buckets, normalised: texts sharing words are close."""

    def __init__(self, dim: int = DIM) -> None:
        self.dim = dim

    def embed_query(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big")
            vector[bucket % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vector)) or 1.0
        return [v / norm for v in vector]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.embed_query(text) for text in texts]


def answer(store: KnowledgeVectorStore, question: str) -> tuple[str, list[str]]:
    """The answer (here: the best passage, where an LLM would write one) and its sources."""
    hits = store.similarity_search(question, k=2)
    context = "\n".join(doc.page_content for doc in hits)
    return context.splitlines()[0] if hits else "I don't know.", [d.id or "" for d in hits]


def run(db: DatabaseManager) -> list[tuple[str, str, list[str]]]:
    """Index the documents, then answer every question: (question, answer, sources)."""
    store = KnowledgeVectorStore(HashEmbeddings(), KnowledgeStore(db))
    store.add_documents(DOCUMENTS)  # idempotent: the ids are the documents'
    return [(q, *answer(store, q)) for q in QUESTIONS]


def main() -> None:
    from agent_factory.schema import apply_migrations
    from agent_factory.testing.fleet import start_fleet

    with start_fleet(["primary", "backup"], proxy=False) as fleet:
        for member in fleet:
            apply_migrations(member.url, embedding_dim=DIM)
        with DatabaseManager(fleet.urls(), order=["primary", "backup"]) as db:
            for question, reply, sources in run(db):
                print(f"Q: {question}\nA: {reply}\n   sources: {', '.join(sources)}\n")
            fleet["primary"].server.kill()
            print("-- primary killed (SIGKILL); asking again on the backup --")
            # The backup is an independent database: this run indexes it again.
            for question, reply, _ in run(db)[:1]:
                print(f"Q: {question}\nA: {reply}  (served by {db.serving_provider})")


if __name__ == "__main__":
    main()

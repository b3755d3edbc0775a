"""KnowledgeStore on real providers with pgvector: exact round trips, filters, cosine
top-k through the HNSW index, reads that fail over, and the production dimension."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from datetime import datetime, timezone

import psycopg
import pytest
from databases import schema_databases
from test_memory_postgres import FAST, ORDER

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import InvalidMemoryError
from agent_factory.memory import KnowledgeAtom, KnowledgeStore
from agent_factory.testing.fleet import Fleet

DIM = 8


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "know", DIM) as made:
        # Small tables would be scanned sequentially; force the HNSW index so
        # the tests exercise what production does.
        for url in made.values():
            dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{dbname}" SET enable_seqscan = off')
        yield made  # ``db``, the conftest fixture, is a manager over them


@pytest.fixture
def store(db: DatabaseManager) -> KnowledgeStore:
    return KnowledgeStore(db)


def unit(rng: random.Random, dim: int = DIM) -> list[float]:
    """A random vector whose components are exact in float4 (multiples of 1/64)."""
    return [rng.randint(-64, 64) / 64 for _ in range(dim)]


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def make_atom(atom_id: str, embedding: list[float] | None, **fields: object) -> KnowledgeAtom:
    values: dict[str, object] = {
        "atom_type": "concept", "title": f"Title {atom_id}", "content": f"Content {atom_id}",
        "manufacturer": "acme", **fields,
    }
    return KnowledgeAtom(atom_id=atom_id, embedding=embedding, **values)  # type: ignore[arg-type]


def test_upsert_and_get_round_trip(store: KnowledgeStore) -> None:
    atom = KnowledgeAtom(
        atom_id="plc-101", atom_type="procedure", title="Reset a fault", content="Steps…",
        summary="How to reset", manufacturer="Siemens", product_family="S7-1200",
        product_version="4.5", difficulty="advanced", prerequisites=["plc-100"],
        related_atoms=["plc-102", "plc-103"], keywords=["fault", "reset", "ü"],
        source_document="manual.pdf", source_pages=[12, 13], source_url="https://example.com/m",
        citations=[{"page": 12, "quote": "press F1"}], quality_score=0.75,
        safety_level="warning", safety_notes="Lock out first", metadata={"lang": "en"},
        embedding=[0.5, -0.25, 1.0, 0.0, 0.125, 2.0, -3.0, 0.0625],
        last_validated_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
    )
    stored = store.upsert(atom)
    assert stored.id and stored.created_at and stored.updated_at
    assert stored.created_at.tzinfo == timezone.utc
    server_fields = {"id": None, "created_at": None, "updated_at": None}
    assert KnowledgeAtom(**{**vars(stored), **server_fields}) == atom
    assert store.get("plc-101") == stored
    assert store.get("nope") is None

    changed = store.upsert(make_atom("plc-101", None, title="Reset, v2"))
    assert changed.id == stored.id and changed.created_at == stored.created_at
    assert changed.title == "Reset, v2" and changed.embedding is None
    assert store.delete("plc-101") is True
    assert store.delete("plc-101") is False


def test_filter(store: KnowledgeStore) -> None:
    store.upsert_many([
        make_atom("f-1", None, manufacturer="abb", product_family="ACS", keywords=["drive", "vfd"]),
        make_atom("f-2", None, manufacturer="abb", product_family="ACS", keywords=["drive"],
                  atom_type="fault"),
        make_atom("f-3", None, manufacturer="abb", product_family="PLC", keywords=["vfd"]),
    ])
    ids = lambda atoms: [a.atom_id for a in atoms]  # noqa: E731
    assert ids(store.filter(manufacturer="abb")) == ["f-1", "f-2", "f-3"]
    assert ids(store.filter(manufacturer="abb", product_family="ACS")) == ["f-1", "f-2"]
    assert ids(store.filter(manufacturer="abb", atom_type="fault")) == ["f-2"]
    assert ids(store.filter(manufacturer="abb", keywords=["drive", "vfd"])) == ["f-1"]
    assert ids(store.filter(manufacturer="abb", limit=1)) == ["f-1"]


def test_search_ranks_by_cosine_similarity(store: KnowledgeStore) -> None:
    rng = random.Random(7)
    atoms = [make_atom(f"s-{i:03d}", unit(rng), manufacturer="search",
                       product_family="odd" if i % 2 else "even") for i in range(120)]
    assert store.upsert_many(atoms, batch_size=50) == 120
    q = unit(rng)
    expected = sorted(atoms, key=lambda a: -cosine(q, a.embedding or []))

    hits = store.search(q, k=5, manufacturer="search", with_embeddings=True)
    assert [h.atom.atom_id for h in hits] == [a.atom_id for a in expected[:5]]
    for hit, atom in zip(hits, expected, strict=False):
        assert hit.similarity == pytest.approx(cosine(q, atom.embedding or []), abs=1e-5)
        assert hit.atom.embedding == atom.embedding

    # More than HNSW's default ef_search (40) candidates, through the HNSW index
    # (no filter: a filter on manufacturer may use the btree index instead).
    many = store.search(q, k=60)
    assert len(many) == 60
    assert [h.similarity for h in many] == sorted((h.similarity for h in many), reverse=True)

    odd = store.search(q, k=5, manufacturer="search", product_family="odd")
    assert [h.atom.atom_id for h in odd] == [
        a.atom_id for a in expected if a.product_family == "odd"][:5]

    same = store.search(atoms[3].embedding or [], k=1, manufacturer="search")
    assert same[0].atom.atom_id == "s-003" and same[0].similarity == pytest.approx(1.0)


def test_bad_input_is_refused(store: KnowledgeStore) -> None:
    with pytest.raises(InvalidMemoryError, match="same atom_id"):
        store.upsert_many([make_atom("d-1", None), make_atom("d-1", None)])
    with pytest.raises(psycopg.errors.DataException) as info:
        store.upsert(make_atom("d-2", [1.0, 2.0]))  # wrong dimension
    assert info.value.provider == "supabase"  # type: ignore[attr-defined]
    with pytest.raises(psycopg.errors.CheckViolation):
        store.upsert(make_atom("d-3", None, atom_type="rumour"))
    with pytest.raises(InvalidMemoryError, match="finite"):
        store.upsert(make_atom("d-4", [math.nan] * DIM))
    with pytest.raises(InvalidMemoryError, match="finite"):
        store.search([math.inf] * DIM)


def test_reads_fail_over_to_backup(urls: dict[str, str], healthy_fleet: Fleet) -> None:
    rng = random.Random(11)
    atoms = [make_atom(f"fo-{i}", unit(rng), manufacturer="failover") for i in range(10)]
    for name in ("supabase", "railway"):  # independent databases: seed both
        with DatabaseManager({name: urls[name]}) as single:
            KnowledgeStore(single).upsert_many(atoms)
    with DatabaseManager(urls, order=ORDER, **FAST) as db:
        store = KnowledgeStore(db)
        q = unit(rng)
        before = store.search(q, k=3, manufacturer="failover")
        assert db.serving_provider == "supabase"
        healthy_fleet["supabase"].server.kill()
        after = store.search(q, k=3, manufacturer="failover")
        assert db.serving_provider == "railway"
        assert [h.atom.atom_id for h in after] == [h.atom.atom_id for h in before]
        with DatabaseManager({"railway": urls["railway"]}) as backup:
            assert store.get("fo-1") == KnowledgeStore(backup).get("fo-1")


def test_production_dimension_1536(fleet: Fleet) -> None:
    rng = random.Random(3)
    with schema_databases(fleet, "know1536", 1536) as made, \
            DatabaseManager(made, order=ORDER, **FAST) as db:
        store = KnowledgeStore(db)
        atoms = [make_atom(f"p-{i}", [rng.gauss(0, 1) for _ in range(1536)]) for i in range(40)]
        store.upsert_many(atoms)
        q = [rng.gauss(0, 1) for _ in range(1536)]
        expected = sorted(atoms, key=lambda a: -cosine(q, a.embedding or []))[:5]
        hits = store.search(q, k=5)
        assert [h.atom.atom_id for h in hits] == [a.atom_id for a in expected]
        assert hits[0].atom.embedding is None  # not shipped unless asked for
        full = store.search(q, k=1, with_embeddings=True)[0].atom.embedding
        assert full is not None and len(full) == 1536
        assert hits[0].similarity == pytest.approx(cosine(q, expected[0].embedding or []),
                                                   abs=1e-4)

"""Memory storage benchmarks on one embedded PostgreSQL server over loopback.

    python -m bench.memory            # ~1 min
    python -m bench.memory --quick    # fewer saves, 2,000 atoms

* **save**: `PostgresMemoryStorage.save_session` of a 20-message session
  through `DatabaseManager`, one thread: saves/s and latency, for new
  sessions, for re-saving an unchanged session (idempotent no-op), and for
  appending one message. Statements per save are counted (target: 1).
* **search**: `KnowledgeStore.search` top-10 by cosine distance over 10,000
  atoms of dimension 1536 with the HNSW index: p50/p95 latency, and
  recall@10 against an exact scan on a sample of the queries. The vectors
  have structure (see `embedding`), like real embeddings; the atoms are
  bulk-loaded, then the index is built once.

Targets: >= 500 saves/s; search p50 < 10 ms. The server uses
shared_buffers=256MB so the index stays in memory, as on a managed provider.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.memory import (
    AtomMatch,
    KnowledgeAtom,
    KnowledgeStore,
    PostgresMemoryStorage,
    Session,
)
from agent_factory.testing.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "agent_factory" / "schema" / "migrations"
SCHEMA_FILES = ("0001_extensions.sql", "0002_session_memories.sql", "0003_knowledge_atoms.sql")
DIM = 1536
SAVE_TARGET = 500.0
SEARCH_P50_TARGET_MS = 10.0


@dataclass
class Timing:
    name: str
    samples: list[float]  # seconds
    statements: int

    @property
    def per_second(self) -> float:
        return len(self.samples) / sum(self.samples)

    def ms(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def deploy_schema(url: str, embedding_dim: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in SCHEMA_FILES:
            script = (MIGRATIONS / name).read_text()
            conn.execute(script.replace("{{EMBEDDING_DIM}}", str(embedding_dim)))


class StatementCounter:
    """Counts the statements a DatabaseManager runs (each is one round trip)."""

    def __init__(self, db: DatabaseManager) -> None:
        self.count = 0
        real = db.execute_query

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        db.execute_query = counted  # type: ignore[method-assign]


def conversation(storage: PostgresMemoryStorage, n: int = 20) -> Session:
    session = Session(user_id="bench", storage=storage, metadata={"channel": "bench"})
    session.add_system_message("You are a concise assistant for industrial maintenance.")
    for i in range(n - 1):
        if i % 2 == 0:
            session.add_user_message(f"Question {i}: how do I reset fault F{i:04d} on the drive?")
        else:
            session.add_assistant_message(
                f"Answer {i}: open the menu, select parameter P{i:03d}, confirm with OK.",
                {"tokens": 24, "model": "bench"},
            )
    return session


def time_calls(
    name: str, calls: Iterator[Callable[[], Any]], counter: StatementCounter, warmup: int
) -> Timing:
    samples: list[float] = []
    start_count = 0
    for i, call in enumerate(calls):
        if i == warmup:
            start_count = counter.count
        t0 = time.perf_counter()
        call()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return Timing(name, samples, counter.count - start_count)


def bench_saves(url: str, saves: int) -> list[Timing]:
    warmup = 50
    with DatabaseManager({"bench": url}) as db:
        storage = PostgresMemoryStorage(db)
        counter = StatementCounter(db)
        fresh = [conversation(storage) for _ in range(saves + warmup)]
        results = [
            time_calls("save new 20-message session", (s.save for s in fresh), counter, warmup)
        ]
        same = fresh[0]
        results.append(
            time_calls(
                "re-save unchanged session",
                (same.save for _ in range(saves + warmup)),
                counter,
                warmup,
            )
        )

        def append_and_save(session: Session) -> Callable[[], None]:
            def call() -> None:
                session.add_user_message("one more question")
                session.save()

            return call

        results.append(
            time_calls(
                "append 1 message and save", (append_and_save(s) for s in fresh), counter, warmup
            )
        )
        return results


LATENT = 24


def embedding(rng: random.Random, latent: list[float] | None = None) -> list[float]:
    """A 1536-d vector with structure, like a real embedding: a 24-d latent point
    tiled across the dimensions, plus noise. (Unstructured Gaussian vectors are
    the worst case for any ANN index: their neighbours are all nearly equidistant.)"""
    z = latent if latent is not None else [rng.gauss(0.0, 1.0) for _ in range(LATENT)]
    return [z[i % LATENT] + 0.3 * (rng.random() - 0.5) for i in range(DIM)]


def bench_search(url: str, atoms: int, queries: int) -> dict[str, float]:
    rng = random.Random(42)
    with DatabaseManager({"bench": url}) as db:
        store = KnowledgeStore(db)
        # Bulk load first, then build the HNSW index once (as one would for a
        # first import): inserting into the index row by row is ~4x slower.
        db.execute_query("DROP INDEX knowledge_atoms_embedding_idx", fetch_mode="none")
        t0 = time.perf_counter()
        store.upsert_many(
            (
                KnowledgeAtom(
                    atom_id=f"atom-{i:05d}",
                    atom_type="concept",
                    title=f"Atom {i}",
                    content="...",
                    manufacturer=("abb", "siemens", "rockwell")[i % 3],
                    embedding=embedding(rng),
                )
                for i in range(atoms)
            ),
            batch_size=250,
        )
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        db.execute_query(
            "CREATE INDEX knowledge_atoms_embedding_idx ON knowledge_atoms "
            "USING hnsw (embedding vector_cosine_ops)",
            fetch_mode="none",
        )
        db.execute_query("ANALYZE knowledge_atoms", fetch_mode="none")
        index_s = time.perf_counter() - t0
        probes = [embedding(rng) for _ in range(queries + 20)]
        for q in probes[:20]:  # warm the index and the plan cache
            store.search(q, k=10)
        samples = []
        for q in probes[20:]:
            t1 = time.perf_counter()
            store.search(q, k=10)
            samples.append(time.perf_counter() - t1)
        sample = probes[20:40]
        recall = {
            ef: exact_recall(url, sample, [store.search(q, k=10, ef_search=ef) for q in sample])
            for ef in (40, 100)
        }
    ordered = sorted(samples)
    return {
        "atoms": atoms,
        "load_s": load_s,
        "index_s": index_s,
        "queries": len(samples),
        "p50_ms": statistics.median(samples) * 1e3,
        "p95_ms": ordered[int(0.95 * len(ordered))] * 1e3,
        "recall_ef40": recall[40],
        "recall_ef100": recall[100],
    }


def exact_recall(url: str, probes: list[list[float]], answers: list[list[AtomMatch]]) -> float:
    """Mean recall@10 of the HNSW answers against a sequential exact scan."""
    found = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET enable_indexscan = off")
        for q, answer in zip(probes, answers, strict=True):
            literal = "[" + ",".join(map(repr, q)) + "]"
            rows = conn.execute(
                "SELECT atom_id FROM knowledge_atoms ORDER BY embedding <=> %s::vector LIMIT 10",
                (literal,),
            ).fetchall()
            found += len({r[0] for r in rows} & {h.atom.atom_id for h in answer})
    return found / (10 * len(probes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run")
    args = parser.parse_args(argv)
    saves, atoms = (300, 2_000) if args.quick else (2_000, 10_000)

    started = time.perf_counter()
    with EmbeddedPostgres(
        "bench-memory", settings={"shared_buffers": "256MB", "maintenance_work_mem": "256MB"}
    ) as pg:
        pg.start(60.0)
        deploy_schema(pg.url, DIM)
        print(f"PostgreSQL on loopback; {saves} saves per series, {atoms} atoms of dim {DIM}")
        timings = bench_saves(pg.url, saves)
        for t in timings:
            print(
                f"  {t.name:28s} {t.per_second:7.0f} saves/s  p50 {t.ms(0.5):5.2f} ms  "
                f"p99 {t.ms(0.99):5.2f} ms  statements/save {t.statements / len(t.samples):.2f}"
            )
        search = bench_search(pg.url, atoms, queries=200)
        print(
            f"  loaded {search['atoms']:.0f} atoms in {search['load_s']:.1f} s, "
            f"built the HNSW index in {search['index_s']:.1f} s"
        )
        print(
            f"  top-10 search: p50 {search['p50_ms']:.2f} ms  p95 {search['p95_ms']:.2f} ms  "
            f"over {search['queries']:.0f} queries; recall@10 {search['recall_ef40']:.2f} "
            f"(ef_search 40), {search['recall_ef100']:.2f} (ef_search 100)"
        )
    one_trip = all(t.statements == len(t.samples) for t in timings)
    checks = {
        f"save >= {SAVE_TARGET:.0f}/s": timings[0].per_second >= SAVE_TARGET,
        "one statement per save": one_trip,
        f"search p50 < {SEARCH_P50_TARGET_MS:.0f} ms": search["p50_ms"] < SEARCH_P50_TARGET_MS,
    }
    for name, passed in checks.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""``schema copy`` between two real providers: binary COPY, batches, upsert, re-runs."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases

from agent_factory.cli.schema_command import _Context, _progress, main
from agent_factory.schema import apply_migrations, copy_tables
from agent_factory.testing.fleet import Fleet

DIM = 3


def env_for(urls: Mapping[str, str]) -> dict[str, str]:
    return {f"{name.upper()}_DB_URL": url for name, url in urls.items()}


def run(fleet: Fleet, capsys: pytest.CaptureFixture[str], urls: Mapping[str, str],
        *args: str) -> tuple[int, str, str]:
    code = main(list(args), environ=env_for(urls))
    out, err = capsys.readouterr()
    for member in fleet:
        assert member.server.password not in out + err
    return code, out, err


def execute(url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def rows(url: str, table: str) -> list[tuple[Any, ...]]:
    return execute(url, f"SELECT * FROM {table} ORDER BY id")


def seed(url: str, sessions: int = 2, messages: int = 3, atoms: int = 5) -> None:
    with psycopg.connect(url) as conn:
        for s in range(sessions):
            conn.execute(
                "INSERT INTO session_memories (session_id, user_id, memory_type, content) "
                "VALUES (%s, 'alice', 'session_metadata', %s)",
                (f"s{s}", json.dumps({"title": f"session {s}"})))
            for m in range(messages):
                conn.execute(
                    "INSERT INTO session_memories (session_id, user_id, memory_type, message_id,"
                    " message_index, content) VALUES (%s, 'alice', 'message_user', %s, %s, %s)",
                    (f"s{s}", f"m{m}", m, json.dumps({"text": f"hello {m} ☃"})))
        for a in range(atoms):
            conn.execute(
                "INSERT INTO knowledge_atoms (atom_id, atom_type, title, content, keywords, "
                "source_pages, citations, embedding) VALUES (%s, 'concept', %s, %s, %s, %s, %s, "
                "%s::vector)",
                (f"atom-{a}", f"Title {a}", "x" * (a * 1000), ["plc", f"k{a}"], [a, a + 1],
                 json.dumps([{"page": a}]), f"[{a}, 0.5, -1]"))


@pytest.fixture
def urls(healthy_fleet: Fleet) -> Iterator[dict[str, str]]:
    """supabase and neon deployed (dimension 3); railway left empty."""
    made = create_databases(healthy_fleet, "schema_copy")
    for name in ("supabase", "neon"):
        apply_migrations(made[name], embedding_dim=DIM, provider=name)
    yield made
    healthy_fleet.heal()
    drop_databases(healthy_fleet, made)


def test_copy_moves_every_row_and_running_it_again_changes_nothing(
    healthy_fleet: Fleet, urls: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    seed(urls["supabase"])
    code, out, err = run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to",
                         "neon", "--batch-size", "3")
    assert code == 0, out + err
    assert "session_memories: 8 row(s) in source, 8 copied (8 inserted, 0 updated), " \
           "0 unchanged" in out
    assert "knowledge_atoms: 5 row(s) in source, 5 copied (5 inserted, 0 updated)" in out
    assert "  session_memories: 3/8 rows" in out  # plain progress: stdout is not a TTY
    assert "done: 13 row(s) written to neon" in out
    for table in ("session_memories", "knowledge_atoms"):
        assert rows(urls["neon"], table) == rows(urls["supabase"], table)  # updated_at too

    code, out, _ = run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to", "neon")
    assert code == 0
    assert "session_memories: 8 row(s) in source, 0 copied (0 inserted, 0 updated), " \
           "8 unchanged" in out
    assert execute(urls["neon"], "SELECT count(*) FROM session_memories") == [(8,)]
    assert execute(urls["neon"], "SELECT count(*) FROM knowledge_atoms") == [(5,)]


def test_copy_updates_older_rows_keeps_newer_ones_and_skips_key_collisions(
    healthy_fleet: Fleet, urls: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = urls["supabase"], urls["neon"]
    seed(src, sessions=1, messages=2, atoms=3)
    assert run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to", "neon")[0] == 0
    # atom-0 changes on the source, atom-1 later on the target: each side's newer one wins.
    execute(src, "UPDATE knowledge_atoms SET title = 'new on source' WHERE atom_id = 'atom-0'")
    execute(dst, "UPDATE knowledge_atoms SET title = 'new on target' WHERE atom_id = 'atom-1'")
    execute(src, "UPDATE knowledge_atoms SET title = 'older on source', updated_at = "
                 "updated_at - interval '1 hour' WHERE atom_id = 'atom-1'")
    # The same message saved on both providers during an outage: two ids, one key.
    for url, text in ((src, "from source"), (dst, "from target")):
        execute(url, "INSERT INTO session_memories (session_id, memory_type, message_id, content)"
                     " VALUES ('s0', 'message_user', 'm-dup', %s)", (json.dumps(text),))

    code, out, err = run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to",
                         "neon", "--batch-size", "2", "--table", "knowledge_atoms",
                         "--table", "session_memories")
    assert code == 0, out + err
    assert "knowledge_atoms: 3 row(s) in source, 1 copied (0 inserted, 1 updated), " \
           "2 unchanged" in out
    assert "session_memories: 4 row(s) in source, 0 copied (0 inserted, 0 updated), " \
           "3 unchanged, 1 skipped" in out
    titles = dict(execute(dst, "SELECT atom_id, title FROM knowledge_atoms"))
    assert titles == {"atom-0": "new on source", "atom-1": "new on target", "atom-2": "Title 2"}
    assert execute(src, "SELECT updated_at FROM knowledge_atoms WHERE atom_id = 'atom-0'") == \
        execute(dst, "SELECT updated_at FROM knowledge_atoms WHERE atom_id = 'atom-0'")
    assert execute(dst, "SELECT content FROM session_memories WHERE message_id = 'm-dup'") == \
        [("from target",)]


def test_copy_refuses_an_undeployed_or_different_target(
    healthy_fleet: Fleet, urls: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to",
                       "railway")
    assert code == 1
    assert "provider 'railway' has no table 'session_memories': deploy the schema there " \
           "first (schema deploy --provider railway)" in err
    apply_migrations(urls["railway"], embedding_dim=DIM + 1, provider="railway")
    code, _, err = run(healthy_fleet, capsys, urls, "copy", "--from", "supabase", "--to",
                       "railway", "--table", "knowledge_atoms")
    assert code == 1
    assert "table 'knowledge_atoms' differs between 'supabase' and 'railway' (embedding: " \
           "vector(3) on 'supabase', vector(4) on 'railway')" in err
    assert execute(urls["railway"], "SELECT count(*) FROM knowledge_atoms") == [(0,)]


def test_copy_tables_api_reports_progress_per_batch(
    healthy_fleet: Fleet, urls: dict[str, str]
) -> None:
    seed(urls["supabase"], sessions=0, atoms=5)
    seen: list[tuple[str, int, int]] = []
    with psycopg.connect(urls["supabase"], autocommit=True) as src, \
            psycopg.connect(urls["neon"], autocommit=True) as dst:
        reports = copy_tables(src, dst, tables=["knowledge_atoms"], batch_size=2,
                              on_progress=lambda *args: seen.append(args))
    assert [(r.table, r.source_rows, r.inserted) for r in reports] == [("knowledge_atoms", 5, 5)]
    assert seen == [("knowledge_atoms", n, 5) for n in (0, 2, 4, 5)]


def test_rich_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with _progress(_Context({}), live=True) as update:
        update("knowledge_atoms", 0, 4)
        update("knowledge_atoms", 4, 4)
    assert "knowledge_atoms" in capsys.readouterr().out

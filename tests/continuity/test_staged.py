"""The drain's set-based path decides and writes what the row-by-row replay would.

A batch mixing clean changes (single and chained updates, inserts, deletes,
insert-then-delete), conflicts of every kind, NULL columns, numbers, times
recorded under another time zone, a composite key and a table whose images
lack a column the primary has. The reference is the replay in Python of the
whole batch (`merge.replay` over every change and row, rendered by the
primary), computed on the primary and rolled back; the drain must leave the
primary's rows and the recorded conflicts exactly as that replay says.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from bank import bank, direct, journaled, query_none  # noqa: F401 - bank is a fixture

from agent_factory.continuity import drain, journal
from agent_factory.continuity.merge import ConflictPolicy, Row, RowKey, replay
from agent_factory.testing.fleet import Fleet

ITEMS = """CREATE TABLE items (id int PRIMARY KEY, n bigint, note text, x float8,
    amount numeric, at timestamptz, doc jsonb, flag bool)"""
PAIRS = "CREATE TABLE pairs (code char(3), seq int, v text, PRIMARY KEY (code, seq))"
SEED = [
    "INSERT INTO items SELECT g, 10 * g, 'note ' || g, g / 3.0, g * 1.50, "
    "'2026-01-01 00:00+00'::timestamptz + g * interval '1 hour', "
    "jsonb_build_object('g', g, 'l', jsonb_build_array(g, 0.1)), g % 2 = 0 "
    "FROM generate_series(1, 12) AS g",
    "INSERT INTO pairs SELECT c, g, c || g FROM unnest(ARRAY['abc', 'xyz']) AS c, "
    "generate_series(1, 3) AS g",
]
POLICY = ConflictPolicy(delta_columns={"items": frozenset({"n"})})


def _outage(primary: str, backup: str) -> None:
    """The primary's own writes, then the backup's journaled ones."""
    query_none(primary, "UPDATE items SET n = n + 7, note = 'primary' WHERE id = 4; "
               "INSERT INTO items (id, n, note) VALUES (102, 1, 'primary''s'); "
               "UPDATE items SET note = 'primary' WHERE id = 7; DELETE FROM items WHERE id = 8; "
               "UPDATE pairs SET v = 'primary' WHERE code = 'xyz' AND seq = 2")
    journaled(backup, "UPDATE items SET n = n + 1, x = 0.1 + 0.2 WHERE id = 1",
              "UPDATE items SET note = NULL, doc = NULL, flag = NULL WHERE id = 5")
    journaled(backup, "UPDATE items SET n = n + 1 WHERE id = 2",
              "UPDATE items SET n = n + 1, amount = 2.500 WHERE id = 2")
    journaled(backup, "SET LOCAL TimeZone = 'Asia/Tokyo'",
              "UPDATE items SET at = at + interval '1 minute' WHERE id = 6",
              "UPDATE items SET n = n + 1 WHERE id = 2")
    journaled(backup, "UPDATE items SET at = at + interval '1 minute' WHERE id = 6",
              "INSERT INTO items (id, n, note) VALUES (100, 1, 'gone again')",
              "UPDATE items SET n = 2 WHERE id = 100")
    journaled(backup, "DELETE FROM items WHERE id = 100",
              "INSERT INTO items (id, n, note) VALUES (101, 1, 'new')",
              "DELETE FROM items WHERE id = 3")
    journaled(backup, "UPDATE items SET n = n - 3, note = 'backup' WHERE id = 4",
              "INSERT INTO items (id, n, note) VALUES (102, 5, 'backup''s')",
              "DELETE FROM items WHERE id = 7", "UPDATE items SET n = 0 WHERE id = 8",
              "UPDATE items SET n = n + 1 WHERE id = 101")
    # A write the journal missed between two changes of a row (as replication
    # applies one): the second change's before image is not the first's after.
    journaled(backup, "UPDATE items SET n = n + 1 WHERE id = 9")
    query_none(backup, "UPDATE items SET note = 'unrecorded' WHERE id = 9")
    journaled(backup, "UPDATE items SET n = n + 1 WHERE id = 9")
    journaled(backup, "UPDATE pairs SET v = 'backup' WHERE seq = 2",
              "INSERT INTO pairs VALUES ('new', 1, 'n1')", "DELETE FROM pairs WHERE seq = 3")
    journaled(backup, "INSERT INTO drifted (id, v) VALUES (3, 'b3')",
              "UPDATE drifted SET v = 'b1' WHERE id = 1")


def _expected(primary: str, backup: str) -> tuple[dict[RowKey, Row | None], list[Any]]:
    """The row-by-row replay of the whole journal, computed on the primary, rolled back."""
    with psycopg.connect(backup) as source:
        raws = [drain.Raw(*r) for r in source.execute(
            "SELECT seq, xid::text, table_name, op, before::text, after::text "
            "FROM agent_factory_journal j ORDER BY (SELECT max(seq) FROM agent_factory_journal "
            "WHERE xid = j.xid), seq").fetchall()]
    with psycopg.connect(primary) as target:
        journal.prepare_session(target)
        with journal._steady(target):
            changes = drain._normalised(target, raws)
            keys = {t: journal.primary_key(target, t) for t in dict.fromkeys(
                c.table for c in changes)}
            key_of = drain._key_by(keys)
            current = drain._current(target, changes, keys, key_of)
            final, conflicts = replay(changes, key_of, current, POLICY)
        target.rollback()
    return final, [(c.change.table, c.change.op, c.resolution, c.change.before,
                    c.change.after, c.primary, c.resolved) for c in conflicts]


@pytest.mark.parametrize("bank", [False], indirect=True)
def test_the_set_based_drain_settles_a_batch_as_the_row_by_row_replay(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    plain = direct(healthy_fleet, bank)
    primary, backup = plain["supabase"], plain["railway"]
    for url in (primary, backup):
        drifted = "CREATE TABLE drifted (id int PRIMARY KEY, v text" + (
            ", w int NOT NULL DEFAULT 7)" if url == primary else ")")
        with psycopg.connect(url, autocommit=True) as conn:
            for statement in (ITEMS, PAIRS, drifted, *SEED,
                              "INSERT INTO drifted (id, v) VALUES (1, 'a1'), (2, 'a2')"):
                conn.execute(statement)
    with psycopg.connect(backup) as conn:
        for table in ("items", "pairs", "drifted"):
            journal.install(conn, table)
    _outage(primary, backup)
    final, conflicts = _expected(primary, backup)
    # Conflicts on both tables, one from a broken chain, and rows the batch deletes.
    assert {c[0] for c in conflicts} == {"public.items", "public.pairs"}
    assert any(c[3] and c[3]["note"] == "unrecorded" for c in conflicts)
    assert any(r is None for r in final.values())

    with psycopg.connect(primary) as target, psycopg.connect(backup) as source, \
            psycopg.connect(backup) as pruner:
        journal.prepare_session(target)
        journal.prepare_session(source)
        report = drain.drain_all(source, target, "railway", POLICY, pruner=pruner)
        assert (report.changes, report.transactions, report.conflicts) == (
            26, 10, len(conflicts))
        with journal._steady(target):
            for (table, key), row in final.items():
                cols = journal.primary_key(target, table)
                match = " AND ".join(f"t.{c} = k.{c}" for c in cols)
                probe = journal._dumps(dict(zip(cols, key, strict=True)))
                got = target.execute(
                    f"SELECT to_jsonb(t) FROM {table} t, jsonb_populate_record(NULL::{table}, "
                    f"%s::jsonb) k WHERE {match}", (probe,)).fetchall()
                if row is None:
                    assert got == [], (table, key)
                else:
                    assert got and {k: got[0][0][k] for k in row} == row, (table, key)
            recorded = target.execute(
                "SELECT table_name, op, resolution, before, backup_version, primary_version, "
                "resolved_version FROM agent_factory_conflicts ORDER BY id").fetchall()
        assert [tuple(r) for r in recorded] == conflicts
        assert target.execute("SELECT w FROM drifted ORDER BY id").fetchall() == [(7,)] * 3
    with psycopg.connect(backup) as source:
        assert source.execute("SELECT count(*) FROM agent_factory_journal").fetchone() == (0,)

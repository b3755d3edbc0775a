"""The failback reconciliation: keyed upsert, newest wins, sequences, idempotent."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from databases import create_databases, drop_databases

from agent_factory.continuity.reconcile import reconcile, tables_on_both
from agent_factory.schema import apply_migrations
from agent_factory.testing.fleet import Fleet

USER_TABLE = "events_log"


@pytest.fixture
def dbs(healthy_fleet: Fleet) -> Iterator[dict[str, str]]:
    urls = create_databases(healthy_fleet, "rec")
    for url in urls.values():
        apply_migrations(url, embedding_dim=8)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE {USER_TABLE} (id bigserial PRIMARY KEY, note text, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            )
    yield urls
    healthy_fleet.heal()
    drop_databases(healthy_fleet, urls)


def memory_row(conn: psycopg.Connection, session: str, text: str, at: datetime) -> str:
    row_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, "
        "content, created_at, updated_at) VALUES (%s, %s, 'u', 'message_user', %s, %s, %s, %s)",
        (row_id, session, uuid.uuid4().hex, json.dumps({"text": text}), at, at),
    )
    return row_id


def test_reconcile_newest_wins_moves_sequences_and_is_idempotent(dbs: dict[str, str]) -> None:
    now = datetime.now(timezone.utc)
    with psycopg.connect(dbs["railway"], autocommit=True) as backup, \
            psycopg.connect(dbs["supabase"], autocommit=True) as primary:
        shared = memory_row(primary, "s1", "old on primary", now - timedelta(minutes=5))
        backup.execute(
            "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, "
            "content, created_at, updated_at) SELECT id, session_id, user_id, memory_type, "
            "message_id, '{\"text\": \"newer on backup\"}', created_at, %s "
            "FROM (VALUES (%s::uuid, 's1', 'u', 'message_user', 'm-shared', "
            "now())) AS v(id, session_id, user_id, memory_type, message_id, created_at)",
            (now, shared),
        )
        kept = memory_row(primary, "s2", "newest on primary", now)
        backup.execute(
            "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, "
            "content, created_at, updated_at) VALUES (%s, 's2', 'u', 'message_user', 'm-kept', "
            "'{\"text\": \"older on backup\"}', %s, %s)",
            (kept, now - timedelta(minutes=1), now - timedelta(minutes=1)),
        )
        new_ids = [memory_row(backup, "s3", f"outage {i}", now) for i in range(25)]
        backup.execute(f"INSERT INTO {USER_TABLE} (note) SELECT 'x' FROM generate_series(1, 40)")
        primary.execute(f"INSERT INTO {USER_TABLE} (note) VALUES ('p')")

    with psycopg.connect(dbs["railway"]) as src, psycopg.connect(dbs["supabase"]) as dst:
        tables = tables_on_both(src, dst, ["session_memories", "knowledge_atoms", USER_TABLE,
                                           "not_there"])
        assert tables == ["session_memories", "knowledge_atoms", USER_TABLE]
        reports = reconcile(src, dst, tables=["session_memories", USER_TABLE],
                            source_name="railway", target_name="supabase")
        by_table = {r.table: r for r in reports}
        assert by_table["session_memories"].inserted == 25
        assert by_table["session_memories"].updated == 1  # the newer backup row
        again = reconcile(src, dst, tables=["session_memories", USER_TABLE])
        assert all(r.copied == 0 for r in again)

    with psycopg.connect(dbs["supabase"], autocommit=True) as primary:
        texts = dict(primary.execute(
            "SELECT id::text, content->>'text' FROM session_memories").fetchall())
        assert texts[shared] == "newer on backup"
        assert texts[kept] == "newest on primary"
        assert all(i in texts for i in new_ids)
        # The primary's own row 1 collides with the backup's id 1: the newer wins, and
        # the sequence now hands out ids past everything the backup used.
        (next_id,) = primary.execute(
            f"INSERT INTO {USER_TABLE} (note) VALUES ('after') RETURNING id").fetchone() or (0,)
        assert next_id > 40
        # Untagged again: the session's origin was reset.
        assert primary.execute("SELECT pg_replication_origin_session_is_setup()").fetchone() \
            == (False,)


def test_since_limits_the_rows(dbs: dict[str, str]) -> None:
    now = datetime.now(timezone.utc)
    with psycopg.connect(dbs["neon"], autocommit=True) as backup:
        memory_row(backup, "old", "before the outage", now - timedelta(hours=2))
        recent = memory_row(backup, "new", "during the outage", now)
    with psycopg.connect(dbs["neon"]) as src, psycopg.connect(dbs["supabase"]) as dst:
        (report,) = reconcile(src, dst, tables=["session_memories"],
                              since=now - timedelta(minutes=1))
    assert report.inserted == 1
    with psycopg.connect(dbs["supabase"], autocommit=True) as primary:
        ids = {r[0] for r in primary.execute("SELECT id::text FROM session_memories")}
    assert ids == {recent}

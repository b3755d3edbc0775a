"""PostgresMemoryStorage on three real providers: exact round trips, one idempotent
statement per save, no lost appends, and saves that survive a crashed or hung primary."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from databases import schema_databases
from defaults import ORDER
from fleet import run_concurrently

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import InvalidMemoryError, NoProvidersConfiguredError
from agent_factory.memory import Message, MessageHistory, PostgresMemoryStorage, Session
from agent_factory.testing.fleet import Fleet

# Not the shared FAST: checkout_timeout 10 s, the value these tests were written
# and run with.
FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 10.0}


def run(url: str, script: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(script)


def query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    """The module's databases (``db``, the conftest fixture, is a manager over them)."""
    with schema_databases(fleet, "mem") as made:
        yield made


@pytest.fixture
def storage(db: DatabaseManager) -> PostgresMemoryStorage:
    return PostgresMemoryStorage(db)


def rich_session(storage: PostgresMemoryStorage | None = None, user: str = "alice") -> Session:
    """Every role, unicode, nested metadata, microseconds, out-of-order timestamps."""
    t0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
    history = MessageHistory()
    history.add_message("system", "You are terse.", timestamp=t0)
    history.add_message("user", "Grüße 👋 — what's 2+2? 100% sure?", {"lang": "de"},
                        timestamp=t0 + timedelta(seconds=1, microseconds=1))
    history.add_message("assistant", "4", {"tokens": 1, "cost": 0.25, "tags": ["math", None],
                                           "nested": {"ok": True}},
                        timestamp=t0 + timedelta(seconds=2))
    history.add_message("tool", '{"result": 4}', {"tool": "calc"}, timestamp=t0 - timedelta(days=1))
    history.add_message("user", "", timestamp=t0 + timedelta(seconds=3))
    return Session(user_id=user, history=history, metadata={"topic": "math", "n": [1, 2.5]},
                   created_at=t0 - timedelta(hours=1), last_active=t0 + timedelta(seconds=3),
                   storage=storage)


def session_rows(url: str, session_id: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT memory_type, message_id, xmin::text FROM session_memories "
                      "WHERE session_id = %s ORDER BY message_index NULLS FIRST", (session_id,))


class CallCounter:
    """Counts DatabaseManager calls while delegating to the real ones."""

    def __init__(self, db: DatabaseManager, monkeypatch: pytest.MonkeyPatch) -> None:
        self.queries: list[str] = []
        self.transactions = 0
        real_query, real_tx = db.execute_query, db.transaction

        def execute_query(q: Any, *args: Any, **kwargs: Any) -> Any:
            self.queries.append(str(q))
            return real_query(q, *args, **kwargs)

        def transaction() -> Any:
            self.transactions += 1
            return real_tx()

        monkeypatch.setattr(db, "execute_query", execute_query)
        monkeypatch.setattr(db, "transaction", transaction)


def test_round_trip_is_exact(storage: PostgresMemoryStorage, urls: dict[str, str]) -> None:
    session = rich_session(storage)
    session.save()
    loaded = storage.load_session(session.session_id)
    assert loaded == session
    assert loaded is not None and loaded.storage is storage
    assert [m.id for m in loaded.history] == [m.id for m in session.history]
    assert all(m.timestamp.tzinfo == timezone.utc for m in loaded.history)
    assert loaded.created_at.tzinfo == timezone.utc
    assert storage.load_session("session_nosuchthing") is None
    empty = Session(user_id="", storage=storage)
    empty.save()
    assert storage.load_session(empty.session_id) == empty
    assert Session.load(session.session_id, storage) == session


def test_save_is_one_idempotent_statement(
    storage: PostgresMemoryStorage, db: DatabaseManager, urls: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = rich_session(storage)
    calls = CallCounter(db, monkeypatch)
    session.save()
    assert len(calls.queries) == 1 and calls.transactions == 0
    first = session_rows(urls["supabase"], session.session_id)
    assert len(first) == 1 + len(session)
    session.save()
    session.save()
    assert len(calls.queries) == 3 and calls.transactions == 0
    # Unchanged messages are not even rewritten (same row versions).
    again = session_rows(urls["supabase"], session.session_id)
    assert [r[:2] for r in again] == [r[:2] for r in first]
    assert [r[2] for r in again[1:]] == [r[2] for r in first[1:]]
    session.add_assistant_message("more")
    session.save()
    assert len(session_rows(urls["supabase"], session.session_id)) == 2 + 5
    assert storage.load_session(session.session_id) == session


def test_save_is_atomic(storage: PostgresMemoryStorage, urls: dict[str, str]) -> None:
    session = rich_session(storage)
    session.save()
    before = storage.load_session(session.session_id)
    # A test-only trigger fails the statement on the second new message, after
    # the metadata row and the first new message were written by it.
    run(urls["supabase"], """
        CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.content->>'content' = 'boom' THEN RAISE EXCEPTION 'boom'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER boom BEFORE INSERT ON session_memories
            FOR EACH ROW EXECUTE FUNCTION boom();""")
    try:
        session.metadata["changed"] = True
        session.add_user_message("fine")
        session.add_user_message("boom")
        with pytest.raises(psycopg.errors.RaiseException) as info:
            session.save()
        assert info.value.provider == "supabase"  # type: ignore[attr-defined]
    finally:
        run(urls["supabase"], "DROP TRIGGER boom ON session_memories; DROP FUNCTION boom()")
    assert storage.load_session(session.session_id) == before


def test_invalid_records_are_refused_before_sending(
    storage: PostgresMemoryStorage, db: DatabaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = CallCounter(db, monkeypatch)
    session = Session(user_id="bob", storage=storage)
    session.history.add_message("function", "old role")
    with pytest.raises(InvalidMemoryError, match="'function'"):
        session.save()
    bad = Session(user_id="bob", storage=storage)
    bad.add_user_message("x", {"when": datetime.now(timezone.utc)})
    with pytest.raises(InvalidMemoryError, match="JSON"):
        bad.save()
    with pytest.raises(InvalidMemoryError, match="atom type"):
        storage.save_memory_atom("s", "bob", "message_user", {})
    assert calls.queries == []


def test_concurrent_appends_lose_nothing(urls: dict[str, str], healthy_fleet: Fleet) -> None:
    base = rich_session()
    with DatabaseManager(urls, order=ORDER, **FAST) as m, PostgresMemoryStorage(m) as setup:
        setup.save_session(base)
    barrier = threading.Barrier(2)

    def writer(name: str) -> None:
        # Own manager and pool: as separate as two processes.
        with DatabaseManager(urls, order=ORDER, **FAST) as m, PostgresMemoryStorage(m) as mine:
            session = mine.load_session(base.session_id)
            assert session is not None
            barrier.wait()
            for i in range(15):
                session.add_user_message(f"{name}-{i}")
                mine.save_session(session)

    assert run_concurrently(writer, ("a", "b"), timeout=60) == []
    with DatabaseManager(urls, order=ORDER, **FAST) as m, PostgresMemoryStorage(m) as reader:
        loaded = reader.load_session(base.session_id)
    assert loaded is not None
    contents = [m.content for m in loaded.history]
    assert len(contents) == len(base) + 30
    assert contents[: len(base)] == [m.content for m in base.history]
    for name in ("a", "b"):
        assert [c for c in contents if c.startswith(f"{name}-")] == [
            f"{name}-{i}" for i in range(15)
        ]


def test_list_delete_and_memory_atoms(
    storage: PostgresMemoryStorage, three_sessions: tuple[str, list[str]]
) -> None:
    user, ids = three_sessions
    assert storage.list_sessions(user) == sorted(ids)
    assert set(ids) <= set(storage.list_sessions())
    assert storage.list_sessions(user + "-nobody") == []

    first = storage.save_memory_atom(ids[0], user, "decision", {"title": "use postgres"},
                                     {"by": "test"})
    second = storage.save_memory_atom(ids[0], user, "issue", {"title": "a bug"})
    assert first["memory_type"] == "decision" and first["content"] == {"title": "use postgres"}
    assert first["metadata"] == {"by": "test"}
    assert first["created_at"].tzinfo == timezone.utc
    atoms = storage.query_memory_atoms(session_id=ids[0], memory_type="decision")
    assert atoms == [first]
    newest_first = storage.query_memory_atoms(user_id=user, limit=2)
    assert [a["id"] for a in newest_first] == [second["id"], first["id"]]

    assert storage.delete_session(ids[0]) is True
    assert storage.delete_session(ids[0]) is False
    assert storage.load_session(ids[0]) is None
    assert storage.query_memory_atoms(session_id=ids[0]) == []
    assert storage.list_sessions(user) == sorted(ids[1:])


def test_save_and_load_on_backup_after_primary_crash(
    storage: PostgresMemoryStorage, db: DatabaseManager, healthy_fleet: Fleet,
    urls: dict[str, str],
) -> None:
    storage.save_session(rich_session())
    assert db.serving_provider == "supabase"
    healthy_fleet["supabase"].server.kill()
    session = rich_session(storage, user="carol")
    session.save()
    assert db.serving_provider == "railway"
    loaded = storage.load_session(session.session_id)
    assert db.serving_provider == "railway"
    assert loaded == session
    # Independent databases: the save is on the backup that served it, only.
    assert len(session_rows(urls["railway"], session.session_id)) == 1 + len(session)
    assert session_rows(urls["neon"], session.session_id) == []


def test_save_interrupted_by_hung_primary_is_retried_on_backup(
    storage: PostgresMemoryStorage, db: DatabaseManager, healthy_fleet: Fleet
) -> None:
    session = rich_session(storage)
    session.save()  # the pool holds a live connection to the primary now
    healthy_fleet["supabase"].server.hang()
    session.add_user_message("sent to a hung server")
    t0 = time.monotonic()
    session.save()  # sent, never answered: idempotent, so retried on railway
    assert time.monotonic() - t0 < FAST["hang_timeout"] + 3.0
    assert db.serving_provider == "railway"
    assert storage.load_session(session.session_id) == session


def test_default_manager_is_created_lazily_from_environment(
    fleet: Fleet, urls: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    healthy_fleet: Fleet,
) -> None:
    import os

    for var in list(os.environ):
        if var.startswith(("DATABASE_", "SUPABASE_")) or var.endswith("_DB_URL"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    threads = threading.active_count()
    unconfigured = PostgresMemoryStorage()  # opens nothing, reads nothing yet
    assert threading.active_count() == threads
    with pytest.raises(NoProvidersConfiguredError):
        unconfigured.list_sessions()

    monkeypatch.setenv("SUPABASE_DB_URL", urls["supabase"])
    monkeypatch.setenv("RAILWAY_DB_URL", urls["railway"])
    monkeypatch.setenv("NEON_DB_URL", urls["neon"])
    # The spec's "Using with Memory Storage" example, verbatim.
    storage = PostgresMemoryStorage()
    session = Session(user_id="alice", storage=storage)
    session.add_user_message("Hello")
    session.save()
    loaded = storage.load_session(session.session_id)
    assert loaded == session
    assert storage.db.primary_provider == "supabase"
    storage.close()
    assert storage.db.closed


def test_message_ids_are_stable(storage: PostgresMemoryStorage) -> None:
    session = Session(storage=storage)
    message = session.add_user_message("same object twice")
    session.history.append(message)
    session.save()
    loaded = storage.load_session(session.session_id)
    assert loaded is not None and [m.id for m in loaded.history] == [message.id]
    legacy = {"role": "user", "content": "old", "timestamp": "2024-01-01T10:00:00"}
    assert Message.from_dict(legacy).id == Message.from_dict(dict(legacy)).id


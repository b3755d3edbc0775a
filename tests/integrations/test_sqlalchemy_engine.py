"""The SQLAlchemy engine on the real fleet: through a kill -9 of the primary it keeps
answering on the backup, and it goes back to the primary once that recovers; what
it writes on the backup meanwhile is journaled and reaches the primary at failback."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial

import psycopg
import pytest
import sqlalchemy
from conftest import MakeDb
from databases import schema_databases
from defaults import ORDER
from fleet import wait_until
from observers import provider_of
from sqlalchemy import text

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.integrations.sqlalchemy import create_engine
from agent_factory.testing.fleet import START_TIMEOUT, Fleet, can_connect

FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}


def served_by(engine: sqlalchemy.Engine, fleet: Fleet) -> str:
    with engine.connect() as conn:
        port = conn.execute(text("SELECT inet_server_port()")).scalar_one()
    return fleet.port_names()[port]


def test_the_engine_follows_a_crash_and_the_return(
        make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    engine = create_engine(db, pool_size=2)
    try:
        assert [served_by(engine, healthy_fleet) for _ in range(3)] == ["supabase"] * 3
        healthy_fleet["supabase"].server.kill()
        # The pooled connection is dead: pre-ping replaces it, the connector
        # skips the refusing primary, and this very first query succeeds.
        assert served_by(engine, healthy_fleet) == "railway"
        # Not a wait: every query for 3 s must stay on the backup.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert served_by(engine, healthy_fleet) == "railway"
        with engine.begin() as conn:
            conn.execute(text("CREATE TEMP TABLE t (x int)"))
            conn.execute(text("INSERT INTO t VALUES (1)"))
            assert conn.execute(text("SELECT count(*) FROM t")).scalar_one() == 1

        healthy_fleet["supabase"].heal()
        wait_until(partial(can_connect, healthy_fleet["supabase"].url), START_TIMEOUT,
                   message="the primary answering again")
        wait_until(lambda: served_by(engine, healthy_fleet) == "supabase", timeout=60,
                   interval=0.2, message="the engine back on the primary")
        assert [served_by(engine, healthy_fleet) for _ in range(3)] == ["supabase"] * 3
    finally:
        engine.dispose()


@pytest.fixture
def notes(healthy_fleet: Fleet) -> Iterator[dict[str, str]]:
    """Databases with the schema (the journal) and a ``notes`` table on every provider."""
    with schema_databases(healthy_fleet, "sqla") as urls:
        for url in urls.values():
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CREATE TABLE notes (id uuid PRIMARY KEY, body text NOT NULL)")
        yield urls


def test_a_write_through_the_engine_during_an_outage_reaches_the_primary(
        healthy_fleet: Fleet, notes: dict[str, str]) -> None:
    note = str(uuid.uuid4())
    with DatabaseManager(notes, order=ORDER, drain_interval=0.5, **FAST) as db:
        db.register_table("notes")
        engine = create_engine(db, pool_size=2)
        try:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO notes VALUES (:id, 'before')"),
                             {"id": str(uuid.uuid4())})
            healthy_fleet["supabase"].server.kill()
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO notes VALUES (:id, 'during the outage')"),
                             {"id": note})
                port = conn.execute(text("SELECT inet_server_port()")).scalar_one()
            assert provider_of(healthy_fleet, port) == "railway"
            healthy_fleet["supabase"].server.restart()

            def on_primary() -> list[tuple[str]]:
                with psycopg.connect(notes["supabase"], autocommit=True) as conn:
                    rows = conn.execute("SELECT body FROM notes WHERE id = %s", (note,))
                    return rows.fetchall()
            wait_until(lambda: until_up(on_primary) == [("during the outage",)], timeout=60,
                       message="the engine's write on the primary after failback")
        finally:
            engine.dispose()


def until_up(read: Callable[[], list[tuple[str]]]) -> list[tuple[str]]:
    """``read()``, or nothing while the restarted primary does not answer yet."""
    try:
        return read()
    except psycopg.OperationalError:
        return []


def test_a_connection_failure_names_every_provider_without_the_password(
        healthy_fleet: Fleet) -> None:
    urls = {name: "postgresql://app:s3cret-pw@127.0.0.1:1/x" for name in ("one", "two")}
    with DatabaseManager(urls, order=["one", "two"], **FAST) as db:
        engine = create_engine(db)
        with pytest.raises(sqlalchemy.exc.OperationalError) as info:
            engine.connect()
        message = str(info.value)
        assert "one:" in message and "two:" in message
        assert "s3cret-pw" not in message
        engine.dispose()


def test_without_sqlalchemy_the_import_names_the_extra() -> None:
    code = ("import sys\nsys.modules['sqlalchemy'] = None\n"
            "try:\n    import agent_factory.integrations.sqlalchemy\n"
            "except ImportError as exc:\n    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("MissingDependencyError")
    assert "pip install 'agent-factory[sqlalchemy]'" in out

"""configure=, row_factory= and db.connection() on real servers (sync and async).

``configure`` runs on every new pooled connection that serves the caller's
statements, the primary's and the backups', and again after the pool is
renewed at a recovery; one that fails is a configuration error, not an outage.
``row_factory`` shapes the caller's rows while the library's own calls keep
tuples. `connection()` hands out a pooled autocommit connection, failing over
at checkout.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import MakeDb
from databases import schema_databases
from defaults import FAST, ORDER
from fleet import wait_until
from observers import provider_of
from psycopg.rows import dict_row, namedtuple_row, tuple_row

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.settings import Settings
from agent_factory.errors import ConfigurationError
from agent_factory.memory import PostgresMemoryStorage, Session
from agent_factory.testing.fleet import Fleet

TAG = "SELECT current_setting('app.tag', true), inet_server_port()"


def tagger(tag: str, seen: list[int]) -> Any:
    """A configure that marks the session (visible to the caller's statements)."""
    def configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT set_config('app.tag', %s, false)", (tag,))
        seen.append(conn.info.backend_pid)
    return configure


def tagged(fleet: Fleet, row: Any) -> tuple[str, str]:
    return row[0], provider_of(fleet, row[1])


def test_configure_reaches_every_door_through_a_failover_and_a_pool_renewal(
        healthy_fleet: Fleet) -> None:
    everywhere: list[int] = []
    on_railway: list[int] = []
    urls: dict[str, Any] = healthy_fleet.urls()
    urls["railway"] = {"url": urls["railway"], "configure": tagger("railway", on_railway)}
    with DatabaseManager(urls, order=ORDER, configure=tagger("all", everywhere),
                         pool_min_size=2, **FAST) as db:
        assert tagged(healthy_fleet, db.execute_query(TAG, fetch_mode="one")) == (
            "all", "supabase")
        with db.transaction() as conn:
            assert conn.execute(TAG).fetchone()[0] == "all"  # type: ignore[index]
        with db.connection() as conn:
            assert conn.execute(TAG).fetchone()[0] == "all"  # type: ignore[index]
            assert conn.info.backend_pid in everywhere
        old_pool = db.providers["supabase"]._pool

        healthy_fleet["supabase"].server.kill()
        # The backup's connections got its own configure (the provider option wins).
        assert tagged(healthy_fleet, db.execute_query(TAG, fetch_mode="one")) == (
            "railway", "railway")
        with db.connection() as conn:
            assert conn.execute(TAG).fetchone()[0] == "railway"  # type: ignore[index]
        assert on_railway

        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: tagged(healthy_fleet, db.execute_query(TAG, fetch_mode="one"))[1]
                   == "supabase", timeout=60, message="back on the primary")
        assert db.providers["supabase"]._pool is not old_pool  # renewed at the recovery
        before = len(everywhere)
        assert tagged(healthy_fleet, db.execute_query(TAG, fetch_mode="one")) == (
            "all", "supabase")
        assert len(everywhere) >= before >= 3  # the renewed pool's connections ran it too
        # The library's own connections (probes, monitor, witness) never run configure.
        ours = set(everywhere)
        with psycopg.connect(healthy_fleet["supabase"].direct_url, autocommit=True) as conn:
            mine = {r[0] for r in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'agent-factory'"
                " AND backend_type = 'client backend'")}
        assert mine - ours, "no internal connection found to compare with"


def test_a_configure_that_fails_is_a_configuration_error_not_an_outage(
        make_db: MakeDb, healthy_fleet: Fleet) -> None:
    calls = []

    def broken(conn: psycopg.Connection[Any]) -> None:
        calls.append(1)
        conn.execute("SELECT * FROM no_such_table_for_configure")

    db = make_db(configure=broken)
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as info:
        db.execute_query("SELECT 1")
    # Not the 30 s checkout wait of the module's FAST: the error is known at once.
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "configure" in message and "'supabase'" in message
    assert "no_such_table_for_configure" in message
    assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
    with pytest.raises(ConfigurationError), db.connection():
        pass
    stats = db.get_provider_stats()
    assert stats["supabase"]["healthy"] is True  # not marked down: the server answered
    assert "no_such_table_for_configure" in (stats["supabase"]["configure_error"] or "")
    assert db.serving_provider != "railway"  # nothing moved to a backup
    assert healthy_fleet.urls()["supabase"].split("@")[0] not in message  # no credentials


def test_a_configure_that_fails_once_is_retried_by_the_pool(make_db: MakeDb) -> None:
    calls = []

    def flaky(conn: psycopg.Connection[Any]) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first connection refused by the application")

    db = make_db(configure=flaky, pool_min_size=1)

    def works() -> bool:
        try:
            return bool(db.execute_query("SELECT 1", fetch_mode="one") == (1,))
        except ConfigurationError:
            return False
    wait_until(works, timeout=30, message="a later connection passing configure")
    assert db.get_provider_stats()["supabase"]["configure_error"] is None


def test_bad_configure_and_row_factory_are_refused_by_name() -> None:
    url = "postgresql://app:pw@127.0.0.1:1/x"
    with pytest.raises(ConfigurationError, match="configure must be a function"):
        Settings.build({"a": url}, configure="SET search_path TO app")
    with pytest.raises(ConfigurationError, match=r"providers\['a'\]\['configure'\]"):
        Settings.build({"a": {"url": url, "configure": 3}})
    with pytest.raises(ConfigurationError, match="row_factory must be a psycopg row factory"):
        Settings.build({"a": url}, row_factory="dict")

    async def coroutine(conn: Any) -> None:
        await conn.execute("SELECT 1")
    with pytest.raises(ConfigurationError, match="coroutine function"):
        DatabaseManager({"a": url}, configure=coroutine)


def test_row_factory_for_the_caller_tuples_for_the_library(
        make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db(row_factory=dict_row)
    assert db.execute_query("SELECT 1 AS one") == [{"one": 1}]
    assert db.execute_query("SELECT 1 AS one", fetch_mode="one") == {"one": 1}
    assert db.execute_query("SELECT 1 AS one", row_factory=tuple_row) == [(1,)]
    assert db.read("SELECT 2 AS two", row_factory=namedtuple_row)[0].two == 2
    with db.transaction() as conn:
        assert conn.execute("SELECT 3 AS three").fetchone() == {"three": 3}
        conn.row_factory = tuple_row  # the block's own business: not kept by the pool
    with db.connection() as conn:
        assert conn.execute("SELECT 4 AS four").fetchone() == {"four": 4}
        conn.row_factory = namedtuple_row
    for _ in range(3):
        assert db.execute_query("SELECT 5 AS five") == [{"five": 5}]
    with pytest.raises(TypeError, match="row_factory must be a psycopg row factory"):
        db.execute_query("SELECT 1", row_factory="dict")


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "conn") as made:
        yield made


def test_memory_storage_works_whatever_row_factory_the_user_sets(
        healthy_fleet: Fleet, urls: dict[str, str]) -> None:
    with DatabaseManager(urls, order=ORDER, row_factory=dict_row, **FAST) as db:
        storage = PostgresMemoryStorage(db)
        user = f"user-{uuid.uuid4().hex[:8]}"
        session = Session(user_id=user, storage=storage)
        session.add_user_message("hello")
        session.save()
        loaded = storage.load_session(session.session_id)
        assert loaded is not None
        assert [m.content for m in loaded.history.get_messages()] == ["hello"]
        assert session.session_id in storage.list_sessions(user)


def test_connection_fails_over_at_checkout_and_shows_the_raw_pool_stats(
        make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    with db.connection() as conn:
        assert conn.autocommit
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]  # type: ignore[index]
        assert provider_of(healthy_fleet, port) == "supabase"
    pool = db.get_provider_stats()["supabase"]["pool"]
    # psycopg_pool's own names, unrenamed.
    assert {"pool_min", "pool_max", "pool_size", "pool_available", "requests_num"} <= set(pool)
    assert pool["requests_num"] >= 1

    healthy_fleet["supabase"].server.kill()
    # Known dead: the prober saw it (until then a pooled connection behind the fault
    # proxy may still look alive, and a statement sent on it has an unknown outcome).
    wait_until(lambda: not db.get_provider_stats()["supabase"]["healthy"], timeout=30,
               message="the primary marked down")
    with db.connection() as conn:  # the dead primary at checkout: the next provider
        port = conn.execute("SELECT inet_server_port()").fetchone()[0]  # type: ignore[index]
        assert provider_of(healthy_fleet, port) == "railway"
    assert db.serving_provider == "railway"


def test_async_configure_row_factory_and_connection(healthy_fleet: Fleet) -> None:
    seen: list[int] = []

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT set_config('app.tag', 'async', false)")
        seen.append(conn.info.backend_pid)

    async def main() -> None:
        async with AsyncDatabaseManager(healthy_fleet.urls(), order=ORDER, configure=configure,
                                        row_factory=dict_row, **FAST) as db:
            row = await db.execute_query("SELECT current_setting('app.tag', true) AS tag",
                                         fetch_mode="one")
            assert row == {"tag": "async"}
            assert await db.execute_query("SELECT 1", row_factory=tuple_row) == [(1,)]
            async with db.connection() as conn:
                assert conn.autocommit
                cur = await conn.execute("SELECT current_setting('app.tag', true) AS tag")
                assert await cur.fetchone() == {"tag": "async"}
                assert conn.info.backend_pid in seen
            healthy_fleet["supabase"].server.kill()
            async with db.connection() as conn:
                cur = await conn.execute("SELECT current_setting('app.tag', true) AS tag, "
                                         "inet_server_port() AS port")
                got = await cur.fetchone()
                assert got is not None and got["tag"] == "async"
                assert provider_of(healthy_fleet, got["port"]) == "railway"
            assert "pool_size" in db.get_provider_stats()["railway"]["pool"]

    asyncio.run(main())

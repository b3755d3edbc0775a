"""transaction(): a busy pool and a read-only refusal are not outages (sync and async).

A write never moves to a backup because the primary's pool is busy: that would
fork the data while the primary takes other writes. It fails after
checkout_timeout (nothing sent, safe to retry); reads may move on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import MakeDb
from defaults import ORDER
from fleet import read_only_server, wait_until
from observers import provider_of
from psycopg import errors as pge

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.errors import ProviderUnavailableError
from agent_factory.testing.fleet import Fleet

# Not the shared FAST: no checkout_timeout, so the library's 5 s default is kept
# (BUSY shortens it further where a full pool is the point of the test).
FAST = {"hang_timeout": 1.0, "probe_interval": 0.1}
BUSY = {"pool_min_size": 1, "pool_max_size": 1, "checkout_timeout": 0.5}


def assert_primary_untouched(stats: dict[str, dict[str, Any]]) -> None:
    primary = stats["supabase"]
    assert primary["healthy"] is True, primary
    assert primary["errors"] == 0, primary


def test_busy_pool_at_transaction_checkout_waits_then_fails_without_moving(
    make_db: MakeDb, healthy_fleet: Fleet, table: str
) -> None:
    """The block does not run on a backup; the primary stays up; reads may still move."""
    db = make_db(**BUSY)
    with db.transaction() as held:  # the primary's only pooled connection
        (port,) = held.execute("SELECT inet_server_port()").fetchone() or (0,)
        assert provider_of(healthy_fleet, port) == "supabase"
        with pytest.raises(ProviderUnavailableError, match="does not move to a backup"), \
                db.transaction() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        with pytest.raises(ProviderUnavailableError, match="does not move to a backup"):
            db.execute_query(f"INSERT INTO {table} VALUES (2)", fetch_mode="none")
        (port,) = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
        assert provider_of(healthy_fleet, port) == "railway"  # a read moves on
    assert_primary_untouched(db.get_provider_stats())
    for name in ("railway", "neon"):
        assert db.providers[name].execute_query(f"SELECT count(*) FROM {table}") == [(0,)]
    with db.transaction() as conn:  # on the primary at once
        (port,) = conn.execute("SELECT inet_server_port()").fetchone() or (0,)
    assert provider_of(healthy_fleet, port) == "supabase"


def test_busy_pool_at_async_transaction_checkout_waits_then_fails_without_moving(
    healthy_fleet: Fleet,
) -> None:
    async def main() -> None:
        async with AsyncDatabaseManager(healthy_fleet.urls(), order=ORDER,
                                        **{**FAST, **BUSY}) as db:
            async with db.transaction() as held:
                cur = await held.execute("SELECT inet_server_port()")
                assert provider_of(healthy_fleet, (await cur.fetchone() or (0,))[0]) == "supabase"
                with pytest.raises(ProviderUnavailableError, match="does not move"):
                    async with db.transaction():
                        pass
            assert_primary_untouched(db.get_provider_stats())

    asyncio.run(main())


def test_read_only_refusal_inside_a_transaction_is_the_callers_error(
    make_db: MakeDb, table: str
) -> None:
    """SQLSTATE 25006 is an answer, not a lost connection: the SQL error itself, nothing down."""
    db = make_db()
    with pytest.raises(pge.ReadOnlySqlTransaction) as info, db.transaction() as conn:
        conn.execute("SET TRANSACTION READ ONLY")  # the caller's own choice
        conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert info.value.provider == "supabase"  # type: ignore[attr-defined]
    assert_primary_untouched(db.get_provider_stats())
    # The server itself is writable: writes stay on it.
    db.execute_query(f"INSERT INTO {table} VALUES (2)", fetch_mode="none")
    assert db.serving_provider == "supabase"
    assert db.get_provider_stats()["supabase"]["writable"] is True


def test_read_only_refusal_inside_an_async_transaction_is_the_callers_error(
    healthy_fleet: Fleet, table: str
) -> None:
    async def main() -> None:
        async with AsyncDatabaseManager(healthy_fleet.urls(), order=ORDER, **FAST) as db:
            with pytest.raises(pge.ReadOnlySqlTransaction) as info:
                async with db.transaction() as conn:
                    await conn.execute("SET TRANSACTION READ ONLY")
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
            assert info.value.provider == "supabase"  # type: ignore[attr-defined]
            assert_primary_untouched(db.get_provider_stats())

    asyncio.run(main())


def test_read_only_server_inside_a_transaction_is_marked_not_writable_not_down(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    """A demoted primary: the caller gets 25006; the probe it triggers marks it read-only."""
    db = make_db(monitor_interval=60.0)  # only the refusal can trigger the probe in time
    wait_until(lambda: db.get_provider_stats()["supabase"]["checked"], timeout=10,
               message="the first probe")
    with read_only_server(healthy_fleet["supabase"]):
        with pytest.raises(pge.ReadOnlySqlTransaction) as info, db.transaction() as conn:
            conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert info.value.provider == "supabase"  # type: ignore[attr-defined]
        wait_until(lambda: db.get_provider_stats()["supabase"]["writable"] is False, timeout=10,
                   message="the primary marked read-only")
        assert_primary_untouched(db.get_provider_stats())
        with db.transaction() as conn:  # the next block goes where writes are taken
            (port,) = conn.execute("SELECT inet_server_port()").fetchone() or (0,)
        assert provider_of(healthy_fleet, port) == "railway"

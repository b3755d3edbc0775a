"""AsyncDatabaseManager: the same failover semantics on asyncio, against real servers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from defaults import FAST, ORDER
from fleet import local_port, wait_until
from observers import count_rows, served_by_async
from psycopg import errors as pge

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.errors import (
    AllProvidersUnavailableError,
    ManagerClosedError,
    OutcomeUnknownError,
)
from agent_factory.testing.fleet import Fleet


def manager(fleet: Fleet, **options: Any) -> AsyncDatabaseManager:
    return AsyncDatabaseManager(fleet.urls(), order=ORDER, **{**FAST, **options})


def test_queries_and_sql_errors(healthy_fleet: Fleet) -> None:
    async def main() -> None:
        async with manager(healthy_fleet) as db:
            assert await served_by_async(db, healthy_fleet) == "supabase"
            assert await db.execute_query("SELECT 1, 'a'") == [(1, "a")]
            assert await db.execute_query("SELECT %s::int", (3,), fetch_mode="one") == (3,)
            assert await db.execute_query("SELECT 1", fetch_mode="none") is None
            with pytest.raises(pge.SyntaxError) as info:
                await db.execute_query("SELEC 1")
            assert info.value.provider == "supabase"  # type: ignore[attr-defined]
            with pytest.raises(ValueError, match="fetch_mode"):
                await db.execute_query("SELECT 1", fetch_mode="x")  # type: ignore[arg-type]
            stats = db.get_provider_stats()
            assert stats["supabase"]["role"] == "primary"
            assert healthy_fleet["supabase"].server.password not in repr(stats)
        assert db.closed
        with pytest.raises(ManagerClosedError):
            await db.execute_query("SELECT 1")

    asyncio.run(main())


def test_crash_hang_and_return_to_primary(healthy_fleet: Fleet) -> None:
    async def main() -> None:
        async with manager(healthy_fleet) as db:
            assert await served_by_async(db, healthy_fleet) == "supabase"
            healthy_fleet["supabase"].server.kill()
            assert await served_by_async(db, healthy_fleet) == "railway"
            healthy_fleet["supabase"].server.restart()
            deadline = time.monotonic() + 20
            while await served_by_async(db, healthy_fleet) != "supabase":
                assert time.monotonic() < deadline, "no return to the primary"
                await asyncio.sleep(0.05)
            healthy_fleet["supabase"].server.hang()
            t0 = time.monotonic()
            assert await served_by_async(db, healthy_fleet) == "railway"
            assert time.monotonic() - t0 < 1.0 + 3.0

    asyncio.run(main())


def test_lost_write_is_outcome_unknown_idempotent_is_retried(
    healthy_fleet: Fleet, table: str
) -> None:
    async def main() -> None:
        async with manager(healthy_fleet) as db:
            await db.execute_query(f"SELECT count(*) FROM {table}")
            healthy_fleet["supabase"].server.hang()
            with pytest.raises(OutcomeUnknownError):
                await db.execute_query(f"INSERT INTO {table} VALUES (1)", fetch_mode="none")
            assert count_rows(healthy_fleet, "railway", table) == 0
            await db.execute_query(
                f"INSERT INTO {table} VALUES (2) ON CONFLICT DO NOTHING",
                fetch_mode="none", idempotent=True,
            )
            assert count_rows(healthy_fleet, "railway", table) == 1

    asyncio.run(main())


def test_silenced_connection_on_a_live_server_is_abandoned(healthy_fleet: Fleet) -> None:
    """A pooled connection whose bytes are dropped while the server and probes are fine."""
    async def main() -> None:
        async with manager(healthy_fleet, pool_min_size=1, pool_max_size=1) as db:
            assert await db.health_check_all(max_age=0) == dict.fromkeys(ORDER, True)
            async with db.transaction() as conn:  # the one pooled connection
                port = local_port(conn)
            healthy_fleet["supabase"].proxy.blackhole_client(port)
            t0 = time.monotonic()
            served = await asyncio.wait_for(served_by_async(db, healthy_fleet), timeout=15)
            assert served == "railway"
            assert time.monotonic() - t0 < 1.0 + 3.0

    asyncio.run(main())


def test_all_down(healthy_fleet: Fleet) -> None:
    async def main() -> None:
        async with manager(healthy_fleet) as db:
            for member in healthy_fleet:
                member.server.kill()
            with pytest.raises(AllProvidersUnavailableError) as info:
                await db.execute_query("SELECT 1")
            assert set(info.value.reasons) == set(ORDER)

    asyncio.run(main())


def test_cancellation_is_safe(healthy_fleet: Fleet) -> None:
    async def main() -> None:
        async with manager(healthy_fleet, pool_max_size=2) as db:
            task = asyncio.create_task(db.execute_query("SELECT pg_sleep(30)"))
            wait = time.monotonic() + 10
            while db.providers["supabase"].health.in_flight == 0:
                assert time.monotonic() < wait
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert db.providers["supabase"].health.in_flight == 0
            # The pool still serves, and nothing was retried elsewhere.
            for _ in range(5):
                assert await served_by_async(db, healthy_fleet) == "supabase"
            assert db.get_provider_stats()["supabase"]["healthy"] is True

    asyncio.run(main())

    def sleeping() -> int:
        with psycopg.connect(healthy_fleet["supabase"].direct_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
                " AND state = 'active'"
            ).fetchone()
        return int(row[0]) if row else 0

    wait_until(lambda: sleeping() == 0, timeout=15, message="the cancelled query to stop")


def test_transaction(healthy_fleet: Fleet, table: str) -> None:
    async def main() -> None:
        async with manager(healthy_fleet) as db:
            async with db.transaction() as conn:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
                await conn.execute(f"INSERT INTO {table} VALUES (2)")
            with pytest.raises(pge.UniqueViolation):
                async with db.transaction() as conn:
                    await conn.execute(f"INSERT INTO {table} VALUES (3)")
                    await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert count_rows(healthy_fleet, "supabase", table) == 2

    asyncio.run(main())

"""Chaos tests for AsyncDatabaseManager: a mixed load of tasks while the primary flaps.

The same assertions as tests/core/test_chaos.py (bounded latency, no write applied
twice, only documented errors, recovery), with the load made of asyncio tasks
on one event loop (`AsyncLoad`, in the harness tests/chaos.py).
"""

from __future__ import annotations

import asyncio

from chaos import (
    AsyncLoad,
    Op,
    StillBroken,
    assert_bounded,
    assert_no_write_twice,
    assert_only,
    inject,
    manager,
    poll,
    summary,
    undo,
)
from observers import Reconciled, provider_of, served_by_async

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.testing.fleet import Fleet


def test_async_flapping_primary_bounded_no_double_write_and_recovery(
    healthy_fleet: Fleet, table: str
) -> None:
    """Six tasks on one loop while the primary resets, hangs and refuses, twice each."""
    fleet = healthy_fleet

    async def main() -> list[Op]:
        async with manager(fleet, pool_max_size=6) as db:
            assert await served_by_async(db, fleet) == "supabase"
            load = AsyncLoad(db, fleet, table)
            load.start()
            try:
                await poll(lambda: len(load.ops) > 40, 20, "warm-up load")
                for fault in ("reset", "hang", "refuse") * 2:
                    await asyncio.to_thread(inject, fleet, fault)
                    await asyncio.sleep(0.4)  # pacing the faults
                    await asyncio.to_thread(undo, fleet, fault)
                    await asyncio.sleep(0.25)
                await poll(load.settled_on_primary, 20,
                           "traffic settled back on the primary after the flapping")
            finally:
                await load.stop()
            return load.ops

    ops = asyncio.run(main())
    assert_bounded(ops)
    assert_only(ops, reads={"ok"}, writes={"ok", "unknown"})
    outcomes = assert_no_write_twice(fleet, table, ops)
    assert outcomes["ok"] > 0
    assert any(o.provider != "supabase" or o.outcome != "ok" for o in ops), summary(ops)


def test_async_write_cancelled_during_failback_pause_does_not_block_later_failbacks(
    healthy_fleet: Fleet, table: str
) -> None:
    fleet = healthy_fleet
    proxy = fleet["supabase"].proxy

    async def outage_with_a_write(db: AsyncDatabaseManager, row: int) -> None:
        await asyncio.to_thread(proxy.set_mode, "refuse")
        (port,) = await db.execute_query(
            f"INSERT INTO {table} (id, note) VALUES (%s, 'outage') RETURNING inet_server_port()",
            (row,), fetch_mode="one")
        assert provider_of(fleet, port) == "railway"

    async def main() -> None:
        reconciled = Reconciled()
        async with manager(fleet, listeners=[reconciled]) as db:
            db.register_table(table)
            assert await served_by_async(db, fleet) == "supabase"
            await outage_with_a_write(db, 1)
            # A transaction open on the backup holds the failback between its passes:
            # writes are paused while it stays open.
            async with db.transaction() as tx:
                await tx.execute("SELECT 1")
                await asyncio.to_thread(proxy.set_mode, "pass")
                await poll(lambda: reconciled.events, 15, "failback pass 1")
                paused_write = asyncio.create_task(db.execute_query(
                    f"INSERT INTO {table} (id, note) VALUES (2, 'paused')", fetch_mode="none"))
                await asyncio.sleep(0.2)  # let it reach the pause
                assert not paused_write.done()
                paused_write.cancel()
            await poll(lambda: db.get_provider_stats()["supabase"]["healthy"], 15,
                       "the first failback to finish")
            assert await served_by_async(db, fleet) == "supabase"
            # A second outage, with a write on the backup: failback must work again.
            await outage_with_a_write(db, 3)
            await asyncio.to_thread(proxy.set_mode, "pass")
            try:
                await poll(lambda: db.get_provider_stats()["supabase"]["healthy"], 5,
                           "the primary back after the second outage")
            except AssertionError as exc:
                writers = db._core._writers  # internal: the count the cancelled task leaked
                for _ in range(writers):
                    db._core.exit_write()  # cleanup, so that closing does not wait on the pause
                raise StillBroken(f"{exc} (writes counted in flight: {writers})") from exc

    try:
        asyncio.run(main())
    finally:
        proxy.set_mode("pass")

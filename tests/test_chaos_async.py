"""Chaos tests for AsyncDatabaseManager: a mixed load of tasks while the primary flaps.

The same assertions as tests/test_chaos.py (bounded latency, no write applied
twice, only documented errors, recovery), with the load made of asyncio tasks
on one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

from fleet import Fleet
from test_chaos import (
    CALL_BOUND,
    FAST,
    ORDER,
    Op,
    Reconciled,
    StillBroken,
    assert_bounded,
    assert_no_write_twice,
    assert_only,
    inject,
    provider_of,
    summary,
    undo,
)

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.errors import AllProvidersUnavailableError, OutcomeUnknownError


def manager(fleet: Fleet, **options: Any) -> AsyncDatabaseManager:
    return AsyncDatabaseManager(fleet.urls(), order=ORDER, **{**FAST, **options})


async def served_by(db: AsyncDatabaseManager, fleet: Fleet) -> str:
    (port,) = await db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    return provider_of(fleet, port)


async def poll(predicate: Callable[[], object], timeout: float, message: str) -> None:
    """`fleet.wait_until` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        await asyncio.sleep(0.02)


class AsyncLoad:
    """Tasks alternating reads and unique-id writes (``INSERT ... RETURNING`` the server)."""

    def __init__(self, db: AsyncDatabaseManager, fleet: Fleet, table: str,
                 workers: int = 6, pace: float = 0.01) -> None:
        self.db, self.fleet, self.table = db, fleet, table
        self.workers, self.pace = workers, pace
        self.ops: list[Op] = []
        self._ids = itertools.count(1)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=CALL_BOUND + 10)
        assert not pending, f"{len(pending)} tasks still blocked in a call"
        for task in self._tasks:
            task.result()  # a bug in the load itself surfaces here

    def settled_on_primary(self, n: int = 20) -> bool:
        tail = self.ops[-n:]
        return len(tail) == n and all(
            o.outcome == "ok" and o.provider == "supabase" for o in tail)

    async def _work(self, worker: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            if (n + worker) % 2:
                await self._write()
            else:
                await self._read()
            await asyncio.sleep(self.pace)

    async def _read(self) -> None:
        t0 = time.monotonic()
        try:
            (port,) = await self.db.execute_query("SELECT inet_server_port()", fetch_mode="one")
        except AllProvidersUnavailableError as exc:
            self.ops.append(Op("read", None, "all_down", time.monotonic() - t0, None, t0, exc))
        except Exception as exc:  # noqa: BLE001 - any other error fails the test
            self.ops.append(Op("read", None, "error", time.monotonic() - t0, None, t0, exc))
        else:
            self.ops.append(Op("read", None, "ok", time.monotonic() - t0,
                               provider_of(self.fleet, port), t0))

    async def _write(self) -> None:
        wid = next(self._ids)
        t0 = time.monotonic()
        try:
            (port,) = await self.db.execute_query(
                f"INSERT INTO {self.table} (id, note) VALUES (%s, %s) "
                "RETURNING inet_server_port()",
                (wid, f"w{wid}"),
                fetch_mode="one",
            )
        except OutcomeUnknownError as exc:
            self.ops.append(Op("write", wid, "unknown", time.monotonic() - t0, exc.provider, t0,
                               exc))
        except AllProvidersUnavailableError as exc:
            self.ops.append(Op("write", wid, "all_down", time.monotonic() - t0, None, t0, exc))
        except Exception as exc:  # noqa: BLE001 - any other error fails the test
            self.ops.append(Op("write", wid, "error", time.monotonic() - t0, None, t0, exc))
        else:
            self.ops.append(Op("write", wid, "ok", time.monotonic() - t0,
                               provider_of(self.fleet, port), t0))


def test_async_flapping_primary_bounded_no_double_write_and_recovery(
    healthy_fleet: Fleet, table: str
) -> None:
    """Six tasks on one loop while the primary resets, hangs and refuses, twice each."""
    fleet = healthy_fleet

    async def main() -> list[Op]:
        async with manager(fleet, pool_max_size=6) as db:
            assert await served_by(db, fleet) == "supabase"
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
            assert await served_by(db, fleet) == "supabase"
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
            assert await served_by(db, fleet) == "supabase"
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

"""Hedged reads against real faults: a hung or blackholed primary, a slow one, stale backups.

A hedge that answers is evidence, not proof: the tests check that the read was
answered by a backup while the primary was still up (its breaker closed), that
is by the hedge and not by a failover. ``hang_timeout`` is long here so that
the watchdog's own verdict comes well after the hedge; the timing goals are
the benchmark's (bench/hedging.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import psycopg
import pytest
from databases import replicated  # noqa: F401 - a fixture
from defaults import ORDER
from fleet import wait_until

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.fleet import Fleet

PORT = "SELECT inet_server_port()"
#: The watchdog's verdict comes long after any hedge (and a probe every 0.1 s once down).
SLOW_VERDICT = {"hang_timeout": 8.0, "probe_interval": 0.1, "checkout_timeout": 30.0}


@pytest.fixture
def fleet_ports(healthy_fleet: Fleet) -> dict[int, str]:
    return {m.server.port: m.name for m in healthy_fleet}


@pytest.fixture
def hedged(healthy_fleet: Fleet) -> Iterator[DatabaseManager]:
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, hedged_reads="on",
                         **SLOW_VERDICT) as db:
        yield db


def served_by(db: DatabaseManager, ports: dict[int, str]) -> str | None:
    row = db.execute_query(PORT, fetch_mode="one")
    return ports.get(int(row[0])) if ports else None


def warm(db: DatabaseManager, ports: dict[int, str]) -> None:
    """Until the primary's pool is open: a read that waited for it went to the hedge."""
    wait_until(lambda: all(served_by(db, ports) == "supabase" for _ in range(20)),
               timeout=30, message="reads served by the primary")


@pytest.mark.parametrize("fault", ["hang", "blackhole"])
def test_a_read_on_a_silent_primary_is_answered_by_the_hedge_before_any_verdict(
    healthy_fleet: Fleet, hedged: DatabaseManager, fleet_ports: dict[int, str], fault: str
) -> None:
    warm(hedged, fleet_ports)
    primary = healthy_fleet["supabase"]
    if fault == "hang":
        primary.server.hang()
    else:
        primary.proxy.set_mode("blackhole")
    try:
        assert served_by(hedged, fleet_ports) == "railway"
        # Answered while the primary still counts as up: the hedge, not a failover.
        assert hedged.get_provider_stats()["supabase"]["healthy"]
        assert hedged.serving_provider == "supabase"
        assert hedged.get_hedge_stats()["hedges_won"] >= 1
        # The watchdog still decides: the silent primary is marked down in the end.
        wait_until(lambda: not hedged.get_provider_stats()["supabase"]["healthy"],
                   timeout=30, message="the watchdog's verdict on the silent primary")
    finally:
        primary.release_faults()


def test_a_slow_primary_is_hedged_within_the_budget_and_never_failed_over(
    healthy_fleet: Fleet, fleet_ports: dict[int, str]
) -> None:
    primary = healthy_fleet["supabase"]
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, hedged_reads="on",
                         hang_timeout=2.0, probe_interval=0.1) as db:
        warm(db, fleet_ports)
        primary.proxy.set_latency(0.1)  # +200 ms per round trip
        reads, threads = 120, 8
        seen: list[str | None] = []

        def reader() -> None:
            for _ in range(reads // threads):
                seen.append(served_by(db, fleet_ports))

        workers = [threading.Thread(target=reader) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        primary.proxy.set_latency(0.0)
        stats = db.get_hedge_stats()
        budget = db.settings.hedge_budget
        assert len(seen) == reads
        assert 1 <= stats["hedges_sent"] <= 10 + budget * (reads + 20) + 1, stats
        assert seen.count("railway") == stats["hedges_won"]
        assert stats["hedges_refused_by_budget"] > 0  # every read was slower than hedge_after
        primary_stats = db.get_provider_stats()["supabase"]
        assert primary_stats["healthy"] and primary_stats["errors"] == 0
        assert db.serving_provider == "supabase"
        # The losers were cancelled on a live server: their connections were kept.
        wait_until(lambda: db.get_provider_stats()["supabase"]["in_flight"] == 0, timeout=10)
        pool = db.get_provider_stats()["supabase"]["pool"]
        assert pool.get("returns_bad", 0) == 0 and pool.get("connections_lost", 0) == 0, pool


def test_without_replication_auto_never_hedges(
    healthy_fleet: Fleet, fleet_ports: dict[int, str]
) -> None:
    """The default ("auto") hedges only to backups whose lag is measured: here none is."""
    primary = healthy_fleet["supabase"]
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, hang_timeout=1.0,
                         probe_interval=0.1) as db:
        warm(db, fleet_ports)
        primary.server.hang()
        try:
            assert served_by(db, fleet_ports) == "railway"  # by failover, after the verdict
            assert not db.get_provider_stats()["supabase"]["healthy"]
            assert db.get_hedge_stats()["hedges_sent"] == 0
        finally:
            primary.release_faults()


def test_writes_transactions_and_reads_after_a_write_are_not_hedged(
    hedged: DatabaseManager
) -> None:
    core = hedged._core
    read = core.route("SELECT 1")
    assert core.hedge_at(read) is not None
    assert core.hedge_target(read) is hedged.providers["railway"]  # "on": the next one
    assert core.hedge_at(core.route("CREATE TEMP TABLE t (x int)")) is None
    assert core.hedge_at(core.route("SELECT 1", read_only=True, idempotent=False)) is None
    with hedged.transaction() as conn:
        conn.execute("SELECT 1")
    # Inside the read-your-writes window that follows a write or a transaction.
    assert core.hedge_at(core.route("SELECT 1")) is None


def test_a_healthy_read_never_decides_where_its_hedge_would_go(
    hedged: DatabaseManager, fleet_ports: dict[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hedge is decided only once a read has been silent for hedge_after."""
    warm(hedged, fleet_ports)
    core = hedged._core
    asked: list[object] = []
    decide = core.hedge_target
    monkeypatch.setattr(core, "hedge_target", lambda route: asked.append(route) or decide(route))
    for _ in range(50):
        assert served_by(hedged, fleet_ports) == "supabase"
    assert asked == [] and hedged.get_hedge_stats()["hedges_sent"] == 0


def test_a_due_hedge_with_nowhere_to_go_leaves_the_read_to_the_watchdog(
    healthy_fleet: Fleet, fleet_ports: dict[int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No backup fresh enough once the hedge is due: the read waits on, as without
    hedging, until the watchdog's verdict moves it."""
    primary = healthy_fleet["supabase"]
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, hedged_reads="on",
                         hang_timeout=1.0, probe_interval=0.1) as db:
        warm(db, fleet_ports)
        asked: list[object] = []
        monkeypatch.setattr(db._core, "hedge_target", lambda route: asked.append(route))
        primary.server.hang()
        try:
            assert served_by(db, fleet_ports) == "railway"  # by failover, after the verdict
            assert asked and not db.get_provider_stats()["supabase"]["healthy"]
            assert db.get_hedge_stats() == {"hedges_sent": 0, "hedges_won": 0,
                                            "hedges_refused_by_budget": 0}
        finally:
            primary.release_faults()


def test_async_a_read_on_a_hung_primary_is_answered_by_the_hedge(
    healthy_fleet: Fleet, fleet_ports: dict[int, str]
) -> None:
    primary = healthy_fleet["supabase"]

    async def main() -> None:
        async with AsyncDatabaseManager(healthy_fleet.urls(), order=ORDER, hedged_reads="on",
                                        **SLOW_VERDICT) as db:
            served = 0
            while served < 20:  # until the primary's pool is open (see warm)
                row = await db.execute_query(PORT, fetch_mode="one")
                served = served + 1 if fleet_ports[row[0]] == "supabase" else 0
            primary.server.hang()
            row = await db.execute_query(PORT, fetch_mode="one")
            assert fleet_ports[row[0]] == "railway"
            assert db.get_provider_stats()["supabase"]["healthy"]
            assert db.get_hedge_stats()["hedges_won"] >= 1
            # The losing call's task settles in the background until the verdict.
            deadline = asyncio.get_running_loop().time() + 30
            while db.get_provider_stats()["supabase"]["healthy"]:
                assert asyncio.get_running_loop().time() < deadline, "no verdict"
                await asyncio.sleep(0.05)

    try:
        asyncio.run(main())
    finally:
        primary.release_faults()


# -- a stale backup, with real replication ------------------------------------------------

INSERT = (
    "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, content) "
    "VALUES (gen_random_uuid(), 'hedge', 'writer', 'log', gen_random_uuid()::text, '{}'::jsonb)"
)


def test_a_hedge_never_goes_to_a_backup_behind_the_lag_bound(
    healthy_fleet: Fleet, replicated: dict[str, str], fleet_ports: dict[int, str]
) -> None:
    """railway's apply is held up by a lock: its measured lag grows past hedge_max_lag,
    so the hedge goes to neon, which keeps up (hedged_reads="auto", the default)."""
    primary = healthy_fleet["supabase"]
    with DatabaseManager(replicated, order=ORDER, monitor_interval=0.2, hedge_max_lag=1.0,
                         **SLOW_VERDICT) as db, \
            psycopg.connect(replicated["supabase"], autocommit=True) as writer, \
            psycopg.connect(replicated["railway"], autocommit=True) as blocker:
        warm(db, fleet_ports)
        core = db._core
        wait_until(lambda: core.lag_seconds("railway") is not None
                   and core.lag_seconds("neon") is not None,
                   timeout=30, message="replication lag measured")
        with blocker.transaction():
            blocker.execute("LOCK TABLE session_memories IN ACCESS EXCLUSIVE MODE")

            def railway_behind() -> bool:
                writer.execute(INSERT)
                lag = core.lag_seconds("railway")
                return lag is not None and lag > 1.5

            wait_until(railway_behind, timeout=60, message="railway behind the bound")
            writer.execute(INSERT)
            assert (core.lag_seconds("neon") or 0.0) < 1.0  # neon keeps up
            primary.server.hang()
            try:
                assert served_by(db, fleet_ports) == "neon"
                assert db.get_provider_stats()["supabase"]["healthy"]  # the hedge answered
            finally:
                primary.release_faults()

"""The prober survives its own errors: a failing failback gate or pool renewal is retried.

The invariant the continuity work must keep: nothing the prober runs on the
way back (the failback gate, the pool renewal) can end the prober thread or
leave writes paused; a failure is logged, counted (``prober_errors``) and
retried at the next probe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from conftest import MakeDb
from fleet import wait_until

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.fleet import Fleet

# Not the shared FAST: probes every 50 ms and recovery after 2 good ones, so
# that the prober reaches the failback gate and the pool renewal quickly (and
# retries them at the next probe) within these tests' waits.
FAST = {"hang_timeout": 1.0, "probe_interval": 0.05, "recovery_probes": 2}


def take_primary_down(db: DatabaseManager, fleet: Fleet) -> None:
    fleet["supabase"].proxy.set_mode("refuse")
    db.execute_query("SELECT 1")  # fails over; the primary is marked down
    assert db.get_provider_stats()["supabase"]["healthy"] is False
    fleet["supabase"].proxy.set_mode("pass")


def failing_once(real: Callable[..., object] | None, failures: list[int],
                 before: Callable[[], object] = lambda: None) -> Callable[..., object]:
    def hook(*args: object) -> object:
        before()
        if not failures:
            failures.append(1)
            raise RuntimeError("injected failure")
        return True if real is None else real(*args)
    return hook


def test_a_failing_failback_gate_never_leaves_writes_paused_or_kills_the_prober(
    make_db: MakeDb, healthy_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(failback_reconcile=True)
    health = db.providers["supabase"].health
    core = db._core
    failures: list[int] = []
    # The gate pauses writes (as the failback's switch does), then fails.
    health.gate_recovery = failing_once(
        health.gate_recovery, failures, before=lambda: core.pause_writes(1.0))
    take_primary_down(db, healthy_fleet)
    wait_until(lambda: failures, timeout=20, message="the gate to fail once")
    wait_until(lambda: db.get_provider_stats()["supabase"]["healthy"], timeout=20,
               message="the primary back after the gate's failure")
    stats = db.get_provider_stats()["supabase"]
    assert stats["prober_errors"] == 1
    assert not core._paused  # writes flow
    assert health._prober is not None and health._prober.is_alive()
    db.execute_query("SELECT 1")
    assert db.serving_provider == "supabase"
    assert any(r.levelname == "ERROR" and "failback" in r.getMessage() and r.exc_info
               for r in caplog.records)


def test_a_failing_pool_renewal_is_retried_at_the_next_probe(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    db = make_db()
    health = db.providers["supabase"].health
    failures: list[int] = []
    health.before_recovery = failing_once(health.before_recovery, failures)
    take_primary_down(db, healthy_fleet)
    wait_until(lambda: db.get_provider_stats()["supabase"]["healthy"], timeout=20,
               message="the primary back after the renewal's failure")
    assert failures == [1]
    assert db.get_provider_stats()["supabase"]["prober_errors"] == 1
    assert health._prober is not None and health._prober.is_alive()
    assert db.execute_query("SELECT 1") == [(1,)]
    assert db.serving_provider == "supabase"


def hold_the_only_connection(db: DatabaseManager, seconds: float) -> threading.Thread:
    """A transaction that keeps the pool's one connection busy for ``seconds``."""
    entered = threading.Event()

    def hold() -> None:
        with db.transaction() as conn:
            entered.set()
            conn.execute("SELECT pg_sleep(%s)", (seconds,))

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert entered.wait(10), "the holding transaction never started"
    return thread


def test_a_timed_out_connect_to_a_live_provider_is_not_an_outage(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    # A login of several round trips over a 1.2 s link outlasts connect_timeout
    # (2 s) while every query on an open connection answers within hang_timeout
    # (4 s here: a watchdog's probe and its answer take two round trips).
    db = make_db(hang_timeout=4.0, pool_min_size=1, pool_max_size=2, checkout_timeout=30.0,
                 connect_timeout=2.0)
    health = db.providers["supabase"].health
    wait_until(lambda: health._monitor is not None and db.providers["supabase"]._pool
               .get_stats().get("pool_available", 0) >= 1,
               timeout=20, message="the monitor and one pooled connection open")
    healthy_fleet["supabase"].proxy.set_latency(0.6)
    holder = hold_the_only_connection(db, 6.0)
    started = time.monotonic()
    # Needs a second connection: its connect times out, the probe says alive,
    # so the read waits for the held connection instead of failing over.
    port = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    holder.join(30)
    stats = db.get_provider_stats()["supabase"]
    assert stats["healthy"] and stats["errors"] == 0, stats
    assert health.connect_timeouts >= 1, "no connect timed out: the test proves nothing"
    assert port == (healthy_fleet["supabase"].server.port,)
    assert db.serving_provider == "supabase"
    assert time.monotonic() - started < 30


def test_a_timed_out_connect_to_a_silent_provider_is_an_outage(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    # No pooled connection: the read has to open one, into the blackhole.
    db = make_db(hang_timeout=2.0, pool_min_size=0, checkout_timeout=30.0)
    health = db.providers["supabase"].health
    wait_until(lambda: health._monitor is not None, timeout=20,
               message="the monitor connection open")
    healthy_fleet["supabase"].proxy.set_mode("blackhole")
    started = time.monotonic()
    row = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    waited = time.monotonic() - started
    assert row == (healthy_fleet["railway"].server.port,)
    assert not db.get_provider_stats()["supabase"]["healthy"]
    # connect_timeout, then a probe's hang_timeout, and slack for a shared machine
    assert waited < 2.0 + 2.0 + 6.0, waited

"""The prober survives its own errors: a failing failback gate or pool renewal is retried.

The invariant the continuity work must keep: nothing the prober runs on the
way back (the failback gate, the pool renewal) can end the prober thread or
leave writes paused; a failure is logged, counted (``prober_errors``) and
retried at the next probe.
"""

from __future__ import annotations

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

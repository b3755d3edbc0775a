"""The RPO bound after the primary dies, on real servers with logical replication.

A backup's lag counts as its last sample plus what the primary may have
written between that sample and its last sign of life (see Failover.lag).
"""

from __future__ import annotations

import time

import pytest
from fleet import until_accepted, wait_until
from test_failback import FAST
from test_failback_replication import replicated  # noqa: F401  (the fixture)

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import AllProvidersUnavailableError
from agent_factory.testing.fleet import Fleet

# Two providers, not three: a primary and the one backup it replicates to.
ORDER = ["supabase", "railway"]
INSERT = ("INSERT INTO session_memories (session_id, memory_type, content) "
          "VALUES ('rpo', 'log', '{}')")


def test_writes_the_primary_took_after_its_last_probe_count_against_the_bound(
    healthy_fleet: Fleet, replicated: dict[str, str]  # noqa: F811
) -> None:
    """Caught up at the last probe, but the primary wrote 1.5 s more: refused at 1 s."""
    with DatabaseManager(replicated, order=ORDER, monitor_interval=3600.0,
                         max_replication_lag=1.0, **FAST) as db:
        primary = db.providers["supabase"].health
        db.execute_query(INSERT, fetch_mode="none")

        def caught_up() -> bool:
            primary.probe()  # the monitor itself waits an hour: one sample, taken here
            lag = primary.replication.get("railway")
            return lag is not None and lag.seconds < 0.5

        wait_until(caught_up, timeout=30, message="railway caught up at a probe")
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            db.execute_query(INSERT, fetch_mode="none")
        healthy_fleet["supabase"].server.kill()
        with pytest.raises(AllProvidersUnavailableError, match="stale: replication lag"):
            db.execute_query(INSERT, fetch_mode="none")
        stats = db.get_provider_stats()["railway"]
        assert stats["stale"] is True
        assert isinstance(stats["replication_lag_s"], float)
        assert stats["replication_lag_s"] >= 1.5


def test_writes_are_not_refused_for_the_whole_outage(
    healthy_fleet: Fleet, replicated: dict[str, str]  # noqa: F811
) -> None:
    """A backup close enough when the primary died stays writable however long it stays dead."""
    with DatabaseManager(replicated, order=ORDER, monitor_interval=0.2,
                         max_replication_lag=1.0, **FAST) as db:
        db.execute_query(INSERT, fetch_mode="none")
        wait_until(lambda: db.get_provider_stats()["railway"]["stale"] is False, timeout=30,
                   message="railway fresh")
        healthy_fleet["supabase"].server.kill()
        until_accepted(lambda: db.execute_query(INSERT, fetch_mode="none"))
        assert db.serving_provider == "railway"
        time.sleep(2.5)  # longer than max_replication_lag
        db.execute_query(INSERT, fetch_mode="none")
        stats = db.get_provider_stats()["railway"]
        assert stats["stale"] is False and stats["failback_pending_since"] is not None

"""Failback: client-keyed inserts acknowledged on a backup end up on the primary exactly once."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases
from defaults import ORDER
from fleet import wait_until
from observers import Reconciled

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import (
    AllProvidersUnavailableError,
    OutcomeUnknownError,
    SplitBrainRefusedError,
)
from agent_factory.schema import apply_migrations
from agent_factory.testing.fleet import Fleet

# Not the shared FAST: checkout_timeout 10 s, the value these tests (and
# test_rpo_bound, which imports this FAST) were written and run with;
# recovery_probes is the library's default, named because the tests wait for
# the recovery (and the failback) it paces.
FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 10.0,
        "recovery_probes": 2}
INSERT = (
    "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, content) "
    "VALUES (%s, 'chaos', 'writer', 'log', %s, '{}'::jsonb)"
)


@pytest.fixture
def dbs(healthy_fleet: Fleet) -> Iterator[dict[str, str]]:
    urls = create_databases(healthy_fleet, "fb")
    for member in healthy_fleet:
        direct = urls[member.name].replace(str(member.proxy.port), str(member.server.port))
        apply_migrations(direct, embedding_dim=8)
    yield urls
    healthy_fleet.heal()
    drop_databases(healthy_fleet, urls)


class Writer:
    """Appends rows with unique ids at a steady pace; remembers what was acknowledged."""

    def __init__(self, db: DatabaseManager, rate: float = 150.0) -> None:
        self.db = db
        self.interval = 1.0 / rate
        self.acked: list[str] = []
        self.unknown: list[str] = []
        self.refused = 0
        self.fenced: list[float] = []
        self.errors: list[BaseException] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def fenced_for(self) -> float:
        """Seconds from the first to the last write refused by the split-brain fence."""
        return self.fenced[-1] - self.fenced[0] if self.fenced else 0.0

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        next_at = time.monotonic()
        for n in itertools.count():
            if self._stop.is_set():
                return
            row_id = str(uuid.uuid4())
            t0 = time.monotonic()
            try:
                self.db.execute_query(INSERT, (row_id, f"m{n}"), fetch_mode="none")
                self.acked.append(row_id)
            except OutcomeUnknownError:
                self.unknown.append(row_id)
            except SplitBrainRefusedError:
                # The primary's heartbeat still reached the backup: nothing sent.
                self.fenced.append(time.monotonic())
            except AllProvidersUnavailableError:
                self.refused += 1
            except BaseException as exc:  # noqa: BLE001 - asserted empty by the test
                self.errors.append(exc)
            self.slowest = max(self.slowest, time.monotonic() - t0)
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def ids_on(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT id::text FROM session_memories WHERE session_id = 'chaos'").fetchall()]


def outage(fleet: Fleet, fault: str) -> Callable[[], None]:
    server = fleet["supabase"].server
    if fault == "crash":
        server.kill()
        return server.restart
    server.hang()
    return server.resume


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_no_acknowledged_write_lost_across_failover_and_failback(
    healthy_fleet: Fleet, dbs: dict[str, str], fault: str
) -> None:
    recorder = Reconciled()
    with DatabaseManager(dbs, order=ORDER, listeners=[recorder], **FAST) as db, \
            Writer(db) as writer:
        wait_until(lambda: len(writer.acked) > 100, timeout=30, message="writes on the primary")
        restore = outage(healthy_fleet, fault)
        wait_until(lambda: db.serving_provider == "railway", timeout=30,
                   message="writes failed over")
        mark = len(writer.acked)
        wait_until(lambda: len(writer.acked) > mark + 200, timeout=30,
                   message="writes on the backup")
        restore()
        wait_until(lambda: db.serving_provider == "supabase", timeout=30,
                   message="writes back on the primary")
        mark = len(writer.acked)
        wait_until(lambda: len(writer.acked) > mark + 100, timeout=30,
                   message="writes after failback")
    assert writer.errors == []
    on_primary = ids_on(dbs["supabase"])
    assert len(on_primary) == len(set(on_primary))  # exactly once
    missing = set(writer.acked) - set(on_primary)
    assert not missing, f"{len(missing)} of {len(writer.acked)} acknowledged writes lost"
    # An unknown outcome is applied at most once, wherever it landed.
    everywhere = ids_on(dbs["supabase"]) + ids_on(dbs["railway"]) + ids_on(dbs["neon"])
    for row_id in writer.unknown:
        assert on_primary.count(row_id) <= 1
    assert len(writer.unknown) <= 5
    assert len(everywhere) >= len(writer.acked)
    assert any(source == "railway" and rows > 0 for _, source, rows in recorder.events)
    assert writer.slowest < 1.0 + 10.0


def test_backup_unreachable_at_failback_is_reconciled_later(
    healthy_fleet: Fleet, dbs: dict[str, str]
) -> None:
    with DatabaseManager(dbs, order=ORDER, **FAST) as db:
        healthy_fleet["supabase"].server.kill()
        written = []
        for n in range(20):
            row_id = str(uuid.uuid4())
            # Keyed, so retried safely if the crash's close reaches a pooled
            # connection just after the statement went out on it.
            db.execute_query(INSERT, (row_id, f"late{n}"), fetch_mode="none", idempotent=True)
            written.append(row_id)
        assert db.serving_provider == "railway"
        healthy_fleet["railway"].proxy.set_mode("refuse")
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: db.execute_query("SELECT 1") and db.serving_provider == "supabase",
                   timeout=30, message="primary back")
        stats: dict[str, Any] = db.get_provider_stats()["railway"]
        assert stats["failback_pending_since"] is not None
        healthy_fleet["railway"].proxy.set_mode("pass")
        wait_until(lambda: set(written) <= set(ids_on(dbs["supabase"])), timeout=30,
                   message="late reconciliation of railway's rows")
        wait_until(lambda: db.get_provider_stats()["railway"]["failback_pending_since"] is None,
                   timeout=10, message="railway's pending failback cleared")

"""Failover semantics of DatabaseManager against real servers and real faults."""

from __future__ import annotations

import logging
import re
import threading
import time

import psycopg
import pytest
from conftest import MakeDb
from defaults import FAST, ORDER
from fleet import wait_until
from observers import Recorder, count_rows, served_by
from psycopg import errors as pge

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.events import Listener
from agent_factory.errors import (
    AllProvidersUnavailableError,
    OutcomeUnknownError,
    ProviderUnavailableError,
)
from agent_factory.testing.fleet import Fleet


def test_queries_run_on_the_primary(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    assert served_by(db, healthy_fleet) == "supabase"
    assert db.execute_query("SELECT 1, 'a'") == [(1, "a")]
    assert db.execute_query("SELECT %s::int", (5,), fetch_mode="one") == (5,)
    assert db.execute_query("SELECT 1 WHERE false", fetch_mode="one") is None
    assert db.execute_query("SELECT 1", fetch_mode="none") is None


def test_percent_literal_without_params(make_db: MakeDb) -> None:
    db = make_db()
    assert db.execute_query("SELECT 'message_1' LIKE 'message_%'") == [(True,)]
    assert db.execute_query("SELECT %s LIKE 'message_%%'", ("message_2",)) == [(True,)]


def test_bad_fetch_mode_raises_before_running(make_db: MakeDb, table: str,
                                              healthy_fleet: Fleet) -> None:
    db = make_db()
    with pytest.raises(ValueError, match="fetch_mode"):
        db.execute_query(f"INSERT INTO {table} VALUES (1)", fetch_mode="many")  # type: ignore[arg-type]
    assert count_rows(healthy_fleet, "supabase", table) == 0


def test_sql_error_propagates_unchanged_and_is_never_retried(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    db = make_db()
    db.execute_query(f"INSERT INTO {table} VALUES (1, 'first')", fetch_mode="none")
    with pytest.raises(pge.UniqueViolation) as info:
        db.execute_query(f"INSERT INTO {table} VALUES (1, 'again')", fetch_mode="none")
    assert info.value.provider == "supabase"  # type: ignore[attr-defined]
    with pytest.raises(pge.SyntaxError):
        db.execute_query("SELEC 1")
    with pytest.raises(pge.UndefinedTable):
        db.execute_query("SELECT * FROM no_such_table_here")
    # Nothing reached the backups and the primary is still healthy and serving.
    assert count_rows(healthy_fleet, "railway", table) == 0
    assert count_rows(healthy_fleet, "neon", table) == 0
    assert db.get_provider_stats()["supabase"]["healthy"] is True
    assert served_by(db, healthy_fleet) == "supabase"


def test_crash_of_primary_fails_reads_and_unsent_writes_over(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    db = make_db()
    assert served_by(db, healthy_fleet) == "supabase"  # warm: the pool holds a connection
    healthy_fleet["supabase"].server.kill()
    t0 = time.monotonic()
    assert served_by(db, healthy_fleet) == "railway"
    # Bounded: far below the 30 s checkout timeout (the benchmark measures it).
    assert time.monotonic() - t0 < 5.0
    # A write after the crash never reached the dead primary: it runs on the backup.
    db.execute_query(f"INSERT INTO {table} VALUES (7)", fetch_mode="none")
    assert count_rows(healthy_fleet, "railway", table) == 1
    stats = db.get_provider_stats()
    assert stats["supabase"]["healthy"] is False and stats["supabase"]["role"] == "down"
    assert stats["railway"]["role"] == "serving"


def test_primary_down_at_start(healthy_fleet: Fleet) -> None:
    healthy_fleet["supabase"].server.kill()
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, **FAST) as db:
        assert served_by(db, healthy_fleet) == "railway"


def test_hang_abandons_reads_within_deadline(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].server.hang()
    t0 = time.monotonic()
    assert served_by(db, healthy_fleet) == "railway"
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 3.0, elapsed  # hang_timeout 1 s, generous margin for 2 cores
    # The hung provider is now skipped without waiting on it.
    t1 = time.monotonic()
    assert served_by(db, healthy_fleet) == "railway"
    assert time.monotonic() - t1 < 0.5


@pytest.fixture
def db_on_hung_primary(make_db: MakeDb, table: str, healthy_fleet: Fleet) -> DatabaseManager:
    """A manager whose pool holds a live connection to the primary, whose server then hangs."""
    db = make_db()
    db.execute_query(f"SELECT count(*) FROM {table}")
    healthy_fleet["supabase"].server.hang()
    return db


def test_write_lost_in_flight_is_outcome_unknown_never_applied_twice(
    db_on_hung_primary: DatabaseManager, table: str, healthy_fleet: Fleet
) -> None:
    db = db_on_hung_primary
    with pytest.raises(OutcomeUnknownError) as info:
        db.execute_query(f"INSERT INTO {table} VALUES (1)", fetch_mode="none")
    assert info.value.provider == "supabase"
    assert "may or may not have committed" in str(info.value)
    assert isinstance(info.value, psycopg.OperationalError)
    assert count_rows(healthy_fleet, "railway", table) == 0
    assert count_rows(healthy_fleet, "neon", table) == 0


def test_idempotent_write_is_retried_after_hang(
    db_on_hung_primary: DatabaseManager, table: str, healthy_fleet: Fleet
) -> None:
    db_on_hung_primary.execute_query(
        f"INSERT INTO {table} VALUES (1) ON CONFLICT DO NOTHING", fetch_mode="none",
        idempotent=True,
    )
    assert count_rows(healthy_fleet, "railway", table) == 1


def test_blackholed_primary_new_connections(healthy_fleet: Fleet) -> None:
    healthy_fleet["supabase"].proxy.set_mode("blackhole")
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, pool_min_size=0, **FAST) as db:
        t0 = time.monotonic()
        assert served_by(db, healthy_fleet) == "railway"
        # libpq's connect_timeout has a 2 s floor; the wait is bounded by it.
        assert time.monotonic() - t0 < 2.0 + 3.0


def test_blackholed_primary_pooled_connections(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].proxy.set_mode("blackhole")
    assert served_by(db, healthy_fleet) == "railway"


def test_connection_reset_fails_reads_over(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].proxy.set_mode("reset")
    assert served_by(db, healthy_fleet) == "railway"


def test_all_down_raises_one_error_listing_every_provider(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    db = make_db()
    for member in healthy_fleet:
        member.server.kill()
    t0 = time.monotonic()
    with pytest.raises(AllProvidersUnavailableError) as info:
        db.execute_query("SELECT 1")
    assert time.monotonic() - t0 < 10.0
    assert set(info.value.reasons) == set(ORDER)
    assert isinstance(info.value, psycopg.OperationalError)
    # Now every provider is known down: the next call fails at once.
    t1 = time.monotonic()
    with pytest.raises(AllProvidersUnavailableError):
        db.execute_query("SELECT 1")
    assert time.monotonic() - t1 < 0.5


def test_returns_to_primary_after_recovery(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    recorder = Recorder()
    db = make_db(listeners=[recorder], recovery_probes=2)
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].server.kill()
    assert served_by(db, healthy_fleet) == "railway"
    healthy_fleet["supabase"].server.restart()
    # A read that began just before the primary's health changed says nothing about
    # where traffic goes (its epoch is older): the return is reported by the next one.
    wait_until(lambda: served_by(db, healthy_fleet) == "supabase"
               and ("failback", "supabase", "railway") in recorder.events, timeout=20,
               message="traffic back on the primary, and the return reported")
    assert ("failover", "supabase", "railway") in recorder.events
    assert ("health", "supabase", False) in recorder.events
    assert ("health", "supabase", True) in recorder.events


def test_failover_disabled_uses_only_the_primary(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db(failover_enabled=False)
    healthy_fleet["supabase"].server.kill()
    with pytest.raises(AllProvidersUnavailableError) as info:
        db.execute_query("SELECT 1")
    assert list(info.value.reasons) == ["supabase"]


def test_set_provider_moves_queries(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db()
    db.set_provider("neon")
    assert db.primary_provider == "neon"
    assert served_by(db, healthy_fleet) == "neon"
    with pytest.raises(ValueError, match="not configured. Available"):
        db.set_provider("nowhere")


def test_failover_warning_is_rate_limited(
    make_db: MakeDb, healthy_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db(failover_log_interval=2.0)
    healthy_fleet["supabase"].server.kill()
    with caplog.at_level(logging.WARNING, logger="agent_factory.core.database_manager"):
        for _ in range(30):
            db.execute_query("SELECT 1")
        time.sleep(2.1)
        db.execute_query("SELECT 1")
    lines = [r.getMessage() for r in caplog.records if "Executed on failover" in r.getMessage()]
    assert 2 <= len(lines) <= 3  # one per interval (the loop may span two on a slow machine)
    assert "'railway'" in lines[0] and "'supabase'" in lines[0]
    # Each later line counts the ones suppressed since the previous: none goes unaccounted.
    more = [re.search(r" \((\d+) more since last log\)$", line) for line in lines[1:]]
    assert all(more) and len(lines) + sum(int(m[1]) for m in more if m) == 31


def test_transaction_is_atomic_and_pinned(make_db: MakeDb, table: str,
                                          healthy_fleet: Fleet) -> None:
    db = make_db()
    with db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    assert count_rows(healthy_fleet, "supabase", table) == 2
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (3)")
        raise RuntimeError("abort")
    with pytest.raises(pge.UniqueViolation) as info, db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (4)")
        conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert info.value.provider == "supabase"  # type: ignore[attr-defined]
    assert count_rows(healthy_fleet, "supabase", table) == 2


def test_transaction_losing_its_connection_commits_nothing(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    db = make_db()
    with pytest.raises(ProviderUnavailableError, match="nothing was committed"), \
            db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        healthy_fleet["supabase"].server.kill()
        conn.execute(f"INSERT INTO {table} VALUES (2)")
    healthy_fleet["supabase"].server.restart()
    assert count_rows(healthy_fleet, "supabase", table) == 0
    # The next transaction goes to a backup (the primary is marked down).
    with db.transaction() as conn:
        (port,) = conn.execute("SELECT inet_server_port()").fetchone() or (0,)
    assert port != healthy_fleet["supabase"].server.port


def test_transaction_losing_its_connection_at_commit_is_outcome_unknown(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    """Lost during COMMIT: the library cannot know whether it committed, and says so."""
    db = make_db()
    with pytest.raises(OutcomeUnknownError) as info, db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} VALUES (1)")
        healthy_fleet["supabase"].server.kill()
    assert info.value.provider == "supabase"
    assert db.get_provider_stats()["supabase"]["healthy"] is False
    healthy_fleet["supabase"].server.restart()
    assert count_rows(healthy_fleet, "supabase", table) == 0  # never replayed elsewhere
    assert count_rows(healthy_fleet, "railway", table) == 0


def test_concurrent_readers_survive_a_crash(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    db = make_db(pool_max_size=4)
    errors: list[BaseException] = []
    done = threading.Event()
    served: list[str] = []

    def reader() -> None:
        while not done.is_set():
            try:
                served.append(served_by(db, healthy_fleet))
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: len(served) > 50, message="warm-up reads")
    healthy_fleet["supabase"].server.kill()
    mark = len(served)
    wait_until(lambda: served[mark:].count("railway") > 50, message="reads on the backup")
    done.set()
    for t in threads:
        t.join(timeout=10)
    assert errors == []


def test_close_stops_background_threads(healthy_fleet: Fleet) -> None:
    before = set(threading.enumerate())
    db = DatabaseManager(healthy_fleet.urls(), order=ORDER, **FAST)
    healthy_fleet["supabase"].server.kill()
    db.execute_query("SELECT 1")  # starts the prober and the watchdog
    db.close_all()
    db.close_all()  # idempotent
    wait_until(lambda: set(threading.enumerate()) <= before, timeout=10,
               message="background threads to stop")
    assert all(t.daemon for t in threading.enumerate() if t not in before)


def test_passwords_never_leak(healthy_fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    secrets = {m.server.password for m in healthy_fleet}
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        db = DatabaseManager(healthy_fleet.urls(), order=ORDER, **FAST)
        texts += [repr(db), repr(db.providers), str(db.get_provider_stats())]
        for member in healthy_fleet:
            member.server.kill()
        try:
            db.execute_query("SELECT 1")
        except AllProvidersUnavailableError as exc:
            texts += [str(exc), repr(exc)]
        texts.append(str(db.get_provider_stats()))
        db.close_all()
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    assert "127.0.0.1" in blob  # the check looks at real output
    for secret in secrets:
        assert secret not in blob


class TimedRecorder(Recorder):
    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self._add("health", provider, healthy, time.monotonic())


def test_recovery_does_not_flap_from_stale_pool_connects(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """A connect started by the pool replaced at recovery must not mark it down again."""
    recorder = TimedRecorder()
    db = make_db(listeners=[recorder], pool_min_size=2)
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].proxy.set_mode("blackhole")
    assert served_by(db, healthy_fleet) == "railway"
    healthy_fleet["supabase"].proxy.set_mode("pass")
    wait_until(lambda: served_by(db, healthy_fleet) == "supabase", timeout=20,
               message="traffic back on the primary")
    # The old pool's blackholed connects time out 2 s (libpq's floor) later;
    # watch past that point: the primary must stay up.
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        assert served_by(db, healthy_fleet) == "supabase"
        time.sleep(0.05)
    downs = [e for e in recorder.events if e[:3] == ("health", "supabase", False)]
    assert len(downs) == 1


def test_recovery_probes_are_spaced(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    recorder = TimedRecorder()
    db = make_db(listeners=[recorder], probe_interval=0.4, recovery_probes=3)
    assert served_by(db, healthy_fleet) == "supabase"
    healthy_fleet["supabase"].server.hang()
    assert served_by(db, healthy_fleet) == "railway"
    healthy_fleet["supabase"].server.resume()
    wait_until(lambda: db.get_provider_stats()["supabase"]["healthy"], timeout=20,
               message="primary healthy again")
    down = next(e[3] for e in recorder.events if e[:3] == ("health", "supabase", False))
    up = next(e[3] for e in recorder.events if e[:3] == ("health", "supabase", True))
    # Three good probes, the last two each after a full probe_interval.
    assert up - down >= 2 * 0.4


class QueryLog(Listener):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        assert seconds >= 0
        self.seen.append((provider, outcome))


class Broken(Listener):
    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        raise RuntimeError("listener bug")

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        raise RuntimeError("listener bug")


def test_query_events_and_broken_listeners(
    make_db: MakeDb, table: str, healthy_fleet: Fleet
) -> None:
    log = QueryLog()
    db = make_db(listeners=[Broken(), log])
    db.execute_query("SELECT 1")
    with pytest.raises(pge.SyntaxError):
        db.execute_query("SELEC 1")
    healthy_fleet["supabase"].server.hang()
    with pytest.raises(OutcomeUnknownError):
        db.execute_query(f"INSERT INTO {table} VALUES (1)", fetch_mode="none")
    assert db.execute_query("SELECT 2") == [(2,)]  # the broken listener breaks nothing
    assert log.seen == [
        ("supabase", "ok"),
        ("supabase", "sql_error"),
        ("supabase", "outcome_unknown"),
        ("railway", "ok"),
    ]

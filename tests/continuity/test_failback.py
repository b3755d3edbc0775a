"""Failback: client-keyed inserts acknowledged on a backup end up on the primary exactly once."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases, with_port
from defaults import ORDER
from fleet import wait_until
from observers import Reconciled, Recorder

from agent_factory.continuity.journal import _LOCK_SPACE
from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.events import Listener
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
        apply_migrations(on_server(urls[member.name], member), embedding_dim=8)
    yield urls
    healthy_fleet.heal()
    drop_databases(healthy_fleet, urls)


def on_server(url: str, member: Any) -> str:
    """``url``'s database on ``member``'s server itself, not through its fault proxy."""
    return with_port(url, member.server.port)


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
        # Keyed, so retried safely if the crash's close reaches a pooled
        # connection just after the statement went out on it.
        written = [insert(db, f"late{n}") for n in range(20)]
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


class Returns(Listener):
    def __init__(self) -> None:
        self.returns: list[str] = []

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self.returns.append(from_provider)


@pytest.mark.parametrize("manager", ["sync", "async"])
def test_reads_in_the_failback_window_go_to_the_primary(
    healthy_fleet: Fleet, dbs: dict[str, str], manager: str
) -> None:
    """The primary answers again, the backup's changes are not brought back yet.

    The backup then holds its outage writes while it may already apply the
    primary's stream again: a mix of two histories. The primary holds one (its
    own plus whole backup transactions, in order): reads go there, writes still
    go to the backup until the drain is done, and the return is reported once.
    """
    member = healthy_fleet["supabase"]
    returns = Returns()
    run = _sync_steps if manager == "sync" else _async_steps
    member.proxy.set_mode("refuse")
    try:
        with another_drainer(dbs, member) as drainer:
            written = run(healthy_fleet, dbs, returns, member, drainer)
    finally:
        member.proxy.set_mode("pass")
    assert set(written) <= set(ids_on(dbs["supabase"]))
    assert returns.returns == ["railway"]


@contextmanager
def another_drainer(dbs: dict[str, str], member: Any) -> Iterator[psycopg.Connection[Any]]:
    """A session on the primary's server holding railway's drain lock: another instance's
    drain of railway, as far as a manager can tell (`release` ends it)."""
    with psycopg.connect(on_server(dbs["supabase"], member), autocommit=True) as drainer:
        drainer.execute("SELECT pg_advisory_lock(%s, hashtext('railway'))", (_LOCK_SPACE,))
        yield drainer


def conflicts(dbs: dict[str, str], member: Any) -> int:
    """Conflicts recorded on the primary by the drains (read on its server directly)."""
    with psycopg.connect(on_server(dbs["supabase"], member), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM agent_factory_conflicts").fetchone()
    assert row is not None
    return int(row[0])


def release(drainer: psycopg.Connection[Any]) -> None:
    drainer.execute("SELECT pg_advisory_unlock(%s, hashtext('railway'))", (_LOCK_SPACE,))


def _port(row: Any) -> int:
    return int(row[0])


def answered_by(db: DatabaseManager) -> int:
    """The server port of whoever answers a read of ``db``'s."""
    return _port(db.execute_query("SELECT inet_server_port()", fetch_mode="one"))


def _sync_steps(fleet: Fleet, dbs: dict[str, str], returns: Returns, member: Any,
                drainer: psycopg.Connection[Any]) -> list[str]:
    port = member.server.port
    with DatabaseManager(dbs, order=ORDER, listeners=[returns], **FAST) as db:
        written = [insert(db, f"w{n}") for n in range(5)]
        assert db.serving_provider == "railway"
        member.proxy.set_mode("pass")
        wait_until(lambda: answered_by(db) == port, timeout=30,
                   message="a read served by the primary in the failback window")
        # The drain waits for the lock: the primary holds none of railway's rows yet,
        # and writes still go to railway.
        assert not set(written) & set(ids_on(dbs["supabase"]))
        row_id = insert(db, "held")
        written.append(row_id)
        assert row_id in ids_on(dbs["railway"])
        assert db.serving_provider == "railway" and returns.returns == []
        assert db.get_provider_stats()["supabase"]["role"] == "returning"
        release(drainer)
        wait_until(lambda: insert(db, "after") and db.serving_provider == "supabase",
                   timeout=30, message="writes back on the primary")
    return written


def _async_steps(fleet: Fleet, dbs: dict[str, str], returns: Returns, member: Any,
                 drainer: psycopg.Connection[Any]) -> list[str]:
    port = member.server.port

    async def steps() -> list[str]:
        async with AsyncDatabaseManager(dbs, order=ORDER, listeners=[returns], **FAST) as db:
            written = []
            for n in range(5):
                row_id = str(uuid.uuid4())
                await db.execute_query(INSERT, (row_id, f"w{n}"), fetch_mode="none",
                                       idempotent=True)
                written.append(row_id)
            assert db.serving_provider == "railway"
            member.proxy.set_mode("pass")
            deadline = time.monotonic() + 30
            while _port(await db.execute_query("SELECT inet_server_port()",
                                               fetch_mode="one")) != port:
                assert time.monotonic() < deadline, "no read served by the primary"
                await asyncio.sleep(0.05)
            assert not set(written) & set(ids_on(dbs["supabase"]))
            row_id = str(uuid.uuid4())
            await db.execute_query(INSERT, (row_id, "held"), fetch_mode="none", idempotent=True)
            written.append(row_id)
            assert row_id in ids_on(dbs["railway"])
            assert db.serving_provider == "railway" and returns.returns == []
            release(drainer)
            deadline = time.monotonic() + 30
            while True:
                await db.execute_query(INSERT, (str(uuid.uuid4()), str(uuid.uuid4())),
                                       fetch_mode="none",
                                       idempotent=True)
                if db.serving_provider == "supabase":
                    break
                assert time.monotonic() < deadline, "writes not back on the primary"
                await asyncio.sleep(0.05)
            return written

    return asyncio.run(steps())


def insert(db: DatabaseManager, tag: str) -> str:
    """One keyed row (its message id unique too) written through ``db``, retried safely;
    its id."""
    row_id = str(uuid.uuid4())
    db.execute_query(INSERT, (row_id, f"{tag}:{row_id}"), fetch_mode="none", idempotent=True)
    return row_id


def test_an_instance_started_in_the_failback_window(
        healthy_fleet: Fleet, dbs: dict[str, str]) -> None:
    """A second manager starts while the first one's failback window is open (the
    primary answers again, another instance drains railway): both read from the
    primary; the first still writes to railway; the second, which never saw the
    primary down, holds its writes until railway's outage changes are back (its
    start-up pass finds them pending). Then every acknowledged write of both is
    on the primary exactly once, and a row both changed keeps the second's later
    change, with no conflict.

    Before the start-up pass, the second wrote on the primary at once and the
    drain then replayed the first's older change over it (a conflict that
    ``backup_wins`` settled for the older version).
    """
    member = healthy_fleet["supabase"]
    port = member.server.port
    shared = str(uuid.uuid4())
    for m in healthy_fleet:  # the same row everywhere, its times included
        with psycopg.connect(on_server(dbs[m.name], m), autocommit=True) as conn:
            conn.execute("INSERT INTO session_memories (id, session_id, memory_type, content, "
                         "created_at, updated_at) VALUES (%s, 'chaos', 'log', '{}', "
                         "'2026-01-01Z', '2026-01-01Z')", (shared,))
    update = "UPDATE session_memories SET content = %s::jsonb WHERE id = %s"
    member.proxy.set_mode("refuse")
    with another_drainer(dbs, member) as drainer, \
            DatabaseManager(dbs, order=ORDER, **FAST) as first:
        outage = [insert(first, "first") for _ in range(5)]
        first.execute_query(update, ('{"v": "first, in the outage"}', shared), fetch_mode="none")
        assert first.serving_provider == "railway"
        member.proxy.set_mode("pass")
        wait_until(lambda: first.get_provider_stats()["supabase"]["role"] == "returning",
                   timeout=30, message="the first manager's failback window open")
        with DatabaseManager(dbs, order=ORDER, **FAST) as second:
            written = list(outage)
            for _ in range(3):
                assert answered_by(second) == port and answered_by(first) == port
                row_id = insert(first, "first-held")
                written.append(row_id)
                assert row_id in ids_on(dbs["railway"])
            held: list[str] = []
            writer = threading.Thread(target=lambda: (
                second.execute_query(update, ('{"v": "second, after it"}', shared),
                                     fetch_mode="none"),
                held.append(insert(second, "second"))))
            writer.start()
            # Held while the outage changes are not back (bounded by
            # write_pause_timeout, 10 s here; a second is plenty to see it).
            writer.join(1.0)
            assert writer.is_alive() and not held, "written before the outage changes were back"
            assert not set(outage) & set(ids_on(dbs["supabase"]))
            assert first.get_provider_stats()["supabase"]["role"] == "returning"
            release(drainer)
            writer.join(30)
            assert held, "the second manager's writes did not go on after the drain"
            written += held
            wait_until(lambda: insert(first, "after") and first.serving_provider == "supabase",
                       timeout=30, message="the first manager's writes back on the primary")
            written.append(insert(second, "after"))
    on_primary = ids_on(dbs["supabase"])
    assert len(on_primary) == len(set(on_primary))
    missing = set(written) - set(on_primary)
    assert not missing, f"{len(missing)} of {len(written)} acknowledged writes not on the primary"
    with psycopg.connect(on_server(dbs["supabase"], member), autocommit=True) as conn:
        row = conn.execute("SELECT content->>'v' FROM session_memories WHERE id = %s",
                           (shared,)).fetchone()
    assert row == ("second, after it",)
    # Once, and in order: a change replayed over a later one would be a conflict.
    assert conflicts(dbs, member) == 0


def test_a_backup_silent_at_start_up_holds_writes_no_longer_than_hang_timeout(
        healthy_fleet: Fleet, dbs: dict[str, str]) -> None:
    """Writes are held at start-up while the backups' journals are looked at; a
    backup that does not answer (blackholed) is not reachable, and the hold ends
    by itself after hang_timeout instead of lasting write_pause_timeout."""
    healthy_fleet["railway"].proxy.set_mode("blackhole")
    with DatabaseManager(dbs, order=ORDER, hang_timeout=1.0, probe_interval=0.1,
                         write_pause_timeout=60.0) as db:
        t0 = time.monotonic()
        row_id = insert(db, "at start-up")
        waited = time.monotonic() - t0
    assert row_id in ids_on(dbs["supabase"])
    assert waited < 30, f"the first write waited {waited:.1f} s"


def test_writes_in_the_failback_window_are_not_held_over_a_slow_link(
        healthy_fleet: Fleet, dbs: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    """The primary answers again across a 100 ms round trip while another instance
    drains railway: each failback pass of this instance finds that drainer at work
    and gives up before it pauses writes, which keep landing on railway at once.

    Before, every pass (each probe) paused writes for a second look across the
    slow link, a connect and a few round trips: over a second each time here.
    """
    member = healthy_fleet["supabase"]
    caplog.set_level(logging.INFO, logger="agent_factory.core.database_manager")
    member.proxy.set_mode("refuse")
    with another_drainer(dbs, member) as drainer, \
            DatabaseManager(dbs, order=ORDER, **FAST) as db:
        written = [insert(db, "outage") for _ in range(5)]
        member.proxy.set_latency(0.05)  # each way
        member.proxy.set_mode("pass")
        wait_until(lambda: db.get_provider_stats()["supabase"]["role"] == "returning",
                   timeout=30, message="the primary's probes passing over the slow link")
        caplog.clear()
        slowest = 0.0
        held_until = time.monotonic() + 4 * FAST["hang_timeout"]
        while time.monotonic() < held_until or len(postponed(caplog)) < 2:
            assert time.monotonic() < held_until + 30, "no failback pass met the other drainer"
            t0 = time.monotonic()
            written.append(insert(db, "held"))
            slowest = max(slowest, time.monotonic() - t0)
            assert db.serving_provider == "railway"
        assert slowest < 0.5, f"a write in the failback window waited {slowest:.2f} s"
        assert not set(written) & set(ids_on(dbs["supabase"]))
        release(drainer)
        wait_until(lambda: insert(db, "after") and db.serving_provider == "supabase",
                   timeout=30, message="writes back on the primary over the slow link")
    assert set(written) <= set(ids_on(dbs["supabase"]))
    assert conflicts(dbs, member) == 0


def postponed(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The failback passes that found another instance draining."""
    return [r for r in caplog.records if "waits for another drainer" in r.getMessage()]


def test_the_failback_window_over_a_slow_link(healthy_fleet: Fleet,
                                              dbs: dict[str, str]) -> None:
    """The primary answers again across an 80 ms round trip while another instance
    drains railway: every read is answered by the primary, every write lands on
    railway until the drain, and the slow answers are no new outage."""
    member = healthy_fleet["supabase"]
    port = member.server.port
    recorder = Recorder()
    member.proxy.set_mode("refuse")
    with another_drainer(dbs, member) as drainer, \
            DatabaseManager(dbs, order=ORDER, listeners=[recorder], **FAST) as db:
        written = [insert(db, f"w{n}") for n in range(5)]
        assert db.serving_provider == "railway"
        member.proxy.set_latency(0.04)  # each way
        member.proxy.set_mode("pass")
        wait_until(lambda: db.get_provider_stats()["supabase"]["role"] == "returning",
                   timeout=30, message="the primary's probes passing over the slow link")
        # From here on nothing may count as a failure of the primary's: the first
        # reads wait for connections of the pool renewed just now, across the slow link.
        errors = db.get_provider_stats()["supabase"]["errors"]
        # Held open for several hang_timeouts and probe rounds of the slow link.
        held_until = time.monotonic() + 4 * FAST["hang_timeout"]
        while time.monotonic() < held_until:
            assert answered_by(db) == port
            row_id = insert(db, "held")
            written.append(row_id)
            assert db.serving_provider == "railway"
            assert row_id in ids_on(dbs["railway"])
            stats = db.get_provider_stats()["supabase"]
            assert stats["role"] == "returning" and stats["errors"] == errors
        assert not set(written) & set(ids_on(dbs["supabase"]))
        release(drainer)
        wait_until(lambda: insert(db, "after") and db.serving_provider == "supabase",
                   timeout=30, message="writes back on the primary over the slow link")
        assert db.get_provider_stats()["supabase"]["errors"] == errors
    assert set(written) <= set(ids_on(dbs["supabase"]))
    assert conflicts(dbs, member) == 0  # each change replayed once
    # Down once (the refused connections), up once (the drain done): never down again.
    health = [e[2] for e in recorder.events if e[:2] == ("health", "supabase")]
    assert health == [False, True]
    assert [e[1:] for e in recorder.events if e[0] == "failback"] == [("supabase", "railway")]

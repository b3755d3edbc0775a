"""The false-outage catalogue (issue 9, item 1): healthy work is never abandoned.

Each scenario is a workload a healthy primary must serve however long it takes:
back-to-back statements in one transaction, big uploads (also once psycopg prepares
them), a batch of vectors, long sleeps, a row-lock wait and big results over slow
links. With the default timing (``hang_timeout`` 2 s) none may raise, mark the primary
down, count an error against it or move traffic off it, and each checks that its own
work really happened.

Every scenario has its own manager, whose primary is reached through a private
`FaultProxy` (so one scenario's rate limit is not another's, and a verdict belongs to
one scenario); the backups are the fleet's. A test runs every scenario on both
managers side by side (threads for the sync one, tasks for the async one), once on
loopback, once with 10 ms of added latency each way, and once on loopback as on a
platform without TCP counters: the module takes about 45 s.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field
from typing import Any

import psycopg
import pytest
from defaults import ORDER
from fleet import wait_until

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine import provider, watchdog
from agent_factory.engine.events import Listener
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet

PRIMARY = ORDER[0]

BUSY_SECONDS = 10.0  # back-to-back statements in one transaction, this long
SLEEP_SECONDS = 5.0  # pg_sleep, and how long the row lock is held once waited on
BLOB_BYTES = 12_000_000
UPLOAD_RATE = 4_000_000.0  # the 12 MB upload takes 3 s
RESULT_ROWS, RESULT_ROW_BYTES = 6, 1_000_000
RESULT_RATE = 1_500_000.0  # the 6 MB result takes 4 s
VECTORS, DIMS = 500, 1536
PREPARE_THRESHOLD = 5  # psycopg's default: the 6th execution on a connection is prepared

BIG_RESULT = f"SELECT repeat('x', {RESULT_ROW_BYTES}) FROM generate_series(1, {RESULT_ROWS})"
#: Eighteen managers start at once in this process, with a hundred threads between
#: them and their proxies; beside another test worker, an event loop starved of the
#: GIL took over 5 s to hand out a pool's first connection (10 ms link). A
#: checkout that runs out of time is back-pressure (it never marks the primary down,
#: which is what this module judges), so the checkouts get more of it here.
CHECKOUT = {"checkout_timeout": 20.0}


# -- one scenario's world ---------------------------------------------------------------


class EventLog(Listener):
    """Every health change and failover a manager reports (none is expected here)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self.events.append(f"{provider} {'up' if healthy else 'down'}: {reason}")

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self.events.append(f"failover {from_provider} -> {to_provider}: {reason}")


#: The scenarios' tables: what each holds.
TABLE_COLUMNS = {
    "batch": "(batch int, n int)",
    "blob": "(id serial, data bytea)",
    "vec": f"(id serial, v vector({DIMS}))",
    "lock": "(id int PRIMARY KEY, n int)",
}


@dataclass(frozen=True)
class Tables:
    """This test's tables, on every provider (a failover then fails on the verdict only)."""

    batch: str
    blob: str
    vec: str
    lock: str

    @classmethod
    def fresh(cls) -> Tables:
        prefix = f"fo_{uuid.uuid4().hex[:8]}"
        return cls(**{kind: f"{prefix}_{kind}" for kind in TABLE_COLUMNS})

    def create(self, fleet: Fleet) -> None:
        for member in fleet:
            with psycopg.connect(member.direct_url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                for kind, columns in TABLE_COLUMNS.items():
                    conn.execute(f"CREATE TABLE {getattr(self, kind)} {columns}")
                conn.execute(f"INSERT INTO {self.lock} VALUES (1, 0)")

    def drop(self, fleet: Fleet) -> None:
        for member in fleet:
            with psycopg.connect(member.direct_url, autocommit=True) as conn:
                for table in astuple(self):
                    conn.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def tables(healthy_fleet: Fleet) -> Iterator[dict[str, Tables]]:
    """One set of tables for the sync catalogue and one for the async one."""
    made = {"sync": Tables.fresh(), "async": Tables.fresh()}
    for each in made.values():
        each.create(healthy_fleet)
    yield made
    healthy_fleet.heal()
    for each in made.values():
        each.drop(healthy_fleet)


class Rig:
    """A private link to the primary (latency, optional rate) and the URLs over it."""

    def __init__(self, fleet: Fleet, latency: float, rate: float | None) -> None:
        primary = fleet[PRIMARY]
        self.port = primary.server.port
        self.direct_url = primary.direct_url  # bypasses every proxy (for the lock holder)
        self.proxy = FaultProxy(primary.server.host, primary.server.port)
        self.proxy.start()
        self.proxy.set_latency(latency)
        self.proxy.set_rate(rate)
        self.urls = {**fleet.urls(), PRIMARY: self.proxy.url_for(primary.server.url)}
        self.log = EventLog()
        self.step = ""  # what a scenario of several steps is doing now, for the report

    def verdict(self, db: DatabaseManager | AsyncDatabaseManager) -> list[str]:
        """What went wrong for the primary, in words (empty: nothing)."""
        stats = db.get_provider_stats()[PRIMARY]
        problems = [f"event: {event}" for event in self.log.events]
        if not stats["healthy"] or stats["errors"]:
            problems.append(f"primary healthy={stats['healthy']} errors={stats['errors']}"
                            f" last_error={stats['last_error']!r}")
        if db.serving_provider != PRIMARY:
            problems.append(f"served by {db.serving_provider}")
        return problems

    def close(self) -> None:
        self.proxy.close()


@dataclass
class Scenario:
    name: str
    rate: float | None
    run_sync: Callable[[DatabaseManager, Rig, Tables], None]
    run_async: Callable[[AsyncDatabaseManager, Rig, Tables], Awaitable[None]]
    options: dict[str, Any] = field(default_factory=dict)  # for the manager


def describe(exc: BaseException) -> str:
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return line if isinstance(exc, AssertionError) else f"{line} ({type(exc).__module__})"


# -- helpers both twins share -------------------------------------------------------------


@functools.cache
def vector_literals(count: int, seed: int) -> list[str]:
    """Vectors as pgvector text; cached, so the async twin never builds them on the loop."""
    rnd = random.Random(seed)
    return ["[" + ",".join(f"{rnd.random():.6f}" for _ in range(DIMS)) + "]"
            for _ in range(count)]


def multirow_vector_insert(table: str, count: int) -> str:
    values = ", ".join(["(%s::vector)"] * count)
    return f"INSERT INTO {table} (v) VALUES {values}"


class RowLockHolder:
    """Holds a row lock in another session; releases it ``SLEEP_SECONDS`` after a waiter.

    The waiter is a backend of the primary waiting on a lock with a statement that
    starts with ``waiter_sql``; ``held_after_wait`` is how long it was kept waiting.
    """

    def __init__(self, url: str, table: str, key: int, waiter_sql: str) -> None:
        self._url, self._waiter_sql = url, waiter_sql
        self.held_after_wait = 0.0
        self.error: BaseException | None = None
        self._conn = psycopg.connect(url)
        self._conn.execute(f"SELECT n FROM {table} WHERE id = %s FOR UPDATE", (key,))
        self._thread = threading.Thread(target=self._hold, daemon=True, name="row-lock-holder")
        self._thread.start()

    def _waiter_seen(self, monitor: psycopg.Connection[Any]) -> bool:
        row = monitor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE %s", (self._waiter_sql + "%",),
        ).fetchone()
        return bool(row and row[0])

    def _hold(self) -> None:
        try:
            with psycopg.connect(self._url, autocommit=True) as monitor:
                wait_until(lambda: self._waiter_seen(monitor), timeout=15,
                           message="the statement to wait on the row lock")
            seen = time.monotonic()
            time.sleep(SLEEP_SECONDS)  # the lock is held this long on purpose
            self.held_after_wait = time.monotonic() - seen
        except BaseException as exc:  # reported by the scenario
            self.error = exc
        finally:
            self._conn.commit()
            self._conn.close()

    def join(self) -> None:
        self._thread.join(SLEEP_SECONDS + 20)
        if self.error is not None:
            raise AssertionError(f"lock holder: {describe(self.error)}")


def check_duration(what: str, seconds: float, at_least: float) -> None:
    assert seconds >= at_least, f"{what} took {seconds:.2f}s, expected >= {at_least}s"


def check_port(row: Any, rig: Rig) -> None:
    assert row == (rig.port,), f"ran on port {row}, expected the primary's {rig.port}"


# -- the sync scenarios ---------------------------------------------------------------------


def tx_tight_loop(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    statements = 0
    with db.transaction() as conn:
        deadline = time.monotonic() + BUSY_SECONDS
        while time.monotonic() < deadline:
            conn.execute("SELECT 1")
            statements += 1
        check_port(conn.execute("SELECT inet_server_port()").fetchone(), rig)
    assert statements > 100, statements


def tx_executemany(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    batches = 0
    with db.transaction() as conn:
        deadline = time.monotonic() + BUSY_SECONDS
        with conn.cursor() as cur:
            while time.monotonic() < deadline:
                cur.executemany(f"INSERT INTO {t.batch} VALUES (%s, %s)",
                                [(batches, n) for n in range(100)])
                batches += 1
        check_port(conn.execute("SELECT inet_server_port()").fetchone(), rig)
    assert batches > 10, batches
    row = db.execute_query(f"SELECT count(*), count(DISTINCT batch) FROM {t.batch}",
                           fetch_mode="one")
    assert row == (batches * 100, batches), (row, batches)


def upload_blob(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    insert = f"INSERT INTO {t.blob} (data) VALUES (%s) RETURNING length(data)"
    blob = os.urandom(BLOB_BYTES)
    rig.step = "the unprepared upload"
    started = time.monotonic()
    assert db.execute_query(insert, (blob,), fetch_mode="one") == (BLOB_BYTES,)
    check_duration("the unprepared upload", time.monotonic() - started, 2.5)
    rig.step = "the small uploads"
    for _ in range(PREPARE_THRESHOLD):
        assert db.execute_query(insert, (b"small",), fetch_mode="one") == (5,)
    prepared = db.execute_query(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
        (f"INSERT INTO {t.blob}%",), fetch_mode="one")
    assert prepared == (1,), f"the insert is not prepared: {prepared}"
    rig.step = "the prepared upload"
    started = time.monotonic()
    assert db.execute_query(insert, (blob,), fetch_mode="one") == (BLOB_BYTES,)
    check_duration("the prepared upload", time.monotonic() - started, 2.5)
    row = db.execute_query(f"SELECT count(*), sum(length(data)) FROM {t.blob}", fetch_mode="one")
    assert row == (2 + PREPARE_THRESHOLD, 2 * BLOB_BYTES + 5 * PREPARE_THRESHOLD), row


def insert_vectors(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    rig.step = "the multi-row insert"
    db.execute_query(multirow_vector_insert(t.vec, VECTORS), vector_literals(VECTORS, 1),
                     fetch_mode="none")
    rig.step = "executemany in a transaction"
    with db.transaction() as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {t.vec} (v) VALUES (%s::vector)",
                        [(v,) for v in vector_literals(VECTORS, 2)])
    row = db.execute_query(f"SELECT count(*), min(vector_dims(v)) FROM {t.vec}", fetch_mode="one")
    assert row == (2 * VECTORS, DIMS), row


def sleep_autocommit(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    row = db.execute_query(f"SELECT inet_server_port() FROM pg_sleep({SLEEP_SECONDS})",
                           fetch_mode="one")
    check_duration("pg_sleep", time.monotonic() - started, SLEEP_SECONDS)
    check_port(row, rig)


def sleep_in_transaction(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    with db.transaction() as conn:
        conn.execute("SELECT 1")
        conn.execute(f"SELECT pg_sleep({SLEEP_SECONDS})")
        check_port(conn.execute("SELECT inet_server_port()").fetchone(), rig)
    check_duration("pg_sleep in a transaction", time.monotonic() - started, SLEEP_SECONDS)


def row_lock_wait(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    update = f"UPDATE {t.lock} SET n = n + 1 WHERE id = 1"
    holder = RowLockHolder(rig.direct_url, t.lock, 1, update)
    started = time.monotonic()
    try:
        db.execute_query(update, fetch_mode="none")
    finally:
        holder.join()
    check_duration("the row-lock wait", time.monotonic() - started, 4.5)
    check_duration("the lock held after the wait began", holder.held_after_wait, 4.5)
    assert db.execute_query(f"SELECT n FROM {t.lock} WHERE id = 1", fetch_mode="one") == (1,)


def result_fetchall(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    rows = db.execute_query(BIG_RESULT)
    check_duration("the slow result", time.monotonic() - started, 3.0)
    assert [len(text) for (text,) in rows] == [RESULT_ROW_BYTES] * RESULT_ROWS


def result_stream(db: DatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    lengths = []
    with db.transaction() as conn:
        for (text,) in conn.cursor().stream(BIG_RESULT):
            lengths.append(len(text))
    check_duration("the slow stream", time.monotonic() - started, 3.0)
    assert lengths == [RESULT_ROW_BYTES] * RESULT_ROWS


# -- the async twins ---------------------------------------------------------------------------


async def tx_tight_loop_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    statements = 0
    async with db.transaction() as conn:
        deadline = time.monotonic() + BUSY_SECONDS
        while time.monotonic() < deadline:
            await conn.execute("SELECT 1")
            statements += 1
        check_port(await (await conn.execute("SELECT inet_server_port()")).fetchone(), rig)
    assert statements > 100, statements


async def tx_executemany_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    batches = 0
    async with db.transaction() as conn:
        deadline = time.monotonic() + BUSY_SECONDS
        async with conn.cursor() as cur:
            while time.monotonic() < deadline:
                await cur.executemany(f"INSERT INTO {t.batch} VALUES (%s, %s)",
                                      [(batches, n) for n in range(100)])
                batches += 1
        check_port(await (await conn.execute("SELECT inet_server_port()")).fetchone(), rig)
    assert batches > 10, batches
    row = await db.execute_query(f"SELECT count(*), count(DISTINCT batch) FROM {t.batch}",
                                 fetch_mode="one")
    assert row == (batches * 100, batches), (row, batches)


async def upload_blob_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    insert = f"INSERT INTO {t.blob} (data) VALUES (%s) RETURNING length(data)"
    blob = os.urandom(BLOB_BYTES)
    rig.step = "the unprepared upload"
    started = time.monotonic()
    assert await db.execute_query(insert, (blob,), fetch_mode="one") == (BLOB_BYTES,)
    check_duration("the unprepared upload", time.monotonic() - started, 2.5)
    rig.step = "the small uploads"
    for _ in range(PREPARE_THRESHOLD):
        assert await db.execute_query(insert, (b"small",), fetch_mode="one") == (5,)
    prepared = await db.execute_query(
        "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
        (f"INSERT INTO {t.blob}%",), fetch_mode="one")
    assert prepared == (1,), f"the insert is not prepared: {prepared}"
    rig.step = "the prepared upload"
    started = time.monotonic()
    assert await db.execute_query(insert, (blob,), fetch_mode="one") == (BLOB_BYTES,)
    check_duration("the prepared upload", time.monotonic() - started, 2.5)
    row = await db.execute_query(f"SELECT count(*), sum(length(data)) FROM {t.blob}",
                                 fetch_mode="one")
    assert row == (2 + PREPARE_THRESHOLD, 2 * BLOB_BYTES + 5 * PREPARE_THRESHOLD), row


async def insert_vectors_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    rig.step = "the multi-row insert"
    await db.execute_query(multirow_vector_insert(t.vec, VECTORS), vector_literals(VECTORS, 1),
                           fetch_mode="none")
    rig.step = "executemany in a transaction"
    async with db.transaction() as conn, conn.cursor() as cur:
        await cur.executemany(f"INSERT INTO {t.vec} (v) VALUES (%s::vector)",
                              [(v,) for v in vector_literals(VECTORS, 2)])
    row = await db.execute_query(f"SELECT count(*), min(vector_dims(v)) FROM {t.vec}",
                                 fetch_mode="one")
    assert row == (2 * VECTORS, DIMS), row


async def sleep_autocommit_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    row = await db.execute_query(
        f"SELECT inet_server_port() FROM pg_sleep({SLEEP_SECONDS})", fetch_mode="one")
    check_duration("pg_sleep", time.monotonic() - started, SLEEP_SECONDS)
    check_port(row, rig)


async def sleep_in_transaction_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    async with db.transaction() as conn:
        await conn.execute("SELECT 1")
        await conn.execute(f"SELECT pg_sleep({SLEEP_SECONDS})")
        check_port(await (await conn.execute("SELECT inet_server_port()")).fetchone(), rig)
    check_duration("pg_sleep in a transaction", time.monotonic() - started, SLEEP_SECONDS)


async def row_lock_wait_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    update = f"UPDATE {t.lock} SET n = n + 1 WHERE id = 1"
    holder = await asyncio.to_thread(RowLockHolder, rig.direct_url, t.lock, 1, update)
    started = time.monotonic()
    try:
        await db.execute_query(update, fetch_mode="none")
    finally:
        await asyncio.to_thread(holder.join)
    check_duration("the row-lock wait", time.monotonic() - started, 4.5)
    check_duration("the lock held after the wait began", holder.held_after_wait, 4.5)
    row = await db.execute_query(f"SELECT n FROM {t.lock} WHERE id = 1", fetch_mode="one")
    assert row == (1,), row


async def result_fetchall_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    rows = await db.execute_query(BIG_RESULT)
    check_duration("the slow result", time.monotonic() - started, 3.0)
    assert [len(text) for (text,) in rows] == [RESULT_ROW_BYTES] * RESULT_ROWS


async def result_stream_async(db: AsyncDatabaseManager, rig: Rig, t: Tables) -> None:
    started = time.monotonic()
    lengths = []
    async with db.transaction() as conn:
        async for (text,) in conn.cursor().stream(BIG_RESULT):
            lengths.append(len(text))
    check_duration("the slow stream", time.monotonic() - started, 3.0)
    assert lengths == [RESULT_ROW_BYTES] * RESULT_ROWS


CATALOGUE = [
    Scenario("transaction: SELECT 1 back to back", None, tx_tight_loop, tx_tight_loop_async),
    Scenario("transaction: executemany batches", None, tx_executemany, tx_executemany_async),
    # One pooled connection: every execution lands on the session that prepares it.
    Scenario("12 MB bytea at 4 MB/s, unprepared then prepared", UPLOAD_RATE,
             upload_blob, upload_blob_async, {"pool_max_size": 1}),
    Scenario("500 x 1536-dim vectors", None, insert_vectors, insert_vectors_async),
    Scenario("pg_sleep(5)", None, sleep_autocommit, sleep_autocommit_async),
    Scenario("pg_sleep(5) in a transaction", None, sleep_in_transaction,
             sleep_in_transaction_async),
    Scenario("row-lock wait of 5 s", None, row_lock_wait, row_lock_wait_async),
    Scenario("6 MB result at 1.5 MB/s, fetchall", RESULT_RATE,
             result_fetchall, result_fetchall_async),
    Scenario("6 MB result at 1.5 MB/s, stream in a transaction", RESULT_RATE,
             result_stream, result_stream_async),
]


# -- running the catalogue ------------------------------------------------------------------


def run_sync(fleet: Fleet, tables: Tables, latency: float, scenario: Scenario) -> list[str]:
    """Run one scenario on a manager of its own; what went wrong, in words."""
    rig = Rig(fleet, latency, scenario.rate)
    try:
        with DatabaseManager(rig.urls, order=ORDER, listeners=[rig.log],
                             **{**CHECKOUT, **scenario.options}) as db:
            problems = []
            try:
                scenario.run_sync(db, rig, tables)
            except Exception as exc:
                step = f" (during {rig.step})" if rig.step else ""
                problems.append(describe(exc) + step)
            return problems + rig.verdict(db)
    finally:
        rig.close()


async def run_async(fleet: Fleet, tables: Tables, latency: float, scenario: Scenario) -> list[str]:
    rig = Rig(fleet, latency, scenario.rate)
    try:
        async with AsyncDatabaseManager(rig.urls, order=ORDER, listeners=[rig.log],
                                        **{**CHECKOUT, **scenario.options}) as db:
            problems = []
            try:
                await scenario.run_async(db, rig, tables)
            except Exception as exc:
                step = f" (during {rig.step})" if rig.step else ""
                problems.append(describe(exc) + step)
            return problems + rig.verdict(db)
    finally:
        await asyncio.to_thread(rig.close)


def report(results: dict[str, list[str]]) -> None:
    failed = [f"- {name}: {'; '.join(problems)}" for name, problems in results.items() if problems]
    assert not failed, f"{len(failed)} of {len(results)} scenarios failed:\n" + "\n".join(failed)


@pytest.mark.parametrize(
    ("latency", "counters"),
    [(0.0, True), (0.01, True), (0.0, False)],
    ids=["loopback", "latency10ms", "loopback-no-tcp-counters"],
)
def test_healthy_work_is_never_abandoned(
    healthy_fleet: Fleet, tables: dict[str, Tables], latency: float, counters: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole catalogue on both managers at once: threads for sync, tasks for async.

    ``counters`` False: as on a platform without TCP_INFO, where the watchdog
    sees a call's progress only through psycopg waking on its socket.
    """
    if not counters:
        for module in (watchdog, provider):
            monkeypatch.setattr(module, "tcp_progress", lambda fd: None)
    for seed in (1, 2):
        vector_literals(VECTORS, seed)  # built (and cached) before the event loop runs

    async def async_catalogue() -> list[list[str]]:
        return await asyncio.gather(
            *(run_async(healthy_fleet, tables["async"], latency, s) for s in CATALOGUE))

    with ThreadPoolExecutor(len(CATALOGUE), thread_name_prefix="catalogue") as pool:
        futures = [pool.submit(run_sync, healthy_fleet, tables["sync"], latency, s)
                   for s in CATALOGUE]
        async_results = asyncio.run(async_catalogue())
    results = {f"sync: {s.name}": f.result() for s, f in zip(CATALOGUE, futures, strict=True)}
    results.update((f"async: {s.name}", problems)
                   for s, problems in zip(CATALOGUE, async_results, strict=True))
    report(results)

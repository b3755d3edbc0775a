"""The healthy path at the floor: µs per call the managers add over a plain pool, and the
watchdog's scan with 100 calls in flight.

    python -m bench --suite floor       # full run, updates bench/RESULTS.md (~2 min)
    python -m bench.floor [--quick]     # prints the tables only

1. ``SELECT 1`` on one embedded server, pools of 4 connections (min = max) for
   every client, interleaved rounds (the order rotates every round), 1 and 4
   threads (sync) or concurrent tasks (async). Clients: a plain autocommit
   ``psycopg_pool`` pool (``with pool.connection() as c: c.execute(...).fetchall()``),
   an identical twin of it (A/A: the noise floor), and the manager with two
   providers (the second one a second server, the hedge's target) with
   ``hedged_reads="off"`` and ``"on"``. No read is slower than ``hedge_after``
   here, so hedging must add no statement at all (counted).
2. The watchdog: 100 real calls in flight (``pg_sleep`` on 100 connections),
   each watched as a data-path call; the time of one scan of the watchdog
   thread (it runs under the watchdog's own lock, never the callers'), and of
   one ``watch`` + ``unwatch`` pair, a caller's per-call cost, beside them.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.watchdog import Watch, Watchdog
from agent_factory.testing.fleet import start_fleet
from bench import common
from bench.common import Progress, Series, interleaved, paired, run_alone, server_version
from bench.overhead import measure
from bench.report import row, section, signed, targets

PLAIN = "plain autocommit pool"
TWIN = "identical twin pool (A/A)"
OFF = "manager, hedging off"
ON = "manager, hedging on"
VARIANTS = (PLAIN, TWIN, OFF, ON)
ADDED_TARGET_US = 5.0


@dataclass
class FloorResult:
    rounds: int
    queries: int
    pg_version: str = "?"
    series: dict[tuple[str, str, int], Series] = field(default_factory=dict)  # kind, v, n
    extra_hedges: int = 0
    scan_us: float = 0.0
    watch_us: float = 0.0
    in_flight: int = 0

    def added(self, kind: str, variant: str, n: int, *, cpu: bool = False) -> float:
        """Median over rounds of (variant - plain) µs per call, measured in the same round."""
        return statistics.median(paired(self.series[(kind, variant, n)],
                                        self.series[(kind, PLAIN, n)], cpu=cpu))


def _manager_options(urls: list[str], hedging: str) -> dict[str, Any]:
    return {"providers": {"supabase": urls[0], "railway": urls[1]}, "hang_timeout": 2.0,
            "pool_min_size": 4, "pool_max_size": 4, "dotenv": None, "hedged_reads": hedging}


def sync_rounds(urls: list[str], res: FloorResult, warmup: int, progress: Progress) -> None:
    pools = [ConnectionPool(urls[0], min_size=4, max_size=4, kwargs={"autocommit": True})
             for _ in range(2)]
    dbs = {v: DatabaseManager(**_manager_options(urls, h)) for v, h in ((OFF, "off"),
                                                                       (ON, "on"))}
    try:
        for p in pools:
            p.wait()

        def via(p: ConnectionPool[Any]) -> Callable[[], Any]:
            def q() -> Any:
                with p.connection() as c:
                    return c.execute("SELECT 1").fetchall()
            return q

        fns = {PLAIN: via(pools[0]), TWIN: via(pools[1]),
               OFF: lambda: dbs[OFF].execute_query("SELECT 1"),
               ON: lambda: dbs[ON].execute_query("SELECT 1")}
        for threads in (1, 4):
            for v in VARIANTS:
                measure(fns[v], warmup, threads)
                res.series[("sync", v, threads)] = Series(v, threads)
            for v in interleaved(VARIANTS, res.rounds):
                res.series[("sync", v, threads)].add(*measure(fns[v], res.queries, threads))
            progress(f"floor, sync, {threads} thread(s): " + ", ".join(
                f"{v} {res.series[('sync', v, threads)].median:.1f} µs" for v in VARIANTS))
        res.extra_hedges += dbs[ON].get_hedge_stats()["hedges_sent"]
    finally:
        for p in pools:
            p.close()
        for db in dbs.values():
            db.close_all()


async def _timed(fn: Callable[[], Awaitable[Any]], n: int, tasks: int) -> tuple[float, float]:
    per = n // tasks

    async def work() -> None:
        for _ in range(per):
            await fn()

    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
    await asyncio.gather(*(work() for _ in range(tasks)))
    done = per * tasks
    return ((time.perf_counter_ns() - t0) / done / 1e3,
            (time.process_time_ns() - c0) / done / 1e3)


async def async_rounds(urls: list[str], res: FloorResult, warmup: int,
                       progress: Progress) -> None:
    pools = [AsyncConnectionPool(urls[0], min_size=4, max_size=4, open=False,
                                 kwargs={"autocommit": True}) for _ in range(2)]
    dbs = {v: AsyncDatabaseManager(**_manager_options(urls, h)) for v, h in ((OFF, "off"),
                                                                            (ON, "on"))}
    try:
        for p in pools:
            await p.open()
            await p.wait()
        for db in dbs.values():
            await db.open()

        def via(p: AsyncConnectionPool[Any]) -> Callable[[], Awaitable[Any]]:
            async def q() -> Any:
                async with p.connection() as c:
                    return await (await c.execute("SELECT 1")).fetchall()
            return q

        def on(db: AsyncDatabaseManager) -> Callable[[], Awaitable[Any]]:
            return lambda: db.execute_query("SELECT 1")

        fns = {PLAIN: via(pools[0]), TWIN: via(pools[1]), OFF: on(dbs[OFF]), ON: on(dbs[ON])}
        for tasks in (1, 4):
            for v in VARIANTS:
                await _timed(fns[v], warmup, tasks)
                res.series[("async", v, tasks)] = Series(v, tasks)
            for v in interleaved(VARIANTS, res.rounds):
                res.series[("async", v, tasks)].add(*await _timed(fns[v], res.queries, tasks))
            progress(f"floor, async, {tasks} task(s): " + ", ".join(
                f"{v} {res.series[('async', v, tasks)].median:.1f} µs" for v in VARIANTS))
        res.extra_hedges += dbs[ON].get_hedge_stats()["hedges_sent"]
    finally:
        for p in pools:
            await p.close()
        for db in dbs.values():
            await db.close()


class _Target:
    """The watchdog's view of a provider that never times out (the scan is measured)."""

    name = "floor"
    last_alive = 0.0
    hang_timeout = 1e9
    tracks_backends = True

    def request_probe(self, watch: Watch | None = None) -> None:
        return None


def scan_cost(url: str, res: FloorResult, calls: int = 100, scans: int = 300) -> None:
    conns = [psycopg.connect(url, autocommit=True) for _ in range(calls)]
    dog = Watchdog(probe_after=1e9)
    target = _Target()
    try:
        for c in conns:
            c.pgconn.send_query(b"SELECT pg_sleep(60)")
        watches = [dog.watch_call(c.pgconn, target, time.monotonic() - 1.0) for c in conns]
        times = []
        for _ in range(scans):
            with dog._cond:
                t0 = time.perf_counter_ns()
                dog._scan(time.monotonic(), [], [])
                times.append(time.perf_counter_ns() - t0)
        spare = conns[0].pgconn
        pairs = []
        for _ in range(scans):
            t0 = time.perf_counter_ns()
            dog.unwatch(dog.watch_call(spare, target))
            pairs.append(time.perf_counter_ns() - t0)
        res.scan_us = statistics.median(times) / 1e3
        res.watch_us = statistics.median(pairs) / 1e3
        res.in_flight = len(watches)
    finally:
        dog.close()
        for c in conns:
            c.close()


def run(quick: bool = False, progress: Progress = common.progress) -> FloorResult:
    # Rounds of 3000 queries (0.15-0.25 s each): with 1000 the 4-thread rows moved by
    # 5-10 µs from run to run, as much as the cost they measure.
    rounds, queries, warmup = (5, 500, 200) if quick else (20, 3000, 1000)
    res = FloorResult(rounds, queries)
    with start_fleet(("floor", "floorhedge"), prefix="bench-", proxy=False,
                     settings={"max_connections": "200"}) as servers:
        res.pg_version = server_version(servers)
        urls = [m.url for m in servers]
        sync_rounds(urls, res, warmup, progress)
        asyncio.run(async_rounds(urls, res, warmup, progress))
        progress("floor: watchdog scan with 100 calls in flight")
        scan_cost(urls[0], res)
    return res


# -- report ----------------------------------------------------------------------------


def render(res: FloorResult, header: list[str]) -> str:
    lines = ["## The healthy path at the floor", "", *header, ""]
    intro = (
        f"`SELECT 1` on one embedded server over loopback, pools of 4 (min = max) for every "
        f"client, {res.rounds} interleaved rounds of {res.queries} queries per client after a "
        "warm-up; with 4 threads (tasks) the queries are shared and the time is wall time / "
        "queries. The managers have two providers (the second, on another server, is the "
        "hedge's target). *added* is the median over rounds of the client's µs per query "
        "minus the plain pool's in the same round."
    )
    table = ["| kind | threads / tasks | client | median µs/query | added µs/query | "
             "ratio to plain | CPU µs added |", "|---|---:|---|---:|---:|---:|---:|"]
    for (kind, v, n), s in res.series.items():
        plain = res.series[(kind, PLAIN, n)]
        added = "—" if v == PLAIN else signed(res.added(kind, v, n))
        cpu = "—" if v == PLAIN else signed(res.added(kind, v, n, cpu=True))
        table.append(row(kind, n, v, f"{s.median:.1f}", added,
                         f"{s.median / plain.median:.2f}×", cpu))
    scan = (
        f"Watchdog with {res.in_flight} calls in flight (each a `pg_sleep` on its own "
        f"connection, watched as a data-path call): one scan of the watchdog thread takes "
        f"{res.scan_us:.0f} µs ({res.scan_us / max(res.in_flight, 1):.2f} µs per call: it "
        "reads each waiting call's TCP counters), under the watchdog's own lock, which the "
        f"callers never take; a caller's `watch` + `unwatch` pair beside them costs "
        f"{res.watch_us:.2f} µs (a set add and discard, whatever the number in flight). "
        f"Statements the hedging manager sent to the second provider during these rounds: "
        f"{res.extra_hedges}."
    )
    lines += section("", intro, table, scan)[2:]
    lines += section("### Targets", targets(_targets(res)))
    return "\n".join(lines)


def _targets(res: FloorResult) -> list[tuple[str, str, bool]]:
    out = []
    for kind in ("sync", "async"):
        for n in (1, 4):
            off = res.added(kind, OFF, n)
            out.append((f"{kind}, {n}: manager without hedging adds ≤ {ADDED_TARGET_US:g} µs",
                        f"{off:+.1f} µs", off <= ADDED_TARGET_US))
            added = res.added(kind, ON, n)
            aa = abs(res.added(kind, TWIN, n))
            out.append((f"{kind}, {n}: hedging manager adds ≤ {ADDED_TARGET_US:g} µs per call",
                        f"{added:+.1f} µs (A/A {res.added(kind, TWIN, n):+.1f} µs)",
                        added <= ADDED_TARGET_US))
            out.append((f"{kind}, {n}: within the A/A noise (at most twice the twin's distance)",
                        f"{added:+.1f} µs vs {aa:.1f} µs", abs(added) <= max(aa, 1.0) * 2))
    out.append(("hedging adds 0 statements when no read is slower than hedge_after",
                str(res.extra_hedges), res.extra_hedges == 0))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_alone(__doc__ or "", run, render, "fewer, shorter rounds", argv)


if __name__ == "__main__":
    raise SystemExit(main())

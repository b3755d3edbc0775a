"""Resilience benchmarks: open-breaker skip cost, ``nearest`` read routing, async overhead.

    python -m bench --suite resilience     # full run, updates bench/RESULTS.md (~1 min)
    python -m bench.resilience [--quick]     # prints the tables only

1. **Skipping an open breaker.** Three embedded servers. The primary
   (supabase) is killed and stays dead; the manager marks it down and, with
   ``probe_interval=3600``, never probes it during the run. ``SELECT 1`` is
   then served by railway. Compared, in interleaved rounds, with a manager
   whose primary *is* railway (order railway, neon, supabase; same options
   and pool sizes), an identical twin of it (A/A, the noise floor), and the
   first manager switched to railway with ``set_provider`` (same manager,
   same pool, same server backend as the skipping case).
2. **``nearest`` routing.** The three servers behind `FaultProxy` instances
   adding 20 ms (supabase, the primary), 5 ms (railway) and 1 ms (neon) of
   one-way latency; ``read_routing="nearest"``, ``monitor_interval=0.2``.
   Once the probes have measured the latencies, 200 ``db.read("SELECT
   inet_server_port()")``: which server answered each. A manager with the
   default ``primary`` policy is the baseline.
3. **Async overhead.** ``AsyncDatabaseManager.execute_query("SELECT 1")``
   against a plain ``psycopg_pool.AsyncConnectionPool`` of autocommit
   connections and an identical twin of that pool (A/A), same pool sizes,
   interleaved rounds, 1 task and 4 concurrent tasks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import PROVIDERS, Fleet
from bench import common
from bench.common import (
    Progress,
    Series,
    fleet,
    interleaved,
    paired,
    run_alone,
    server_version,
    wait_for,
)
from bench.report import section, signed, targets

SKIP_TARGET_US = 50.0
ASYNC_TARGET = 1.10
NEAREST_ONE_WAY_MS = {"supabase": 20.0, "railway": 5.0, "neon": 1.0}
NEAREST_READS = 200
BASELINE_READS = 50
PORT_QUERY = "SELECT inet_server_port()"


# -- measuring ----------------------------------------------------------------------


def measure_sync(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """Wall µs and process CPU µs per call, ``n`` calls in a row."""
    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    wall = time.perf_counter_ns() - t0
    cpu = time.process_time_ns() - c0
    return wall / n / 1e3, cpu / n / 1e3


def _quiet_primary_switch(record: logging.LogRecord) -> bool:
    """Drop the 'primary set to ...' lines that set_provider logs between rounds."""
    msg = str(record.msg)
    return not (msg.startswith("primary set to") or msg.startswith("primary provider set to"))


# -- 1. skipping an open breaker -----------------------------------------------------

SKIP = "primary's breaker open, served by railway"
DIRECT = "railway is the primary (second manager)"
TWIN = "railway is the primary (third manager, identical twin of the second: A/A)"
SWITCH = "first manager with railway made primary by set_provider (same pool)"
SKIP_VARIANTS = (SKIP, DIRECT, TWIN, SWITCH)


@dataclass
class SkipResult:
    rounds: int
    queries: int
    warmup: int
    pool_size: int
    series: dict[str, Series]
    served_by: dict[str, str]
    breaker: str  # the primary's breaker state in the first manager, at the end
    primary_errors: int  # failures the first manager recorded for the primary

    def extra_us(self, peer: str = DIRECT, *, cpu: bool = False) -> float:
        return statistics.median(paired(self.series[SKIP], self.series[peer], cpu=cpu))


def _wait(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> float:
    took = wait_for(cond, timeout, step)
    if took is None:
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
    return took


def _select1(m: DatabaseManager) -> Callable[[], Any]:
    return lambda: m.execute_query("SELECT 1")


# The first manager's primary is killed; the second and its twin start at railway.
SKIP_ORDERS = (
    ("supabase", "railway", "neon"),
    ("railway", "neon", "supabase"),
    ("railway", "neon", "supabase"),
)
SKIP_OPTIONS: dict[str, Any] = {"hang_timeout": 2.0, "probe_interval": 3600.0, "dotenv": None}
# Per variant: what to do before its rounds, and the manager to query.
Plan = dict[str, tuple[Callable[[], None], DatabaseManager]]


def breaker_skip(
    f: Fleet, *, rounds: int, queries: int, warmup: int, progress: Progress
) -> SkipResult:
    pool_size = 1
    managers: list[DatabaseManager] = []
    switch_filter = logging.getLogger("agent_factory.core.database_manager")
    switch_filter.addFilter(_quiet_primary_switch)
    try:
        for order in SKIP_ORDERS:
            managers.append(DatabaseManager(f.urls(), order=list(order), pool_min_size=pool_size,
                                            pool_max_size=pool_size, **SKIP_OPTIONS))
        for m in managers:
            m.execute_query("SELECT 1")
        first = managers[0]
        _open_primary_breaker(f, first)
        plan = _skip_plan(*managers)
        served_by = _served_and_warmed(plan, f.port_names(), warmup)
        series = _skip_rounds(plan, rounds, queries)
        first.set_provider("supabase")
        stats = first.get_provider_stats()["supabase"]
        result = SkipResult(rounds, queries, warmup, pool_size, series, served_by,
                            str(stats["breaker"]), int(stats["errors"]))
        progress(
            "breaker skip: "
            + ", ".join(f"{v.split(' (')[0]} {series[v].median:.1f} µs" for v in SKIP_VARIANTS)
            + f"; extra {result.extra_us():+.1f} µs (same pool {result.extra_us(SWITCH):+.1f})"
        )
        return result
    finally:
        for m in managers:
            m.close_all()
        switch_filter.removeFilter(_quiet_primary_switch)
        if not f["supabase"].server.is_running():
            f["supabase"].server.start()


def _open_primary_breaker(f: Fleet, first: DatabaseManager) -> None:
    """Kill the first manager's primary (for good) and wait until its breaker is open."""
    f["supabase"].server.kill()
    first.execute_query("SELECT 1")  # finds the primary dead, marks it down
    _wait(lambda: first.get_provider_stats()["supabase"]["breaker"] == "open", 10.0,
          "the primary's breaker to open")


def _skip_plan(first: DatabaseManager, second: DatabaseManager,
               third: DatabaseManager) -> Plan:
    """The variants: the first manager set to supabase (skip) or railway (same pool)."""

    def on(primary: str) -> Callable[[], None]:
        def prepare() -> None:
            if first.primary_provider != primary:
                first.set_provider(primary)
        return prepare

    return {
        SKIP: (on("supabase"), first),
        DIRECT: (lambda: None, second),
        TWIN: (lambda: None, third),
        SWITCH: (on("railway"), first),
    }


def _served_and_warmed(plan: Plan, ports: dict[int, str], warmup: int) -> dict[str, str]:
    """Which server answers each variant; then ``warmup`` queries of each."""
    served_by: dict[str, str] = {}
    for v in SKIP_VARIANTS:
        prepare, m = plan[v]
        prepare()
        row = m.execute_query(PORT_QUERY, fetch_mode="one")
        served_by[v] = ports.get(int(row[0]), "?")
        measure_sync(_select1(m), warmup)
    return served_by


def _skip_rounds(plan: Plan, rounds: int, queries: int) -> dict[str, Series]:
    """``rounds`` interleaved rounds of ``queries`` queries per variant."""
    series = {v: Series(v) for v in SKIP_VARIANTS}
    for v in interleaved(SKIP_VARIANTS, rounds):
        prepare, m = plan[v]
        prepare()
        series[v].add(*measure_sync(_select1(m), queries))
    return series


# -- 2. nearest routing ---------------------------------------------------------------


@dataclass
class RoutingRun:
    policy: str
    reads: int
    served: dict[str, int]
    read_ms: list[float]
    latency: dict[str, tuple[float | None, float | None]]  # avg, p99 ms at the reads' start
    latency_after: dict[str, tuple[float | None, float | None]]
    errors: int
    settled: float  # seconds waited for the moving averages to settle


    def share(self, name: str) -> float:
        return self.served.get(name, 0) / self.reads if self.reads else 0.0


@dataclass
class NearestResult:
    one_way_ms: dict[str, float]
    rtt_ms: dict[str, float]  # median plain SELECT 1 round trip through each proxy
    settle: float
    nearest: RoutingRun
    baseline: RoutingRun


def _latencies(db: DatabaseManager) -> dict[str, tuple[float | None, float | None]]:
    return {
        n: (s["latency_avg_ms"], s["latency_p99_ms"]) for n, s in db.get_provider_stats().items()
    }


def _settle(db: DatabaseManager, limit: float, every: float = 0.5) -> float:
    """Wait until no provider's latency average moves by > 3 % (or 0.3 ms) in ``every`` s.

    The moving average starts at the first probe, which may be slow (a cold
    connection); at most ``limit`` s.
    """
    t0 = time.monotonic()
    prev = _latencies(db)
    while time.monotonic() - t0 < limit:
        time.sleep(every)
        now = _latencies(db)
        steady = all(
            a is not None and b is not None and abs(a - b) <= max(0.03 * a, 0.3)
            for (a, _), (b, _) in zip(now.values(), prev.values(), strict=True)
        )
        prev = now
        if steady:
            break
    return time.monotonic() - t0


def _routing_run(
    urls: dict[str, str], ports: dict[int, str], policy: str, reads: int, settle: float
) -> RoutingRun:
    db = DatabaseManager(
        urls,
        order=list(PROVIDERS),
        read_routing=policy,
        monitor_interval=0.2,
        pool_min_size=1,
        pool_max_size=2,
        dotenv=None,
    )
    try:
        _wait(lambda: all(v[0] is not None for v in _latencies(db).values()), 20.0,
              "every provider's latency to be measured")
        settled = _settle(db, settle)
        before = _latencies(db)
        served: collections.Counter[str] = collections.Counter()
        read_ms: list[float] = []
        errors = 0
        for _ in range(reads):
            t0 = time.perf_counter()
            try:
                row = db.read(PORT_QUERY, fetch_mode="one")
            except Exception:
                errors += 1
                continue
            read_ms.append((time.perf_counter() - t0) * 1e3)
            served[ports.get(int(row[0]), "?")] += 1
        return RoutingRun(policy, reads, dict(served), read_ms, before, _latencies(db), errors,
                          settled)
    finally:
        db.close_all()


def _round_trip_ms(url: str, n: int = 15) -> float:
    """Median ``SELECT 1`` round trip on a plain connection (after a warm-up)."""
    with psycopg.connect(url, autocommit=True, prepare_threshold=None) as conn:
        conn.execute("SELECT 1").fetchall()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchall()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def nearest_routing(f: Fleet, *, settle: float, progress: Progress) -> NearestResult:
    proxies: dict[str, FaultProxy] = {}
    try:
        for n in PROVIDERS:
            p = FaultProxy(f[n].server.host, f[n].server.port)
            proxies[n] = p
            p.start()
            p.set_latency(NEAREST_ONE_WAY_MS[n] / 1e3)
        urls = {n: proxies[n].url_for(f[n].url) for n in PROVIDERS}
        ports = f.port_names()
        rtt = {n: _round_trip_ms(urls[n]) for n in PROVIDERS}
        nearest = _routing_run(urls, ports, "nearest", NEAREST_READS, settle)
        progress(
            "nearest: "
            + ", ".join(f"{n} {nearest.served.get(n, 0)}" for n in PROVIDERS)
            + " reads; latency "
            + ", ".join(f"{n} {nearest.latency[n][0]} ms" for n in PROVIDERS)
        )
        baseline = _routing_run(urls, ports, "primary", BASELINE_READS, settle)
        return NearestResult(dict(NEAREST_ONE_WAY_MS), rtt, settle, nearest, baseline)
    finally:
        for p in proxies.values():
            p.close()


# -- 3. async overhead ----------------------------------------------------------------

AMANAGER = "AsyncDatabaseManager"
APLAIN = "plain AsyncConnectionPool (autocommit)"
ATWIN = "plain AsyncConnectionPool, identical twin pool (A/A)"
ASYNC_VARIANTS = (AMANAGER, APLAIN, ATWIN)


@dataclass
class AsyncResult:
    rounds: int
    queries: int
    warmup: int
    pool_size: int
    series: dict[tuple[str, int], Series]

    def ratio(self, tasks: int, variant: str = AMANAGER) -> float:
        return self.series[(variant, tasks)].median / self.series[(APLAIN, tasks)].median

    def paired_ratio(self, tasks: int, variant: str = AMANAGER) -> float:
        return statistics.median(
            paired(self.series[(variant, tasks)], self.series[(APLAIN, tasks)], ratio=True)
        )

    @property
    def tasks(self) -> list[int]:
        return sorted({t for (_, t) in self.series})


async def _measure_async(fn: Callable[[], Awaitable[Any]], n: int, tasks: int) -> tuple[
    float, float
]:
    per = n // tasks

    async def work() -> None:
        for _ in range(per):
            await fn()

    c0 = time.process_time_ns()
    t0 = time.perf_counter_ns()
    if tasks == 1:
        await work()
    else:
        await asyncio.gather(*(work() for _ in range(tasks)))
    wall = time.perf_counter_ns() - t0
    cpu = time.process_time_ns() - c0
    done = per * tasks
    return wall / done / 1e3, cpu / done / 1e3


async def _async_overhead(
    url: str, rounds: int, queries: int, warmup: int, pool_size: int, progress: Progress
) -> AsyncResult:
    db = AsyncDatabaseManager(
        {"supabase": url},
        hang_timeout=2.0,
        pool_min_size=pool_size,
        pool_max_size=pool_size,
        dotenv=None,
    )
    pools: list[AsyncConnectionPool[Any]] = []
    try:
        await db.open()
        for _ in range(2):
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                url, min_size=pool_size, max_size=pool_size,
                kwargs={"autocommit": True}, open=False,
            )
            pools.append(pool)
            await pool.open()
            await pool.wait()
        plain, twin = pools

        async def q_manager() -> Any:
            return await db.execute_query("SELECT 1")

        def via(p: AsyncConnectionPool[Any]) -> Callable[[], Awaitable[Any]]:
            async def q() -> Any:
                async with p.connection() as c:
                    return await (await c.execute("SELECT 1")).fetchall()
            return q

        fns = {AMANAGER: q_manager, APLAIN: via(plain), ATWIN: via(twin)}
        series: dict[tuple[str, int], Series] = {}
        for tasks in (1, 4):
            for v in ASYNC_VARIANTS:
                await _measure_async(fns[v], warmup, tasks)
                series[(v, tasks)] = Series(v)
            for v in interleaved(ASYNC_VARIANTS, rounds):
                series[(v, tasks)].add(*await _measure_async(fns[v], queries, tasks))
            progress(
                f"async, {tasks} task(s): "
                + ", ".join(f"{v.split(' (')[0]} {series[(v, tasks)].median:.1f} µs"
                            for v in ASYNC_VARIANTS)
            )
        return AsyncResult(rounds, queries, warmup, pool_size, series)
    finally:
        for p in pools:
            await p.close()
        await db.close()


def async_overhead(
    url: str, *, rounds: int, queries: int, warmup: int, progress: Progress, pool_size: int = 4
) -> AsyncResult:
    return asyncio.run(_async_overhead(url, rounds, queries, warmup, pool_size, progress))


# -- the suite ------------------------------------------------------------------------


@dataclass
class Config:
    skip_rounds: int
    skip_queries: int
    skip_warmup: int
    settle: float
    async_rounds: int
    async_queries: int
    async_warmup: int


FULL = Config(30, 1000, 1000, 10.0, 30, 1000, 1000)
QUICK = Config(6, 400, 200, 4.0, 5, 400, 200)


@dataclass
class ResilienceResult:
    config: Config
    pg_version: str
    skip: SkipResult
    nearest: NearestResult
    asyncr: AsyncResult
    rusage_maxrss_mb: float = 0.0


def run(quick: bool = False, progress: Progress = common.progress) -> ResilienceResult:
    cfg = QUICK if quick else FULL
    with fleet("bench-res") as f:
        pg_version = server_version(f)
        progress("resilience 1/3: cost of skipping an open breaker")
        skip = breaker_skip(f, rounds=cfg.skip_rounds, queries=cfg.skip_queries,
                            warmup=cfg.skip_warmup, progress=progress)
        progress("resilience 2/3: nearest read routing behind latency proxies")
        nearest = nearest_routing(f, settle=cfg.settle, progress=progress)
        progress("resilience 3/3: async overhead")
        asyncr = async_overhead(f["railway"].url, rounds=cfg.async_rounds,
                                queries=cfg.async_queries, warmup=cfg.async_warmup,
                                progress=progress)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return ResilienceResult(cfg, pg_version, skip, nearest, asyncr, rss)


# -- Markdown -----------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.1f}"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def render(res: ResilienceResult, header: list[str]) -> str:
    return "\n".join([
        *section("## Resilience: breakers, routing, async", header),
        *_skip_section(res.skip),
        *_nearest_section(res),
        *_async_section(res.asyncr),
        *_targets_section(res),
    ])


def _skip_section(s: SkipResult) -> list[str]:
    intro = (
        "Three embedded servers. The first manager has order supabase, railway, neon; "
        "supabase (its primary) was killed (SIGKILL, kept dead), the manager marked it "
        f"down on the next query and its breaker stayed **{s.breaker}** for the whole run "
        f"(`probe_interval=3600`, so no probe ran; {s.primary_errors} failure(s) recorded). "
        "The second and third managers have order railway, neon, supabase. All: "
        f"`hang_timeout=2.0`, pools of {s.pool_size} connection per provider (min = max), "
        "other settings at their defaults. `execute_query(\"SELECT 1\")`, one thread, "
        f"{s.warmup} warm-up queries per variant, then {s.rounds} rounds of {s.queries} "
        "queries per variant, interleaved (the order rotates every round). The last row "
        "switches the first manager's primary with `set_provider` before its rounds (and "
        "back to supabase before the skipping rounds), so both use the very same pooled "
        "connection to railway and the pool-to-pool noise drops out."
    )
    table = [
        "| variant | served by | median µs/query | fastest–slowest round | CPU µs/query | "
        "Δ vs second manager, per round (median) | Δ CPU vs second manager |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = s.series[DIRECT]
    for v in SKIP_VARIANTS:
        x = s.series[v]
        delta = "—" if v == DIRECT else f"{signed(statistics.median(paired(x, base)))} µs"
        dcpu = "—" if v == DIRECT else f"{signed(statistics.median(paired(x, base, cpu=True)))} µs"
        table.append(f"| {v} | {s.served_by.get(v, '?')} | {x.median:.1f} | {min(x.samples):.0f}–"
                     f"{max(x.samples):.0f} | {x.cpu_median:.1f} | {delta} | {dcpu} |")
    same = s.extra_us(SWITCH)
    same_cpu = s.extra_us(SWITCH, cpu=True)
    twin = statistics.median(paired(s.series[TWIN], base))
    reading = (
        f"Extra cost of the skip: **{signed(s.extra_us())} µs** per query against the second "
        f"manager ({signed(s.extra_us(cpu=True))} µs CPU); against the same manager and pool "
        f"{signed(same)} µs ({signed(same_cpu)} µs CPU). The A/A twin differs from the second "
        f"manager by {signed(twin)} µs: differences of that size are noise. The open breaker is "
        "checked when the route is built: skipping it costs no connection attempt and no "
        "network round trip."
    )
    return section("### Cost of skipping an open breaker", intro, table, reading)


def _nearest_section(res: ResilienceResult) -> list[str]:
    n = res.nearest
    intro = (
        "The three servers behind `FaultProxy` instances that delay every chunk by "
        + ", ".join(f"{NEAREST_ONE_WAY_MS[k]:g} ms ({k})" for k in PROVIDERS)
        + " in each direction; supabase is the primary and neon is last in the failover "
        "order. Manager: `read_routing=\"nearest\"`, `monitor_interval=0.2`, pools 1–2, "
        "otherwise defaults. Once every provider had a measured latency, the run waited "
        "until no average moved by more than 3 % (or 0.3 ms) in 0.5 s, since the average "
        f"starts at the first probe ({n.nearest.settled:.1f} s here, at most {n.settle:g} s), "
        "then "
        f"{n.nearest.reads} × `db.read(\"SELECT inet_server_port()\", fetch_mode=\"one\")` "
        "one after the other; the port says which server answered. Baseline: the same "
        f"with the default `read_routing=\"primary\"` ({n.baseline.reads} reads)."
    )
    table = [
        "| provider | one-way delay added | plain `SELECT 1` round trip, median ms | "
        "latency_avg_ms at the reads' start | ÷ round trip | latency_p99_ms | "
        "latency_avg_ms after the reads | reads served (nearest) | "
        "reads served (primary policy) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k in PROVIDERS:
        avg, p99 = n.nearest.latency[k]
        after = n.nearest.latency_after[k][0]
        rtt = n.rtt_ms[k]
        per = "—" if avg is None else f"{avg / rtt:.1f}"
        table.append(
            f"| {k} | {NEAREST_ONE_WAY_MS[k]:g} ms | {rtt:.1f} | {_ms(avg)} | {per} | "
            f"{_ms(p99)} | {_ms(after)} | {n.nearest.served.get(k, 0)} "
            f"({100 * n.nearest.share(k):.0f}%) | {n.baseline.served.get(k, 0)} |"
        )
    return section("### `nearest` read routing", intro, table, _read_latency(n))


def _read_latency(n: NearestResult) -> str | None:
    nr, br = n.nearest.read_ms, n.baseline.read_ms
    if not (nr and br):
        return None
    return (
        f"Read latency: median {statistics.median(nr):.1f} ms, p99 {_pct(nr, 0.99):.1f} ms "
        f"with `nearest`; median {statistics.median(br):.1f} ms, p99 {_pct(br, 0.99):.1f} ms "
        "with `primary`. Failed reads: "
        f"{n.nearest.errors} (nearest), {n.baseline.errors} (primary). *latency_avg_ms* "
        "and *latency_p99_ms* are the manager's own figures (`get_provider_stats()`: a "
        "moving average of its health probes' round trips, and the p99 of the last 200 "
        "probes); *÷ round trip* compares the average with a plain `SELECT 1` through "
        "the same proxy (1.0: a probe costs one round trip)."
    )


def _async_section(a: AsyncResult) -> list[str]:
    intro = (
        f"`SELECT 1` on one embedded server (railway's), same event loop, pools of "
        f"{a.pool_size} connections (min = max) for every client: "
        "`AsyncDatabaseManager({\"supabase\": url}, hang_timeout=2.0)` with "
        "`await db.execute_query(\"SELECT 1\")`; a plain `AsyncConnectionPool(url, "
        "kwargs={\"autocommit\": True})` with `async with pool.connection() as c: await "
        "(await c.execute(\"SELECT 1\")).fetchall()`; and an identical twin of that pool "
        f"(A/A, the noise floor). {a.warmup} warm-up queries per client, then {a.rounds} "
        f"rounds of {a.queries} queries per client, interleaved (the order rotates every "
        "round). With 4 tasks the queries are shared by 4 concurrent tasks (`asyncio.gather`) "
        "and the time is wall time / queries."
    )
    table = [
        "| client | tasks | median µs/query | fastest–slowest round | CPU µs/query | "
        "vs plain pool (ratio of medians) | per-round ratio, median |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in a.tasks:
        p = a.series[(APLAIN, t)]
        for v in ASYNC_VARIANTS:
            x = a.series[(v, t)]
            pr = "—" if v == APLAIN else f"{a.paired_ratio(t, v):.2f}×"
            table.append(f"| {v} | {t} | {x.median:.1f} | {min(x.samples):.0f}–"
                         f"{max(x.samples):.0f} | {x.cpu_median:.1f} | "
                         f"{x.median / p.median:.2f}× | {pr} |")
    cpu = []
    for t in a.tasks:
        m, p, w = (a.series[(v, t)] for v in ASYNC_VARIANTS)
        cpu.append(
            f"- {t} task(s): the manager uses "
            f"{signed(statistics.median(paired(m, p, cpu=True)))} µs "
            f"CPU per query more than the plain pool (per-round median); the twin pool "
            f"{signed(statistics.median(paired(w, p, cpu=True)))} µs."
        )
    return section("### Async overhead", intro, table, cpu)


def _targets_section(res: ResilienceResult) -> list[str]:
    s, n, a = res.skip, res.nearest, res.asyncr
    same, extra = s.extra_us(SWITCH), s.extra_us()
    nearest_name = min(NEAREST_ONE_WAY_MS, key=lambda k: NEAREST_ONE_WAY_MS[k])
    share = n.nearest.share(nearest_name)
    rows = [
        (f"skipping an open breaker costs < {SKIP_TARGET_US:g} µs per query",
         f"{signed(extra)} µs (same pool: {signed(same)} µs)",
         extra < SKIP_TARGET_US and same < SKIP_TARGET_US),
        (f"`nearest` reads go to the lowest-latency provider ({nearest_name}, "
         f"{NEAREST_ONE_WAY_MS[nearest_name]:g} ms)",
         f"{100 * share:.1f}% of {n.nearest.reads} reads", share == 1.0),
    ]
    for t in a.tasks:
        ratio, per_round = a.ratio(t), a.paired_ratio(t)
        rows.append((f"async overhead ≤ {ASYNC_TARGET:.2f}× plain pool ({t} task(s))",
                     f"{ratio:.2f}× (per-round median {per_round:.2f}×; A/A twin "
                     f"{a.ratio(t, ATWIN):.2f}×)", ratio <= ASYNC_TARGET))
    return section("### Targets", targets(rows))


def main(argv: list[str] | None = None) -> int:
    return run_alone(__doc__, run, render, "fewer rounds (< 40 s)", argv)


if __name__ == "__main__":
    sys.exit(main())

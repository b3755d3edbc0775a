"""Per-query overhead of ``DatabaseManager.execute_query`` against a plain pool.

Three ways to run ``SELECT 1`` on the same server, in the same process, with
pools of the same size:

* ``manager``: ``DatabaseManager.execute_query("SELECT 1")`` (one provider);
* ``plain-autocommit``: a psycopg_pool ``ConnectionPool`` of autocommit
  connections, the like-for-like peer (the manager runs single statements in
  autocommit mode too);
* ``plain-default``: the default pool usage, where psycopg wraps the
  statement in BEGIN ... COMMIT (two more round trips).

Runs are interleaved (the order rotates every round) so slow drifts of the
shared machine hit all variants alike; the median over rounds is reported.
"""

from __future__ import annotations

import resource
import statistics
import threading
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from psycopg_pool import ConnectionPool

from agent_factory.core.database_manager import DatabaseManager
from bench.common import Series, interleaved, paired

Query = Callable[[], Any]

MANAGER = "manager"
PARKED = "manager, watchdog never woken (diagnostic)"
PLAIN_AC = "plain-autocommit"
TWIN = "plain-autocommit, identical twin pool (A/A)"
PLAIN_TX = "plain-default"
VARIANTS = (MANAGER, PARKED, PLAIN_AC, TWIN, PLAIN_TX)


@dataclass
class OverheadResult:
    rounds: int
    queries: int
    warmup: int
    pool_size: int
    series: dict[tuple[str, int], Series]

    def ratio(self, threads: int, variant: str = MANAGER, peer: str = PLAIN_AC) -> float:
        return self.series[(variant, threads)].median / self.series[(peer, threads)].median

    def paired_ratios(
        self, threads: int, variant: str = MANAGER, peer: str = PLAIN_AC
    ) -> list[float]:
        """variant/peer per round (both measured close together in that round)."""
        return paired(self.series[(variant, threads)], self.series[(peer, threads)], ratio=True)


def _serial(fn: Query, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - t0) / n / 1e3


def _threaded(fn: Query, n: int, threads: int) -> float:
    """Wall time per query with ``threads`` threads sharing ``n`` queries."""
    per = n // threads
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(per):
            fn()

    pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter_ns()
    for t in pool:
        t.join()
    return (time.perf_counter_ns() - t0) / (per * threads) / 1e3


def measure(fn: Query, n: int, threads: int) -> tuple[float, float, float]:
    """Per query: wall µs, process CPU µs, context switches (all threads of the process)."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    c0 = time.process_time_ns()
    wall = _serial(fn, n) if threads == 1 else _threaded(fn, n, threads)
    cpu = time.process_time_ns() - c0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    done = n if threads == 1 else (n // threads) * threads
    switches = (r1.ru_nvcsw - r0.ru_nvcsw) + (r1.ru_nivcsw - r0.ru_nivcsw)
    return wall, cpu / done / 1e3, switches / done


def _liveness(provider: Any) -> Any:
    """What the watchdog watches for a provider (its health object, or itself)."""
    return getattr(provider, "health", provider)


def _manager(url: str, pool_size: int, *, parked: bool = False) -> DatabaseManager:
    manager = DatabaseManager(
        providers={"supabase": url},
        hang_timeout=2.0,
        pool_min_size=pool_size,
        pool_max_size=pool_size,
        dotenv=None,
    )
    if parked:
        # Diagnostic only: a watch parked far in the future keeps the
        # watchdog's set non-empty, so Watchdog.watch() never notifies (wakes)
        # the watchdog thread. Hang detection is unchanged otherwise.
        target = _liveness(manager.providers["supabase"])
        manager._watchdog.watch(-1, target, time.monotonic() + 1e9)
    return manager


def make_queries(url: str, pool_size: int) -> tuple[dict[str, Query], Callable[[], None]]:
    """The variants, and a function closing everything they opened."""
    manager = _manager(url, pool_size)
    parked = _manager(url, pool_size, parked=True)
    plain_ac: ConnectionPool[Any] = ConnectionPool(
        url, min_size=pool_size, max_size=pool_size, kwargs={"autocommit": True}, open=True
    )
    twin: ConnectionPool[Any] = ConnectionPool(
        url, min_size=pool_size, max_size=pool_size, kwargs={"autocommit": True}, open=True
    )
    plain_tx: ConnectionPool[Any] = ConnectionPool(
        url, min_size=pool_size, max_size=pool_size, open=True
    )
    for pool in (plain_ac, twin, plain_tx):
        pool.wait()

    def q_manager() -> Any:
        return manager.execute_query("SELECT 1")

    def q_parked() -> Any:
        return parked.execute_query("SELECT 1")

    def q_plain_ac() -> Any:
        with plain_ac.connection() as c:
            return c.execute("SELECT 1").fetchall()

    def q_twin() -> Any:
        with twin.connection() as c:
            return c.execute("SELECT 1").fetchall()

    def q_plain_tx() -> Any:
        with plain_tx.connection() as c:
            return c.execute("SELECT 1").fetchall()

    def close() -> None:
        manager.close_all()
        parked.close_all()
        plain_ac.close()
        twin.close()
        plain_tx.close()

    fns = {
        MANAGER: q_manager,
        PARKED: q_parked,
        PLAIN_AC: q_plain_ac,
        TWIN: q_twin,
        PLAIN_TX: q_plain_tx,
    }
    return fns, close


def run(
    url: str,
    *,
    rounds: int,
    queries: int,
    warmup: int,
    thread_counts: tuple[int, ...] = (1, 4),
    pool_size: int = 4,
    progress: Callable[[str], None] = print,
) -> OverheadResult:
    fns, close = make_queries(url, pool_size)
    series: dict[tuple[str, int], Series] = {}
    try:
        for threads in thread_counts:
            for name in VARIANTS:
                measure(fns[name], warmup, threads)  # warm-up: pools full, caches hot
                series[(name, threads)] = Series(name, threads)
            for name in interleaved(VARIANTS, rounds):
                series[(name, threads)].add(*measure(fns[name], queries, threads))
            progress(
                f"overhead, {threads} thread(s): "
                + ", ".join(f"{v} {series[(v, threads)].median:.1f} µs" for v in VARIANTS)
            )
    finally:
        close()
    return OverheadResult(rounds, queries, warmup, pool_size, series)


def _manager_fetch_all() -> Callable[[Any], Any]:
    """The function the manager applies to the cursor for ``fetch_mode="all"``."""
    from agent_factory.engine import provider

    fetchers = getattr(provider, "FETCHERS", None)
    if fetchers is None:  # older layout: the manager module held them
        from agent_factory.core import database_manager

        fetchers = database_manager._FETCHERS  # type: ignore[attr-defined]
    fetch: Callable[[Any], Any] = fetchers["all"]
    return fetch


def python_costs(url: str, number: int = 20000) -> dict[str, float]:
    """CPU µs of the pieces the manager adds or replaces, without network I/O.

    Best of 5 timeit runs, watchdog parked so no thread is woken. The
    dispatch row runs ``execute_query`` with the provider's ``run`` replaced
    by a no-op on a throwaway manager.
    """
    manager = _manager(url, 1, parked=True)
    plain: ConnectionPool[Any] = ConnectionPool(
        url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True
    )
    plain.wait()
    provider = manager.providers["supabase"]
    target = _liveness(provider)
    watchdog = manager._watchdog
    try:
        manager.execute_query("SELECT 1")
        with plain.connection() as conn:
            cur = conn.execute("SELECT 1")
            cur.fetchall()

        def pool_ctx() -> None:
            with plain.connection():
                pass

        def checkout() -> None:
            pool, c = provider.checkout()
            pool.putconn(c)

        def watch() -> None:
            watchdog.unwatch(watchdog.watch(0, target))

        fetch_all = _manager_fetch_all()

        def plain_fetch() -> None:
            cur.fetchall()

        def manager_fetch() -> None:
            fetch_all(cur)

        def t(fn: Callable[[], None]) -> float:
            best = min(timeit.repeat(fn, number=number, repeat=5, timer=time.process_time))
            return best / number * 1e6

        out = {
            "plain pool: `with pool.connection()` enter + exit": t(pool_ctx),
            "manager: `provider.checkout()` + `putconn` (incl. dead-socket select())": t(checkout),
            "manager: watchdog `watch` + `unwatch` (thread not woken)": t(watch),
            "plain pool: `cursor.fetchall()` (result already consumed)": t(plain_fetch),
            "manager: its fetch function for fetch_mode='all' (same cursor)": t(manager_fetch),
        }
        provider.run = lambda *args, **kwargs: None  # type: ignore[method-assign]
        out["manager: `execute_query` dispatch around `provider.run` (routing, events)"] = t(
            lambda: manager.execute_query("SELECT 1")
        )
        return out
    finally:
        manager.close_all()
        plain.close()


@dataclass
class SameBackendRow:
    name: str
    wall: float  # median µs/query
    ratio: float  # median per-round ratio to the plain idiom
    cpu: float  # median CPU µs/query
    cpu_diff: float  # median per-round CPU difference to the plain idiom


def same_backend(url: str, *, rounds: int = 30, queries: int = 1000) -> list[SameBackendRow]:
    """The plain-pool idiom and the manager on one pool of one connection.

    Both talk to the very same server backend over the same socket, so the
    placement of backends on the shared cores (which makes two identical
    pools differ by several µs) drops out. Single thread, interleaved rounds.
    """
    manager = _manager(url, 1)
    provider = manager.providers["supabase"]
    try:
        manager.execute_query("SELECT 1")
        pool = provider._pool

        def idiom() -> Any:
            with pool.connection() as c:
                return c.execute("SELECT 1").fetchall()

        def getput() -> Any:
            c = pool.getconn()
            try:
                return c.execute("SELECT 1").fetchall()
            finally:
                pool.putconn(c)

        steps: dict[str, Query] = {
            "plain idiom `with pool.connection()` on the manager's pool": idiom,
            "`pool.getconn()` / `putconn()` on the manager's pool": getput,
            "`provider.run()` (checkout, watchdog, fetch)": lambda: provider.run(
                "SELECT 1", None, _manager_fetch_all()
            ),
            "`manager.execute_query()`": lambda: manager.execute_query("SELECT 1"),
        }
        names = list(steps)
        for fn in steps.values():
            measure(fn, 500, 1)
        got: dict[str, list[tuple[float, float, float]]] = {k: [] for k in names}
        for name in interleaved(names, rounds):
            got[name].append(measure(steps[name], queries, 1))
        base = got[names[0]]
        rows = []
        for name in names:
            v = got[name]
            rows.append(
                SameBackendRow(
                    name,
                    statistics.median(x[0] for x in v),
                    statistics.median(a[0] / b[0] for a, b in zip(v, base, strict=True)),
                    statistics.median(x[1] for x in v),
                    statistics.median(a[1] - b[1] for a, b in zip(v, base, strict=True)),
                )
            )
        return rows
    finally:
        manager.close_all()

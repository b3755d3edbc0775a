"""Per-query cost of the Prometheus metrics listener.

    python -m bench.metrics [--rounds 21] [--queries 2000]

One embedded PostgreSQL server, one `DatabaseManager` (pool of 1, so every
round uses the same connection), ``execute_query("SELECT 1")`` in rounds
alternately with and without the `MetricsListener` attached (the order
flips every pair of rounds, so slow drifts of a shared machine hit both
alike). Reports the median µs/query of each, the median of the per-pair
ratios, and the listener's own cost per call measured without a database.
Target: overhead < 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

TARGET = 0.05


def _round(run: object, n: int) -> float:
    assert callable(run)
    t0 = time.perf_counter_ns()
    for _ in range(n):
        run()
    return (time.perf_counter_ns() - t0) / n / 1e3


def listener_cost_ns(calls: int = 200_000) -> float:
    """ns per `on_query` call (counter + histogram through the cached children)."""
    from agent_factory.observability.metrics import MetricsListener

    m = MetricsListener()
    m.prepare(["supabase"])
    on_query = m.on_query
    t0 = time.perf_counter_ns()
    for _ in range(calls):
        on_query("supabase", 0.0001, "ok")
    return (time.perf_counter_ns() - t0) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="rounds per variant")
    parser.add_argument("--queries", type=int, default=2000, help="queries per round")
    parser.add_argument("--warmup", type=int, default=1000)
    args = parser.parse_args(argv)

    from agent_factory.core.database_manager import DatabaseManager
    from agent_factory.observability.metrics import MetricsListener
    from agent_factory.testing.embedded import EmbeddedPostgres

    with EmbeddedPostgres("bench-metrics") as server:
        server.start()
        db = DatabaseManager(providers={"supabase": server.url}, hang_timeout=2.0,
                             pool_min_size=1, pool_max_size=1)
        listener = MetricsListener()
        listener.prepare(db.providers)

        def query() -> object:
            return db.execute_query("SELECT 1")

        try:
            _round(query, args.warmup)
            plain: list[float] = []
            metered: list[float] = []
            for r in range(args.rounds):
                for with_metrics in ((False, True) if r % 2 == 0 else (True, False)):
                    if with_metrics:
                        db.add_listener(listener)
                        metered.append(_round(query, args.queries))
                        db.remove_listener(listener)
                    else:
                        plain.append(_round(query, args.queries))
        finally:
            db.close_all()

    counted = listener.query_counts()["supabase"]["ok"]
    assert counted == args.rounds * args.queries, counted  # every metered query was counted
    ratios = sorted(m / p for m, p in zip(metered, plain, strict=True))
    overhead = statistics.median(ratios) - 1
    base = statistics.median(plain)
    cost = listener_cost_ns()
    print(f"execute_query('SELECT 1'), {args.rounds} interleaved rounds of {args.queries}:")
    print(f"  without metrics  median {base:7.1f} µs/query")
    print(f"  with metrics     median {statistics.median(metered):7.1f} µs/query")
    print(f"  per-round ratio  median {overhead:+.1%} "
          f"(quartiles {ratios[len(ratios) // 4] - 1:+.1%} .. "
          f"{ratios[3 * len(ratios) // 4] - 1:+.1%})")
    print(f"  listener alone   {cost:7.0f} ns/call = {cost / 1e3 / base:.1%} of a query")
    verdict = "met" if overhead < TARGET else "NOT met"
    print(f"target < {TARGET:.0%}: {verdict}")
    return 0 if overhead < TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

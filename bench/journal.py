"""The failback journal: what it costs on the write path, and how fast it drains.

    python -m bench.journal [--quick]

Two embedded PostgreSQL servers (primary, backup) with the shipped schema.

* Write path on the primary: single-row autocommit inserts into a table with
  the journal trigger (which records nothing there) against an identical
  table without it, in alternating rounds; and the same two plain tables
  against each other (A/A: the noise of this machine). Each round's
  difference is taken between runs next to each other in time (a machine
  that slows down for a while moves both): the added cost is the median of
  those differences, the noise the median size of the A/A ones. And the
  same inserts in a loop on the server (``DO``: no client, no network, no
  commit), which shows the trigger's own cost that the clients' noise hides.
* Writes on a backup standing in for the primary: the same inserts with the
  session marked ``agent_factory.journal = on`` (recorded) against unmarked.
* Drain: changed rows of ~200 bytes (a uuid key, one secondary index) in
  transactions of 10, replayed on the primary by `continuity.drain.drain`
  (no concurrent load), for inserts and for updates; and the time to drain
  10,000 changes of a table of 100,000 rows against one of 1,000,000
  (``--quick``: 100,000 and 300,000): the drain touches the changed keys only.

Targets: primary write cost within the A/A noise; backup writes <= 1.5x;
drain >= 20,000 rows/s; 10,000 changes drained in <= 5 s whatever the size.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from agent_factory.continuity import drain, journal
from agent_factory.continuity.merge import ConflictPolicy
from agent_factory.schema import apply_migrations

from .common import fleet, run_alone

TABLE = """CREATE TABLE {t} (id uuid PRIMARY KEY, k int NOT NULL, payload text NOT NULL);
CREATE INDEX ON {t} (k)"""
PAYLOAD = "x" * 160


@dataclass
class Result:
    pg_version: str = ""
    primary_us: dict[str, float] = field(default_factory=dict)
    #: Median of the per-round differences to "plain" (µs), signed; the A/A twin's
    #: as the median of their sizes.
    primary_added: dict[str, float] = field(default_factory=dict)
    server_us: dict[str, float] = field(default_factory=dict)  # per insert, in a server loop
    backup_us: dict[str, float] = field(default_factory=dict)
    drain: dict[str, tuple[int, float]] = field(default_factory=dict)
    sized: dict[int, float] = field(default_factory=dict)


def _series(variants: dict[str, Callable[[], None]], rounds: int, n: int
            ) -> dict[str, list[float]]:
    """µs per call of each variant, one value per round; rounds interleaved (order
    flipped each round)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            run = variants[name]
            t0 = time.perf_counter_ns()
            for _ in range(n):
                run()
            times[name].append((time.perf_counter_ns() - t0) / n / 1e3)
    return times


def _rounds(variants: dict[str, Callable[[], None]], rounds: int, n: int) -> dict[str, float]:
    """Median µs per call of each variant, rounds interleaved (order flipped each round)."""
    return {k: statistics.median(v) for k, v in _series(variants, rounds, n).items()}


def _paired(times: dict[str, list[float]], base: str, twin: str) -> dict[str, float]:
    """Each variant's median per-round difference to ``base``; ``twin`` (an A/A copy of
    ``base``) as the median size of its differences: the noise."""
    added = {}
    for name, values in times.items():
        if name == base:
            continue
        diffs = [v - b for v, b in zip(values, times[base], strict=True)]
        added[name] = statistics.median(abs(d) for d in diffs) if name == twin \
            else statistics.median(diffs)
    return added


def _inserter(conn: psycopg.Connection[Any], table: str) -> Callable[[], None]:
    query = f"INSERT INTO {table} VALUES (%s, 1, %s)"
    return lambda: conn.execute(query, (uuid.uuid4(), PAYLOAD)) and None


def _setup(url: str, *tables: str, journaled: tuple[str, ...] = ()) -> None:
    apply_migrations(url, embedding_dim=8)
    with psycopg.connect(url, autocommit=True) as conn:
        for t in tables:
            conn.execute(TABLE.format(t=t))
    with psycopg.connect(url) as conn:
        for t in journaled:
            journal.install(conn, t)


def write_costs(primary: str, backup: str, res: Result, rounds: int, n: int) -> None:
    with psycopg.connect(primary, autocommit=True) as conn:
        times = _series({
            "journal trigger": _inserter(conn, "w_journal"),
            "plain": _inserter(conn, "w_plain"),
            "plain (A/A twin)": _inserter(conn, "w_twin"),
        }, rounds, n)
        res.primary_us = {k: statistics.median(v) for k, v in times.items()}
        res.primary_added = _paired(times, "plain", "plain (A/A twin)")
        def looped(table: str) -> Callable[[], None]:
            query = (f"DO $$ BEGIN FOR i IN 1..{10 * n} LOOP INSERT INTO {table} VALUES "
                     f"(gen_random_uuid(), 1, '{PAYLOAD}'); END LOOP; END $$")
            return lambda: conn.execute(query) and None

        server = _series({"journal trigger": looped("w_journal"), "plain": looped("w_plain")},
                         rounds, 1)
        res.server_us = {k: statistics.median(v) / (10 * n) for k, v in server.items()}
    with psycopg.connect(backup, autocommit=True) as on, \
            psycopg.connect(backup, autocommit=True) as off:
        on.execute("SET agent_factory.journal = on")
        res.backup_us = _rounds({"recorded": _inserter(on, "w_journal"),
                                 "not recorded": _inserter(off, "w_journal")}, rounds, n)


def _record(backup: str, table: str, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """Run ``statement`` once per row on the backup, marked, 10 rows a transaction."""
    with psycopg.connect(backup) as conn:
        conn.execute("SET agent_factory.journal = on")
        cur = conn.cursor()
        for i in range(0, len(rows), 10):
            cur.executemany(statement.format(t=table), rows[i:i + 10])
            conn.commit()


def _drain(primary: str, backup: str) -> tuple[int, float]:
    with psycopg.connect(primary) as target, psycopg.connect(backup) as source, \
            psycopg.connect(backup) as pruner:
        journal.prepare_session(target)
        journal.prepare_session(source)
        t0 = time.perf_counter()
        moved = drain.drain_all(source, target, "backup", ConflictPolicy(),
                                pruner=pruner).changes
        return moved, time.perf_counter() - t0


def drain_rates(primary: str, backup: str, res: Result, rows: int) -> None:
    keys = [uuid.uuid4() for _ in range(rows)]
    _record(backup, "d_items", "INSERT INTO {t} VALUES (%s, %s, %s)",
            [(k, i, PAYLOAD) for i, k in enumerate(keys)])
    res.drain["insert"] = _drain(primary, backup)
    _record(backup, "d_items", "UPDATE {t} SET k = k + 1 WHERE id = %s", [(k,) for k in keys])
    res.drain["update"] = _drain(primary, backup)


def size_independence(primary: str, backup: str, res: Result, sizes: tuple[int, ...],
                      changes: int) -> None:
    for size in sizes:
        table = f"s_{size}"
        for url in (primary, backup):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(TABLE.format(t=table))
                conn.execute(f"INSERT INTO {table} SELECT md5(g::text)::uuid, g, %s "
                             f"FROM generate_series(1, {size}) AS g", (PAYLOAD,))
                conn.execute(f"ANALYZE {table}")
        with psycopg.connect(backup) as conn:
            journal.install(conn, table)
        _record(backup, table, "UPDATE {t} SET k = -k WHERE id = md5(%s::text)::uuid",
                [(g,) for g in range(1, changes + 1)])
        res.sized[size] = _drain(primary, backup)[1]


def run(quick: bool) -> Result:
    res = Result()
    with fleet("journal", ("supabase", "railway")) as f:
        primary, backup = f["supabase"].direct_url, f["railway"].direct_url
        for url in (primary, backup):
            _setup(url, "w_journal", "w_plain", "w_twin", "d_items",
                   journaled=("w_journal", "d_items"))
        with psycopg.connect(primary) as conn:
            res.pg_version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        write_costs(primary, backup, res, rounds=7 if quick else 15, n=300 if quick else 1000)
        drain_rates(primary, backup, res, rows=5000 if quick else 20000)
        size_independence(primary, backup, res,
                          (100_000, 300_000) if quick else (100_000, 1_000_000),
                          changes=2000 if quick else 10_000)
    return res


def render(res: Result, notes: list[str]) -> str:
    p, b, s = res.primary_us, res.backup_us, res.server_us
    added = res.primary_added["journal trigger"]
    noise = res.primary_added["plain (A/A twin)"]
    lines = [
        "Write path on the primary (µs per single-row insert, median of rounds):",
        *(f"  {k:<18} {v:8.1f}" for k, v in p.items()),
        f"  journal trigger adds {added:+.1f} µs (median per-round difference); "
        f"A/A noise {noise:.1f} µs (median per-round |difference|): "
        f"{'within' if abs(added) <= noise else 'OUTSIDE'} the noise",
        f"  in a loop on the server: {s['journal trigger']:.2f} against {s['plain']:.2f} µs "
        f"per insert: the trigger's own cost {s['journal trigger'] - s['plain']:+.2f} µs",
        "Writes on a backup standing in (µs per insert):",
        *(f"  {k:<18} {v:8.1f}" for k, v in b.items()),
        f"  recorded / not recorded = {b['recorded'] / b['not recorded']:.2f}x (target <= 1.5x)",
        "Drain (no concurrent load):",
        *(f"  {k:<7} {n:6d} rows in {s:6.2f} s = {n / s:9.0f} rows/s (target >= 20,000)"
          for k, (n, s) in res.drain.items()),
        "Drain of the same number of changes, by table size:",
        *(f"  {size:>9,d} rows: {s:5.2f} s (target <= 5 s)" for size, s in res.sized.items()),
        *notes,
    ]
    return "\n".join(lines)


def met(res: Result) -> bool:
    b = res.backup_us
    return (b["recorded"] / b["not recorded"] <= 1.5
            and all(n / s >= 20_000 for n, s in res.drain.values())
            and all(s <= 5 for s in res.sized.values()))


def main(argv: list[str] | None = None) -> int:
    holder: list[Result] = []

    def keep(quick: bool) -> Result:
        holder.append(run(quick))
        return holder[0]

    run_alone(__doc__ or "", keep, render, "smaller sizes (< 1 min)", argv)
    return 0 if met(holder[0]) else 1


if __name__ == "__main__":
    sys.exit(main())

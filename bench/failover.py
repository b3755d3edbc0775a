"""Failover windows: what readers see while the primary crashes or hangs.

Three embedded servers (supabase = primary, railway, neon). Reader threads
run ``SELECT inet_server_port()`` on a fixed schedule (a monotonic clock,
``rate`` reads/s each; a reader that falls behind catches up at once, no read
is skipped). The port says which server answered. One fault per scenario:

* ``crash``: every process of the primary gets SIGKILL; after ``outage``
  seconds it is started again (crash recovery) on the same port;
* ``hang``: every process of the primary gets SIGSTOP (the kernel still
  accepts TCP, nobody answers); after ``outage`` seconds, SIGCONT.

Clients compared: the `DatabaseManager` (hang_timeout=2.0), and a libpq
multi-host psycopg_pool ``ConnectionPool`` (``host=h,h,h port=p1,p2,p3
connect_timeout=2 target_session_attrs=any load_balance_hosts=disable``).
All servers are restarted between scenarios.
"""

from __future__ import annotations

import contextlib
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.embedded import EmbeddedPostgres
from agent_factory.testing.fleet import PROVIDERS, Fleet
from bench import common
from bench.common import FaultTimes, Paced, fault_cycle, first_line

QUERY = "SELECT inet_server_port()"
MANAGER = "DatabaseManager"
MULTIHOST = "libpq multi-host pool"


@dataclass(frozen=True)
class Config:
    outage: float  # seconds the primary stays down after a crash
    hang_outage: float  # seconds the primary stays frozen
    before: float  # seconds of normal reads before the fault
    after: float  # seconds observed after the primary is back
    rate: float = 200.0  # reads/s of each reader thread
    readers: int = 2
    hang_timeout: float = 2.0
    pool_min: int = 2
    pool_max: int = 4
    connect_timeout: int = 2


@dataclass
class Read:
    reader: int
    sched: float
    start: float
    end: float
    port: int | None
    error: str | None


@dataclass
class Outcome:
    client: str
    fault: str
    reads: int
    failed: int
    first_backup: float | None  # seconds from fault to first read served by a backup
    max_latency: float  # seconds, longest read overlapping the fault
    on_time: float  # % of reads scheduled during the fault served within 1 s of schedule
    back_to_primary: float | None  # seconds from restore to first read served by primary
    restore_took: float  # seconds the restart/resume call took
    observed_after: float
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- fault injection -------------------------------------------------------------
# EmbeddedPostgres.kill()/hang() signal the postmaster and every backend (the
# backends call setsid(), so the postmaster's process group alone misses them).


def embedded_hang_freezes_backends(server: EmbeddedPostgres) -> bool:
    """Whether ``EmbeddedPostgres.hang()`` alone silences an open connection."""
    conn = psycopg.connect(server.url, autocommit=True)
    try:
        conn.execute("SELECT 1")
        pg = conn.pgconn
        server.hang()
        try:
            pg.send_query(b"SELECT 1")
            pg.flush()
            answered = bool(select.select([pg.socket], [], [], 0.3)[0])
        finally:
            server.resume()
    finally:
        conn.close()
    return not answered


# -- clients ---------------------------------------------------------------------


def fresh(fleet: Fleet) -> None:
    """(Re)start every server: no state survives from the previous scenario."""
    for member in fleet:
        if member.server.is_running():
            member.server.stop()
        member.server.start()


@contextlib.contextmanager
def manager_client(fleet: Fleet, cfg: Config) -> Iterator[tuple[Callable[[], int], Any]]:
    manager = DatabaseManager(
        providers=fleet.urls(),
        order=list(PROVIDERS),
        hang_timeout=cfg.hang_timeout,
        pool_min_size=cfg.pool_min,
        pool_max_size=cfg.pool_max,
        connect_timeout=float(cfg.connect_timeout),
        dotenv=None,
    )

    def read() -> int:
        row = manager.execute_query(QUERY, fetch_mode="one")
        return int(row[0])

    try:
        yield read, manager
    finally:
        manager.close_all()


def multihost_conninfo(fleet: Fleet, cfg: Config) -> str:
    first = fleet[PROVIDERS[0]].server
    hosts = ",".join(m.server.host for m in fleet)
    ports = ",".join(str(m.server.port) for m in fleet)
    return (
        f"host={hosts} port={ports} user={first.user} password={first.password} "
        f"dbname={first.dbname} connect_timeout={cfg.connect_timeout} "
        "target_session_attrs=any load_balance_hosts=disable"
    )


@contextlib.contextmanager
def multihost_client(fleet: Fleet, cfg: Config) -> Iterator[tuple[Callable[[], int], Any]]:
    pool: ConnectionPool[Any] = ConnectionPool(
        multihost_conninfo(fleet, cfg),
        min_size=cfg.pool_min,
        max_size=cfg.pool_max,
        kwargs={"autocommit": True},
        open=True,
    )
    pool.wait()

    def read() -> int:
        with pool.connection() as conn:
            row = conn.execute(QUERY).fetchone()
        assert row is not None
        return int(row[0])

    try:
        yield read, pool
    finally:
        pool.close(timeout=5.0)


CLIENTS = {MANAGER: manager_client, MULTIHOST: multihost_client}


# -- readers ---------------------------------------------------------------------


def _read_step(read: Callable[[], int]) -> Callable[[int, int, float], Read]:
    """One scheduled read of a reader thread: which port answered, or the error."""

    def step(reader: int, i: int, sched: float) -> Read:
        start = time.monotonic()
        port: int | None = None
        error: str | None = None
        try:
            port = read()
        except Exception as exc:  # every failure counts, whatever its type
            error = first_line(exc, 160)
        return Read(reader, sched, start, time.monotonic(), port, error)

    return step


def run_scenario(
    fleet: Fleet,
    client: str,
    fault: str,
    cfg: Config,
    progress: Callable[[str], None] = print,
) -> Outcome:
    fresh(fleet)
    primary = fleet[PROVIDERS[0]].server
    port_names = fleet.port_names()
    with CLIENTS[client](fleet, cfg) as (read, handle):
        for _ in range(50):  # connections made, primary serving
            read()
        readers = Paced(_read_step(read), cfg.readers, 1.0 / cfg.rate, name="bench-reader",
                        lead=0.05)
        outage = cfg.outage if fault == "crash" else cfg.hang_outage
        times = fault_cycle(primary, fault, at=readers.started + cfg.before, outage=outage)
        time.sleep(cfg.after)
        stopped = readers.stop()
        notes = _client_state_notes(client, handle, stopped)
    out = summarize(client, fault, readers.results, primary.port, times, cfg, port_names)
    out.notes.extend(notes)
    progress(
        f"{client:22s} {fault:5s}: failed {out.failed}, first backup {_s(out.first_backup)}, "
        f"max latency {out.max_latency * 1e3:.0f} ms, on time {out.on_time:.1f}%, "
        f"back to primary {_s(out.back_to_primary)}"
    )
    return out


def _client_state_notes(client: str, handle: Any, stopped: bool) -> list[str]:
    notes = []
    if not stopped:
        notes.append("a reader thread was still blocked 30 s after the end")
    if client == MANAGER:
        stats = handle.get_provider_stats()
        down = [n for n, s in stats.items() if not s["healthy"]]
        if down:
            notes.append(f"providers still marked down at the end: {', '.join(down)}")
        if handle.serving_provider != PROVIDERS[0]:
            notes.append(f"serving provider at the end: {handle.serving_provider!r}")
    return notes


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


def summarize(
    client: str,
    fault: str,
    reads: list[Read],
    primary_port: int,
    times: FaultTimes,
    cfg: Config,
    port_names: dict[int, str],
) -> Outcome:
    t_fault, t_signalled, t_restore = times.fault, times.signalled, times.restored
    reads = sorted(reads, key=lambda r: r.end)
    failed = [r for r in reads if r.error is not None]
    errors: dict[str, int] = {}
    for r in failed:
        assert r.error is not None
        errors[r.error] = errors.get(r.error, 0) + 1
    backup = [r.end for r in reads if r.port not in (None, primary_port) and r.end >= t_fault]
    during = [r for r in reads if r.end >= t_fault and r.start <= t_restore]
    scheduled = [r for r in reads if t_fault <= r.sched <= t_restore]
    on_time = [r for r in scheduled if r.error is None and r.end - r.sched <= 1.0]
    back = [r.end for r in reads if r.port == primary_port and r.start >= t_restore]
    notes = []
    early = [r for r in reads if r.end < t_fault and r.port != primary_port]
    if early:
        notes.append(f"{len(early)} reads before the fault not served by the primary")
    wrong = [r for r in reads if r.port is not None and r.port not in port_names]
    if wrong:
        notes.append(f"{len(wrong)} reads answered by an unknown port")
    if fault == "crash":
        during_primary = [
            r
            for r in reads
            if r.port == primary_port and t_signalled < r.start and r.end < t_restore
        ]
        if during_primary:
            notes.append(f"{len(during_primary)} reads served by the primary while it was dead")
    return Outcome(
        client=client,
        fault=fault,
        reads=len(reads),
        failed=len(failed),
        first_backup=(min(backup) - t_fault) if backup else None,
        max_latency=max((r.end - r.start for r in during), default=0.0),
        on_time=100.0 * len(on_time) / len(scheduled) if scheduled else 0.0,
        back_to_primary=(min(back) - t_restore) if back else None,
        restore_took=times.restore_took,
        observed_after=cfg.after,
        errors=errors,
        notes=notes,
    )


def run(cfg: Config, progress: Callable[[str], None] = print) -> list[Outcome]:
    """Every client through every fault."""
    # The servers share one password: the multi-host peer's conninfo has one.
    with common.fleet("bench") as servers:
        if not embedded_hang_freezes_backends(servers[PROVIDERS[1]].server):
            raise RuntimeError(
                "EmbeddedPostgres.hang() does not silence open connections (backends "
                "not frozen): the hang scenarios would measure nothing"
            )
        outcomes = [
            run_scenario(servers, client, fault, cfg, progress)
            for client in (MANAGER, MULTIHOST)
            for fault in ("crash", "hang")
        ]
    return outcomes

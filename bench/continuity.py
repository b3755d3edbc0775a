"""Continuity benchmarks: no acknowledged write lost; replication lag; reconciliation.

    python -m bench --suite continuity     # full run, updates bench/RESULTS.md (~1 min)
    python -m bench.continuity [--quick]     # prints the tables only

Three embedded servers (supabase = primary, railway, neon) with the schema
deployed (`apply_migrations`, embedding_dim=8) and logical replication from
the primary to both backups (`setup_replication`): one such fleet for the lag
and the reconciliation, a fresh one for each fault scenario.

1. **Acknowledged writes across crash → failover → restore → failback.** A
   `DatabaseManager` (``monitor_interval=0.2, hang_timeout=1.0,
   probe_interval=0.1``, failback reconciliation on, the default) and two
   writer threads inserting rows with unique uuid ids into
   ``session_memories`` at a steady total rate (a monotonic schedule; a late
   writer catches up, no write is skipped). The primary is crashed (SIGKILL
   of every process) for ``outage`` seconds, restarted; once the manager
   serves from it again the writers go on for ``after`` seconds (longer if
   needed to reach ``min_acked`` acknowledged writes). Then: acknowledged ids
   missing from the primary (lost), duplicates, writes with an unknown
   outcome, and the same on each backup. Repeated with a hang (SIGSTOP /
   SIGCONT) instead of the crash.
2. **Replication lag** under a steady write load through the manager: every
   100 ms a marker row is inserted on the primary (direct connection) and each
   backup is polled every 2 ms until it appears (end-to-end lag); the
   primary's ``pg_stat_replication.replay_lag`` is sampled at the same time.
3. **Reconciliation** of rows written on a backup during an outage: rows
   inserted directly on railway, then `reconcile(railway, supabase,
   tables=["session_memories"])` timed, twice (the second copies nothing).
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from agent_factory.continuity.reconcile import reconcile
from agent_factory.continuity.replication import (
    replication_status,
    setup_replication,
    subscription_name,
    teardown_replication,
)
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.events import Listener
from agent_factory.engine.settings import Settings
from agent_factory.errors import OutcomeUnknownError
from agent_factory.schema.migrations import apply_migrations
from agent_factory.testing.fleet import PROVIDERS, Fleet
from bench import common
from bench.common import (
    FaultTimes,
    Paced,
    Progress,
    fault_cycle,
    first_line,
    fleet,
    run_alone,
    server_version,
    sleep_until,
    wait_for,
)
from bench.report import row, section, targets

PRIMARY, BACKUPS = PROVIDERS[0], PROVIDERS[1:]
INSERT = (
    "INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, content) "
    "VALUES (%s, %s, 'w', 'log', %s, '{}'::jsonb)"
)
WRITE = INSERT + " RETURNING inet_server_port()"
MANAGER_OPTIONS: dict[str, Any] = {
    "monitor_interval": 0.2,
    "hang_timeout": 1.0,
    "probe_interval": 0.1,
}
LOST_TARGET = 0
MIN_ACKED = 5000
LAG_P99_TARGET = 1.0
RECONCILE_TARGET = 10.0

@dataclass(frozen=True)
class Config:
    rate: float  # writes/s, all writers together
    before: float
    outage: float
    after: float
    min_acked: int
    lag_seconds: float
    lag_rate: float
    reconcile_rows: int


FULL = Config(500.0, 4.0, 5.0, 3.0, MIN_ACKED, 20.0, 500.0, 10_000)
QUICK = Config(300.0, 1.5, 2.0, 1.5, 0, 4.0, 300.0, 2_000)


# -- fleet with schema and replication -------------------------------------------------


def settings_of(f: Fleet) -> Settings:
    return Settings.build(f.urls(), order=list(PROVIDERS))


def prepare_fleet(f: Fleet, progress: Progress) -> float:
    """Schema on every server, replication primary -> backups; seconds until streaming."""
    for n in PROVIDERS:
        apply_migrations(f[n].url, embedding_dim=8, provider=n)
    report = setup_replication(settings_of(f))
    if report.errors:
        raise RuntimeError(f"replication setup failed: {report.errors}")
    took = wait_streaming(f, 60.0)
    progress(f"continuity: schema deployed, replication streaming after {took:.1f} s")
    return took


def wait_streaming(f: Fleet, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        statuses = replication_status(settings_of(f))
        if all(s.streaming and s.tables_syncing == 0 for s in statuses):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            problems = {s.provider: s.problem() for s in statuses}
            raise RuntimeError(f"replication not streaming after {timeout:g} s: {problems}")
        time.sleep(0.1)


def truncate(f: Fleet) -> None:
    for n in PROVIDERS:
        with psycopg.connect(f[n].url, autocommit=True) as conn:
            conn.execute("TRUNCATE session_memories")


def ids_on(url: str, session: str) -> list[uuid.UUID]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                "SELECT id FROM session_memories WHERE session_id = %s", (session,)
            )
        ]


# -- 1. acknowledged writes across a fault ---------------------------------------------


@dataclass
class Write:
    id: uuid.UUID
    sched: float
    start: float
    end: float
    outcome: str  # ok | unknown | error
    port: int | None
    error: str | None


class Events(Listener):
    def __init__(self) -> None:
        self.reconciled: list[tuple[str, int]] = []
        self.health: list[tuple[float, str, bool]] = []

    def on_reconcile(self, primary: str, source: str, rows: int) -> None:
        self.reconciled.append((source, rows))

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self.health.append((time.monotonic(), provider, healthy))


def _write_step(db: DatabaseManager, session: str) -> Callable[[int, int, float], Write]:
    """One scheduled write of a writer thread: a fresh id, and what became of it."""

    def step(idx: int, i: int, sched: float) -> Write:
        wid = uuid.uuid4()
        start = time.monotonic()
        port: int | None = None
        error: str | None = None
        try:
            answer = db.execute_query(WRITE, (wid, session, f"w{idx}-{i}"), fetch_mode="one")
            outcome, port = "ok", int(answer[0])
        except OutcomeUnknownError as exc:
            outcome, error = "unknown", first_line(exc, 140)
        except Exception as exc:  # every other failure counts, whatever its type
            outcome, error = "error", first_line(exc, 140)
        return Write(wid, sched, start, time.monotonic(), outcome, port, error)

    return step


class Writers(Paced[Write]):
    """``threads`` writer threads sharing ``rate`` writes/s on one schedule."""

    def __init__(self, db: DatabaseManager, session: str, rate: float, threads: int = 2) -> None:
        super().__init__(_write_step(db, session), threads, threads / rate,
                         name="bench-writer", lead=0.02)

    @property
    def writes(self) -> list[Write]:
        return self.results

    def acked(self) -> int:
        return sum(1 for w in self.writes if w.outcome == "ok")


def warm_manager(f: Fleet, listeners: tuple[Listener, ...] = ()) -> DatabaseManager:
    """A manager over the fleet (``MANAGER_OPTIONS``), its pools warmed by 20 queries."""
    db = DatabaseManager(f.urls(), order=list(PROVIDERS), listeners=listeners, dotenv=None,
                         **MANAGER_OPTIONS)
    try:
        for _ in range(20):
            db.execute_query("SELECT 1")
    except BaseException:
        db.close_all()
        raise
    return db


@dataclass
class FaultOutcome:
    fault: str
    attempted: int
    acked: int
    acked_by: dict[str, int]
    unknown: int
    unknown_on_primary: int
    failed: int
    failed_on_primary: int  # refused writes that exist anyway (must be 0)
    lost: int  # acknowledged, missing from the primary
    duplicated: int  # rows of the run on the primary beyond one per id
    missing_on_backups: dict[str, int]  # acknowledged, missing on a backup after catch-up
    backup_catchup: float | None  # seconds until the backups held every acknowledged row
    first_backup_ack: float | None  # seconds from the fault to the first write acked elsewhere
    longest_write: float  # seconds, slowest write overlapping the fault
    restore_took: float
    failback: float | None  # restore -> manager serving from the primary again
    duration: float
    rate: float  # acknowledged writes/s achieved
    reconciled: list[tuple[str, int]]
    errors: dict[str, int]
    replication: dict[str, str]  # backup -> "streaming, ..." or its problem, at the end
    apply_errors: dict[str, str]  # backup -> last apply error other than a lost connection
    notes: list[str] = field(default_factory=list)


@dataclass
class FaultRun:
    """What the writers saw across one fault, before anything is checked."""

    writes: list[Write]
    started: float  # the writers' schedule began
    times: FaultTimes
    failback: float | None  # restore -> manager serving from the primary again
    ended: float  # the writers stopped
    ports: dict[int, str]  # provider by server port, as before the fault


def fault_scenario(
    f: Fleet, fault: str, cfg: Config, progress: Progress
) -> FaultOutcome:
    truncate(f)
    session = f"bench-{fault}"
    events = Events()
    notes: list[str] = []
    db = warm_manager(f, listeners=(events,))
    try:
        run = _write_across_fault(db, f, fault, cfg, session, notes)
        _settle_failback(db, notes)
    finally:
        db.close_all()
    out = _check_writes(f, fault, run, session, events.reconciled, notes)
    progress(
        f"continuity {fault}: acked {out.acked}, lost {out.lost}, unknown {out.unknown} "
        f"({out.unknown_on_primary} on the primary), failed {out.failed}, failback "
        f"{_s(out.failback)}, backups missing {out.missing_on_backups}"
    )
    return out


def _write_across_fault(db: DatabaseManager, f: Fleet, fault: str, cfg: Config, session: str,
                        notes: list[str]) -> FaultRun:
    """Start the writers, crash or hang the primary, wait for failback, write ``after`` s more."""
    ports = f.port_names()
    writers = Writers(db, session, cfg.rate)
    try:
        times = fault_cycle(f[PRIMARY].server, fault, at=writers.started + cfg.before,
                            outage=cfg.outage)
        failback = wait_for(lambda: _serving_primary(db), 30.0, 0.01)
        if failback is None:
            notes.append("the manager did not serve from the primary within 30 s of the restore")
        t_after = time.monotonic()
        while time.monotonic() - t_after < cfg.after or (
            writers.acked() < cfg.min_acked and time.monotonic() - t_after < 30.0
        ):
            time.sleep(0.05)
    finally:
        if not writers.stop():
            notes.append("a writer thread was still blocked 30 s after the stop")
    return FaultRun(writers.writes, writers.started, times, failback, time.monotonic(), ports)


def _serving_primary(db: DatabaseManager) -> bool:
    return db.serving_provider == PRIMARY and bool(db.get_provider_stats()[PRIMARY]["healthy"])


def _settle_failback(db: DatabaseManager, notes: list[str]) -> None:
    """Wait (15 s at most) for a late, background failback; note what is still pending or down.

    A backup that took writes and was unreachable at failback is reconciled
    late, in the background: the checks must come after that.
    """
    wait_for(lambda: not any(s["failback_pending_since"]
                             for s in db.get_provider_stats().values()), 15.0, 0.05)
    pending = [n for n, s in db.get_provider_stats().items() if s["failback_pending_since"]]
    if pending:
        notes.append(f"failback still pending for {', '.join(pending)} at the check")
    down = [n for n, s in db.get_provider_stats().items() if not s["healthy"]]
    if down:
        notes.append(f"providers still marked down at the end: {', '.join(down)}")


def _backup_catchup(f: Fleet, acked: set[uuid.UUID],
                    session: str) -> tuple[dict[str, int], float | None]:
    """Acknowledged ids missing per backup, polled until none is (15 s at most); seconds it took."""
    missing: dict[str, int] = {}

    def caught_up() -> bool:
        missing.update({b: len(acked - set(ids_on(f[b].url, session))) for b in BACKUPS})
        return not any(missing.values())

    took = wait_for(caught_up, 15.0, 0.1)
    return missing, took


def _check_writes(f: Fleet, fault: str, run: FaultRun, session: str,
                  reconciled: list[tuple[str, int]], notes: list[str]) -> FaultOutcome:
    """Every acknowledged, unknown and refused write looked up on each server."""
    writes, times = run.writes, run.times
    acked = {w.id for w in writes if w.outcome == "ok"}
    unknown = {w.id for w in writes if w.outcome == "unknown"}
    failed = {w.id for w in writes if w.outcome == "error"}
    primary = f[PRIMARY].server
    on_primary = ids_on(primary.url, session)
    primary_set = set(on_primary)
    missing, catchup = _backup_catchup(f, acked, session)
    with contextlib.suppress(RuntimeError):
        wait_streaming(f, 5.0)
    acked_by = collections.Counter(run.ports.get(w.port or 0, "?") for w in writes
                                   if w.outcome == "ok")
    backup_acks = [w.end for w in writes if w.outcome == "ok" and w.port != primary.port
                   and w.end >= times.fault]
    during = [w for w in writes
              if w.end >= times.fault and w.start <= times.restored + (run.failback or 0)]
    errors = collections.Counter(w.error for w in writes if w.error is not None)
    return FaultOutcome(
        fault=fault,
        attempted=len(writes),
        acked=len(acked),
        acked_by=dict(acked_by),
        unknown=len(unknown),
        unknown_on_primary=len(unknown & primary_set),
        failed=len(failed),
        failed_on_primary=len(failed & primary_set),
        lost=len(acked - primary_set),
        duplicated=len(on_primary) - len(primary_set),
        missing_on_backups=missing,
        backup_catchup=catchup,
        first_backup_ack=(min(backup_acks) - times.fault) if backup_acks else None,
        longest_write=max((w.end - w.start for w in during), default=0.0),
        restore_took=times.restore_took,
        failback=run.failback,
        duration=run.ended - run.started,
        rate=len(acked) / (run.ended - run.started),
        reconciled=list(reconciled),
        errors={str(k): v for k, v in errors.items()},
        replication=_replication_state(f),
        apply_errors=_apply_errors(f),
        notes=notes,
    )


def _s(v: float | None) -> str:
    return "never" if v is None else f"{v:.2f} s"


# -- 2. replication lag ------------------------------------------------------------------


@dataclass
class LagResult:
    seconds: float
    rate_target: float
    writes_acked: int
    writes_failed: int
    end_to_end: dict[str, list[float]]  # backup -> seconds per marker
    unseen: dict[str, int]  # markers never seen within the drain time
    replay_lag: dict[str, list[float]]  # backup -> pg_stat_replication.replay_lag samples
    replay_null: dict[str, int]  # samples where replay_lag was NULL (idle / caught up)
    replay_bytes: dict[str, list[float]]  # bytes of WAL between the primary and replay_lsn
    markers: int
    poll_interval: float


class Drain:
    """Tells the pollers to stop once nothing is pending, or at ``deadline`` at the latest."""

    def __init__(self) -> None:
        self.stopping = False
        self.deadline = float("inf")

    def stop(self, grace: float) -> None:
        self.deadline = time.monotonic() + grace
        self.stopping = True


class LagProbe:
    """The markers pending on each backup, their end-to-end lags, the primary's replay_lag.

    One poller thread per backup looks for the pending markers every
    ``every`` s; `mark` adds a marker and samples ``pg_stat_replication``.
    """

    def __init__(self, f: Fleet, every: float) -> None:
        self.every = every
        self.pending: dict[str, dict[uuid.UUID, float]] = {b: {} for b in BACKUPS}
        self.seen: dict[str, list[float]] = {b: [] for b in BACKUPS}
        self.replay: dict[str, list[float]] = {b: [] for b in BACKUPS}
        self.replay_null = {b: 0 for b in BACKUPS}
        self.replay_bytes: dict[str, list[float]] = {b: [] for b in BACKUPS}
        self.markers = 0
        self._apps = {subscription_name(b): b for b in BACKUPS}
        self._lock = threading.Lock()
        self._drain = Drain()
        self._pollers = [
            threading.Thread(target=self._poll, args=(f[b].url, b),
                             name=f"bench-lag-poll-{b}", daemon=True)
            for b in BACKUPS
        ]
        for t in self._pollers:
            t.start()

    def _poll(self, url: str, backup: str) -> None:
        pending, seen = self.pending[backup], self.seen[backup]
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < self._drain.deadline:
                with self._lock:
                    wanted = list(pending)
                if wanted:
                    rows = conn.execute(
                        "SELECT id FROM session_memories WHERE id = ANY(%s)", (wanted,)
                    ).fetchall()
                    now = time.monotonic()
                    with self._lock:
                        for (mid,) in rows:
                            t = pending.pop(mid, None)
                            if t is not None:
                                seen.append(now - t)
                elif self._drain.stopping:
                    return
                time.sleep(self.every)

    def mark(self, mconn: psycopg.Connection[Any], sconn: psycopg.Connection[Any],
             i: int) -> None:
        """Insert marker ``i`` on the primary (``mconn``), then sample its replay_lag."""
        mid = uuid.uuid4()
        mconn.execute(INSERT, (mid, "lag-marker", f"m{i}"))
        committed = time.monotonic()
        with self._lock:
            for b in BACKUPS:
                self.pending[b][mid] = committed
        self.markers += 1
        for app, lag, behind in sconn.execute(
            "SELECT application_name, extract(epoch FROM replay_lag)::float8, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 "
            "FROM pg_stat_replication WHERE application_name = ANY(%s)",
            (list(self._apps),),
        ).fetchall():
            backup = self._apps[app]
            if behind is not None:
                self.replay_bytes[backup].append(behind)
            if lag is None:
                self.replay_null[backup] += 1
            else:
                self.replay[backup].append(lag)

    def stop(self, grace: float = 5.0) -> None:
        """Let the pollers find what is still pending (``grace`` s at most), then join them."""
        self._drain.stop(grace)
        for t in self._pollers:
            t.join(timeout=10.0)

    def result(self, cfg: Config, writers: Writers) -> LagResult:
        acked = writers.acked()
        return LagResult(
            seconds=cfg.lag_seconds,
            rate_target=cfg.lag_rate,
            writes_acked=acked,
            writes_failed=len(writers.writes) - acked,
            end_to_end=self.seen,
            unseen={b: len(self.pending[b]) for b in BACKUPS},
            replay_lag=self.replay,
            replay_null=self.replay_null,
            replay_bytes=self.replay_bytes,
            markers=self.markers,
            poll_interval=self.every,
        )


def replication_lag(f: Fleet, cfg: Config, progress: Progress) -> LagResult:
    truncate(f)
    wait_streaming(f, 30.0)
    probe = LagProbe(f, every=0.002)
    try:
        writers = _marked_load(f, cfg, probe)
    finally:
        probe.stop()
    result = probe.result(cfg, writers)
    seen = result.end_to_end
    progress(
        f"replication lag: {result.writes_acked / (cfg.lag_seconds + 0.5):.0f} writes/s; "
        + ", ".join(
            f"{b} p50 {_q(seen[b], 0.5) * 1e3:.1f} ms p99 {_q(seen[b], 0.99) * 1e3:.1f} ms"
            for b in BACKUPS
            if seen[b]
        )
    )
    return result


def _marked_load(f: Fleet, cfg: Config, probe: LagProbe) -> Writers:
    """Writers through a manager at ``lag_rate``; after 0.5 s a marker every 100 ms."""
    db = warm_manager(f)
    try:
        writers = Writers(db, "lag-load", cfg.lag_rate)
        try:
            url = f[PRIMARY].url
            with psycopg.connect(url, autocommit=True) as mconn, psycopg.connect(
                url, autocommit=True
            ) as sconn:
                t0 = time.monotonic() + 0.5  # the writers at full pace first
                i = 0
                while t0 + i * 0.1 <= t0 + cfg.lag_seconds:
                    sleep_until(t0 + i * 0.1)
                    probe.mark(mconn, sconn, i)
                    i += 1
        finally:
            writers.stop()
    finally:
        db.close_all()
    return writers


def _q(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


# -- 3. reconciliation ---------------------------------------------------------------------


@dataclass
class ReconcileRun:
    seconds: float
    source_rows: int
    inserted: int
    updated: int
    unchanged: int
    skipped: int

    @property
    def copied(self) -> int:
        return self.inserted + self.updated


@dataclass
class ReconcileResult:
    rows: int
    insert_seconds: float
    runs: list[ReconcileRun]
    on_primary: int


def reconciliation(f: Fleet, cfg: Config, progress: Progress) -> ReconcileResult:
    truncate(f)
    source = f["railway"]
    rows = [(uuid.uuid4(), "outage", f"o{i}") for i in range(cfg.reconcile_rows)]
    t0 = time.perf_counter()
    with psycopg.connect(source.url) as conn, conn.cursor() as cur:
        for k in range(0, len(rows), 1000):
            cur.executemany(INSERT, rows[k : k + 1000])
    inserted_in = time.perf_counter() - t0
    runs = []
    for _ in range(2):
        with psycopg.connect(source.url) as src, psycopg.connect(f[PRIMARY].url) as dst:
            t0 = time.perf_counter()
            reports = reconcile(src, dst, tables=["session_memories"],
                                source_name="railway", target_name=PRIMARY)
            took = time.perf_counter() - t0
        r = reports[0]
        runs.append(ReconcileRun(took, r.source_rows, r.inserted, r.updated, r.unchanged,
                                 r.skipped))
        progress(f"reconcile: {r.copied} rows copied of {r.source_rows} in {took:.2f} s")
    on_primary = len(ids_on(f[PRIMARY].url, "outage"))
    return ReconcileResult(cfg.reconcile_rows, inserted_in, runs, on_primary)


# -- the suite -----------------------------------------------------------------------------


@dataclass
class ContinuityResult:
    config: Config
    pg_version: str
    streaming_after: float
    lag: LagResult
    faults: list[FaultOutcome]
    recon: ReconcileResult


def run(quick: bool = False, progress: Progress = common.progress) -> ContinuityResult:
    cfg = QUICK if quick else FULL
    with fleet("bench-cont") as f, _replication(f):
        pg_version = server_version(f)
        streaming = prepare_fleet(f, progress)
        progress("continuity 1/3: replication lag under a steady write load")
        lag = replication_lag(f, cfg, progress)
        progress("continuity 2/3: reconciliation of rows written on a backup")
        recon = reconciliation(f, cfg, progress)
    faults = []
    for i, fault in enumerate(("crash", "hang")):
        progress(f"continuity 3/3: acknowledged writes across a {fault} ({i + 1}/2), "
                 "fresh servers")
        with fleet(f"bench-cont-{fault}") as f, _replication(f):
            prepare_fleet(f, progress)
            faults.append(fault_scenario(f, fault, cfg, progress))
    return ContinuityResult(cfg, pg_version, streaming, lag, faults, recon)


def _apply_errors(f: Fleet) -> dict[str, str]:
    """The last apply error of each backup's subscription that is not a lost connection."""
    out = {}
    for b in BACKUPS:
        try:
            lines = f[b].server.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i in range(len(lines) - 1, -1, -1):
            line = lines[i]
            if "ERROR:" in line and not any(
                k in line for k in ("could not connect", "could not receive data")
            ):
                text = line.split("ERROR:", 1)[1].strip()
                if i + 1 < len(lines) and "DETAIL:" in lines[i + 1]:
                    text += " (" + lines[i + 1].split("DETAIL:", 1)[1].strip() + ")"
                out[b] = text
                break
    return out


def _replication_state(f: Fleet) -> dict[str, str]:
    return {
        s.provider: s.problem() or f"streaming, apply_error_count {s.apply_errors}"
        for s in replication_status(settings_of(f))
    }


@contextlib.contextmanager
def _replication(f: Fleet) -> Iterator[None]:
    """Tear replication down before the servers stop (best effort)."""
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            f[PRIMARY].server.resume()  # a no-op unless a failure left it hung
            if all(m.server.is_running() for m in f):
                teardown_replication(settings_of(f))


# -- Markdown ---------------------------------------------------------------------------


def render(res: ContinuityResult, header: list[str]) -> str:
    intro = (
        "Three embedded servers: supabase (primary), railway, neon; schema deployed on each "
        "(`apply_migrations(url, embedding_dim=8)`), logical replication from the primary "
        f"to both backups (`setup_replication`; streaming {res.streaming_after:.1f} s after "
        "setup). The lag and reconciliation measures share one such fleet; each fault "
        "scenario gets a fresh one. Manager options: "
        + ", ".join(f"`{k}={v:g}`" for k, v in MANAGER_OPTIONS.items())
        + ", failback reconciliation on (the default), other settings at their defaults."
    )
    return "\n".join([
        *section("## Continuity: acknowledged writes, replication lag, reconciliation",
                 header, intro),
        *_faults_section(res),
        *_lag_section(res.lag),
        *_recon_section(res.recon),
        *_targets_section(res),
    ])


# The rows of the fault table: a label, and the cell of one scenario.
FAULT_ROWS: list[tuple[str, Callable[[FaultOutcome], str]]] = [
    ("writes attempted", lambda o: str(o.attempted)),
    ("acknowledged", lambda o: str(o.acked)),
    ("… by the primary / railway / neon",
     lambda o: " / ".join(str(o.acked_by.get(n, 0)) for n in PROVIDERS)),
    ("**lost** (acknowledged, missing on the primary)", lambda o: f"**{o.lost}**"),
    ("duplicated on the primary", lambda o: str(o.duplicated)),
    ("outcome unknown (`OutcomeUnknownError`)", lambda o: str(o.unknown)),
    ("… of which on the primary afterwards", lambda o: str(o.unknown_on_primary)),
    ("other errors", lambda o: str(o.failed)),
    ("… of which on the primary anyway", lambda o: str(o.failed_on_primary)),
    ("acknowledged, missing on railway / neon (after ≤ 15 s of catch-up)",
     lambda o: " / ".join(str(o.missing_on_backups.get(b, "?")) for b in BACKUPS)),
    ("backups held every acknowledged row after", lambda o: _s(o.backup_catchup)),
    ("fault → first write acknowledged by a backup", lambda o: _s(o.first_backup_ack)),
    ("slowest write during the fault", lambda o: f"{o.longest_write:.2f} s"),
    ("restore (restart / SIGCONT) took", lambda o: f"{o.restore_took:.2f} s"),
    ("restore → manager serving from the primary", lambda o: _s(o.failback)),
    ("rows brought back by failback (on_reconcile)",
     lambda o: ", ".join(f"{n} from {s}" for s, n in o.reconciled) or "—"),
    ("acknowledged writes/s over the run", lambda o: f"{o.rate:.0f}"),
]


def _faults_section(res: ContinuityResult) -> list[str]:
    cfg = res.config
    intro = (
        f"2 writer threads, {cfg.rate:g} writes/s in all on a monotonic schedule (a late "
        "writer catches up; no write is skipped), each write `INSERT INTO session_memories "
        "(id, session_id, user_id, memory_type, message_id, content) VALUES (%s, <session>, "
        "'w', 'log', %s, '{}'::jsonb) RETURNING inet_server_port()` with a fresh uuid id, "
        "not idempotent (so a lost connection after sending gives `OutcomeUnknownError`). "
        f"{cfg.before:g} s of writes, then the fault on the primary: *crash* = SIGKILL of "
        f"every process, restarted (crash recovery) {cfg.outage:g} s later; *hang* = SIGSTOP, "
        f"SIGCONT {cfg.outage:g} s later. Once the manager serves from the primary again, "
        f"{cfg.after:g} s more (longer if needed for {cfg.min_acked} acknowledged writes). "
        "Checked afterwards on each server by id."
    )
    table = [
        "| | " + " | ".join(o.fault for o in res.faults) + " |",
        "|---|" + "---:|" * len(res.faults),
        *(row(label, *(cell(o) for o in res.faults)) for label, cell in FAULT_ROWS),
    ]
    return section("### Acknowledged writes across crash → failover → restore → failback",
                   intro, table, _faults_notes(res.faults))


def _faults_notes(faults: list[FaultOutcome]) -> list[str]:
    notes = []
    for o in faults:
        notes += [f"- {o.fault}: {n} × `{e}`"
                  for e, n in sorted(o.errors.items(), key=lambda x: -x[1])]
        notes += [f"- {o.fault}: {note}" for note in o.notes]
    for o in faults:
        notes.append(f"- {o.fault}: replication at the end: "
                     + "; ".join(f"{b}: {p}" for b, p in o.replication.items())
                     + " (PostgreSQL 16 counts a lost connection to the publisher as an "
                     "apply error).")
        notes += [f"- {o.fault}: last apply error on {b}: `{e}`"
                  for b, e in o.apply_errors.items()]
    notes.append(
        "- *duplicated* counts rows beyond one per id; the primary key makes it 0 by "
        "construction, so the meaningful checks are *lost*, *on the primary anyway* (a "
        "write reported as failed must not exist) and the backups."
    )
    return notes


def _lag_section(lag: LagResult) -> list[str]:
    span = lag.seconds + 0.5
    intro = (
        f"2 writer threads through the manager at {lag.rate_target:g} writes/s in all "
        f"({lag.writes_acked / span:.0f}/s achieved, {lag.writes_failed} failed) for "
        f"{lag.seconds:g} s. Every 100 ms a marker row is inserted on the primary over a "
        "direct connection; from the return of its (synchronous, autocommit) INSERT, each "
        f"backup is polled every {lag.poll_interval * 1e3:g} ms until the row is visible "
        f"there (end-to-end lag, {lag.markers} markers). At the same moments the primary's "
        "`pg_stat_replication.replay_lag` of `agent_factory_<backup>` is read."
    )
    table = [
        "| backup | markers seen | never seen (5 s drain) | end-to-end p50 | p99 | max | "
        "replay_lag samples (of them NULL) | replay_lag p50 | p99 | WAL bytes behind "
        "replay_lsn p50 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in BACKUPS:
        e2e, rl, behind = lag.end_to_end[b], lag.replay_lag[b], lag.replay_bytes[b]
        table.append(row(
            b, len(e2e), lag.unseen[b], _sec(_q(e2e, 0.5)), _sec(_q(e2e, 0.99)),
            _sec(max(e2e) if e2e else float("nan")),
            f"{len(rl) + lag.replay_null[b]} ({lag.replay_null[b]})", _sec(_q(rl, 0.5)),
            _sec(_q(rl, 0.99)), _bytes(_q(behind, 0.5)), _bytes(_q(behind, 0.99)),
        ))
    reading = (
        "`replay_lag` is what the manager's probe reports as `replication_lag_s`; it is "
        "computed by the primary from the subscriber's feedback messages (sent about every "
        "`wal_receiver_status_interval` or when the apply worker catches up), so it is "
        "coarse and reads NULL once the subscriber is idle. The end-to-end figure includes "
        "up to one poll interval plus one query round trip of measurement error."
    )
    return section("### Replication lag under a steady write load", intro, table, reading)


def _recon_section(rc: ReconcileResult) -> list[str]:
    intro = (
        f"{rc.rows} `session_memories` rows inserted directly on railway (batches of 1000 "
        f"with `executemany`, one transaction, {rc.insert_seconds:.2f} s), the tables empty "
        "on the other servers; then `reconcile(railway_conn, supabase_conn, "
        "tables=[\"session_memories\"])` with fresh connections, timed, twice."
    )
    table = [
        "| run | seconds | source rows | inserted | updated | unchanged | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(row("first" if i == 1 else "second (idempotent)", f"{r.seconds:.2f}", r.source_rows,
              r.inserted, r.updated, r.unchanged, r.skipped)
          for i, r in enumerate(rc.runs, 1)),
    ]
    return section("### Reconciliation of rows written on a backup during an outage",
                   intro, table, f"Rows of the outage on the primary afterwards: "
                   f"{rc.on_primary} of {rc.rows}.")


def _targets_section(res: ContinuityResult) -> list[str]:
    cfg, lag, rc = res.config, res.lag, res.recon
    rows = [
        (f"{o.fault}: 0 acknowledged writes lost out of ≥ {cfg.min_acked}",
         f"{o.lost} lost of {o.acked} ({o.unknown} unknown outcome, {o.failed_on_primary} "
         "refused writes present)",
         o.lost == LOST_TARGET and o.acked >= cfg.min_acked and o.failed_on_primary == 0)
        for o in res.faults
    ]
    rows += [
        (f"{o.fault} (extra check): every acknowledged write on every backup",
         ", ".join(f"{o.missing_on_backups.get(b, '?')} missing on {b}" for b in BACKUPS),
         sum(o.missing_on_backups.values()) == 0)
        for o in res.faults
    ]
    for b in BACKUPS:
        p99 = _q(lag.end_to_end[b], 0.99)
        rows.append((f"replication lag p99 < {LAG_P99_TARGET:g} s ({b}, end to end)", _sec(p99),
                     bool(lag.end_to_end[b]) and p99 < LAG_P99_TARGET and lag.unseen[b] == 0))
    first, second = rc.runs
    rows += [
        (f"reconcile {rc.rows} rows < {RECONCILE_TARGET:g} s",
         f"{first.seconds:.2f} s, {first.copied} copied",
         first.seconds < RECONCILE_TARGET and first.copied == rc.rows),
        ("second reconcile copies 0 rows", f"{second.copied} copied in {second.seconds:.2f} s",
         second.copied == 0),
    ]
    return section("### Targets", targets(rows))


def _bytes(v: float) -> str:
    return "—" if v != v else f"{v:,.0f}"


def _sec(v: float) -> str:
    if v != v:  # NaN: no sample
        return "—"
    return f"{v * 1e3:.1f} ms" if v < 1.0 else f"{v:.2f} s"


def main(argv: list[str] | None = None) -> int:
    return run_alone(__doc__, run, render, "short outages, fewer rows", argv)


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import collections
import contextlib
import logging
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
from bench.report import yes
from bench.resilience import fleet, server_version

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

Progress = Callable[[str], None]
logger = logging.getLogger("bench.continuity")


def _stderr(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:140] if text else ''}"


def _writer(
    idx: int,
    db: DatabaseManager,
    session: str,
    t0: float,
    period: float,
    stop: threading.Event,
    out: list[Write],
) -> None:
    i = 0
    while not stop.is_set():
        sched = t0 + i * period
        delay = sched - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        wid = uuid.uuid4()
        start = time.monotonic()
        port: int | None = None
        error: str | None = None
        try:
            row = db.execute_query(WRITE, (wid, session, f"w{idx}-{i}"), fetch_mode="one")
            outcome, port = "ok", int(row[0])
        except OutcomeUnknownError as exc:
            outcome, error = "unknown", _first_line(exc)
        except Exception as exc:  # every other failure counts, whatever its type
            outcome, error = "error", _first_line(exc)
        out.append(Write(wid, sched, start, time.monotonic(), outcome, port, error))
        i += 1


class Writers:
    """``threads`` writer threads sharing ``rate`` writes/s on one schedule."""

    def __init__(self, db: DatabaseManager, session: str, rate: float, threads: int = 2) -> None:
        self.writes: list[Write] = []
        self.stop_event = threading.Event()
        period = threads / rate
        t0 = time.monotonic() + 0.02
        self.threads = [
            threading.Thread(
                target=_writer,
                args=(k, db, session, t0 + k * period / threads, period, self.stop_event,
                      self.writes),
                name=f"bench-writer-{k}",
                daemon=True,
            )
            for k in range(threads)
        ]
        self.started = t0
        for t in self.threads:
            t.start()

    def acked(self) -> int:
        return sum(1 for w in self.writes if w.outcome == "ok")

    def stop(self) -> bool:
        """Stop and join; False if a writer was still blocked 30 s later."""
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30.0)
        return not any(t.is_alive() for t in self.threads)


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


def fault_scenario(
    f: Fleet, fault: str, cfg: Config, progress: Progress
) -> FaultOutcome:
    truncate(f)
    session = f"bench-{fault}"
    primary = f[PRIMARY].server
    ports = f.port_names()
    events = Events()
    notes: list[str] = []
    db = DatabaseManager(f.urls(), order=list(PROVIDERS), listeners=[events], dotenv=None,
                         **MANAGER_OPTIONS)
    try:
        for _ in range(20):
            db.execute_query("SELECT 1")
        writers = Writers(db, session, cfg.rate)
        try:
            time.sleep(max(0.0, writers.started + cfg.before - time.monotonic()))
            t_fault = time.monotonic()
            if fault == "crash":
                primary.kill()
            else:
                primary.hang()
            time.sleep(max(0.0, t_fault + cfg.outage - time.monotonic()))
            t_restore0 = time.monotonic()
            if fault == "crash":
                primary.restart()
            else:
                primary.resume()
            t_restore = time.monotonic()
            failback: float | None = None
            deadline = t_restore + 30.0
            while time.monotonic() < deadline:
                if db.serving_provider == PRIMARY and db.get_provider_stats()[PRIMARY]["healthy"]:
                    failback = time.monotonic() - t_restore
                    break
                time.sleep(0.01)
            if failback is None:
                notes.append("the manager did not serve from the primary within 30 s of the "
                              "restore")
            t_after = time.monotonic()
            while time.monotonic() - t_after < cfg.after or (
                writers.acked() < cfg.min_acked and time.monotonic() - t_after < 30.0
            ):
                time.sleep(0.05)
        finally:
            if not writers.stop():
                notes.append("a writer thread was still blocked 30 s after the stop")
        t_end = time.monotonic()
        # A backup that took writes and was unreachable at failback is reconciled
        # late, in the background: wait for that before checking.
        pending_deadline = time.monotonic() + 15.0
        while time.monotonic() < pending_deadline and any(
            s["failback_pending_since"] for s in db.get_provider_stats().values()
        ):
            time.sleep(0.05)
        pending = [n for n, s in db.get_provider_stats().items() if s["failback_pending_since"]]
        if pending:
            notes.append(f"failback still pending for {', '.join(pending)} at the check")
        down = [n for n, s in db.get_provider_stats().items() if not s["healthy"]]
        if down:
            notes.append(f"providers still marked down at the end: {', '.join(down)}")
    finally:
        db.close_all()
    writes = writers.writes
    acked = {w.id for w in writes if w.outcome == "ok"}
    unknown = {w.id for w in writes if w.outcome == "unknown"}
    failed = {w.id for w in writes if w.outcome == "error"}
    on_primary = ids_on(primary.url, session)
    primary_set = set(on_primary)
    missing: dict[str, int] = {}
    t_check = time.monotonic()
    catchup: float | None = None
    while True:
        missing = {b: len(acked - set(ids_on(f[b].url, session))) for b in BACKUPS}
        if not any(missing.values()):
            catchup = time.monotonic() - t_check
            break
        if time.monotonic() - t_check > 15.0:
            break
        time.sleep(0.1)
    with contextlib.suppress(RuntimeError):
        wait_streaming(f, 5.0)
    replication = _replication_state(f)
    acked_by = collections.Counter(ports.get(w.port or 0, "?") for w in writes
                                   if w.outcome == "ok")
    backup_acks = [w.end for w in writes if w.outcome == "ok" and w.port != primary.port
                   and w.end >= t_fault]
    during = [w for w in writes if w.end >= t_fault and w.start <= t_restore + (failback or 0)]
    errors = collections.Counter(w.error for w in writes if w.error is not None)
    out = FaultOutcome(
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
        first_backup_ack=(min(backup_acks) - t_fault) if backup_acks else None,
        longest_write=max((w.end - w.start for w in during), default=0.0),
        restore_took=t_restore - t_restore0,
        failback=failback,
        duration=t_end - writers.started,
        rate=len(acked) / (t_end - writers.started),
        reconciled=list(events.reconciled),
        errors={str(k): v for k, v in errors.items()},
        replication=replication,
        apply_errors=_apply_errors(f),
        notes=notes,
    )
    progress(
        f"continuity {fault}: acked {out.acked}, lost {out.lost}, unknown {out.unknown} "
        f"({out.unknown_on_primary} on the primary), failed {out.failed}, failback "
        f"{_s(out.failback)}, backups missing {out.missing_on_backups}"
    )
    return out


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


def _poller(url: str, pending: dict[uuid.UUID, float], seen: list[float], lock: threading.Lock,
            drain: Drain, every: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < drain.deadline:
            with lock:
                wanted = list(pending)
            if wanted:
                rows = conn.execute(
                    "SELECT id FROM session_memories WHERE id = ANY(%s)", (wanted,)
                ).fetchall()
                now = time.monotonic()
                with lock:
                    for (mid,) in rows:
                        t = pending.pop(mid, None)
                        if t is not None:
                            seen.append(now - t)
            elif drain.stopping:
                return
            time.sleep(every)


def replication_lag(f: Fleet, cfg: Config, progress: Progress) -> LagResult:
    truncate(f)
    wait_streaming(f, 30.0)
    poll_every = 0.002
    pendings: dict[str, dict[uuid.UUID, float]] = {b: {} for b in BACKUPS}
    seen: dict[str, list[float]] = {b: [] for b in BACKUPS}
    replay: dict[str, list[float]] = {b: [] for b in BACKUPS}
    replay_null = {b: 0 for b in BACKUPS}
    replay_bytes: dict[str, list[float]] = {b: [] for b in BACKUPS}
    lock = threading.Lock()
    drain = Drain()
    pollers = [
        threading.Thread(target=_poller, args=(f[b].url, pendings[b], seen[b], lock,
                                               drain, poll_every),
                         name=f"bench-lag-poll-{b}", daemon=True)
        for b in BACKUPS
    ]
    for t in pollers:
        t.start()
    apps = {subscription_name(b): b for b in BACKUPS}
    markers = 0
    db = DatabaseManager(f.urls(), order=list(PROVIDERS), dotenv=None, **MANAGER_OPTIONS)
    try:
        for _ in range(20):
            db.execute_query("SELECT 1")
        writers = Writers(db, "lag-load", cfg.lag_rate)
        try:
            with psycopg.connect(f[PRIMARY].url, autocommit=True) as mconn, psycopg.connect(
                f[PRIMARY].url, autocommit=True
            ) as sconn:
                t0 = time.monotonic() + 0.5  # the writers at full pace first
                i = 0
                while True:
                    due = t0 + i * 0.1
                    if due > t0 + cfg.lag_seconds:
                        break
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    mid = uuid.uuid4()
                    mconn.execute(INSERT, (mid, "lag-marker", f"m{i}"))
                    committed = time.monotonic()
                    with lock:
                        for b in BACKUPS:
                            pendings[b][mid] = committed
                    markers += 1
                    for app, lag, behind in sconn.execute(
                        "SELECT application_name, extract(epoch FROM replay_lag)::float8, "
                        "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 "
                        "FROM pg_stat_replication WHERE application_name = ANY(%s)",
                        (list(apps),),
                    ).fetchall():
                        if behind is not None:
                            replay_bytes[apps[app]].append(behind)
                        if lag is None:
                            replay_null[apps[app]] += 1
                        else:
                            replay[apps[app]].append(lag)
                    i += 1
        finally:
            writers.stop()
    finally:
        db.close_all()
        drain.stop(5.0)
        for t in pollers:
            t.join(timeout=10.0)
    span = cfg.lag_seconds + 0.5
    acked = writers.acked()
    result = LagResult(
        seconds=cfg.lag_seconds,
        rate_target=cfg.lag_rate,
        writes_acked=acked,
        writes_failed=len(writers.writes) - acked,
        end_to_end=seen,
        unseen={b: len(pendings[b]) for b in BACKUPS},
        replay_lag=replay,
        replay_null=replay_null,
        replay_bytes=replay_bytes,
        markers=markers,
        poll_interval=poll_every,
    )
    progress(
        f"replication lag: {acked / span:.0f} writes/s; "
        + ", ".join(
            f"{b} p50 {_q(seen[b], 0.5) * 1e3:.1f} ms p99 {_q(seen[b], 0.99) * 1e3:.1f} ms"
            for b in BACKUPS
            if seen[b]
        )
    )
    return result


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


def run(quick: bool = False, progress: Progress = _stderr) -> ContinuityResult:
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
    lines: list[str] = []
    add = lines.append
    add("## Continuity: acknowledged writes, replication lag, reconciliation")
    add("")
    lines.extend(header)
    add("")
    add(
        "Three embedded servers: supabase (primary), railway, neon; schema deployed on each "
        "(`apply_migrations(url, embedding_dim=8)`), logical replication from the primary "
        f"to both backups (`setup_replication`; streaming {res.streaming_after:.1f} s after "
        "setup). The lag and reconciliation measures share one such fleet; each fault "
        "scenario gets a fresh one. Manager options: "
        + ", ".join(f"`{k}={v:g}`" for k, v in MANAGER_OPTIONS.items())
        + ", failback reconciliation on (the default), other settings at their defaults."
    )
    add("")
    lines += _faults_section(res)
    lines += _lag_section(res.lag)
    lines += _recon_section(res.recon)
    lines += _targets_section(res)
    return "\n".join(lines)


def _faults_section(res: ContinuityResult) -> list[str]:
    lines: list[str] = []
    add = lines.append
    cfg = res.config
    add("### Acknowledged writes across crash → failover → restore → failback")
    add("")
    add(
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
    add("")
    add("| | " + " | ".join(o.fault for o in res.faults) + " |")
    add("|---|" + "---:|" * len(res.faults))

    def row(label: str, cell: Callable[[FaultOutcome], str]) -> None:
        add(f"| {label} | " + " | ".join(cell(o) for o in res.faults) + " |")

    row("writes attempted", lambda o: str(o.attempted))
    row("acknowledged", lambda o: str(o.acked))
    row("… by the primary / railway / neon",
        lambda o: " / ".join(str(o.acked_by.get(n, 0)) for n in PROVIDERS))
    row("**lost** (acknowledged, missing on the primary)", lambda o: f"**{o.lost}**")
    row("duplicated on the primary", lambda o: str(o.duplicated))
    row("outcome unknown (`OutcomeUnknownError`)", lambda o: str(o.unknown))
    row("… of which on the primary afterwards", lambda o: str(o.unknown_on_primary))
    row("other errors", lambda o: str(o.failed))
    row("… of which on the primary anyway", lambda o: str(o.failed_on_primary))
    row("acknowledged, missing on railway / neon (after ≤ 15 s of catch-up)",
        lambda o: " / ".join(str(o.missing_on_backups.get(b, "?")) for b in BACKUPS))
    row("backups held every acknowledged row after", lambda o: _s(o.backup_catchup))
    row("fault → first write acknowledged by a backup", lambda o: _s(o.first_backup_ack))
    row("slowest write during the fault", lambda o: f"{o.longest_write:.2f} s")
    row("restore (restart / SIGCONT) took", lambda o: f"{o.restore_took:.2f} s")
    row("restore → manager serving from the primary", lambda o: _s(o.failback))
    row("rows brought back by failback (on_reconcile)",
        lambda o: ", ".join(f"{n} from {s}" for s, n in o.reconciled) or "—")
    row("acknowledged writes/s over the run", lambda o: f"{o.rate:.0f}")
    add("")
    for o in res.faults:
        for e, n in sorted(o.errors.items(), key=lambda x: -x[1]):
            add(f"- {o.fault}: {n} × `{e}`")
        for note in o.notes:
            add(f"- {o.fault}: {note}")
    for o in res.faults:
        add(f"- {o.fault}: replication at the end: "
            + "; ".join(f"{b}: {p}" for b, p in o.replication.items())
            + " (PostgreSQL 16 counts a lost connection to the publisher as an apply error).")
        for b, e in o.apply_errors.items():
            add(f"- {o.fault}: last apply error on {b}: `{e}`")
    add(
        "- *duplicated* counts rows beyond one per id; the primary key makes it 0 by "
        "construction, so the meaningful checks are *lost*, *on the primary anyway* (a "
        "write reported as failed must not exist) and the backups."
    )
    add("")
    return lines


def _lag_section(lag: LagResult) -> list[str]:
    lines: list[str] = []
    add = lines.append
    add("### Replication lag under a steady write load")
    add("")
    span = lag.seconds + 0.5
    add(
        f"2 writer threads through the manager at {lag.rate_target:g} writes/s in all "
        f"({lag.writes_acked / span:.0f}/s achieved, {lag.writes_failed} failed) for "
        f"{lag.seconds:g} s. Every 100 ms a marker row is inserted on the primary over a "
        "direct connection; from the return of its (synchronous, autocommit) INSERT, each "
        f"backup is polled every {lag.poll_interval * 1e3:g} ms until the row is visible "
        f"there (end-to-end lag, {lag.markers} markers). At the same moments the primary's "
        "`pg_stat_replication.replay_lag` of `agent_factory_<backup>` is read."
    )
    add("")
    add("| backup | markers seen | never seen (5 s drain) | end-to-end p50 | p99 | max | "
        "replay_lag samples (of them NULL) | replay_lag p50 | p99 | WAL bytes behind "
        "replay_lsn p50 | p99 |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b in BACKUPS:
        e2e = lag.end_to_end[b]
        rl = lag.replay_lag[b]
        add(
            f"| {b} | {len(e2e)} | {lag.unseen[b]} | {_sec(_q(e2e, 0.5))} | "
            f"{_sec(_q(e2e, 0.99))} | {_sec(max(e2e) if e2e else float('nan'))} | "
            f"{len(rl) + lag.replay_null[b]} ({lag.replay_null[b]}) | {_sec(_q(rl, 0.5))} | "
            f"{_sec(_q(rl, 0.99))} | {_bytes(_q(lag.replay_bytes[b], 0.5))} | "
            f"{_bytes(_q(lag.replay_bytes[b], 0.99))} |"
        )
    add("")
    add(
        "`replay_lag` is what the manager's probe reports as `replication_lag_s`; it is "
        "computed by the primary from the subscriber's feedback messages (sent about every "
        "`wal_receiver_status_interval` or when the apply worker catches up), so it is "
        "coarse and reads NULL once the subscriber is idle. The end-to-end figure includes "
        "up to one poll interval plus one query round trip of measurement error."
    )
    add("")
    return lines


def _recon_section(rc: ReconcileResult) -> list[str]:
    lines: list[str] = []
    add = lines.append
    add("### Reconciliation of rows written on a backup during an outage")
    add("")
    add(
        f"{rc.rows} `session_memories` rows inserted directly on railway (batches of 1000 "
        f"with `executemany`, one transaction, {rc.insert_seconds:.2f} s), the tables empty "
        "on the other servers; then `reconcile(railway_conn, supabase_conn, "
        "tables=[\"session_memories\"])` with fresh connections, timed, twice."
    )
    add("")
    add("| run | seconds | source rows | inserted | updated | unchanged | skipped |")
    add("|---|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rc.runs, 1):
        add(f"| {'first' if i == 1 else 'second (idempotent)'} | {r.seconds:.2f} | "
            f"{r.source_rows} | {r.inserted} | {r.updated} | {r.unchanged} | {r.skipped} |")
    add("")
    add(f"Rows of the outage on the primary afterwards: {rc.on_primary} of {rc.rows}.")
    add("")
    return lines


def _targets_section(res: ContinuityResult) -> list[str]:
    lines: list[str] = []
    add = lines.append
    cfg, lag, rc = res.config, res.lag, res.recon
    add("### Targets")
    add("")
    add("| target | result | met |")
    add("|---|---|---|")
    for o in res.faults:
        ok = o.lost == LOST_TARGET and o.acked >= cfg.min_acked and o.failed_on_primary == 0
        add(f"| {o.fault}: 0 acknowledged writes lost out of ≥ {cfg.min_acked} | {o.lost} lost "
            f"of {o.acked} ({o.unknown} unknown outcome, {o.failed_on_primary} refused "
            f"writes present) | {yes(ok)} |")
    for o in res.faults:
        missing = sum(o.missing_on_backups.values())
        add(f"| {o.fault} (extra check): every acknowledged write on every backup | "
            + ", ".join(f"{o.missing_on_backups.get(b, '?')} missing on {b}" for b in BACKUPS)
            + f" | {yes(missing == 0)} |")
    for b in BACKUPS:
        p99 = _q(lag.end_to_end[b], 0.99)
        ok = bool(lag.end_to_end[b]) and p99 < LAG_P99_TARGET and lag.unseen[b] == 0
        add(f"| replication lag p99 < {LAG_P99_TARGET:g} s ({b}, end to end) | {_sec(p99)} | "
            f"{yes(ok)} |")
    first, second = rc.runs
    ok = first.seconds < RECONCILE_TARGET and first.copied == rc.rows
    add(f"| reconcile {rc.rows} rows < {RECONCILE_TARGET:g} s | {first.seconds:.2f} s, "
        f"{first.copied} copied | {yes(ok)} |")
    add(f"| second reconcile copies 0 rows | {second.copied} copied in {second.seconds:.2f} s | "
        f"{yes(second.copied == 0)} |")
    add("")
    return lines


def _bytes(v: float) -> str:
    return "—" if v != v else f"{v:,.0f}"


def _sec(v: float) -> str:
    if v != v:  # NaN: no sample
        return "—"
    return f"{v * 1e3:.1f} ms" if v < 1.0 else f"{v:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short outages, fewer rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.monotonic()
    res = run(args.quick)
    print(render(res, [f"- {time.monotonic() - t0:.0f} s, PostgreSQL {res.pg_version}."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

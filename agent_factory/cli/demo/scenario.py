"""The failover demo: three embedded providers under steady traffic, then faults.

`run_demo()` starts three local PostgreSQL servers named like the real
providers, sends a steady mix of reads and writes through one
`DatabaseManager`, crashes the primary (kill -9) and brings it back, then
hangs it (SIGSTOP) and resumes it. Each time it measures how long traffic
took to reach a backup and to come back to the primary, and how many
operations failed on the way. Nothing here needs a terminal: the CLI draws
`Demo.view()` live, tests read the returned `DemoResult`. What it counts and
narrates along the way is kept in `agent_factory.cli.demo.tally`.

Midway through the crash the application restarts (a new manager replaces
the old one, as after a deploy): the rows the old one wrote on railway are
known only to railway's journal. After each fault the demo checks that
every row written on a backup reached the primary, and shows the conflicts
failback met.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from ...continuity import journal
from ...core.database_manager import DatabaseManager
from ...errors import ManagerClosedError, OutcomeUnknownError
from ...testing.embedded import EmbeddedPostgres
from ...testing.fleet import PROVIDERS, Fleet, start_fleet
from .tally import Counts, EventLog, Served, Tally

__all__ = [
    "Counts",
    "Demo",
    "DemoConfig",
    "DemoResult",
    "DemoView",
    "FaultResult",
    "ProviderView",
    "run_demo",
]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS demo_events "
    "(id bigserial PRIMARY KEY, provider text, at timestamptz DEFAULT now())"
)
# Every server knows its own name (a per-database setting), so each answer
# says which provider served it even while worker threads race each other.
_READ = "SELECT current_setting('demo.provider'), max(id) FROM demo_events"
_WRITE = (
    "INSERT INTO demo_events (provider) VALUES (current_setting('demo.provider')) "
    "RETURNING provider, id"
)
_FAILOVER_WAIT = 5.0  # beyond hang_timeout, before declaring that failover never happened
_MAX_FAILURE_LINES = 20  # failures logged one by one; more would drown the narration


@dataclass(frozen=True)
class DemoConfig:
    """Durations in seconds; the defaults make a ~20 s demo at ~100 operations/s."""

    warmup: float = 3.0
    down_seconds: float = 4.0
    hang: bool = True
    hang_timeout: float = 2.0
    workers: int = 4
    ops_per_second: float = 100.0
    write_share: float = 0.3
    settle: float = 1.0
    recovery_limit: float = 30.0
    base_dir: Path | None = None  # where the servers' data goes; a temp dir when None

    def __post_init__(self) -> None:
        for name in ("down_seconds", "hang_timeout", "ops_per_second", "recovery_limit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup < 0 or self.settle < 0:
            raise ValueError("warmup and settle must be >= 0")
        if self.workers < 1 or not 0 <= self.write_share <= 1:
            raise ValueError("workers must be >= 1 and write_share within [0, 1]")


@dataclass(frozen=True)
class FaultResult:
    """What one fault of the primary cost, as measured by the clients.

    ``failover_s``: from the fault to the first operation served by a backup.
    ``back_to_primary_s``: from the server being back (restarted or resumed)
    to the first operation started afterwards and served by the primary.
    None means it did not happen within the demo's limits.
    """

    fault: str
    failover_s: float | None
    failed_reads: int
    unknown_writes: int
    failed_writes: int
    back_to_primary_s: float | None
    #: Rows written on a backup so far, and how many of them the primary lacks
    #: once failback is done (None: failback did not finish within the limit).
    backup_rows: int = 0
    missing_on_primary: int | None = None
    conflicts: int = 0


@dataclass(frozen=True)
class DemoResult:
    faults: tuple[FaultResult, ...]
    totals: Counts
    duration_s: float
    failover_bound_s: float

    @property
    def ok(self) -> bool:
        """Every fault failed over in bound and came back; no read nor write was lost."""
        t = self.totals
        return (
            bool(self.faults)
            and t.failed_reads == 0
            and t.failed_writes == 0
            and all(
                f.failover_s is not None
                and f.failover_s <= self.failover_bound_s
                and f.back_to_primary_s is not None
                and f.missing_on_primary == 0
                for f in self.faults
            )
        )


@dataclass(frozen=True)
class ProviderView:
    """One provider for display.

    ``errors`` counts the failures the manager saw there (queries, connects,
    probes); ``latency_ms`` is the last operation it served, timed by the client.
    """

    name: str
    role: str
    healthy: bool | None
    reads: int
    writes: int
    errors: int
    pool_used: int
    pool_size: int
    pool_max: int
    latency_ms: float | None


@dataclass(frozen=True)
class DemoView:
    """A consistent-enough picture of the running demo, for display."""

    elapsed: float
    phase: str
    providers: tuple[ProviderView, ...]
    events: tuple[str, ...]
    counts: Counts


@dataclass(frozen=True)
class _Fault:
    label: str
    inject: Callable[[], None]
    recover: Callable[[], None]
    recovering: str
    restart: bool = False  # the application restarts midway through the outage


def _ids_written_on_backups(server: EmbeddedPostgres) -> set[int]:
    with psycopg.connect(server.url, autocommit=True) as conn:
        return {r[0] for r in conn.execute(
            "SELECT id FROM demo_events WHERE provider <> %s", (PROVIDERS[0],))}


def _conflicts(server: EmbeddedPostgres) -> int:
    with psycopg.connect(server.url, autocommit=True) as conn:
        return sum(journal.conflicts_by_table(conn).values())


def _prepare(name: str, server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(_SCHEMA)
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET demo.provider = {}").format(
                sql.Identifier(server.dbname), sql.Literal(name)
            )
        )


class Demo:
    """One run of the scenario; `run()` once, `view()` from any thread meanwhile."""

    def __init__(
        self, config: DemoConfig | None = None, *, on_log: Callable[[str], None] | None = None
    ) -> None:
        self.config = config or DemoConfig()
        self._t0 = time.monotonic()
        self._log = EventLog(self._t0, on_log)
        self._primary = PROVIDERS[0]
        self._tally = Tally(PROVIDERS, self._primary)
        self._fleet = Fleet(())
        self._db: DatabaseManager | None = None
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._failure_lines = 0
        self.phase = "starting"

    def run(self) -> DemoResult:
        """Run the whole scenario; everything started is stopped again, even on Ctrl-C."""
        c = self.config
        try:
            self._start_servers()
            self._db = self._manager()
            self._start_workers()
            faults = self._scenario()
        finally:
            self._shutdown()
        return DemoResult(
            tuple(faults),
            self._tally.counts(),
            time.monotonic() - self._t0,
            failover_bound_s=c.hang_timeout + 1.0,
        )

    # -- setup and teardown ----------------------------------------------------

    def _manager(self) -> DatabaseManager:
        db = DatabaseManager(
            providers=self._fleet.urls(),
            order=list(PROVIDERS),
            hang_timeout=self.config.hang_timeout,
            listeners=[self._log],
        )
        db.register_table("demo_events")  # its changes on a backup come back at failback
        return db

    def _restart_application(self) -> None:
        """A new manager replaces the running one, as when the application restarts."""
        old, self._db = self._db, self._manager()
        self._log.add("RESTART: the application restarts during the outage; what it wrote "
                      "on the backup is now known only to that backup's journal")
        if old is not None:
            old.close_all()

    def _start_servers(self) -> None:
        self._log.add(f"starting {len(PROVIDERS)} embedded PostgreSQL servers: "
                      + ", ".join(PROVIDERS))
        self._fleet = start_fleet(PROVIDERS, base_dir=self.config.base_dir, proxy=False)
        for member in self._fleet:
            _prepare(member.name, member.server)
        ports = ", ".join(f"{m.name} :{m.server.port}" for m in self._fleet)
        self._log.add(f"servers ready ({ports}); table demo_events created on each")

    def _start_workers(self) -> None:
        c = self.config
        self._log.add(f"{c.workers} workers start ~{c.ops_per_second:g} ops/s "
                      f"({c.write_share:.0%} writes), hang_timeout={c.hang_timeout:g}s")
        for i in range(c.workers):
            t = threading.Thread(target=self._work, args=(i,), name=f"demo-worker-{i}",
                                 daemon=True)
            t.start()
            self._workers.append(t)

    def _shutdown(self) -> None:
        self.phase = "cleaning up"
        self._stop.set()
        self._fleet.release_faults()  # a frozen server would hold the workers until their deadline
        limit = time.monotonic() + self.config.hang_timeout + 10.0
        for t in self._workers:
            t.join(timeout=max(0.0, limit - time.monotonic()))
        if self._db is not None:
            self._db.close_all()
        # A server that fails to stop does not keep the others running; its finalizer kills it.
        self._fleet.close(
            on_error=lambda name, exc: self._log.add(f"could not stop {name} cleanly: {exc}"))
        self.phase = "done"

    # -- traffic ---------------------------------------------------------------

    def _work(self, index: int) -> None:
        rng = random.Random(index)
        interval = self.config.workers / self.config.ops_per_second
        next_at = time.monotonic() + rng.uniform(0, interval)
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            # After a stall (a hung provider) carry on at the normal pace, no burst.
            next_at = max(next_at + interval, time.monotonic())
            if not self._one_op(write=rng.random() < self.config.write_share):
                return

    def _one_op(self, *, write: bool) -> bool:
        db = self._db
        assert db is not None
        started = time.monotonic()
        try:
            row = db.execute_query(_WRITE if write else _READ, fetch_mode="one")
        except ManagerClosedError:
            if self._db is not db:  # the application restarted: again on the new one
                return self._one_op(write=write)
            return False
        except OutcomeUnknownError as exc:
            self._tally.failed(write, unknown=True)
            self._note_failure(f"write outcome unknown on {exc.provider}: {exc.reason}")
        except Exception as exc:  # the demo counts and shows every failure, it never dies of one
            self._tally.failed(write, unknown=False)
            kind = "write" if write else "read"
            self._note_failure(f"{kind} FAILED: {type(exc).__name__}: {exc}")
        else:
            self._tally.ok(write, str(row[0]), started, time.monotonic())
        return True

    def _note_failure(self, text: str) -> None:
        self._failure_lines += 1
        if self._failure_lines <= _MAX_FAILURE_LINES:
            self._log.add(text)
        elif self._failure_lines == _MAX_FAILURE_LINES + 1:
            self._log.add("further failures are counted but not logged")

    # -- scenario --------------------------------------------------------------

    def _scenario(self) -> list[FaultResult]:
        c = self.config
        server = self._fleet[self._primary].server
        self.phase = "warm-up"
        self._log.add(f"warming up for {c.warmup:g}s: all traffic on the primary {self._primary}")
        time.sleep(c.warmup)
        faults = [_Fault("crash (kill -9)", server.kill, server.restart, "restarting",
                         restart=True)]
        if c.hang:
            faults.append(_Fault("hang (SIGSTOP)", server.hang, server.resume, "resuming"))
        return [self._inject(f) for f in faults]

    def _inject(self, fault: _Fault) -> FaultResult:
        c, name = self.config, self._primary
        before = self._tally.counts()
        self.phase = f"{fault.label} of {name}"
        self._log.add(f"FAULT: {fault.label} of the primary {name}")
        at = time.monotonic()
        to_backup = self._tally.mark(at, on_primary=False)
        fault.inject()
        failover = to_backup.wait(c.hang_timeout + _FAILOVER_WAIT)
        if failover is None:
            self._log.add("MEASURED: no operation reached a backup")
        else:
            self._log.add(f"MEASURED: first operation served by a backup {failover:.3f}s "
                          "after the fault")
        if fault.restart:
            time.sleep(max(0.0, at + c.down_seconds / 2 - time.monotonic()))
            self._restart_application()
        time.sleep(max(0.0, at + c.down_seconds - time.monotonic()))
        self.phase = f"{fault.recovering} {name}"
        self._log.add(f"{fault.recovering} {name} after {time.monotonic() - at:.1f}s down")
        fault.recover()
        up = time.monotonic()
        back = self._tally.mark(up, on_primary=True).wait(c.recovery_limit)
        if back is None:
            self._log.add(f"MEASURED: writes did not return to {name} "
                          f"within {c.recovery_limit:g}s")
        else:
            self._log.add(f"MEASURED: writes back on {name} {back:.3f}s after it was up again")
        self.phase = "steady"
        time.sleep(c.settle)  # failures that trail the recovery still belong to this fault
        d = self._tally.counts() - before
        self._log.add(f"{fault.label}: {d.failed_reads} failed reads, {d.unknown_writes} "
                      f"unknown-outcome writes, {d.failed_writes} failed writes")
        written, missing, conflicts = self._failback_check(c.recovery_limit)
        return FaultResult(fault.label, failover, d.failed_reads, d.unknown_writes,
                           d.failed_writes, back, written, missing, conflicts)

    def _failback_check(self, limit: float) -> tuple[int, int | None, int]:
        """Rows written on a backup so far, how many the primary lacks, conflicts met."""
        db = self._db
        assert db is not None
        deadline = time.monotonic() + limit
        while any(db.failback_status()["pending"].values()) and time.monotonic() < deadline:
            db.failback_now()
            time.sleep(0.2)
        on = {m.name: _ids_written_on_backups(m.server) for m in self._fleet}
        written = set().union(*(on[n] for n in PROVIDERS[1:]))
        pending = sum(db.failback_status()["pending"].values())
        missing = None if pending else len(written - on[self._primary])
        conflicts = _conflicts(self._fleet[self._primary].server)
        self._log.add(f"MEASURED: {len(written)} rows written on backups so far, "
                      + ("failback not done" if missing is None
                         else f"{missing} of them missing on {self._primary}")
                      + f"; {conflicts} conflicts recorded by failback")
        return len(written), missing, conflicts

    # -- display ---------------------------------------------------------------

    def view(self, events: int = 12) -> DemoView:
        """The current state: per provider roles and traffic, the last ``events`` lines."""
        stats: Mapping[str, Mapping[str, object]] = {}
        db = self._db
        if db is not None and not db.closed:
            try:
                stats = db.get_provider_stats()
            except Exception:  # raced with close_all(); show traffic only
                stats = {}
        served = self._tally.served()
        rows = tuple(_provider_view(n, stats.get(n), served[n], self.phase) for n in PROVIDERS)
        return DemoView(time.monotonic() - self._t0, self.phase, rows,
                        self._log.lines(events), self._tally.counts())


def _provider_view(
    name: str, stats: Mapping[str, object] | None, served: Served, phase: str
) -> ProviderView:
    s = stats or {}

    def num(key: str) -> int:
        value = s.get(key, 0)
        return value if isinstance(value, int) else 0

    healthy = s.get("healthy")
    role = s.get("role")
    return ProviderView(
        name=name,
        role=str(role) if role is not None else ("starting" if phase == "starting" else "stopped"),
        healthy=healthy if isinstance(healthy, bool) else None,
        reads=served.reads,
        writes=served.writes,
        errors=num("errors"),
        pool_used=num("pool_size") - num("pool_idle"),
        pool_size=num("pool_size"),
        pool_max=num("pool_max"),
        latency_ms=served.latency_ms,
    )


def run_demo(
    config: DemoConfig | None = None, *, on_log: Callable[[str], None] | None = None
) -> DemoResult:
    """Run the scenario with ``config``; ``on_log`` receives each event line as it happens."""
    return Demo(config, on_log=on_log).run()

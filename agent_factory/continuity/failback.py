"""Failback: bring every change made on a backup back to the primary, from the journal.

While a backup stands in for the primary, the writes the managers send it
are recorded in its own database (`journal`): that record, not this
process's memory, is what failback drains, so it survives restarts and is
drained by whichever instance gets to it first (one per backup at a time).
A drain runs:

* before a recovered primary takes writes again: a pass while writes still
  go to the backup, then writes pause (in-flight ones finish), a last pass,
  and the primary's breaker closes; a drain that keeps failing holds the
  primary back for at most ``failback_max_wait`` seconds (ERROR logged,
  counted, shown), after which it takes writes and the drain keeps retrying;
* when a backup with a non-empty journal becomes reachable, and every
  ``drain_interval`` seconds from the start, on a daemon thread.

Conflicts (the primary changed a row too) are settled by the configured
policy and recorded on the primary (`merge`, table ``agent_factory_conflicts``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime, timezone
from typing import Any, TypeVar

import psycopg

from ..engine.events import Dispatcher
from ..engine.failover import Failover
from ..engine.provider import Unavailable
from ..engine.stats import FailbackStats
from ..engine.watchdog import Watchdog
from ..errors import ConfigurationError
from . import drain, journal, replication
from .merge import ConflictPolicy
from .peek import Peeker, Stall

logger = logging.getLogger("agent_factory.core.database_manager")
T = TypeVar("T")
#: How long a backup's subscription may have no worker (while the primary is
#: up) before its replication launcher is woken: three restart intervals.
WAKE_AFTER = 15.0


class PrimaryLost(Exception):
    """Internal: the primary failed during the drain."""


class BackupStatus:
    """What this process knows of one backup's journal (for stats, CLI, dashboard)."""

    def __init__(self) -> None:
        self.pending = 0
        self.oldest: datetime | None = None
        self.last_drain: datetime | None = None
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.skipped = False  # its last drain found another drainer at work
        self.drained = 0
        self.conflicts = 0
        self.stuck = 0  # source transactions no retry can apply

    def stats(self) -> FailbackStats:
        since = self.failing_since
        return {"failback_pending": self.pending, "failback_conflicts": self.conflicts,
                "failback_error": self.last_error,
                "failback_failing_s": None if since is None else time.monotonic() - since,
                "failback_stuck": self.stuck}

    def as_dict(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "oldest": None if self.oldest is None else self.oldest.isoformat(),
            "last_drain": None if self.last_drain is None else self.last_drain.isoformat(),
            "last_error": self.last_error,
            "drained": self.drained,
            "conflicts": self.conflicts,
        }


class Failback:
    """Drains the backups' journals into the primary (see the module's docstring)."""

    def __init__(self, core: Failover[Any], conninfos: Mapping[str, str],
                 events: Dispatcher, watchdog: Watchdog) -> None:
        self._core = core
        self._watchdog = watchdog
        self._conninfos = conninfos
        self._events = events
        self._tables: list[str] = list(core.settings.reconcile_tables)
        self._policy = ConflictPolicy.from_settings(core.settings)
        self._lock = threading.Lock()  # one drain at a time in this process
        self._installing = threading.Lock()
        self._journaled: dict[str, set[str]] = {n: set() for n in conninfos}
        self.status: dict[str, BackupStatus] = {n: BackupStatus() for n in conninfos}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        #: Since when (monotonic) each backup's subscription has had no worker.
        self._idle_since: dict[str, float] = {}
        settings = core.settings
        self._peeker = Peeker(conninfos, watchdog, settings.hang_timeout,
                              settings.connect_timeout)

    # -- the journal on each provider ----------------------------------------------------

    def register_table(self, table: str) -> None:
        """Journal ``table`` too: installed now on every reachable provider."""
        if table not in self._tables:
            self._tables.append(table)
        for name in self._conninfos:
            self._journaled[name].discard(table)
            # Unreachable: installed before the first write it takes.
            with suppress(Unavailable):
                self.ensure_journaled(name)

    def ensure_journaled(self, name: str) -> None:
        """Before a write goes to provider ``name`` as a backup: its tables record changes.

        Cached after the first success; a registered table that cannot be
        journaled (missing, no primary key) is a `ConfigurationError`.
        """
        if self.journaled(name):
            return
        try:
            self._install(name)
        except psycopg.OperationalError as exc:
            # The user's statement was not sent: the next provider may take it.
            raise Unavailable(f"journal check: {type(exc).__name__}", sent=False) from exc

    def _install(self, name: str) -> None:
        with self._installing:
            self._install_locked(name)

    def _install_locked(self, name: str) -> None:
        done = self._journaled[name]
        timeout = max(1, round(self._core.settings.connect_timeout))
        with psycopg.connect(self._conninfos[name], autocommit=False,
                             connect_timeout=timeout) as conn:
            for table in self._tables:
                if table in done:
                    continue
                try:
                    journal.install(conn, table)
                except ConfigurationError:
                    if table not in self._core.settings.reconcile_tables:
                        raise
                    # A managed table not deployed here: nothing to journal
                    # (deploy the schema before a provider takes writes).
                done.add(table)

    def journaled(self, name: str) -> bool:
        """Every table is known to record changes on ``name`` (no I/O)."""
        done = self._journaled[name]
        return all(t in done for t in self._tables)

    # -- hooks called by ProviderHealth -----------------------------------------------

    def before_return(self, name: str) -> bool:
        """Drain every backup before provider ``name`` (if it is the primary) takes writes."""
        core = self._core
        if name != core.primary or not core.track_writes:
            return True
        with self._lock:
            t0 = time.monotonic()
            try:
                moved = self._drain_all(name)
                if self._others_draining(name):
                    # Writes were not paused: the last pass would find the same
                    # drainer at work while writes waited for it (a connect to the
                    # primary and a few round trips, every probe, over a slow link).
                    return False
                if not core.pause_writes(core.settings.write_pause_timeout):
                    logger.warning("failback to %r: writes in flight did not finish; retrying",
                                   name, extra={"event": "failback_postponed", "provider": name})
                    core.resume_writes()
                    return False
                moved += self._drain_all(name)
            except PrimaryLost as exc:
                logger.warning("failback to %r postponed: %s", name, exc,
                               extra={"event": "failback_postponed", "provider": name})
                core.resume_writes()
                return False
            if not self._may_return():
                core.resume_writes()
                return False
            if self._others_draining(name):
                core.resume_writes()
                return False
            if moved:
                logger.warning("failback to %r: %d changes brought back in %.0f ms", name,
                               moved, (time.monotonic() - t0) * 1e3,
                               extra={"event": "failback", "provider": name})
            return True

    def _others_draining(self, name: str) -> bool:
        """The last pass found another instance draining a backup right now: its
        changes are not on the primary yet (logged; the next probe looks again)."""
        busy = [b for b, st in self.status.items() if st.skipped]
        if busy:
            logger.info("failback to %r waits for another drainer of %s", name,
                        ", ".join(busy),
                        extra={"event": "failback_postponed", "provider": name})
        return bool(busy)

    def after_return(self, name: str) -> None:
        self._core.resume_writes()

    def backup_healthy(self, name: str) -> None:
        """A backup is reachable again: drain it soon (the drainer thread does)."""
        if name != self._core.primary:
            self._wake.set()

    # -- the drainer thread ------------------------------------------------------------

    def start(self) -> None:
        """Start the daemon that drains non-empty journals (first check at once).

        Writes are held until that first check is done (`_first_pass`): an
        instance started while the backups still hold changes from an outage
        (another instance draining them, or none left to) must not write on
        the primary before they are back, or their replay would land on its
        newer writes.
        """
        if self._thread is None and self._core.track_writes:
            if len(self._conninfos) > 1:
                # Long enough to look at every backup's journal, which a live
                # one answers in milliseconds (`_first_pass` holds them longer
                # if it finds changes there).
                self._core.hold_writes(self._core.settings.hang_timeout)
            self._thread = threading.Thread(target=self._loop, name="agent-factory-drainer",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._open_writes()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        self._peeker.close()

    def _loop(self) -> None:
        try:
            self._first_pass()
        finally:
            self._open_writes()
        # Journals in place before any write needs them (else the first
        # write to a backup installs them on its way).
        for name in self._conninfos:
            if name != self._core.primary and not self._stop.is_set():
                with suppress(Exception):
                    self.ensure_journaled(name)
        while not self._stop.is_set():
            try:
                self._keep_sequences_ahead()
                self.drain_now()
                self._keep_replication_running()
            except Exception:
                logger.exception("failback drainer: unexpected error; retrying",
                                 extra={"event": "failback_failed", "provider": None})
            self._wake.wait(self._core.settings.drain_interval)
            self._wake.clear()

    def _first_pass(self) -> None:
        """Drain what the backups hold before this instance writes (see `start`).

        Writes are held for ``hang_timeout`` while each backup's journal is
        looked at (a backup that does not answer by then is not reachable, as
        far as this pass goes). When one holds changes, the hold lasts until
        this pass drained them or, while another instance drains them (looked
        at again every ``probe_interval``), up to ``write_pause_timeout`` from
        the start (a held write waits no longer either). A primary that is
        down or unreachable ends it at once: writes go to a backup, and the
        drain waits for the primary's return as always. So does a drain that
        fails (reported as any other: instances already writing on the primary
        did not wait for it).
        """
        core = self._core
        settings = core.settings
        deadline = time.monotonic() + settings.write_pause_timeout
        primary = core.primary
        if not any(self._has_pending(b, unknown=False) for b in self._conninfos
                   if b != primary and core.providers[b].health.breaker.up):
            return
        while not self._stop.is_set() and core.providers[primary].health.breaker.up:
            core.hold_writes(deadline - time.monotonic())
            with self._lock:
                try:
                    self._drain_all(primary)
                except PrimaryLost:
                    return
            if not self._others_draining(primary) or time.monotonic() >= deadline:
                return
            self._stop.wait(settings.probe_interval)
            primary = core.primary

    def _open_writes(self) -> None:
        """End the start-up hold."""
        self._core.hold_writes(0)

    def _keep_sequences_ahead(self) -> None:
        """Backups' sequences ahead of the primary's, before any of them takes writes.

        Sequences are not replicated: a backup's would hand out ids the
        primary already used (and replicated to it). Checked every
        ``drain_interval`` while the primary is up; a backup is moved to the
        primary's value plus `journal.SEQUENCE_GAP` when it is behind.
        """
        core = self._core
        if not core.providers[core.primary].health.breaker.up:
            return
        values = self._peeker.run(core.primary,
                                  lambda c: journal.sequence_values(c, self._tables))
        if not values:
            return
        for name in self._conninfos:
            if name != core.primary and core.providers[name].health.breaker.up:
                self._peeker.run(name, lambda c: journal.keep_sequences_ahead(c, values))

    def _keep_replication_running(self) -> None:
        """Wake a backup's replication launcher when its subscription has had no
        worker for `WAKE_AFTER` seconds while the primary is up.

        PostgreSQL restarts a failed worker every ``wal_retrieve_retry_interval``
        (5 s); seen here under load, after a restart of the primary, a backup's
        launcher that did not for a minute, so the backup never converged.
        Enabling the subscription again wakes it (a no-op otherwise).
        """
        core = self._core
        now = time.monotonic()
        if not core.providers[core.primary].health.breaker.up:
            self._idle_since.clear()
            return
        for name in self._conninfos:
            if name == core.primary or not core.providers[name].health.breaker.up:
                continue
            idle = self._peeker.run(name, replication.idle_subscriptions)
            if not idle:
                self._idle_since.pop(name, None)
                continue
            since = self._idle_since.setdefault(name, now)
            if now - since < WAKE_AFTER:
                continue
            for sub in idle:
                self._peeker.run(name, functools.partial(replication.wake_launcher, name=sub))
            logger.warning("backup %r: subscription %s has had no worker for %.0f s; woke "
                           "the replication launcher", name, ", ".join(idle), now - since,
                           extra={"event": "replication_woken", "provider": name})
            self._idle_since[name] = now

    def drain_now(self) -> int:
        """Drain every reachable backup into the primary if it is up; changes moved."""
        core = self._core
        primary = core.primary
        if not core.providers[primary].health.breaker.up:
            return 0
        with self._lock:
            try:
                return self._drain_all(primary)
            except PrimaryLost as exc:
                logger.warning("failback drain postponed: %s", exc,
                               extra={"event": "failback_postponed", "provider": primary})
                return 0

    # -- the drain ---------------------------------------------------------------------

    def _may_return(self) -> bool:
        """False while a reachable backup's drain fails, up to ``failback_max_wait``."""
        now = time.monotonic()
        bound = self._core.settings.failback_max_wait
        for name, st in self.status.items():
            if st.failing_since is not None and now - st.failing_since < bound:
                return False
            if st.failing_since is not None:
                logger.error("failback: drain of %r has failed for %.0f s (%s); the primary "
                             "takes writes anyway, %d changes stay pending", name,
                             now - st.failing_since, st.last_error, st.pending,
                             extra={"event": "failback_stuck", "provider": name})
        return True

    def _drain_all(self, primary: str) -> int:
        moved = 0
        for st in self.status.values():
            st.skipped = False
        stall = Stall("failback", 3 * self._core.settings.hang_timeout)
        backups = [b for b in self._conninfos if b != primary
                   and self._core.providers[b].health.breaker.up and self._has_pending(b)]
        if not backups:
            return 0
        with ExitStack() as stack:
            try:
                target = stack.enter_context(self._connect(primary, stall))
            except psycopg.Error as exc:
                raise PrimaryLost(f"cannot connect to {primary!r}: {type(exc).__name__}") from exc
            subscribed = journal.subscribers(target)
            for backup in backups:
                moved += self._drain_one(target, primary, backup, backup in subscribed, stall)
        return moved

    def _has_pending(self, backup: str, unknown: bool = True) -> bool:
        """Whether ``backup``'s journal holds changes (one short query on a kept connection);
        ``unknown`` when it cannot tell (by default: try the drain, whose failure is
        counted and shown)."""
        st = self.status[backup]
        found = self._peeker.run(backup, journal.pending)
        if found is None:
            return unknown
        st.pending, st.oldest = found
        return st.pending > 0

    def _drain_one(self, target: psycopg.Connection[Any], primary: str, backup: str,
                   subscribed: bool, stall: Stall) -> int:
        st = self.status[backup]

        committed = [0]  # changes of the batches committed so far, for a failure's return

        def batch_done(report: drain.DrainReport) -> None:
            stall.alive()
            committed[0] += report.changes
            st.drained += report.changes
            st.conflicts += report.conflicts

        try:
            # A second connection to the backup prunes each batch's entries
            # while the primary applies it (`drain.drain`'s ``pruner``).
            with self._connect(backup, stall) as source, \
                    self._connect(backup, stall) as pruner:
                # `_has_pending` has just read the journal: no second look first.
                total = drain.drain_all(source, target, backup, self._policy,
                                          delete_inserted_on_source=subscribed,
                                          on_batch=batch_done,
                                          lock_timeout=self._core.settings.hang_timeout,
                                          pruner=pruner)
                with source.transaction():
                    st.pending, st.oldest = journal.pending(source)
        except psycopg.Error as exc:
            if target.broken or target.closed:
                raise PrimaryLost(f"connection to {primary!r} lost") from exc
            self._failed(st, backup, f"{type(exc).__name__}: {exc}".strip())
            return committed[0]
        except Exception as exc:  # noqa: BLE001 - any failure is this backup's, reported
            self._failed(st, backup, f"{type(exc).__name__}: {exc}".strip())
            return committed[0]
        st.skipped, moved, stuck = total.skipped, total.changes, total.stuck
        st.stuck = stuck
        if total.conflicts:
            logger.warning("failback from %r: %d conflicts (the primary had changed those rows "
                           "too), settled by delta columns or %s; both versions kept in "
                           "agent_factory_conflicts", backup, total.conflicts, self._policy.name,
                           extra={"event": "failback_conflicts", "provider": backup})
            conflicts = total.conflicts
            self._events.emit(lambda li: li.on_conflicts(primary, backup, conflicts))
        self._ok(st, backup)
        if stuck:
            # Not a failing drain (the rest went through): nothing waiting can fix.
            st.last_error = (f"{stuck} source transaction(s) touch tables the primary lacks; "
                             "left in agent_factory_journal for an operator")
            logger.error("failback from %r: %s", backup, st.last_error,
                         extra={"event": "failback_stuck", "provider": backup})
        if moved:
            self._core.diverged.pop(backup, None)
            self._events.emit(lambda li: li.on_reconcile(primary, backup, moved))
        return moved

    def _ok(self, st: BackupStatus, backup: str) -> None:
        st.last_drain = datetime.now(timezone.utc)
        st.last_error = None
        st.failing_since = None

    def _failed(self, st: BackupStatus, backup: str, error: str) -> None:
        st.last_error = error.splitlines()[0][:300]
        if st.failing_since is None:
            st.failing_since = time.monotonic()
        logger.error("failback: drain of %r failed (%s); its %d changes stay pending and "
                     "are retried", backup, st.last_error, st.pending,
                     extra={"event": "failback_failed", "provider": backup})

    @contextmanager
    def _connect(self, name: str, stall: Stall) -> Iterator[psycopg.Connection[Any]]:
        conn = psycopg.connect(self._conninfos[name], connect_timeout=10)
        stall.alive()
        # With its pgconn the watchdog takes the socket's progress as news: a
        # batch crossing a slow link is not a hang (only progress per batch was,
        # and such a batch was abandoned and retried for ever).
        watch = self._watchdog.watch(conn.pgconn.socket, stall, pgconn=conn.pgconn)
        try:
            with conn:
                journal.prepare_session(conn)
                yield conn
        finally:
            self._watchdog.unwatch(watch)

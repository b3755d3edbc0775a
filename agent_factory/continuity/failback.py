"""Failback: before the primary takes traffic again, bring back the rows written on backups.

While the primary was down, writes went to a backup (`Failover.diverged`
says which, and since when). When the primary passes its recovery probes,
the prober asks this module first:

1. pass 1 copies the backups' rows written since then to the primary while
   writes still flow to the backup;
2. writes are paused (new ones wait, those in flight finish), pass 2 copies
   what arrived meanwhile;
3. the primary's breaker closes, the pause ends, writes go to the primary.

If the primary fails during this, the recovery is vetoed and tried again at
the next probe; a backup that cannot be reached keeps its rows pending and is
reconciled as soon as it is healthy again. Both managers (sync and async)
use it; it runs on the prober's thread with its own connections.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

from ..engine.events import Dispatcher
from ..engine.failover import Failover
from ..engine.watchdog import Watch, Watchdog
from .reconcile import changed_ids, reconcile, tables_on_both

logger = logging.getLogger("agent_factory.core.database_manager")


class _Stall:
    """A watchdog target whose sign of life is the copy's progress."""

    tracks_backends = False

    def __init__(self, name: str, hang_timeout: float) -> None:
        self.name = name
        self.hang_timeout = hang_timeout
        self.last_alive = time.monotonic()

    def alive(self) -> None:
        self.last_alive = time.monotonic()

    def progress(self, table: str, done: int, total: int) -> None:
        self.last_alive = time.monotonic()

    def request_probe(self, watch: Watch | None = None) -> None:
        """Nothing to probe: only progress proves the copy alive."""


class PrimaryLost(Exception):
    """Internal: the primary failed during the reconciliation."""


class Failback:
    """Runs the reconciliation a returning primary needs."""

    def __init__(self, core: Failover[Any], conninfos: Mapping[str, str],
                 events: Dispatcher, watchdog: Watchdog) -> None:
        self._core = core
        self._watchdog = watchdog
        self._conninfos = conninfos
        self._events = events
        self._tables: list[str] = list(core.settings.reconcile_tables)
        self._lock = threading.Lock()  # one reconciliation at a time
        self._paused = False

    def register_table(self, table: str) -> None:
        """Also reconcile ``table`` (needs an ``id`` key and an ``updated_at`` column)."""
        if table not in self._tables:
            self._tables.append(table)

    # -- hooks called by ProviderHealth -----------------------------------------------

    def before_return(self, name: str) -> bool:
        """Reconcile before provider ``name`` (if it is the primary) takes traffic."""
        core = self._core
        if name != core.primary or not core.diverged or not core.track_writes:
            return True
        with self._lock:
            pending = dict(core.diverged)
            t0 = time.monotonic()
            try:
                started = datetime.now(timezone.utc)
                rows = self._pass(name, pending)
                if not core.pause_writes(core.settings.write_pause_timeout):
                    logger.warning("failback to %r: writes in flight did not finish; retrying",
                                   name)
                    core.resume_writes()
                    return False
                self._paused = True
                margin = timedelta(seconds=core.settings.reconcile_margin)
                rows += self._pass(name, {b: started - margin for b in pending})
            except PrimaryLost as exc:
                logger.warning("failback to %r postponed: %s", name, exc)
                self._resume()
                return False
            logger.warning(
                "failback to %r: %d rows brought back from %s in %.0f ms", name, rows,
                ", ".join(sorted(pending)), (time.monotonic() - t0) * 1e3,
            )
            return True

    def after_return(self, name: str) -> None:
        self._resume()

    def backup_healthy(self, name: str) -> None:
        """A backup with pending rows is reachable again: bring them back now."""
        core = self._core
        if name == core.primary or name not in core.diverged:
            return
        if not core.providers[core.primary].health.breaker.up:
            return  # the primary is down: its own return will reconcile

        def run() -> None:
            with self._lock:
                since = core.diverged.get(name)
                if since is not None:
                    try:
                        self._pass(core.primary, {name: since})
                    except PrimaryLost as exc:
                        logger.warning("late reconciliation from %r failed: %s", name, exc)

        threading.Thread(target=run, name="agent-factory-failback", daemon=True).start()

    # -- the copy ----------------------------------------------------------------------

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
        self._core.resume_writes()

    def _pass(self, primary: str, pending: Mapping[str, datetime]) -> int:
        """Copy each pending backup's rows to the primary; the number of rows copied.

        Every connection of the pass is under the watchdog: when the copy
        makes no progress (no batch done) for ``3 * hang_timeout``, its
        sockets are shut, so a server that goes silent mid-copy cannot hold
        the prober (and, during the write pause, the writers) for long.
        """
        deadline = _Stall("failback", 3 * self._core.settings.hang_timeout)
        rows = 0
        with ExitStack() as stack:
            try:
                target = stack.enter_context(self._connect(primary, deadline))
            except psycopg.Error as exc:
                raise PrimaryLost(f"cannot connect to {primary!r}: {type(exc).__name__}") from exc
            for backup, since in pending.items():
                try:
                    source = stack.enter_context(self._connect(backup, deadline))
                except psycopg.Error:
                    logger.warning("failback: backup %r unreachable; its rows stay pending",
                                   backup)
                    continue
                try:
                    tables = tables_on_both(source, target, self._tables)
                    # Decided before the copy, at one instant: rows written on the
                    # backup after it are left to the next pass (and its spread).
                    outage, updated = changed_ids(source, target, tables, since)
                except psycopg.Error as exc:
                    if target.broken or target.closed:
                        raise PrimaryLost(f"connection to {primary!r} lost") from exc
                    logger.warning("failback from %r failed (%s); its rows stay pending",
                                   backup, type(exc).__name__)
                    continue
                ids = {t: outage[t] + updated[t] for t in tables}
                rows += self._copy(source, target, backup, primary, tables, ids, deadline)
                self._spread(source, backup, primary, tables, outage, deadline)
        return rows

    @contextmanager
    def _connect(self, name: str, stall: _Stall) -> Iterator[psycopg.Connection[Any]]:
        conn = psycopg.connect(self._conninfos[name])
        stall.alive()
        watch = self._watchdog.watch(conn.pgconn.socket, stall)
        try:
            with conn:
                yield conn
        finally:
            self._watchdog.unwatch(watch)

    def _spread(self, source: psycopg.Connection[Any], backup: str, primary: str,
                tables: list[str], outage: Mapping[str, list[str]], stall: _Stall) -> None:
        """Copy the outage rows to the other subscribed backups too.

        The primary's copies carry a replication origin, and subscriptions
        with ``origin = none`` skip them: without this, a second backup would
        never see the rows written on the first during the outage. Only the
        rows written on the backup itself are copied (``outage``): a row it
        got from the primary may still be on its way to the other backup by
        replication, and arriving twice would stop that replication on a
        duplicate key.
        """
        if not any(outage.values()):
            return
        subscribers = self._core.providers[primary].health.subscribers
        for other in self._core.providers:
            if other in (primary, backup) or other not in subscribers:
                continue
            try:
                with self._connect(other, stall) as dest:
                    present = tables_on_both(source, dest, tables)
                    reconcile(source, dest, tables=present, only_ids=outage,
                              source_name=backup, target_name=other,
                              on_progress=stall.progress)
            except Exception as exc:  # best effort: `sync` repairs it by hand
                logger.warning("failback: rows of %r not copied to %r (%s); run "
                               "'agent-factory-db sync --from %s --to %s'",
                               backup, other, type(exc).__name__, backup, other)

    def _copy(self, source: psycopg.Connection[Any], target: psycopg.Connection[Any],
              backup: str, primary: str, tables: list[str], ids: Mapping[str, list[str]],
              stall: _Stall) -> int:
        try:
            reports = reconcile(source, target, tables=tables, only_ids=ids,
                                source_name=backup, target_name=primary,
                                on_progress=stall.progress)
        except psycopg.Error as exc:
            if target.broken or target.closed:
                raise PrimaryLost(f"connection to {primary!r} lost") from exc
            logger.warning("failback from %r failed (%s); its rows stay pending",
                           backup, type(exc).__name__)
            return 0
        except Exception as exc:  # CopyError, ProviderUnavailableError: keep pending
            logger.warning("failback from %r failed: %s; its rows stay pending", backup, exc)
            return 0
        self._core.diverged.pop(backup, None)
        copied = sum(r.copied for r in reports)
        self._events.emit(lambda li: li.on_reconcile(primary, backup, copied))
        return copied

"""The split-brain fence: no writes on a backup while the primary is alive for others.

Every instance that reaches the primary bumps a heartbeat row there
(``agent_factory_heartbeat``) about once a second; logical replication
carries it to the backups. An instance that lost the primary watches the
heartbeat *as its backups receive it*: while it still moves -- or, while a
backup applies one long transaction that holds the heartbeats back, that
transaction's messages still arrive -- the primary is alive for someone
(this instance is cut off, not the primary dead), and
writes on a backup are refused with `SplitBrainRefusedError`; reads are
served. Once it has stood still for ``witness_quiet`` seconds (as this
instance's own monotonic clock measures it -- two servers' clocks are never
compared), the primary is taken for dead and backups take writes.

A primary that hangs while it streams a transaction leaves the backup's
apply worker inside that transaction, holding the row locks of what it has
applied so far, until ``wal_receiver_timeout`` (60 s by default) -- writes
on those rows would wait that long. So once the heartbeat has stood still
for ``witness_quiet``, the watcher ends such a worker's transaction
(``pg_terminate_backend`` on the apply worker that holds a transaction id,
waits for data and has received none for ``witness_quiet``: allowed to the
subscription's owner). PostgreSQL restarts the worker; it
gets the whole transaction again once the primary streams.

A backup that does not subscribe to the primary has no witness: writes are
allowed at once (the spec's setup of independent databases; the README says
what that risks). ``split_brain_fence=False`` turns the fence off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from ..engine.failover import Failover
from ..errors import SplitBrainRefusedError
from .peek import Peeker

__all__ = ["HEARTBEAT", "Witness", "Sight"]

logger = logging.getLogger("agent_factory.core.database_manager")

HEARTBEAT = "agent_factory_heartbeat"
#: How often an instance that reaches the primary bumps the heartbeat.
BEAT_INTERVAL = 1.0


class Sight:
    """What this instance saw of the heartbeat on one backup (no I/O)."""

    def __init__(self) -> None:
        self.subscribed: bool | None = None  # unknown until first read
        #: The heartbeat and the subscription's received position, as last read.
        self.value: tuple[Any, ...] | None = None
        self.changed_at: float | None = None  # monotonic time the value last moved

    def see(self, subscribed: bool, value: tuple[Any, ...] | None, now: float) -> None:
        """``value``: the heartbeat, and the apply worker's last receipt while it is
        inside a transaction (else None). A receipt that appears or goes is no
        news: the worker ended its transaction, or the watcher ended it."""
        self.subscribed = subscribed
        old, self.value = self.value, value
        beat, receipt = value if value is not None else (None, None)
        old_beat, old_receipt = old if old is not None else (None, None)
        if (self.changed_at is None or beat != old_beat
                or None not in (receipt, old_receipt) and receipt != old_receipt):
            self.changed_at = now

    def quiet_for(self, now: float) -> float:
        return 0.0 if self.changed_at is None else now - self.changed_at


class Witness:
    """Beats while the primary is up, watches the backups while it is down."""

    def __init__(self, core: Failover[Any], conninfos: Mapping[str, str],
                 peeker: Peeker) -> None:
        self._core = core
        self._conninfos = conninfos
        self._peeker = peeker
        self.sights = {n: Sight() for n in conninfos}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0
        self._no_table_until = 0.0
        self._warned: set[str] = set()

    # -- the rule (no I/O) ------------------------------------------------------------

    def known(self, backup: str) -> bool:
        """Whether `check` can decide without I/O (else call `look` first)."""
        return not self._core.settings.split_brain_fence or (
            self.sights[backup].subscribed is not None)

    def look(self, backup: str) -> None:
        """Read ``backup``'s subscription and heartbeat now (once, before a first check)."""
        self._peeker.run(backup, self._watch(backup))

    def check(self, backup: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        """Raise `SplitBrainRefusedError` unless ``backup`` may take writes now."""
        settings = self._core.settings
        if not settings.split_brain_fence:
            return
        sight = self.sights[backup]
        if sight.subscribed is not True:
            return  # no replication from the primary (or unreadable): no witness
        quiet = sight.quiet_for(clock())
        if quiet < settings.witness_quiet:
            primary = self._core.primary
            raise SplitBrainRefusedError(
                backup,
                f"the primary {primary!r} may be alive for other instances (its heartbeat "
                f"last moved on {backup!r} {quiet:.1f}s ago; writes move after "
                f"{settings.witness_quiet:g}s without one): this write was not sent; reads "
                "are served")

    # -- the thread -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and self._core.settings.split_brain_fence:
            self._thread = threading.Thread(target=self._loop, name="agent-factory-witness",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._peeker.close()

    def _loop(self) -> None:
        while not self._stop.wait(BEAT_INTERVAL / 4):
            core = self._core
            if core.providers[core.primary].health.breaker.up:
                for sight in self.sights.values():
                    sight.changed_at = None  # the next outage starts watching afresh
                if time.monotonic() - self._last_beat >= BEAT_INTERVAL:
                    self._peeker.run(core.primary, self._beat)
                continue
            quiet = core.settings.witness_quiet
            for name in self._conninfos:
                if name != core.primary and not self._stop.is_set():
                    self._peeker.run(name, self._watch(name))
                    sight = self.sights[name]
                    if sight.subscribed and sight.quiet_for(time.monotonic()) >= quiet:
                        self._peeker.run(name, self._release(name))

    def _beat(self, conn: psycopg.Connection[Any]) -> None:
        self._last_beat = time.monotonic()
        if self._no_table_until > self._last_beat:
            return
        row = conn.execute("SELECT to_regclass(%s)", (HEARTBEAT,)).fetchone()
        if row is None or row[0] is None:  # schema not deployed: look again later
            self._no_table_until = self._last_beat + 30.0
            return
        conn.execute(f"INSERT INTO {HEARTBEAT} AS h (id, beat) VALUES (1, 1) ON CONFLICT (id) "
                     f"DO UPDATE SET beat = h.beat + 1, beat_at = now()")

    def _release(self, name: str) -> Callable[[psycopg.Connection[Any]], None]:
        """End the apply worker's half-received transaction on backup ``name`` (if any)."""
        def release(conn: psycopg.Connection[Any]) -> None:
            try:
                # Only a worker waiting for the rest of its transaction that has
                # received nothing for witness_quiet (the backup's own clock against
                # its own stamp): one still receiving or applying a long transaction
                # of a live primary is left alone.
                rows = conn.execute(
                    "SELECT s.subname, pg_terminate_backend(s.pid) FROM pg_stat_subscription s "
                    "JOIN pg_stat_activity a ON a.pid = s.pid "
                    "WHERE s.subname LIKE 'agent\\_factory\\_%%' AND a.backend_xid IS NOT NULL "
                    "AND a.datname = current_database() AND a.wait_event = 'LogicalApplyMain' "
                    "AND s.last_msg_receipt_time < now() - make_interval(secs => %s)",
                    (self._core.settings.witness_quiet,)).fetchall()
            except psycopg.errors.InsufficientPrivilege as exc:
                if name not in self._warned:
                    self._warned.add(name)
                    logger.warning("backup %r: cannot end the apply worker stuck in a "
                                   "transaction of the silent primary (%s); writes on the rows "
                                   "it holds wait for wal_receiver_timeout", name, exc)
                return
            for subscription, _ in rows:
                logger.warning("backup %r: ended the apply worker of %s, stuck inside a "
                               "transaction of the silent primary (its row locks held writes)",
                               name, subscription)
        return release

    def _watch(self, name: str) -> Callable[[psycopg.Connection[Any]], None]:
        def read(conn: psycopg.Connection[Any]) -> None:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_subscription s JOIN pg_database d ON "
                "d.oid = s.subdbid AND d.datname = current_database() WHERE s.subenabled), "
                "to_regclass(%s) IS NOT NULL", (HEARTBEAT,)).fetchone()
            subscribed = bool(row and row[0] and row[1])
            value = None
            if subscribed:
                # The heartbeat; and, while the apply worker is inside a transaction,
                # when it last received a message: a long transaction holds the
                # heartbeats back behind it, while its own changes keep arriving.
                seen = conn.execute(
                    f"SELECT (SELECT beat FROM {HEARTBEAT} WHERE id = 1), "
                    "(SELECT max(st.last_msg_receipt_time)::text FROM pg_stat_subscription st "
                    "JOIN pg_stat_activity a ON a.pid = st.pid AND a.backend_xid IS NOT NULL "
                    "AND a.datname = current_database() "
                    "WHERE st.subname LIKE 'agent\\_factory\\_%')").fetchone()
                value = None if seen is None else (seen[0], seen[1])
            self.sights[name].see(subscribed, value, time.monotonic())
        return read

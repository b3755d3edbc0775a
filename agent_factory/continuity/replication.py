"""Continuous logical replication from the primary to every backup provider.

The primary publishes the managed tables in the publication ``agent_factory``;
backup ``NAME`` subscribes with the subscription ``agent_factory_NAME`` (its
replication slot and its ``application_name`` on the primary carry the same
name), ``WITH (origin = none)``: rows that the failback reconciliation writes
under a replication origin are not sent back. After an outage of the primary
the apply workers reconnect by themselves; an apply error (a conflicting row)
is retried by PostgreSQL and shows in `replication_status` as a growing error
count.

    setup_replication(settings)      publication + one subscription per backup; idempotent
    replication_status(settings)     one `BackupStatus` per backup
    teardown_replication(settings)   subscriptions, then the publication; idempotent

A lost connection to the primary counts as an apply error in PostgreSQL 16,
so ``disable_on_error`` is not used: it would leave replication off after
every restart of the primary.

Sequences and DDL are not replicated. The subscription's connection string,
password included, is stored in the backup's ``pg_subscription`` (readable by
superusers only); it never appears in an error or a message of this module.

The parts without I/O (names, SQL, `BackupStatus`) are in `agent_factory.continuity.subscription`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from ..engine.settings import ProviderSettings, Settings
from ..engine.walclock import WalClock
from ..errors import (
    AgentFactoryError,
    ProviderUnavailableError,
    ReplicationError,
    ReplicationPrerequisiteError,
)
from ..schema.copy import MANAGED_TABLES
from ..schema.migrations import describe_db_error
from .subscription import (
    COPY_DATA_MODES,
    MIN_CONNECT_TIMEOUT,
    PUBLICATION,
    BackupStatus,
    ReplicationReport,
    backup_providers,
    create_subscription_sql,
    decide_copy_data,
    publisher_conninfo,
    qualified,
    scrub,
    subscription_name,
)
from .witness import HEARTBEAT

__all__ = [
    "COPY_DATA_MODES", "PUBLICATION", "BackupStatus", "ReplicationReport", "replication_status",
    "setup_replication", "subscription_name", "teardown_replication",
]

_APP = "agent-factory-replication"
# `replicate status` watches a subscriber this long for its lag in seconds.
LAG_WINDOW = 1.0
LAG_SAMPLE = 0.05


# -- queries -------------------------------------------------------------------


def connect(provider: ProviderSettings, settings: Settings) -> psycopg.Connection[Any]:
    """An autocommit connection to one provider, no failover."""
    timeout = math.ceil(max(settings.tuning(provider.name).connect_timeout, MIN_CONNECT_TIMEOUT))
    try:
        return psycopg.connect(provider.conninfo(connect_timeout=str(timeout),
                                                 application_name=_APP), autocommit=True)
    except psycopg.Error as exc:
        raise ProviderUnavailableError(provider.name, describe_db_error(exc)) from None


def _value(conn: psycopg.Connection[Any], query: str | sql.Composed, params: Any = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def check_wal_level(conn: psycopg.Connection[Any], provider: str) -> None:
    level = _value(conn, "SHOW wal_level")
    if level != "logical":
        raise ReplicationPrerequisiteError(provider, (
            f"provider {provider!r} (the primary) has wal_level = {level}; logical replication "
            "needs 'logical'. Run ALTER SYSTEM SET wal_level = logical and restart the server; "
            "on Neon enable logical replication in the project settings; on Supabase it is "
            "already on."))


def resolve_tables(conn: psycopg.Connection[Any], tables: tuple[str, ...], provider: str,
                   *, need_identity: bool = True) -> list[str]:
    """Schema-qualified names of ``tables``; each must exist and identify its rows."""
    out = []
    for table in tables:
        row = conn.execute(
            "SELECT n.nspname, c.relname, c.relreplident, EXISTS (SELECT 1 FROM pg_index i "
            "WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident)) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = to_regclass(%s)", (table,)).fetchone()
        if row is None:
            raise ReplicationPrerequisiteError(provider, (
                f"provider {provider!r} has no table {table!r}: deploy the schema there first "
                f"(schema deploy --provider {provider})"))
        schema, name, ident, keyed = row
        if need_identity and not (ident == "f" or (ident in ("d", "i") and keyed)):
            raise ReplicationPrerequisiteError(provider, (
                f"table {table!r} on {provider!r} has no primary key (replica identity): once "
                "published, its UPDATEs and DELETEs would fail on the primary. Add a primary "
                "key, or leave the table out"))
        out.append(f"{schema}.{name}")
    return out


def ensure_publication(conn: psycopg.Connection[Any], tables: list[str]) -> str:
    """Create the publication, or add the tables it lacks; never removes any."""
    if not _value(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (PUBLICATION,)):
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(PUBLICATION), sql.SQL(", ").join(map(qualified, tables))))
        return "created"
    have = {f"{s}.{t}" for s, t in conn.execute(
        "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
        (PUBLICATION,))}
    missing = [t for t in tables if t not in have]
    if not missing:
        return "unchanged"
    conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
        sql.Identifier(PUBLICATION), sql.SQL(", ").join(map(qualified, missing))))
    return "extended"


def check_can_subscribe(conn: psycopg.Connection[Any], provider: str, tables: list[str]) -> bool:
    """Superuser, or (PG16+) pg_create_subscription, CREATE on the database and the
    right to act as the tables' owners (the apply runs as them); True for superusers."""
    superuser, member, create, user = conn.execute(
        "SELECT rolsuper, CASE WHEN to_regrole('pg_create_subscription') IS NULL THEN false "
        "ELSE pg_has_role('pg_create_subscription', 'USAGE') END, "
        "has_database_privilege(current_database(), 'CREATE'), current_user "
        "FROM pg_roles WHERE rolname = current_user").fetchone() or (False, False, False, "?")
    if superuser:
        return True
    if not (member and create):
        raise ReplicationPrerequisiteError(provider, (
            f"role {user!r} on provider {provider!r} may not create subscriptions: it needs to "
            "be a superuser, or (PostgreSQL 16+) a member of pg_create_subscription with CREATE "
            f"on the database. As an administrator: GRANT pg_create_subscription TO {user}; "
            f"GRANT CREATE ON DATABASE <db> TO {user}"))
    owners = _value(conn, "SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ', ') FROM "
                    "pg_class WHERE oid = ANY(%s::regclass[]) AND NOT pg_has_role(relowner, "
                    "'MEMBER')", (tables,))
    if owners:
        raise ReplicationPrerequisiteError(provider, (
            f"role {user!r} on provider {provider!r} may subscribe but cannot act as {owners}, "
            "who own(s) the replicated tables there, so every change would fail: make it own "
            f"the tables, or GRANT {owners} TO {user}"))
    return False


def _has_rows(conn: psycopg.Connection[Any], tables: list[str]) -> bool:
    return any(_value(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(qualified(t)))
               for t in tables)


def _subscription(conn: psycopg.Connection[Any], name: str) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT oid, subenabled FROM pg_subscription WHERE subname = %s AND "
        "subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (name,)).fetchone()


def _alter(conn: psycopg.Connection[Any], name: str, action: str) -> None:
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ").format(sql.Identifier(name)) + sql.SQL(action))


def idle_subscriptions(conn: psycopg.Connection[Any]) -> list[str]:
    """This database's enabled subscriptions of ours that have no apply worker now."""
    rows = conn.execute(
        "SELECT s.subname FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid "
        "AND d.datname = current_database() WHERE s.subenabled "
        "AND s.subname LIKE 'agent\\_factory\\_%' AND NOT EXISTS (SELECT 1 FROM "
        "pg_stat_subscription st WHERE st.subid = s.oid AND st.pid IS NOT NULL)").fetchall()
    return [r[0] for r in rows]


def wake_launcher(conn: psycopg.Connection[Any], name: str) -> None:
    """Enable subscription ``name`` again: a no-op that wakes the server's replication
    launcher, which then starts the subscription's worker if it has none."""
    _alter(conn, name, "ENABLE")


def ensure_subscription(conn: psycopg.Connection[Any], backup: str, conninfo: str,
                        tables: list[str], copy_data: str) -> str:
    """Create, enable or refresh ``agent_factory_<backup>``; returns what it did."""
    name = subscription_name(backup)
    found = _subscription(conn, name)
    if found is None:
        superuser = check_can_subscribe(conn, backup, tables)
        has_rows = _has_rows(conn, tables)
        copy = decide_copy_data(copy_data, has_rows)
        if superuser:  # keep a failing statement, password included, out of the server log
            conn.execute("SET log_min_error_statement = panic")
            conn.execute("SET log_statement = none")
        conn.execute(create_subscription_sql(name, conninfo, copy))
        return ("created, copying the primary's rows" if copy else
                "created without copying (its tables already hold rows)" if has_rows else
                "created")
    actions = []
    if not found[1]:
        _alter(conn, name, "ENABLE")
        actions.append("enabled")
    have = {f"{s}.{t}" for s, t in conn.execute(
        "SELECT n.nspname, c.relname FROM pg_subscription_rel r JOIN pg_class c ON c.oid = "
        "r.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.srsubid = %s",
        (found[0],))}
    new = [t for t in tables if t not in have]
    if new:
        copy = decide_copy_data(copy_data, _has_rows(conn, new))
        _alter(conn, name, f"REFRESH PUBLICATION WITH (copy_data = {str(copy).lower()})")
        actions.append(f"refreshed (+{', '.join(new)})")
    return " and ".join(actions) or "unchanged"


Step = Callable[[psycopg.Connection[Any], ProviderSettings], str]


def _each_backup(settings: Settings, report: ReplicationReport, step: Step,
                 password: str = "") -> None:
    """Run ``step`` on every backup, recording its action or its error."""
    for backup in backup_providers(settings):
        try:
            with connect(backup, settings) as conn:
                report.actions[backup.name] = step(conn, backup)
        except AgentFactoryError as exc:
            report.errors[backup.name] = exc
        except psycopg.Error as exc:  # class 08: it cannot reach the primary
            kind = ReplicationPrerequisiteError if (exc.sqlstate or "").startswith("08") \
                else ReplicationError
            report.errors[backup.name] = kind(backup.name, scrub(
                f"subscription {subscription_name(backup.name)} on {backup.name!r}: "
                f"{describe_db_error(exc)}", password))


def setup_replication(settings: Settings, *, tables: tuple[str, ...] = (),
                      publisher_url: str | None = None, copy_data: str = "auto"
                      ) -> ReplicationReport:
    """Publish the managed tables (plus ``tables``) and subscribe every backup to them.

    Raises when the primary cannot publish; a backup that fails is recorded
    in ``errors`` and the others are still set up. Running it again changes
    nothing but enables a disabled subscription.
    """
    decide_copy_data(copy_data, False)
    primary = settings.providers[settings.primary]
    wanted = tuple(dict.fromkeys((*MANAGED_TABLES, *tables)))
    with connect(primary, settings) as conn:
        check_wal_level(conn, primary.name)
        # The split-brain witness's heartbeat travels with the data (schema deploy
        # creates it; without it there is no witness and the fence stays open).
        row = conn.execute("SELECT to_regclass(%s)", (HEARTBEAT,)).fetchone()
        if row is not None and row[0] is not None:
            wanted = (*wanted, HEARTBEAT)
        qualified = resolve_tables(conn, wanted, primary.name)
        report = ReplicationReport(ensure_publication(conn, qualified), tuple(qualified))

    def subscribe(conn: psycopg.Connection[Any], backup: ProviderSettings) -> str:
        resolve_tables(conn, wanted, backup.name, need_identity=False)
        conninfo, _ = publisher_conninfo(primary, backup.name, publisher_url)
        action = ensure_subscription(conn, backup.name, conninfo, qualified, copy_data)
        if "without copying" in action:
            report.notes.append(
                f"{backup.name}: the primary's existing rows were not copied; bring the "
                f"differences over with 'sync --from {primary.name} --to {backup.name}'")
        return action

    password = publisher_conninfo(primary, "", publisher_url)[1]
    _each_backup(settings, report, subscribe, password)
    return report


def _read_backup(conn: psycopg.Connection[Any], status: BackupStatus) -> None:
    row = conn.execute(
        "SELECT s.subenabled, (SELECT w.pid FROM pg_stat_subscription w WHERE w.subid = s.oid "
        "AND w.relid IS NULL LIMIT 1), coalesce(x.apply_error_count, 0), "
        "coalesce(x.sync_error_count, 0), (SELECT count(*) FROM pg_subscription_rel r "
        "WHERE r.srsubid = s.oid AND r.srsubstate <> 'r') FROM pg_subscription s "
        "LEFT JOIN pg_stat_subscription_stats x ON x.subid = s.oid WHERE s.subname = %s "
        "AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (status.subscription,)).fetchone()
    if row is not None:
        status.present = True
        (status.enabled, status.worker_pid, status.apply_errors, status.sync_errors,
         status.tables_syncing) = row


# write_lsn: what the subscriber received, and so applied (see ProviderHealth).
_SENDER = (
    "SELECT state, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, "
    "pg_wal_lsn_diff(write_lsn, '0/0')::bigint "
    "FROM pg_stat_replication WHERE application_name = %s ORDER BY backend_start DESC LIMIT 1"
)


def _read_primary(conn: psycopg.Connection[Any], status: BackupStatus) -> None:
    row = conn.execute(_SENDER, (status.subscription,)).fetchone()
    if row is not None:
        status.sender_state, position, received = row
        if position is not None and received is not None:
            status.lag_bytes = max(0, position - received)
            _watch_lag(conn, status, position, received)
    if status.lag_bytes is None:  # not connected: how far its slot is behind
        status.lag_bytes = _value(
            conn, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s", (status.subscription,))


def _watch_lag(
    conn: psycopg.Connection[Any], status: BackupStatus, position: int, received: int
) -> None:
    """Lag in seconds, measured: PostgreSQL's replay_lag is NULL most of the time.

    Caught up: 0. Otherwise the primary's WAL position and the subscriber's
    received one are sampled for up to `LAG_WINDOW` seconds and the lag read
    on that `WalClock` once the subscriber passes the first sample; one that
    does not is behind by at least the window.
    """
    clock = WalClock()
    started = time.monotonic()
    clock.record(started, position)
    while received < position:
        now = time.monotonic()
        if now - started >= LAG_WINDOW:
            status.lag_seconds, status.lag_at_least = now - started, True
            return
        time.sleep(LAG_SAMPLE)
        row = conn.execute(_SENDER, (status.subscription,)).fetchone()
        if row is None or row[1] is None or row[2] is None:
            return  # the subscriber disconnected meanwhile
        clock.record(time.monotonic(), row[1])
        received = row[2]
    status.lag_seconds = clock.lag(received)


def replication_status(settings: Settings) -> list[BackupStatus]:
    """The replication state of every backup; unreachable servers are reported, not raised."""
    statuses = []
    for backup in backup_providers(settings):
        status = BackupStatus(backup.name, subscription_name(backup.name))
        try:
            with connect(backup, settings) as conn:
                _read_backup(conn, status)
        except psycopg.OperationalError as exc:  # ProviderUnavailableError too
            status.backup_reachable, status.error = False, str(exc)
        statuses.append(status)
    try:
        with connect(settings.providers[settings.primary], settings) as conn:
            for status in statuses:
                if status.present:
                    _read_primary(conn, status)
    except psycopg.OperationalError as exc:
        for status in statuses:
            status.primary_reachable = False
            status.error = status.error or f"primary: {exc}"
    for status in statuses:
        status.last_error = status.problem() if status.reachable else status.error
    return statuses


def drop_subscription(conn: psycopg.Connection[Any], backup: str) -> str:
    """Drop ``agent_factory_<backup>``, also when the primary cannot be reached.

    DROP SUBSCRIPTION drops the slot on the publisher; when that fails, the
    slot is detached first (DISABLE, ``slot_name = NONE``) and left there.
    """
    name = subscription_name(backup)
    if _subscription(conn, name) is None:
        return "absent"
    try:
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
        return "dropped"
    except psycopg.OperationalError as exc:
        if not (exc.sqlstate or "").startswith("08") or conn.broken:
            raise
    _alter(conn, name, "DISABLE")
    _alter(conn, name, "SET (slot_name = NONE)")
    conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
    return "dropped; its slot on the primary could not be dropped from there (unreachable?)"


def teardown_replication(settings: Settings) -> ReplicationReport:
    """Drop every backup's subscription, then the slots left unused and the publication.

    Safe to run again. A slot still in use (its backup could not be reached)
    is kept and named in ``notes``.
    """
    report, patterns = ReplicationReport(), ["-"]
    primary = settings.providers[settings.primary]

    def drop(conn: psycopg.Connection[Any], backup: ProviderSettings) -> str:
        found = _subscription(conn, subscription_name(backup.name))
        if found is not None:  # its table-sync slots are named after its oid
            patterns.append(f"pg\\_{found[0]}\\_sync\\_%")
        return drop_subscription(conn, backup.name)

    _each_backup(settings, report, drop, primary.password)
    # Slots of subscriptions dropped without reaching the primary, or of backups we
    # cannot reach: unused, they would keep WAL forever.
    names = [subscription_name(b.name) for b in backup_providers(settings)]
    try:
        with connect(primary, settings) as conn:
            for slot, active in conn.execute(
                    "SELECT slot_name, active FROM pg_replication_slots WHERE database = "
                    "current_database() AND (slot_name = ANY(%s) OR slot_name LIKE ANY(%s))",
                    (names, patterns)).fetchall():
                if active:
                    report.notes.append(_slot_note(slot))
                    continue
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                report.notes.append(f"unused slot {slot} dropped on the primary")
            found = _value(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
                           (PUBLICATION,))
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                sql.Identifier(PUBLICATION)))
            report.publication = "dropped" if found else "absent"
    except psycopg.OperationalError as exc:
        report.errors[primary.name] = exc if isinstance(exc, ProviderUnavailableError) else \
            ProviderUnavailableError(primary.name, describe_db_error(exc))
        report.notes += [_slot_note(s) for s in names]
        report.notes += [f"if an initial copy was interrupted, also drop the slots named "
                         f"{p.replace(chr(92), '').rstrip('%')}* there" for p in patterns[1:]]
    return report


def _slot_note(slot: str) -> str:
    return (f"replication slot {slot} may be left on the primary, keeping WAL: drop it there "
            f"with SELECT pg_drop_replication_slot('{slot}') (or run 'replicate teardown' again)")

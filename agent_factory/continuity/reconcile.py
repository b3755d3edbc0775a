"""Bring rows from one provider to another, newest wins: `agent-factory-db sync`.

A keyed upsert where the newest ``updated_at`` wins (`schema.copy`), then
every sequence owned by the tables moved past what the source used, so that
ids handed out on a backup during an outage are never handed out again by
the primary. Idempotent: interrupted and run again, it converges.

The writes are made in a session tagged with the replication origin
``agent_factory_failback``: backups subscribe with ``origin = none``, so rows
brought back to the primary are not replicated to the backups a second time
(they came from there). Setting an origin needs superuser rights (or a grant
on the ``pg_replication_origin_*`` functions); without them the copy still
happens, untagged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..schema.copy import MANAGED_TABLES, ProgressCallback, TableReport, copy_tables

__all__ = ["ORIGIN", "reconcile", "tables_on_both"]

logger = logging.getLogger("agent_factory.continuity.reconcile")

ORIGIN = "agent_factory_failback"


def reconcile(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    *,
    tables: Sequence[str] = MANAGED_TABLES,
    since: datetime | None = None,
    source_name: str = "source",
    target_name: str = "target",
    on_progress: ProgressCallback | None = None,
    batch_size: int = 5000,
    only_ids: Mapping[str, Sequence[Any]] | None = None,
) -> list[TableReport]:
    """Upsert ``tables`` from ``source`` into ``target`` (newest wins), move sequences.

    Both connections must be idle and not in autocommit mode. With
    ``since``, only rows updated at or after it are considered.
    """
    origin = _tag_origin(target)
    try:
        reports = copy_tables(
            source,
            target,
            tables=tables,
            batch_size=batch_size,
            source_name=source_name,
            target_name=target_name,
            on_progress=on_progress,
            since=since,
            only_ids=only_ids,
        )
        for table in tables:
            _move_sequences(source, target, table)
    finally:
        if origin is not None:
            _untag_origin(target, origin)
    return reports


def tables_on_both(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any], tables: Sequence[str]
) -> list[str]:
    """The tables that exist on both sides (the others are skipped by failback)."""
    query = "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL"
    found = []
    for conn in (source, target):
        with conn.transaction():
            found.append({row[0] for row in conn.execute(query, (list(tables),)).fetchall()})
    return [t for t in tables if t in found[0] and t in found[1]]


def _tag_origin(conn: psycopg.Connection[Any]) -> str | None:
    """Tag the session with a replication origin; its name, or None without rights.

    Two sessions cannot share an origin: a concurrent reconciliation (another
    application instance failing back) gets one of its own, dropped after.
    """
    for name in (ORIGIN, None):
        if name is None:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            conn.commit()
            name = f"{ORIGIN}_{row[0] if row else 0}"
        try:
            with conn.transaction():
                conn.execute(
                    "SELECT pg_replication_origin_create(%s) "
                    "WHERE pg_replication_origin_oid(%s) IS NULL",
                    (name, name),
                )
            with conn.transaction():
                conn.execute("SELECT pg_replication_origin_session_setup(%s)", (name,))
            return name
        except psycopg.errors.ObjectInUse:
            continue
        except psycopg.errors.InsufficientPrivilege:
            break
    logger.info("no replication origin for the reconciliation: its rows are not tagged")
    return None


def _untag_origin(conn: psycopg.Connection[Any], name: str) -> None:
    if conn.closed or conn.broken:
        return
    with conn.transaction():
        conn.execute("SELECT pg_replication_origin_session_reset()")
        if name != ORIGIN:
            conn.execute("SELECT pg_replication_origin_drop(%s)", (name,))


def _move_sequences(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any], table: str
) -> None:
    """Set each sequence owned by ``table`` on target past the source's last value."""
    owned = sql.SQL(
        "SELECT d.objid::regclass::text FROM pg_depend d JOIN pg_class c ON c.oid = d.objid "
        "WHERE c.relkind = 'S' AND d.refobjid = to_regclass(%s) AND d.deptype IN ('a', 'i')"
    )
    with source.transaction():
        sequences = [row[0] for row in source.execute(owned, (table,)).fetchall()]
        used = {
            seq: source.execute("SELECT pg_sequence_last_value(%s::regclass)", (seq,)).fetchone()
            for seq in sequences
        }
    with target.transaction():
        for seq, row in used.items():
            if row is None or row[0] is None:
                continue  # never used on the source
            target.execute(
                "SELECT setval(%s::regclass, greatest(%s, coalesce("
                "pg_sequence_last_value(%s::regclass), 0)))",
                (seq, row[0], seq),
            )

"""The change journal in each provider's database: installed, read, kept in step.

Installed by migration ``0004_failback_journal`` (``schema deploy``) for the
managed tables and by `install` for a registered table: an ``AFTER`` row
trigger that records nothing unless the writing transaction carries
``agent_factory.journal = on`` -- which the managers set on the writes they
send to a provider that is not the primary (a session setting on a direct
connection, ``set_config(..., true)`` inside the transaction behind a
transaction-mode pooler). The record survives every application process and
is what any instance, or ``agent-factory-db failback run``, drains
(`continuity.drain`). Here too: the backups' sequences kept ahead of the
primary's, the conflicts by table, and the session settings every drain
connection uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_dumps, set_json_loads

from ..errors import ConfigurationError
from ..schema.plan import load_migrations

__all__ = [
    "conflicts_by_table", "install", "pending", "prepare_session", "subscribers",
]

JOURNAL = "agent_factory_journal"
TRIGGER = "agent_factory_journal"
#: The setting the trigger reads; set by the managers on writes to a backup.
SETTING = "agent_factory.journal"
_LOCK_SPACE = 0x4146_4A4E  # "AFJN": advisory lock class of the drains


def prepare_session(conn: psycopg.Connection[Any]) -> None:
    """Exact numbers for comparing images, no server-side prepared statements (a
    transaction-mode pooler may stand in front). Server settings are per
    transaction: see `_steady`."""
    set_json_loads(_loads, conn)
    set_json_dumps(_dumps, conn)
    conn.prepare_threshold = None


#: One rendering of times and numbers, and no journaling of the drain's own
#: writes: set in each transaction (session settings do not outlive one
#: behind a transaction-mode pooler).
_STEADY = (
    "SELECT set_config('TimeZone', 'UTC', true), set_config('IntervalStyle', 'iso_8601', true), "
    f"set_config('extra_float_digits', '1', true), set_config('{SETTING}', 'off', true)"
)


@contextmanager
def _steady(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A transaction on a drain connection, with `_STEADY` settings."""
    with conn.transaction():
        conn.execute(_STEADY)
        yield


def _number(value: Any) -> Any:
    """Decimals back to JSON numbers (as floats when exact, else as their text)."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value():
            return int(value)
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any) -> str:
    # The C encoder does the walk; only Decimals come back to Python.
    return json.dumps(value, default=_number)


_decoder = json.JSONDecoder(parse_float=Decimal)


def _loads(data: str | bytes) -> Any:
    # One decoder for every value (json.loads with arguments builds one per call).
    return _decoder.decode(data if isinstance(data, str) else bytes(data).decode())


def _journal_ddl() -> str:
    """The journal's table and trigger function (migration 0004 without its triggers)."""
    text = next(m.template for m in load_migrations() if m.name == "failback_journal")
    return text.split("DROP TRIGGER", 1)[0]


def install(conn: psycopg.Connection[Any], table: str) -> tuple[str, ...]:
    """Journal ``table`` on this database; its primary key columns.

    Raises `ConfigurationError` when the table is missing or has no primary
    key (a change could not be matched to the primary's row).
    """
    with conn.transaction():
        # Installers (instances, threads, deploys) take turns: CREATE ... IF NOT
        # EXISTS races with itself.
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SPACE,))
        key = primary_key(conn, table)
        exists = conn.execute(
            "SELECT 1 FROM pg_trigger WHERE tgname = %s AND tgrelid = %s::regclass",
            (TRIGGER, table),
        ).fetchone()
        if exists is None:
            conn.execute(_journal_ddl())
            conn.execute(sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} "
                "FOR EACH ROW WHEN (current_setting('agent_factory.journal', true) = 'on') "
                "EXECUTE FUNCTION agent_factory_journal_row()"
            ).format(sql.Identifier(TRIGGER), _ident(table)))
    return key


def primary_key(conn: psycopg.Connection[Any], table: str) -> tuple[str, ...]:
    row = conn.execute("SELECT to_regclass(%s)::text", (table,)).fetchone()
    if row is None or row[0] is None:
        raise ConfigurationError(
            f"registered table {table!r} does not exist on this provider; create it (and "
            "deploy the same schema on every provider) before writing to it"
        )
    cols = [r[0] for r in conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary "
        "ORDER BY array_position(i.indkey::int2[], a.attnum)", (table,)).fetchall()]
    if not cols:
        raise ConfigurationError(
            f"registered table {table!r} has no primary key: failback matches a backup's "
            "changes to the primary's rows by it; add one (ALTER TABLE ... ADD PRIMARY KEY)"
        )
    return tuple(cols)


def pending(conn: psycopg.Connection[Any]) -> tuple[int, Any]:
    """(changes recorded, oldest recording time) on this database; (0, None) without a journal."""
    found = conn.execute("SELECT to_regclass(%s)", (JOURNAL,)).fetchone()
    if found is None or found[0] is None:
        return 0, None
    count, oldest = conn.execute(
        f"SELECT count(*), min(recorded_at) FROM {JOURNAL}").fetchone() or (0, None)
    return int(count), oldest


#: How far ahead of the primary's last value a backup's sequences are kept, so
#: that ids it hands out during an outage are never ones the primary used.
SEQUENCE_GAP = 1_000_000


def sequence_values(conn: psycopg.Connection[Any], tables: Sequence[str]) -> dict[str, int]:
    """The last value of each sequence the tables own (0: not used yet)."""
    rows = conn.execute(
        "SELECT s.oid::regclass::text, coalesce(pg_sequence_last_value(s.oid), 0) "
        "FROM pg_depend d "
        "JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
        "WHERE d.refobjid = ANY(SELECT to_regclass(t) FROM unnest(%s::text[]) AS t) "
        "AND d.deptype IN ('a', 'i')", (list(tables),)).fetchall()
    return {r[0]: int(r[1]) for r in rows if r[1] is not None}


def keep_sequences_ahead(conn: psycopg.Connection[Any], primary: dict[str, int]) -> int:
    """Move this backup's sequences to the primary's value + `SEQUENCE_GAP` where they are
    less than half a gap ahead of it (also when neither was used yet: the first
    values of both would collide)."""
    moved = 0
    for seq, value in primary.items():
        row = conn.execute(
            "SELECT setval(%s::regclass, %s) WHERE coalesce(pg_sequence_last_value("
            "%s::regclass), 0) < %s", (seq, value + SEQUENCE_GAP, seq,
                                       value + SEQUENCE_GAP // 2)).fetchone()
        moved += row is not None
    return moved


def conflicts_by_table(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """The conflicts recorded on this (primary) database, by table."""
    found = conn.execute("SELECT to_regclass('agent_factory_conflicts')").fetchone()
    if found is None or found[0] is None:
        return {}
    rows = conn.execute("SELECT table_name, count(*) FROM agent_factory_conflicts "
                        "GROUP BY table_name").fetchall()
    return {r[0]: int(r[1]) for r in rows}


def subscribers(target: psycopg.Connection[Any]) -> set[str]:
    """The backups subscribed to this primary (by their replication slot's name)."""
    prefix = "agent_factory_"
    try:
        with _steady(target):
            rows = target.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'"
            ).fetchall()
    except psycopg.Error:
        return set()
    return {r[0][len(prefix):] for r in rows if r[0] and r[0].startswith(prefix)}


def _ident(table: str) -> sql.Composable:
    """A table name as SQL writes it (``name``, ``schema.name``, each part maybe
    double-quoted, as the trigger records them) as an identifier."""
    return sql.SQL(".").join(sql.Identifier(p) for p in name_parts(table))


def name_parts(name: str) -> list[str]:
    """The parts of a possibly qualified SQL name, as PostgreSQL reads it: a quoted
    part as written (``""`` a quote), an unquoted one in lower case."""
    parts: list[str] = []
    part: list[str] = []
    quoted = False
    i = 0
    while i < len(name):
        ch = name[i]
        if quoted:
            if ch == '"' and name[i + 1:i + 2] == '"':
                part.append('"')
                i += 1
            elif ch == '"':
                quoted = False
            else:
                part.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(part))
            part = []
        else:
            part.append(ch.lower())
        i += 1
    parts.append("".join(part))
    return parts

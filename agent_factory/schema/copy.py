"""Copy the managed tables' rows from one provider to another; safe to re-run.

Rows stream from the source with ``COPY (SELECT ...) TO STDOUT (FORMAT
binary)`` straight into a temporary table on the target (``COPY ... FROM
STDIN``), one batch of ids at a time, every batch read from the same
snapshot of the source. Each batch is then upserted in its own transaction:
new ids are inserted, known ids are updated only when the source row is
newer (``updated_at``), so running the copy again changes nothing. A row that
would collide with a *different* row of the target on another unique key
(the same message saved on both providers during an outage) is skipped and
counted, never merged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from ..errors import CopyError, ProviderUnavailableError
from .migrations import describe_db_error

__all__ = ["MANAGED_TABLES", "ProgressCallback", "TableReport", "copy_tables"]

MANAGED_TABLES = ("session_memories", "knowledge_atoms")
DEFAULT_BATCH_SIZE = 5000
_KEY = "id"
_VERSION = "updated_at"

# (table, rows done, rows in the source snapshot)
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class TableReport:
    """What one table's copy did; ``source_rows`` is the size of the snapshot."""

    table: str
    source_rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0  # the target already had the row, as new or newer
    skipped: int = 0  # collides with another row of the target on a unique key

    @property
    def copied(self) -> int:
        return self.inserted + self.updated


@dataclass(frozen=True)
class _UniqueKey:
    columns: tuple[str, ...]
    predicate: str | None  # of a partial unique index, as the server prints it


def copy_tables(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    *,
    tables: Sequence[str] = MANAGED_TABLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    source_name: str = "source",
    target_name: str = "target",
    on_progress: ProgressCallback | None = None,
    since: datetime | None = None,
    only_ids: Mapping[str, Sequence[Any]] | None = None,
) -> list[TableReport]:
    """Copy ``tables`` from ``source`` to ``target``; both must be idle connections.

    With ``since``, only rows whose ``updated_at`` is at or after it are
    copied (tables without ``updated_at`` are copied whole). With
    ``only_ids``, only the rows of each table whose ``id`` is listed.

    Raises `CopyError` when a table is missing or its columns differ (deploy
    and verify first) and `ProviderUnavailableError` when a connection is
    lost; batches committed before that stay, and re-running is safe.
    """
    if batch_size < 1:
        raise CopyError(target_name, f"batch size must be >= 1, got {batch_size}")
    names = {"source": source_name, "target": target_name}
    try:
        with source.transaction():
            source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            columns = {t: _matching_columns(source, target, t, names) for t in tables}
            return [
                _copy_table(
                    source, target, t, columns[t], batch_size, on_progress,
                    _since_filter(columns[t], since, (only_ids or {}).get(t)),
                )
                for t in tables
            ]
    except psycopg.Error as exc:
        for side, conn in (("source", source), ("target", target)):
            if conn.broken or conn.closed:
                raise ProviderUnavailableError(
                    names[side],
                    f"connection lost during the copy: {describe_db_error(exc)}; batches "
                    "already committed stay, run the copy again (it is safe to re-run)",
                ) from exc
        raise CopyError(
            target_name,
            f"copy from {source_name!r} to {target_name!r} failed: {describe_db_error(exc)}",
        ) from exc


def _copy_table(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    table: str,
    columns: tuple[str, ...],
    batch_size: int,
    on_progress: ProgressCallback | None,
    only: sql.Composable,
) -> TableReport:
    ident = sql.Identifier(table)
    count = source.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {}").format(ident, only)
    ).fetchone()
    report = TableReport(table, source_rows=count[0] if count else 0)
    keys = _unique_keys(target, table)
    upsert = _upsert_sql(table, columns, has_version=_VERSION in columns)
    done = 0
    lower: Any = None
    if on_progress is not None:
        on_progress(table, 0, report.source_rows)
    while True:
        upper = _batch_upper_bound(source, table, lower, batch_size, only)
        rows = _copy_batch(
            source, target, table, columns, keys, upsert, lower, upper, report, only
        )
        done += rows
        if on_progress is not None:
            on_progress(table, done, max(done, report.source_rows))
        if upper is None:
            return report
        lower = upper


def _copy_batch(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    table: str,
    columns: tuple[str, ...],
    keys: Iterable[_UniqueKey],
    upsert: sql.Composed,
    lower: Any,
    upper: Any,
    report: TableReport,
    only: sql.Composable,
) -> int:
    """Stream ids in (lower, upper] into a temporary table, then upsert them."""
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    where: list[sql.Composable] = [only]
    if lower is not None:
        where.append(sql.SQL("{} > {}").format(sql.Identifier(_KEY), sql.Literal(lower)))
    if upper is not None:
        where.append(sql.SQL("{} <= {}").format(sql.Identifier(_KEY), sql.Literal(upper)))
    copy_out = sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT (FORMAT binary)").format(
        cols, sql.Identifier(table), sql.SQL(" AND ").join(where)
    )
    with target.transaction():
        target.execute(
            sql.SQL(
                "CREATE TEMP TABLE af_copy_batch (LIKE {}) ON COMMIT DROP"
            ).format(sql.Identifier(table))
        )
        with target.cursor() as tcur, source.cursor() as scur:
            with scur.copy(copy_out) as reader, tcur.copy(
                sql.SQL("COPY af_copy_batch ({}) FROM STDIN (FORMAT binary)").format(cols)
            ) as writer:
                for chunk in reader:
                    writer.write(chunk)
            rows = max(tcur.rowcount, 0)
        skipped = 0
        for key in keys:
            skipped += max(target.execute(_skip_collisions_sql(table, key)).rowcount, 0)
        counts = target.execute(upsert).fetchone()
    inserted, updated = counts if counts else (0, 0)
    report.skipped += skipped
    report.inserted += inserted
    report.updated += updated
    report.unchanged += rows - skipped - inserted - updated
    return rows


def _batch_upper_bound(
    source: psycopg.Connection[Any], table: str, lower: Any, batch_size: int,
    only: sql.Composable,
) -> Any:
    """The last id of the next batch, or None when the rest fits in it."""
    key = sql.Identifier(_KEY)
    after = sql.SQL("AND {} > %s").format(key) if lower is not None else sql.SQL("")
    query = sql.SQL(
        "SELECT {key} FROM {table} WHERE {only} {after} ORDER BY {key} OFFSET %s LIMIT 1"
    ).format(key=key, table=sql.Identifier(table), only=only, after=after)
    params = (lower, batch_size - 1) if lower is not None else (batch_size - 1,)
    row = source.execute(query, params).fetchone()
    return row[0] if row is not None else None


def _since_filter(
    columns: tuple[str, ...], since: datetime | None, ids: Sequence[Any] | None = None
) -> sql.Composable:
    parts: list[sql.Composable] = [sql.SQL("TRUE")]
    if since is not None and _VERSION in columns:
        parts.append(sql.SQL("{} >= {}").format(sql.Identifier(_VERSION), sql.Literal(since)))
    if ids is not None:
        parts.append(sql.SQL("{}::text = ANY({})").format(
            sql.Identifier(_KEY), sql.Literal([str(i) for i in ids])))
    return sql.SQL(" AND ").join(parts)


def _upsert_sql(table: str, columns: tuple[str, ...], *, has_version: bool) -> sql.Composed:
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    if has_version:
        assignments = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in columns if c != _KEY
        )
        action: sql.Composable = sql.SQL("DO UPDATE SET {} WHERE target.{v} < EXCLUDED.{v}").format(
            assignments, v=sql.Identifier(_VERSION)
        )
    else:
        action = sql.SQL("DO NOTHING")
    return sql.SQL(
        "WITH up AS (INSERT INTO {table} AS target ({cols}) SELECT {cols} FROM af_copy_batch "
        "ON CONFLICT ({key}) {action} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
    ).format(table=sql.Identifier(table), cols=cols, key=sql.Identifier(_KEY), action=action)


def _skip_collisions_sql(table: str, key: _UniqueKey) -> sql.Composed:
    """Delete batch rows that share ``key`` with a different row of the target.

    The predicate of a partial index names bare columns, so it is applied in
    single-table subqueries where they cannot be ambiguous.
    """
    pred = sql.SQL(key.predicate) if key.predicate else sql.SQL("TRUE")  # from the catalog
    same = sql.SQL(" AND ").join(
        sql.SQL("x.{0} = s.{0}").format(sql.Identifier(c)) for c in key.columns
    )
    return sql.SQL(
        "DELETE FROM af_copy_batch s WHERE s.{key} IN (SELECT {key} FROM af_copy_batch "
        "WHERE {pred}) AND EXISTS (SELECT 1 FROM (SELECT * FROM {table} WHERE {pred}) x "
        "WHERE x.{key} <> s.{key} AND {same})"
    ).format(key=sql.Identifier(_KEY), pred=pred, table=sql.Identifier(table), same=same)


def _table_columns(conn: psycopg.Connection[Any], table: str) -> dict[str, str] | None:
    exists = conn.execute("SELECT to_regclass(%s)::oid", (table,)).fetchone()
    if not exists or exists[0] is None:
        return None
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (exists[0],),
    ).fetchall()
    return dict(rows)


def _matching_columns(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    table: str,
    names: dict[str, str],
) -> tuple[str, ...]:
    """The columns to copy; `CopyError` unless both sides have the same ones."""
    with target.transaction():
        found = {"source": _table_columns(source, table), "target": _table_columns(target, table)}
    for side in ("source", "target"):
        if found[side] is None:
            raise CopyError(
                names[side],
                f"provider {names[side]!r} has no table {table!r}: deploy the schema there "
                f"first (schema deploy --provider {names[side]})",
            )
    src, dst = found["source"] or {}, found["target"] or {}
    if src != dst:
        diffs = [
            f"{c}: {src.get(c, 'missing')} on {names['source']!r}, "
            f"{dst.get(c, 'missing')} on {names['target']!r}"
            for c in sorted(set(src) | set(dst)) if src.get(c) != dst.get(c)
        ]
        raise CopyError(
            names["target"],
            f"table {table!r} differs between {names['source']!r} and {names['target']!r} "
            f"({'; '.join(diffs)}); run schema verify and deploy the same schema to both",
        )
    if _KEY not in src:
        raise CopyError(names["target"], f"table {table!r} has no {_KEY!r} column to upsert on")
    return tuple(src)


def _unique_keys(conn: psycopg.Connection[Any], table: str) -> list[_UniqueKey]:
    """Unique indexes of ``table`` other than the one on ``id``, plain columns only."""
    with conn.transaction():
        rows = conn.execute(
            """SELECT array_agg(a.attname ORDER BY k.ord), pg_get_expr(x.indpred, x.indrelid)
            FROM pg_index x
            CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
            JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
            WHERE x.indrelid = to_regclass(%s) AND x.indisunique AND x.indexprs IS NULL
            GROUP BY x.indexrelid, x.indpred, x.indrelid""",
            (table,),
        ).fetchall()
    return [_UniqueKey(tuple(cols), pred) for cols, pred in rows if tuple(cols) != (_KEY,)]

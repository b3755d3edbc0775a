"""The drain's set-based path: a batch staged on the primary, its clean rows settled there.

A drain copies its batch of a backup's journal into a temporary table on the
primary (`STAGE`, emptied at commit). A row key is *clean* when the primary
would replay its changes without a conflict: its first change expects what
the primary holds (no row for an insert; otherwise the row, binary-equal to
the before image read into the table's type by the primary) and each later
change's before image is the previous change's after image. Clean keys are
locked, compared and written by a few statements per table; only the other
keys' changes and rows go to Python (`merge.replay`).

These comparisons are stricter than Python's, never looser: a key they do
not prove clean is replayed in Python with the usual rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .merge import Change, Row, RowKey

STAGE = "_af_stage"
#: The alias of a user table whose whole row a statement reads: a bare alias
#: names a column when the table has one by that name (a column ``t`` made
#: ``t AS cur`` a timestamp).
ROW = "_af_t"

#: Kept by the session (emptied at each commit): a batch does not create and
#: drop a table, nor leave dead catalog rows behind.
_CREATE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {STAGE} (ord bigint, seq bigint, xid xid8, "
    "table_name text, op text, before jsonb, after jsonb, "
    "dirty boolean NOT NULL DEFAULT false) ON COMMIT DELETE ROWS"
)


class Table(NamedTuple):
    """A table of the staged batch, in first-change order."""

    name: str
    missing: bool  # the primary lacks it
    inserts: bool
    deletes: bool
    #: The primary's columns, when every staged image of the table has exactly
    #: those (else None: schema drift, the table goes to Python whole).
    exact: list[str] | None


def stage(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
          read: sql.Composable, params: tuple[Any, ...]) -> int:
    """Copy the rows of ``read`` (a query of the source's journal) into `STAGE`; how many.

    Streamed, in binary (no text escaping): the primary parses a block while
    the source renders the next.
    """
    target.execute(_CREATE)
    cur = target.cursor()
    with cur.copy(f"COPY {STAGE} (ord, seq, xid, table_name, op, before, after) "
                  "FROM STDIN (FORMAT binary)") as into, \
            source.cursor().copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(read),
                                 params) as out:
        for block in out:
            into.write(block)
    return cur.rowcount


def tables(conn: psycopg.Connection[Any]) -> list[Table]:
    # One image per change is checked: an update's two come from one trigger
    # call (OLD and NEW, one row type), so they have the same columns.
    rows = conn.execute(
        "WITH n AS MATERIALIZED (SELECT t.table_name, (SELECT array_agg(attname::text "
        "ORDER BY attnum) "
        "FROM pg_attribute WHERE attrelid = to_regclass(t.table_name) AND attnum > 0 "
        f"AND NOT attisdropped) AS names FROM (SELECT DISTINCT table_name FROM {STAGE}) t) "
        "SELECT s.table_name, to_regclass(s.table_name) IS NULL, bool_or(op = 'INSERT'), "
        "bool_or(op = 'DELETE'), "
        "bool_and(coalesce(after, before) ?& n.names "
        "AND coalesce(after, before) - n.names = '{}'), min(n.names) "
        f"FROM {STAGE} s JOIN n USING (table_name) GROUP BY s.table_name "
        "ORDER BY min(s.ord)").fetchall()
    return [Table(name, missing, inserts, deletes, list(names) if exact else None)
            for name, missing, inserts, deletes, exact, names in rows]


def set_aside(conn: psycopg.Connection[Any], missing: list[str]) -> set[str]:
    """Drop the source transactions touching ``missing`` tables from the stage; their xids."""
    xids = {r[0] for r in conn.execute(
        f"SELECT DISTINCT xid::text FROM {STAGE} WHERE table_name = ANY(%s)", (missing,))}
    conn.execute(f"DELETE FROM {STAGE} WHERE xid = ANY(%s::xid8[])", (sorted(xids),))
    return xids


def totals(conn: psycopg.Connection[Any]) -> tuple[list[int], int, list[str]]:
    """The staged journal entries (their seqs), changes and source transactions."""
    row = conn.execute(f"SELECT coalesce(array_agg(seq), '{{}}'), count(*), "
                       f"coalesce(array_agg(DISTINCT xid::text), '{{}}') FROM {STAGE}").fetchone()
    assert row is not None
    return list(row[0]), int(row[1]), list(row[2])


def drop_applied(conn: psycopg.Connection[Any], applied: list[str]) -> int:
    """Drop the source transactions the primary applied before (``applied``, their
    xids); the changes dropped.

    A list, not a join with the marks: that table is empty most of its life,
    and its statistics would make a join of thousands of marks a nested loop.
    """
    if not applied:
        return 0
    return conn.execute(f"DELETE FROM {STAGE} WHERE xid = ANY(%s::xid8[])",
                        (applied,)).rowcount


def mark_applied(conn: psycopg.Connection[Any], backup: str) -> None:
    conn.execute("INSERT INTO agent_factory_drained (provider, xid) "
                 f"SELECT DISTINCT %s, xid FROM {STAGE} ON CONFLICT DO NOTHING", (backup,))


#: Key types whose text cast is their input function (as ``jsonb_populate_record``
#: applies it): int2, int4, int8, text, varchar, numeric, uuid, date, timestamp(tz).
_CAST = (21, 23, 20, 25, 1043, 1700, 2950, 1082, 1114, 1184)


class Keys:
    """SQL fragments over a table's primary key columns (aliased ``_k0``, ``_k1``, ...)."""

    def __init__(self, table: sql.Composable, cols: tuple[str, ...],
                 casts: list[str | None]) -> None:
        self.t = table
        self.cols = [sql.Identifier(c) for c in cols]
        self.alias = [sql.Identifier(f"_k{i}") for i in range(len(cols))]
        # A key read by a cast of its text, not by populating the whole row.
        self.casts = casts if all(casts) else None
        self.names = cols

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], table: str, ident: sql.Composable,
             cols: tuple[str, ...]) -> Keys:
        types = dict(conn.execute(
            "SELECT attname, CASE WHEN atttypid = ANY(%s::oid[]) AND atttypmod = -1 "
            "THEN format_type(atttypid, NULL) END FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attname = ANY(%s)",
            (list(_CAST), table, list(cols))).fetchall())
        return cls(ident, cols, [types.get(c) for c in cols])

    def of(self, rel: str) -> sql.Composable:
        """``rel``'s key columns under their aliases."""
        return sql.SQL(", ").join(sql.SQL("{}.{} AS {}").format(sql.Identifier(rel), c, a)
                                  for c, a in zip(self.cols, self.alias, strict=True))

    def aliases(self, rel: str) -> sql.Composable:
        return sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(rel), a)
                                  for a in self.alias)

    def match(self, left: str, right: str, left_aliased: bool = True) -> sql.Composable:
        names = self.alias if left_aliased else self.cols
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = {}.{}").format(sql.Identifier(left), n, sql.Identifier(right), a)
            for n, a in zip(names, self.alias, strict=True))

    def staged(self, where: str) -> sql.Composable:
        """Staged changes of the table with their keys: ``ord, op, before, after, _k...``."""
        if self.casts is not None:
            k = sql.SQL(", ").join([
                sql.SQL("(coalesce(s.after, s.before) ->> {}::text)::{} AS {}").format(
                    sql.Literal(n), sql.SQL(c or ""), a)
                for n, c, a in zip(self.names, self.casts, self.alias, strict=True)])
            return sql.SQL(
                "SELECT s.ord, s.op, s.before, s.after, {k} FROM " + STAGE + " s "
                "WHERE s.table_name = %(table)s AND " + where).format(k=k)
        return sql.SQL(
            "SELECT s.ord, s.op, s.before, s.after, {k} FROM " + STAGE + " s, "
            "jsonb_populate_record(NULL::{t}, coalesce(s.after, s.before)) k "
            "WHERE s.table_name = %(table)s AND " + where
        ).format(k=self.of("k"), t=self.t)

    def ends(self) -> sql.Composable:
        """Each clean key's first and last operation."""
        return sql.SQL(
            "SELECT {a}, (array_agg(c.op ORDER BY c.ord))[1] AS first_op, "
            "(array_agg(c.op ORDER BY c.ord DESC))[1] AS last_op FROM ({c}) c GROUP BY {a}"
        ).format(a=self.aliases("c"), c=self.staged("NOT s.dirty"))


class Writable(NamedTuple):
    """How a drain writes a table's columns: what the server computes is left to it."""

    generated: frozenset[str]  # GENERATED ALWAYS AS (...) STORED: never written
    always: frozenset[str]  # GENERATED ALWAYS AS IDENTITY: inserted overriding, never updated

    @classmethod
    def load(cls, conn: psycopg.Connection[Any], table: str) -> Writable:
        rows = conn.execute(
            "SELECT attname, attgenerated <> '', attidentity = 'a' FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "AND (attgenerated <> '' OR attidentity = 'a')", (table,)).fetchall()
        return cls(frozenset(r[0] for r in rows if r[1]), frozenset(r[0] for r in rows if r[2]))

    def names(self, names: Iterable[str]) -> list[str]:
        """``names`` without the generated columns."""
        return [n for n in names if n not in self.generated]

    def insert(self, t: sql.Composable, names: list[str]) -> sql.Composable:
        """``INSERT INTO t (names)``, overriding an always-generated identity (the
        backup's value is the row's key)."""
        return sql.SQL("INSERT INTO {} ({}){}").format(
            t, sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(" OVERRIDING SYSTEM VALUE" if self.always else ""))

    def on_conflict(self, names: list[str], key: Sequence[str]) -> sql.Composable:
        """``ON CONFLICT (key) DO UPDATE SET`` every other column of ``names`` to the new
        row's (an always-generated identity cannot be updated; a table of key columns
        only sets its key, which writes the row all the same)."""
        cols = [n for n in names if n not in key and n not in self.always] or [
            n for n in key if n not in self.always]
        head = sql.SQL("ON CONFLICT ({}) ").format(
            sql.SQL(", ").join(map(sql.Identifier, key)))
        if not cols:
            return head + sql.SQL("DO NOTHING")
        return head + sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(n)) for n in cols))


_CLASSIFY = """
WITH c AS MATERIALIZED ({staged}),
w AS (
    SELECT {ck}, c.ord, c.op, c.before, row_number() OVER k AS n,
           coalesce(CASE WHEN c.op = 'INSERT' THEN lag(c.after) OVER k IS NULL
                         -- as text: jsonb's = takes 1.0 for 1.00
                         ELSE lag(c.after) OVER k IS NOT NULL
                              AND c.before::text = (lag(c.after) OVER k)::text END,
                    false) AS follows
    FROM c WINDOW k AS (PARTITION BY {ck} ORDER BY c.ord)),
g AS MATERIALIZED (
    SELECT {wk}, bool_and(w.n = 1 OR w.follows) AS chained, max(w.n) AS changes,
           (array_agg(w.op) FILTER (WHERE w.n = 1))[1] AS first_op,
           (array_agg(w.before) FILTER (WHERE w.n = 1))[1] AS first_before
    FROM w GROUP BY {wk}),
locked AS MATERIALIZED (
    SELECT {tk}, _af_t AS cur, true AS found FROM {t} _af_t JOIN g ON {tg}
    ORDER BY {tcols} FOR UPDATE OF _af_t),
bad AS MATERIALIZED (
    SELECT {gk}, l.cur, l.found FROM g LEFT JOIN locked l ON {lg}
    WHERE NOT coalesce(g.chained AND CASE WHEN g.first_op = 'INSERT' THEN l.found IS NULL
        ELSE l.cur *= jsonb_populate_record(NULL::{t}, g.first_before) END, false)),
marked AS (
    UPDATE {stage} s SET dirty = true FROM c JOIN bad ON {cb} WHERE s.ord = c.ord
    RETURNING s.ord, s.seq, s.xid::text AS xid, s.op,
        CASE WHEN s.before IS NOT NULL
             THEN to_jsonb(jsonb_populate_record(NULL::{t}, s.before)) END AS before,
        CASE WHEN s.after IS NOT NULL
             THEN to_jsonb(jsonb_populate_record(NULL::{t}, s.after)) END AS after)
SELECT (SELECT count(*) FROM locked),
    (SELECT coalesce(jsonb_agg(jsonb_build_array(m.ord, m.seq, m.xid, m.op, m.before, m.after)
                               ORDER BY m.ord), '[]') FROM marked m),
    (SELECT coalesce(jsonb_agg(to_jsonb(b.cur)), '[]') FROM bad b WHERE b.found),
    (SELECT coalesce(max(g.changes), 0) <= 1 FROM g)
"""


class Classified(NamedTuple):
    """What `classify` found in a table's staged changes."""

    #: The changes of keys not proven clean (rendered by the primary), with their
    #: batch position.
    changes: list[tuple[int, Change]]
    rows: list[Row]  # the primary's rows of those keys
    #: No key changes twice in the batch: its one change's after image is its last.
    once: bool


def classify(conn: psycopg.Connection[Any], table: str, k: Keys) -> Classified:
    """Lock the primary's rows the table's staged changes touch (in key order) and mark
    the changes of keys not proven clean."""
    query = sql.SQL(_CLASSIFY).format(
        staged=k.staged("true"), ck=k.aliases("c"), wk=k.aliases("w"), gk=k.aliases("g"),
        tk=k.of(ROW), t=k.t, tg=k.match(ROW, "g", left_aliased=False),
        tcols=sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(ROW), c)
                                 for c in k.cols),
        lg=k.match("l", "g"), cb=k.match("c", "bad"), stage=sql.Identifier(STAGE))
    row = conn.execute(query, {"table": table}).fetchone()
    assert row is not None
    changes = [(o, Change(seq, xid, table, op, before, after))
               for o, seq, xid, op, before, after in row[1]]
    return Classified(changes, list(row[2]), bool(row[3]))


def upsert_clean(conn: psycopg.Connection[Any], table: str, k: Keys, w: Writable,
                 names: list[str], rows: list[Row], once: bool = False) -> None:
    """Write each clean key's last after image and ``rows`` (rendered rows of exactly the
    columns ``names``), all in key order: replication applies them on the backups in
    that order, the order their writers lock rows in. ``once``: no key changes twice
    in the batch (`Classified.once`), so no search for each key's last change."""
    last: sql.Composable
    if once:
        last = sql.SQL("SELECT s.after FROM " + STAGE + " s WHERE s.table_name = %(table)s "
                       "AND NOT s.dirty AND s.after IS NOT NULL")
    else:
        last = sql.SQL(
            "SELECT z.after FROM (SELECT DISTINCT ON ({a}) c.after FROM ({c}) c "
            "ORDER BY {a}, c.ord DESC) z WHERE z.after IS NOT NULL"
        ).format(a=k.aliases("c"), c=k.staged("NOT s.dirty"))
    names = w.names(names)
    conn.execute(sql.SQL(
        "{insert} SELECT {values} FROM ("
        "{last} UNION ALL SELECT j FROM jsonb_array_elements(%(rows)s) AS j) AS u(after), "
        "jsonb_populate_record(NULL::{t}, u.after) r ORDER BY {order} {conflict}"
    ).format(
        insert=w.insert(k.t, names), t=k.t, last=last,
        values=sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(n)) for n in names),
        order=sql.SQL(", ").join(sql.SQL("r.{}").format(c) for c in k.cols),
        conflict=w.on_conflict(names, k.names),
    ), {"table": table, "rows": Jsonb(rows)})


def delete_clean(conn: psycopg.Connection[Any], table: str, k: Keys) -> None:
    """Delete the rows of clean keys whose last change deletes a row the primary held."""
    conn.execute(sql.SQL(
        "DELETE FROM {t} t USING ({ends}) e WHERE e.last_op = 'DELETE' "
        "AND e.first_op <> 'INSERT' AND {match}"
    ).format(t=k.t, ends=k.ends(), match=k.match("t", "e", left_aliased=False)),
        {"table": table})


def inserted_clean(conn: psycopg.Connection[Any], table: str, k: Keys) -> list[RowKey]:
    """The clean keys the drain inserts on the primary (first an insert, last not a delete)."""
    row = conn.execute(sql.SQL(
        "SELECT coalesce(jsonb_agg(jsonb_build_array({a})), '[]') FROM ({ends}) e "
        "WHERE e.first_op = 'INSERT' AND e.last_op <> 'DELETE'"
    ).format(a=k.aliases("e"), ends=k.ends()), {"table": table}).fetchone()
    assert row is not None
    return [(table, tuple(key)) for key in row[0]]


def raws(conn: psycopg.Connection[Any], table: str) -> list[tuple[int, Any]]:
    """All staged changes of ``table``, marked for Python: (position, journal row)."""
    rows = conn.execute(
        f"UPDATE {STAGE} SET dirty = true WHERE table_name = %s "
        "RETURNING ord, seq, xid::text, table_name, op, before::text, after::text",
        (table,)).fetchall()
    return sorted(((r[0], r[1:]) for r in rows), key=lambda r: r[0])

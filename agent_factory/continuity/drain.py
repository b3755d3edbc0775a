"""The drain of a backup's change journal (`continuity.journal`) into the primary.

A drain of backup B, in one transaction on the primary: take the advisory
lock of B (``pg_try_advisory_xact_lock``: one drainer per backup, the others
skip), copy B's journal in order (whole source transactions) into a temporary
table on the primary, skip the source transactions the primary already
applied (``agent_factory_drained``), lock the primary's rows they touch (table
by table in key order), settle the rows whose changes apply cleanly there
(`staged`) and replay the others in Python (`merge.replay`), write the final
rows set-based, record conflicts and applied transactions, commit; then prune
B's journal (with a second connection to B, its DELETE runs while the
primary works and commits after the primary's commit). The marks of applied
transactions are dropped under the lock once their entries are gone from the
journal: by the drain that pruned them (its next batch, or a short
transaction after its last), else by a later drain that finds them gone. A
drain interrupted anywhere is run again safely.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ..errors import ConfigurationError
from . import staged
from .journal import (
    _LOCK_SPACE,
    JOURNAL,
    _ident,
    _steady,
    keep_sequences_ahead,
    primary_key,
    sequence_values,
)
from .merge import (
    Change,
    Conflict,
    ConflictPolicy,
    Row,
    RowKey,
    dependency_order,
    replay,
    replay_steps,
)
from .prune import Prune
from .subscription import PUBLICATION

__all__ = ["DrainReport", "drain", "drain_all"]


@dataclass(frozen=True)
class DrainReport:
    """What one drain of one backup did."""

    backup: str
    changes: int = 0
    transactions: int = 0
    conflicts: int = 0
    skipped: bool = False  # another drainer held the backup's lock
    #: Source transactions left in the journal: they touch a table the primary
    #: lacks (dropped, or not deployed there). Waiting does not help: an operator must.
    stuck: int = 0


def drain(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    backup: str,
    policy: ConflictPolicy,
    *,
    batch: int = 20000,
    delete_inserted_on_source: bool = False,
    lock_timeout: float = 2.0,
    pruner: psycopg.Connection[Any] | None = None,
) -> Iterator[DrainReport]:
    """Drain ``backup``'s journal (``source``) into the primary (``target``), batch by batch.

    Both connections are in transaction mode (autocommit off) and prepared by
    `prepare_session`. ``delete_inserted_on_source``: the backup subscribes to
    the primary, so the rows it inserted come back to it by replication --
    they are removed from it first (kept in its journal until the primary has
    them) so that replication does not stop on a duplicate key.
    ``lock_timeout`` (seconds): how long a batch waits for a row of the primary
    that a live transaction holds, before it fails (`LockNotAvailable`, nothing
    applied). Waiting longer would hold the rows the batch locked before it
    -- every live writer of those would queue behind the drain.
    ``pruner``: a second connection to the backup (transaction mode). A batch's
    journal entries are then deleted there while the primary applies the batch
    (the backup's work beside the primary's), committed once the primary has
    committed; without it they are deleted after the primary's commit.
    """
    if pruner is not None and pruner.autocommit:
        raise ValueError("the pruner connection must be in transaction mode: its deletions "
                         "wait for the primary's commit")
    # Up to what is recorded now: writes that keep coming (other instances, or
    # this one before the write pause) are left to the next drain.
    with _steady(source):
        found = source.execute("SELECT to_regclass(%s)", (JOURNAL,)).fetchone()
        if found is None or found[0] is None:  # no journal here: nothing recorded
            yield DrainReport(backup)
            return
        row = source.execute(f"SELECT max(seq) FROM {JOURNAL}").fetchone()
    upto = row[0] if row and row[0] is not None else 0
    stuck: set[str] = set()  # source transactions touching a table the primary lacks
    forget: list[str] = []  # the ones the last batch pruned: their marks may go
    while True:
        report, staged_rows, forget = _drain_batch(
            source, target, backup, policy, batch, upto, delete_inserted_on_source, stuck,
            lock_timeout, pruner, forget)
        yield report
        # A batch that staged fewer entries than it may took every entry up to
        # ``upto`` left: no batch after it would find one (a last, empty batch
        # cost a lock, a look at the marks and a read of the journal).
        if report.skipped or report.changes == 0 or staged_rows < batch:
            break
    if forget:
        with _steady(target):
            if _try_lock(target, backup):
                _drop_marks(target, backup, forget)


def drain_all(
    source: psycopg.Connection[Any],
    target: psycopg.Connection[Any],
    backup: str,
    policy: ConflictPolicy,
    *,
    delete_inserted_on_source: bool = False,
    on_batch: Callable[[DrainReport], None] | None = None,
    lock_timeout: float = 2.0,
    pruner: psycopg.Connection[Any] | None = None,
) -> DrainReport:
    """`drain` to the end; its batches' reports summed (``on_batch`` sees each)."""
    total = DrainReport(backup)
    for report in drain(source, target, backup, policy,
                        delete_inserted_on_source=delete_inserted_on_source,
                        lock_timeout=lock_timeout, pruner=pruner):
        if on_batch is not None:
            on_batch(report)
        total = DrainReport(backup, total.changes + report.changes,
                            total.transactions + report.transactions,
                            total.conflicts + report.conflicts,
                            total.skipped or report.skipped, report.stuck)
    return total


def _drain_batch(
    source: psycopg.Connection[Any], target: psycopg.Connection[Any], backup: str,
    policy: ConflictPolicy, batch: int, upto: int, delete_inserted: bool, stuck: set[str],
    lock_timeout: float, pruner: psycopg.Connection[Any] | None, forget: list[str],
) -> tuple[DrainReport, int, list[str]]:
    """One batch; its report, the number of journal entries it staged, and the source
    transactions it pruned. ``forget``: those of the batch before (their marks go)."""
    with Prune(source, pruner) as prune:
        with _steady(target):
            # work_mem: the batch's sorts in memory.
            target.execute("SELECT set_config('lock_timeout', %s, true), "
                           "set_config('work_mem', '64MB', true)",
                           (f"{max(1, round(lock_timeout * 1000))}ms",))
            if not _try_lock(target, backup):
                return DrainReport(backup, skipped=True), 0, forget
            _drop_marks(target, backup, forget)
            applied = _forget_pruned(source, target, backup)
            staged_rows = _read(source, target, batch, upto, stuck)
            found = _survey(target, applied, stuck)
            if found is None:
                return DrainReport(backup, stuck=len(stuck)), staged_rows, []
            prune.start(found.pruned)
            keys, conflicts = _apply(source, target, policy, found.tables, delete_inserted)
            _record(target, backup, keys, conflicts)
        # Committed on the primary: the entries go from the journal. The
        # applied-transaction marks stay until a later hold of the lock
        # (`_drop_marks`, `_forget_pruned`).
        prune.commit()
    return (DrainReport(backup, found.changes, found.transactions, len(conflicts),
                        stuck=len(stuck)), staged_rows, found.done)


def _apply(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
           policy: ConflictPolicy, tables: list[staged.Table], delete_inserted: bool
           ) -> tuple[dict[str, tuple[str, ...]], list[Conflict]]:
    """Settle the staged batch on the primary (uncommitted); its tables' keys and its
    conflicts."""
    tables = _parents_first(target, tables)
    keys = {t.name: primary_key(target, t.name) for t in tables}
    key_of = _key_by(keys)
    skeys = {t.name: staged.Keys.load(target, t.name, _ident(t.name), keys[t.name])
             for t in tables if t.exact is not None}
    writable = {t.name: staged.Writable.load(target, t.name) for t in tables}
    todo, current, once = _classified(target, tables, keys, skeys, key_of)
    final, conflicts = replay(todo, key_of, current, policy)
    if delete_inserted:
        inserted = _coming_back(target, todo, key_of, current, final)
        inserted += _published(target, [
            k for t in tables if t.inserts and t.exact is not None
            for k in staged.inserted_clean(target, t.name, skeys[t.name])])
        restored = _gone_from_source(target, todo, key_of, final)
        if inserted or restored:
            _fix_source(source, keys, writable, inserted, restored, final)
    try:
        with target.transaction():  # a savepoint
            _write(target, keys, skeys, writable, final, current, tables, once)
    except (psycopg.errors.UniqueViolation, psycopg.errors.ExclusionViolation,
            psycopg.errors.ForeignKeyViolation):
        conflicts = _write_stepwise(target, tables, keys, writable, key_of, policy)
    _move_sequences_past(source, target, list(keys))
    return keys, conflicts


def _write_stepwise(target: psycopg.Connection[Any], tables: list[staged.Table],
                    keys: dict[str, tuple[str, ...]], writable: dict[str, staged.Writable],
                    key_of: Callable[[Change], tuple[Any, ...]], policy: ConflictPolicy
                    ) -> list[Conflict]:
    """Replay the whole batch one change at a time, in source order; its conflicts.

    For a batch whose final rows break a unique key or a foreign key when written
    at once, though the backup went through them step by step: two rows that
    swapped a unique value (by way of a third), a row deleted and another that
    takes its unique value, rows that reference each other. PostgreSQL checks a
    unique key that is not deferrable at each row, not at the end of the
    statement. One statement per change: slower, and only after the set-based
    write failed (rolled back to its savepoint).
    """
    found = sorted((r for t in tables for r in staged.raws(target, t.name)),
                   key=lambda r: r[0])
    changes = _normalised(target, [Raw(*r) for _, r in found])
    current = _current(target, changes, keys, key_of)
    steps, conflicts = replay_steps(changes, key_of, current, policy)
    for (table, key), row in steps:
        if row is None:
            _delete_keys(target, table, keys[table], [dict(zip(keys[table], key, strict=True))])
            continue
        _put_rows(target, table, writable[table], [row], keys[table])
    return conflicts


def _parents_first(target: psycopg.Connection[Any], tables: list[staged.Table]
                   ) -> list[staged.Table]:
    """The batch's tables, each after the tables it references by a foreign key (on the
    primary), else in first-change order.

    The drain writes a table's rows in one statement (a foreign key within a
    table is checked at its end), parents' before children's, and deletes
    children's before parents'. First-change order is not enough: a batch
    that deletes a parent's children and then the parent changes the
    children's table first.
    """
    if len(tables) < 2:
        return tables
    names = [t.name for t in tables]
    refs = target.execute(
        "SELECT c.i::int, p.i::int FROM pg_constraint k "
        "JOIN unnest(%s::text[]) WITH ORDINALITY AS c(name, i) "
        "ON k.conrelid = to_regclass(c.name) "
        "JOIN unnest(%s::text[]) WITH ORDINALITY AS p(name, i) "
        "ON k.confrelid = to_regclass(p.name) "
        "WHERE k.contype = 'f' AND k.conrelid <> k.confrelid", (names, names)).fetchall()
    return [tables[i] for i in dependency_order(len(tables), [(c - 1, p - 1) for c, p in refs])]


class _Survey(NamedTuple):
    tables: list[staged.Table]  # to replay
    pruned: list[int]  # the journal entries the batch prunes
    done: list[str]  # their source transactions (every entry of each is pruned)
    changes: int  # to replay
    transactions: int  # to replay


def _survey(target: psycopg.Connection[Any], applied: list[str], stuck: set[str]
            ) -> _Survey | None:
    """The staged batch: what it replays and prunes; None when nothing was read.

    Source transactions touching a table the primary lacks stay in the journal
    (added to ``stuck``); the ones the primary applied before (``applied``,
    their marks) are pruned only.
    """
    tables = staged.tables(target)
    if not tables:
        return None
    missing = [t.name for t in tables if t.missing]
    if missing:
        stuck.update(staged.set_aside(target, missing))
    pruned, count, done = staged.totals(target)
    xids = len(done)
    if staged.drop_applied(target, applied) or missing:
        tables = staged.tables(target)
        _, count, replayed = staged.totals(target)
        xids = len(replayed)
    return _Survey(tables, pruned, done, count, xids)


def _classified(target: psycopg.Connection[Any], tables: list[staged.Table],
                keys: dict[str, tuple[str, ...]], skeys: dict[str, staged.Keys],
                key_of: Callable[[Change], tuple[Any, ...]]
                ) -> tuple[list[Change], dict[RowKey, Row | None], set[str]]:
    """The staged changes Python must replay (in batch order), the primary's rows
    they touch, and the set-based tables no key of which changes twice.

    Every touched row is locked, table by table in key order. A table whose
    images all have exactly the primary's columns is settled set-based
    (`staged`) but for its keys not proven clean; another one (schema drift)
    goes to Python whole.
    """
    dirty: list[tuple[int, Change]] = []
    current: dict[RowKey, Row | None] = {}
    once: set[str] = set()
    for t in tables:
        cols = keys[t.name]
        if t.exact is not None:
            changes, rows, each_once = staged.classify(target, t.name, skeys[t.name])
            if each_once:
                once.add(t.name)
            for _, c in changes:
                current[(t.name, key_of(c))] = None
            for row in rows:
                current[(t.name, tuple(row.get(c) for c in cols))] = row
        else:
            found = staged.raws(target, t.name)
            normal = _normalised(target, [Raw(*r) for _, r in found])
            changes = [(o, c) for (o, _), c in zip(found, normal, strict=True)]
            current.update(_current(target, normal, {t.name: cols}, key_of))
        dirty += changes
    dirty.sort(key=lambda oc: oc[0])
    return [c for _, c in dirty], current, once


def _key_by(keys: dict[str, tuple[str, ...]]) -> Callable[[Change], tuple[Any, ...]]:
    """A change's row key: its primary key values (from its after image, else its before)."""
    def key_of(c: Change) -> tuple[Any, ...]:
        image = c.after if c.after is not None else c.before
        assert image is not None
        return tuple(image.get(k) for k in keys[c.table])
    return key_of


def _coming_back(target: psycopg.Connection[Any], changes: list[Change], key_of: Any,
                 current: dict[RowKey, Row | None],
                 final: dict[RowKey, Row | None]) -> list[RowKey]:
    """The backup's rows that replication from the primary will insert into it again.

    Rows the drain inserts on the primary, and rows the backup inserted that
    the primary holds too (its own insert of that key had not reached the
    backup: a backlog, a retried insert with the same key). Either would stop
    the backup's subscription on a duplicate key, so the backup gives them up
    just before the primary commits. Only for published tables: a row of a
    table that replication does not carry would never come back.
    """
    first: dict[RowKey, Change] = {}
    for c in changes:
        first.setdefault((c.table, key_of(c)), c)
    wanted = [k for k, c in first.items()
              if (c.op == "INSERT" and current.get(k) is not None)
              or (final.get(k) is not None and current.get(k) is None)]
    return _published(target, wanted)


def _gone_from_source(target: psycopg.Connection[Any], changes: list[Change], key_of: Any,
                      final: dict[RowKey, Row | None]) -> list[RowKey]:
    """Rows the backup deleted last that the primary keeps (the delete lost its
    conflict): replication cannot bring them back -- an update of a row the
    backup lacks is skipped there -- so the backup gets them from the drain."""
    last: dict[RowKey, Change] = {}
    for c in changes:
        last[(c.table, key_of(c))] = c
    return _published(target, [k for k, c in last.items()
                               if c.op == "DELETE" and final.get(k) is not None])


def _published(target: psycopg.Connection[Any], wanted: list[RowKey]) -> list[RowKey]:
    """The keys of tables in the publication (replication carries no other table)."""
    if not wanted:
        return []
    published = {r[0] for r in target.execute(
        "SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IN ("
        "SELECT format('%%I.%%I', schemaname, tablename)::regclass "
        "FROM pg_publication_tables WHERE pubname = %s)",
        (sorted({t for t, _ in wanted}), PUBLICATION)).fetchall()}
    return [k for k in wanted if k[0] in published]


def _try_lock(target: psycopg.Connection[Any], backup: str) -> bool:
    """The backup's drain lock, until the primary's transaction ends; False if taken."""
    got = target.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
                         (_LOCK_SPACE, backup)).fetchone()
    return bool(got and got[0])


def _drop_marks(target: psycopg.Connection[Any], backup: str, xids: list[str]) -> None:
    """Drop the marks of source transactions whose entries are gone from the journal
    (this drain pruned them, or `_forget_pruned` found them gone), under the lock.

    Their entries are gone for good (every entry of each was pruned, and a
    committed transaction records no more): no drainer holding the lock
    later can read them, and none holding it before is still checking.
    """
    if xids:
        target.execute("DELETE FROM agent_factory_drained WHERE provider = %s "
                       "AND xid = ANY(%s::xid8[])", (backup, xids))


def _forget_pruned(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                   backup: str) -> list[str]:
    """Drop the marks of applied transactions whose journal entries are gone; the
    marks left (applied transactions still in the journal: their prune failed).

    Only the lock holder may: a drainer that read entries before another
    drainer pruned them must still find their marks when it checks (a mark
    dropped by the pruner itself, outside the lock, let such a drainer apply
    a transaction twice). The marks left hold while the lock is held: only
    its holder adds any.
    """
    marks = [r[0] for r in target.execute(
        "SELECT xid::text FROM agent_factory_drained WHERE provider = %s", (backup,))]
    if not marks:
        return []
    with _steady(source):
        kept = {r[0] for r in source.execute(
            f"SELECT DISTINCT xid::text FROM {JOURNAL} WHERE xid = ANY(%s::xid8[])", (marks,))}
    _drop_marks(target, backup, [m for m in marks if m not in kept])
    return [m for m in marks if m in kept]


def _move_sequences_past(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
                         tables: list[str]) -> None:
    """The primary's sequences past every value the backup handed out, and the
    backup's a gap ahead of the primary's again at once (not at the next check:
    an outage right after would hand out the primary's next values twice)."""
    with _steady(source):
        used = sequence_values(source, tables)
    for seq, value in used.items():
        if value <= 0:
            continue  # never used on the backup
        target.execute("SELECT setval(%s::regclass, greatest(%s, coalesce("
                       "pg_sequence_last_value(%s::regclass), 0)))", (seq, value, seq))
    if used:
        ahead = sequence_values(target, tables)
        with _steady(source):
            keep_sequences_ahead(source, ahead)


#: The next batch of the journal for `staged.stage`: whole source transactions,
#: oldest first (ordered by their last change), numbered in that order.
_READ = sql.SQL(
    f"WITH x AS (SELECT xid, max(seq) AS last FROM {JOURNAL} "
    f"WHERE xid IN (SELECT xid FROM {JOURNAL} WHERE seq <= %s "
    f"AND xid <> ALL(%s::xid8[]) ORDER BY seq LIMIT %s) GROUP BY xid) "
    f"SELECT row_number() OVER (ORDER BY x.last, j.seq), j.seq, j.xid, j.table_name, j.op, "
    f"j.before, j.after FROM {JOURNAL} j JOIN x USING (xid) ORDER BY x.last, j.seq")


def _read(source: psycopg.Connection[Any], target: psycopg.Connection[Any], batch: int,
          upto: int, stuck: set[str]) -> int:
    """The next batch of the source's journal into the primary's stage (`staged`); its
    number of entries."""
    with _steady(source):
        # The batch is sorted before its first row leaves: in memory, not on disk.
        # No nested loop: the journal is empty most of its life, and an ANALYZE
        # (autovacuum's) that saw it so makes the planner take its next thousands
        # of entries for one row; a nested loop then scans the journal once per
        # source transaction (measured: 20,000 changes read in 64 s instead of
        # 0.04 s, and growing with the square of the batch).
        source.execute("SELECT set_config('work_mem', '64MB', true), "
                       "set_config('enable_nestloop', 'off', true)")
        return staged.stage(source, target, _READ, (upto, sorted(stuck), batch))


class Raw(NamedTuple):
    """A journal row as read: its images still JSON text (the primary parses them)."""

    seq: int
    xid: str
    table: str
    op: str
    before: str | None
    after: str | None


def _normalised(target: psycopg.Connection[Any], changes: list[Raw]) -> list[Change]:
    """The images as the primary renders its own rows (types, time zone, number text).

    One statement and one JSON document per table each way: the images go
    as the journal's text and come back parsed once.
    """
    images: list[str | None] = []
    for c in changes:
        images += [c.before, c.after]
    out: list[Row | None] = [None] * len(images)
    for table in dict.fromkeys(c.table for c in changes):
        idx = [i for i, c in enumerate(changes) for i in (2 * i, 2 * i + 1)
               if c.table == table and images[i] is not None]
        if not idx:
            continue
        doc = "[" + ",".join(images[i] or "" for i in idx) + "]"
        for i, row in zip(idx, _rendered(target, table, doc), strict=True):
            out[i] = row
    return [Change(c.seq, c.xid, c.table, c.op, out[2 * i], out[2 * i + 1])
            for i, c in enumerate(changes)]


def _rendered(target: psycopg.Connection[Any], table: str, doc: str) -> list[Row]:
    """The images of JSON array ``doc`` rendered by the primary, on the backup's columns.

    Usually every image has exactly the primary's columns (one pass). Else
    each keeps only its own columns -- one the primary added since (with a
    default) keeps its default or its value -- and a column the primary
    lacks is an error: dropping it would lose the backup's values unsaid.
    """
    t = _ident(table)
    found = target.execute(sql.SQL(
        "SELECT jsonb_agg(to_jsonb(jsonb_populate_record(NULL::{t}, j)) ORDER BY n), "
        "bool_and(j ?& c.names AND j - c.names = '{{}}') "
        "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(j, n), "
        "(SELECT array_agg(attname::text) AS names FROM pg_attribute WHERE attrelid = "
        "%s::regclass AND attnum > 0 AND NOT attisdropped) AS c").format(t=t),
        (doc, table)).fetchone()
    assert found is not None
    if found[1]:
        return list(found[0])
    pairs = target.execute(sql.SQL(
        "SELECT jsonb_agg(jsonb_build_array(to_jsonb(jsonb_populate_record(NULL::{t}, j)), "
        "(SELECT coalesce(jsonb_agg(k), '[]') FROM jsonb_object_keys(j) AS k)) ORDER BY n) "
        "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(j, n)").format(t=t),
        (doc,)).fetchone()
    assert pairs is not None
    rows: list[Row] = []
    for row, names in pairs[0]:
        unknown = sorted(set(names) - set(row))
        if unknown:
            raise ConfigurationError(
                f"table {table!r}: column(s) {', '.join(unknown)} recorded on the backup "
                "do not exist on the primary; deploy the same schema on every provider "
                "and the drain resumes")
        rows.append({k: row[k] for k in names})
    return rows


def _current(target: psycopg.Connection[Any], changes: list[Change],
             keys: dict[str, tuple[str, ...]], key_of: Any) -> dict[RowKey, Row | None]:
    """The primary's rows the changes touch, locked until the drain commits."""
    found: dict[RowKey, Row | None] = {}
    for table, cols in keys.items():
        wanted = {key_of(c) for c in changes if c.table == table}
        for k in wanted:
            found[(table, k)] = None
        probe = [dict(zip(cols, k, strict=True)) for k in wanted]
        match = sql.SQL(" AND ").join(
            sql.SQL("{r}.{c} = k.{c}").format(r=sql.Identifier(staged.ROW), c=sql.Identifier(c))
            for c in cols)
        # Locked in key order, the order applications usually take row locks in:
        # a drain running beside live writers must not deadlock with them.
        got = target.execute(sql.SQL(
            "SELECT coalesce(jsonb_agg(r), '[]') FROM (SELECT to_jsonb({row}) AS r "
            "FROM {t} {row}, jsonb_populate_recordset(NULL::{t}, %s) k "
            "WHERE {match} ORDER BY {order} FOR UPDATE OF {row}) AS locked"
        ).format(t=_ident(table), match=match, row=sql.Identifier(staged.ROW),
                 order=sql.SQL(", ").join(sql.SQL("{}.{}").format(
                     sql.Identifier(staged.ROW), sql.Identifier(c)) for c in cols)),
                 (Jsonb(probe),)).fetchone()
        assert got is not None
        seen = {k for c in changes if c.table == table for k in (c.after or c.before or {})}
        for row in got[0]:
            # Compared and written on the columns the backup has.
            found[(table, tuple(row.get(c) for c in cols))] = {
                k: v for k, v in row.items() if k in seen}
    return found


def _write(target: psycopg.Connection[Any], keys: dict[str, tuple[str, ...]],
           skeys: dict[str, staged.Keys], writable: dict[str, staged.Writable],
           final: dict[RowKey, Row | None], current: dict[RowKey, Row | None],
           tables: list[staged.Table], once: set[str]) -> None:
    """Upserts table by table in `_parents_first` order, then deletes in reverse order;
    the clean keys' rows set-based from the stage, the others' from ``final``.

    Every row the changes touch is written, also one whose final version is
    already the primary's: the backup still holds its own version (a change
    that lost, or outage changes that net to nothing on the primary), and
    only a write on the primary sends the primary's version to it again.
    """
    for t in tables:
        table = t.name
        rows = [r for (name, _), r in final.items() if name == table and r is not None]
        if t.exact is not None:
            # In one statement with the clean rows (in key order) when they have
            # the same columns (a callback may return fewer).
            every = set(t.exact)
            staged.upsert_clean(target, table, skeys[table], writable[table], t.exact,
                                [r for r in rows if r.keys() == every], table in once)
            rows = [r for r in rows if r.keys() != every]
        if rows:
            _put_rows(target, table, writable[table], rows, keys[table])
    for t in reversed(tables):
        gone = [dict(zip(keys[t.name], k, strict=True)) for (name, k), r in final.items()
                if name == t.name and r is None and current.get((name, k)) is not None]
        if gone:
            _delete_keys(target, t.name, keys[t.name], gone)
        if t.deletes and t.exact is not None:
            staged.delete_clean(target, t.name, skeys[t.name])


def _put_rows(conn: psycopg.Connection[Any], table: str, w: staged.Writable, rows: list[Row],
              key: Sequence[str] | None) -> None:
    """Insert ``rows`` (of the first row's columns); one that exists is updated by
    ``key``, or left alone when ``key`` is None."""
    cols = w.names(rows[0])
    conn.execute(sql.SQL(
        "{insert} SELECT {names} FROM jsonb_populate_recordset(NULL::{t}, %s) {conflict}"
    ).format(insert=w.insert(_ident(table), cols), t=_ident(table),
             names=sql.SQL(", ").join(map(sql.Identifier, cols)),
             conflict=sql.SQL("ON CONFLICT DO NOTHING") if key is None
             else w.on_conflict(cols, key)), (Jsonb(rows),))


def _delete_keys(conn: psycopg.Connection[Any], table: str, cols: Sequence[str],
                 probe: list[dict[str, Any]]) -> None:
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in cols)
    conn.execute(sql.SQL(
        "DELETE FROM {t} t USING jsonb_populate_recordset(NULL::{t}, %s) k WHERE {match}"
    ).format(t=_ident(table), match=match), (Jsonb(probe),))


def _fix_source(source: psycopg.Connection[Any], keys: dict[str, tuple[str, ...]],
                writable: dict[str, staged.Writable], inserted: list[RowKey],
                restored: list[RowKey],
                final: dict[RowKey, Row | None]) -> None:
    """On the backup, just before the primary commits (the drain holds those rows
    on the primary: nothing newer of them can be in the stream yet): give up the
    rows replication will insert again, and take back the ones it cannot."""
    order = list(keys)  # the batch's tables, parents first (`_parents_first`)
    with _steady(source):
        for table in reversed(order):
            probe = [dict(zip(keys[table], k, strict=True)) for t, k in inserted if t == table]
            if probe:
                _delete_keys(source, table, keys[table], probe)
        for table in order:
            rows = [r for (t, k) in restored if t == table
                    for r in [final[(t, k)]] if r is not None]
            if rows:
                _put_rows(source, table, writable[table], rows, None)


def _record(target: psycopg.Connection[Any], backup: str, keys: dict[str, tuple[str, ...]],
            conflicts: list[Conflict]) -> None:
    if conflicts:
        # One statement (a pipeline of many stalls behind some poolers).
        target.execute(
            "INSERT INTO agent_factory_conflicts (provider, table_name, op, row_key, before, "
            "backup_version, primary_version, resolved_version, resolution, source_xid) "
            "SELECT %s, c->>'table', c->>'op', c->'key', c->'before', c->'after', "
            "c->'primary', c->'resolved', c->>'resolution', c->>'xid' "
            "FROM jsonb_array_elements(%s) AS c",
            (backup, Jsonb([{
                "table": c.change.table, "op": c.change.op,
                "key": dict(zip(keys[c.change.table], c.key, strict=True)),
                "before": c.change.before, "after": c.change.after, "primary": c.primary,
                "resolved": c.resolved, "resolution": c.resolution, "xid": c.change.xid,
            } for c in conflicts])),
        )
    staged.mark_applied(target, backup)

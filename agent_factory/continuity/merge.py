"""Replaying a backup's recorded changes on the primary's rows: the decisions, no I/O.

A change (insert, update, delete of one row, with its before and after image)
applies cleanly when the primary's row is still what the backup saw: absent
for an insert, equal to the before image otherwise. Anything else is a
conflict -- the primary changed the row too (writes that had not reached the
backup when the primary failed, a partitioned instance, another backup) --
and is settled column by column for an update (a three-way merge: a column
only one side changed takes that side's value, resolution ``merged``) and by
the `ConflictPolicy` where both sides changed a column:

* a *delta column* (a counter, a balance) moves by the backup's
  ``after - before`` from the primary's value, so both sides' changes count
  (``delta``);
* another column both changed takes the backup's value (``backup_wins``) or
  keeps the primary's (``primary_wins``), or the user's callback decides the
  whole row (``callback``, for every conflict).

Images compare as normalised JSON objects (the primary renders both sides
with one session's settings). Clocks are never compared. The settled rows are
written table by table, each table after those it references
(`dependency_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..engine.settings import Settings, parse_delta_columns

__all__ = [
    "Change", "Conflict", "ConflictPolicy", "Row", "RowKey", "dependency_order", "replay",
    "replay_steps",
]

Row = dict[str, Any]
RowKey = tuple[str, tuple[Any, ...]]  # (table, primary key values)

#: Stamped by the schema's trigger on every update: never a conflict of its own.
_STAMP = "updated_at"


@dataclass(frozen=True)
class Change:
    """One recorded row change of a backup (a row of ``agent_factory_journal``)."""

    seq: int
    xid: str
    table: str
    op: str  # INSERT | UPDATE | DELETE
    before: Row | None
    after: Row | None


@dataclass(frozen=True)
class Conflict:
    """A change that met a primary row it did not expect, and how it was settled."""

    change: Change
    key: tuple[Any, ...]
    primary: Row | None  # the primary's row when the change came
    resolved: Row | None  # what the primary holds after it (None: no row)
    resolution: str  # merged | delta | backup_wins | primary_wins | callback


#: ``callback(conflict_without_resolution) -> row or None``; in-process only.
Resolver = Callable[[Conflict], "Row | None"]


@dataclass(frozen=True)
class ConflictPolicy:
    """How conflicts are settled: the policy's name, delta columns per table, a callback."""

    name: str = "backup_wins"
    delta_columns: Mapping[str, frozenset[str]] = field(default_factory=dict)
    callback: Resolver | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ConflictPolicy:
        return cls(settings.conflict_policy, parse_delta_columns(settings.conflict_delta_columns),
                   settings.conflict_resolver)

    def deltas(self, table: str) -> frozenset[str]:
        bare = table.rsplit(".", 1)[-1].strip('"')
        return self.delta_columns.get(table, frozenset()) | self.delta_columns.get(
            bare, frozenset())


def replay(
    changes: Sequence[Change],
    key_of: Callable[[Change], tuple[Any, ...]],
    current: Mapping[RowKey, Row | None],
    policy: ConflictPolicy,
) -> tuple[dict[RowKey, Row | None], list[Conflict]]:
    """Apply ``changes`` in order to ``current``; the final rows and the conflicts met.

    ``current`` holds the primary's row (or None) for every key the changes
    touch. A change whose after image is already there (both sides made the
    same change; ``updated_at`` may differ) is no conflict -- unless it moves a
    delta column, where equal values are a coincidence and the backup's
    difference still counts.
    (A replay interrupted after its commit never comes here twice: the
    primary records the source transactions it applied.)
    """
    state: dict[RowKey, Row | None] = dict(current)
    conflicts: list[Conflict] = []
    for _ in _replayed(changes, key_of, state, policy, conflicts):
        pass
    return state, conflicts


def replay_steps(
    changes: Sequence[Change],
    key_of: Callable[[Change], tuple[Any, ...]],
    current: Mapping[RowKey, Row | None],
    policy: ConflictPolicy,
) -> tuple[list[tuple[RowKey, Row | None]], list[Conflict]]:
    """`replay`, as the row each change leaves (None: no row), in order: the steps
    that bring the primary there one change at a time; and the conflicts met."""
    state: dict[RowKey, Row | None] = dict(current)
    conflicts: list[Conflict] = []
    return list(_replayed(changes, key_of, state, policy, conflicts)), conflicts


def _replayed(changes: Sequence[Change], key_of: Callable[[Change], tuple[Any, ...]],
              state: dict[RowKey, Row | None], policy: ConflictPolicy,
              conflicts: list[Conflict]) -> Iterator[tuple[RowKey, Row | None]]:
    """Apply each change to ``state`` (adding to ``conflicts``); its row after it."""
    for change in changes:
        key = key_of(change)
        row_key = (change.table, key)
        now = state.get(row_key)
        expected = None if change.op == "INSERT" else change.before
        if now == expected:
            state[row_key] = change.after
        elif _same(now, change.after) and not _moves_counter(change, policy):
            pass  # both sides made the same change: nothing to settle
        else:
            conflict = _settle(Conflict(change, key, now, None, ""), policy)
            state[row_key] = conflict.resolved
            conflicts.append(conflict)
        yield row_key, state.get(row_key)


def _settle(c: Conflict, policy: ConflictPolicy) -> Conflict:
    change, now = c.change, c.primary
    if policy.name == "callback":
        assert policy.callback is not None
        return Conflict(change, c.key, now, policy.callback(c), "callback")
    backup_wins = policy.name == "backup_wins"
    if change.op != "UPDATE" or now is None or change.before is None or change.after is None:
        # A whole-row disagreement (insert over a row, delete of a changed
        # row, update of a deleted one): one side's version wins.
        return Conflict(change, c.key, now, change.after if backup_wins else now, policy.name)
    deltas = policy.deltas(change.table)
    merged = dict(now)
    by_policy = moved = False
    for column, value in change.after.items():
        old = change.before.get(column)
        if value == old:
            continue  # the backup left it alone: the primary's value stays
        if column in deltas and _number(value) and _number(old) and _number(now.get(column)):
            merged[column] = now[column] + (value - old)
            moved = True
        elif column == _STAMP:
            merged[column] = max(value, now.get(column) or value)
        elif column in now and now[column] == old:
            merged[column] = value  # only the backup changed it: nothing to decide
        else:
            by_policy = True  # both changed it
            if backup_wins:
                merged[column] = value
    resolution = policy.name if by_policy else "delta" if moved else "merged"
    return Conflict(change, c.key, now, merged, resolution)


def _same(a: Row | None, b: Row | None) -> bool:
    """Equal rows, but for the stamp the schema's trigger or default sets on each side
    (a retried insert of the same row on two providers)."""
    if a is None or b is None:
        return a is b
    return a == b or {k: v for k, v in a.items() if k != _STAMP} == {
        k: v for k, v in b.items() if k != _STAMP}


def _moves_counter(change: Change, policy: ConflictPolicy) -> bool:
    """The change moves a delta column: equal end values are a coincidence, not a match."""
    if change.before is None or change.after is None:
        return False
    return any(change.after.get(c) != change.before.get(c) for c in policy.deltas(change.table))


def _number(value: Any) -> bool:
    return isinstance(value, (int, Decimal)) and not isinstance(value, bool)


def dependency_order(n: int, refs: list[tuple[int, int]]) -> list[int]:
    """0..n-1 with every item after the items it references (``(item, referenced)``
    pairs), else in index order; in a cycle the lowest index goes first."""
    waits_for: dict[int, set[int]] = {i: set() for i in range(n)}
    for child, parent in refs:
        waits_for[child].add(parent)
    order: list[int] = []
    left = set(range(n))
    while left:
        ready = [i for i in sorted(left) if not waits_for[i] & left]
        nxt = ready[0] if ready else min(left)
        order.append(nxt)
        left.discard(nxt)
    return order

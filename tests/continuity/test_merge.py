"""The replay decisions of failback (continuity/merge.py), without servers."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from agent_factory.continuity.merge import (
    Change,
    Conflict,
    ConflictPolicy,
    dependency_order,
    replay,
    replay_steps,
)
from agent_factory.engine.settings import parse_delta_columns
from agent_factory.errors import ConfigurationError

T = "public.accounts"


def change(op: str, before: dict[str, Any] | None, after: dict[str, Any] | None,
           seq: int = 1) -> Change:
    return Change(seq, str(seq), T, op, before, after)


def key_of(c: Change) -> tuple[Any, ...]:
    image = c.after if c.after is not None else c.before
    assert image is not None
    return (image["id"],)


def run(changes: list[Change], current: dict[int, dict[str, Any] | None],
        policy: ConflictPolicy | None = None) -> tuple[dict[Any, Any], list[Conflict]]:
    final, conflicts = replay(changes, key_of, {(T, (k,)): v for k, v in current.items()},
                              policy or ConflictPolicy())
    return {k[1][0]: v for k, v in final.items()}, conflicts


def acct(balance: int, note: str = "") -> dict[str, Any]:
    return {"id": 1, "balance": balance, "note": note}


def test_clean_changes_apply_in_order_without_conflicts() -> None:
    final, conflicts = run([
        change("INSERT", None, {"id": 2, "balance": 5, "note": ""}, 1),
        change("UPDATE", acct(100), acct(90), 2),
        change("UPDATE", acct(90), acct(80), 3),
        change("DELETE", {"id": 2, "balance": 5, "note": ""}, None, 4),
    ], {1: acct(100), 2: None})
    assert final == {1: acct(80), 2: None}
    assert conflicts == []


def test_a_change_already_applied_is_no_conflict() -> None:
    final, conflicts = run([change("UPDATE", acct(100), acct(90))], {1: acct(90)})
    assert final == {1: acct(90)} and conflicts == []


def test_delta_columns_keep_both_sides_changes() -> None:
    policy = ConflictPolicy(delta_columns=parse_delta_columns(["accounts.balance"]))
    # The primary moved 100 -> 130 (never replicated); the backup 100 -> 90 -> 70.
    final, conflicts = run([change("UPDATE", acct(100), acct(90), 1),
                            change("UPDATE", acct(90), acct(70), 2)], {1: acct(130)}, policy)
    assert final[1]["balance"] == 100  # 130 - 10 - 20
    assert [c.resolution for c in conflicts] == ["delta", "delta"]
    assert conflicts[0].primary == acct(130) and conflicts[0].change.after == acct(90)


def test_a_counter_that_happens_to_match_still_moves() -> None:
    policy = ConflictPolicy(delta_columns={"accounts": frozenset({"balance"})})
    # The primary went 100 -> 101 on its own; the backup 100 -> 101 too: both count.
    final, conflicts = run([change("UPDATE", acct(100), acct(101))], {1: acct(101)}, policy)
    assert final[1]["balance"] == 102 and len(conflicts) == 1


def test_delta_works_on_exact_decimals() -> None:
    policy = ConflictPolicy(delta_columns={"accounts": frozenset({"balance"})})
    final, _ = run([change("UPDATE", acct(Decimal("1.10")), acct(Decimal("1.30")))],  # type: ignore[arg-type]
                   {1: acct(Decimal("5.05"))}, policy)  # type: ignore[arg-type]
    assert final[1]["balance"] == Decimal("5.25")


@pytest.mark.parametrize(("policy", "note"), [("backup_wins", "b"), ("primary_wins", "p")])
def test_other_columns_follow_the_policy_and_conflicts_keep_both_versions(
        policy: str, note: str) -> None:
    final, conflicts = run([change("UPDATE", acct(100, "x"), acct(100, "b"))], {1: acct(100, "p")},
                           ConflictPolicy(policy))
    assert final[1]["note"] == note
    (c,) = conflicts
    assert c.resolution == policy and c.primary == acct(100, "p")
    assert c.change.after == acct(100, "b")


@pytest.mark.parametrize("policy", ["backup_wins", "primary_wins"])
def test_columns_only_one_side_changed_keep_that_change_under_either_policy(
        policy: str) -> None:
    """A three-way merge: the primary changed the balance, the backup the note.
    Neither change is in doubt, so neither is lost, whatever the policy (before,
    primary_wins dropped the backup's note although the primary never touched it)."""
    final, conflicts = run([change("UPDATE", acct(100, "x"), acct(100, "b"))],
                           {1: acct(130, "x")}, ConflictPolicy(policy))
    assert final[1] == acct(130, "b")
    (c,) = conflicts
    assert (c.resolution, c.primary, c.change.after) == ("merged", acct(130, "x"), acct(100, "b"))


def test_the_steps_are_each_change_s_row_and_end_where_replay_ends() -> None:
    changes = [change("UPDATE", acct(100), acct(90), 1),
               change("INSERT", None, {"id": 2, "balance": 5, "note": ""}, 2),
               change("UPDATE", acct(90), acct(80), 3),
               change("DELETE", {"id": 2, "balance": 5, "note": ""}, None, 4)]
    current = {(T, (1,)): acct(100), (T, (2,)): None}
    steps, conflicts = replay_steps(changes, key_of, current, ConflictPolicy())
    assert steps == [((T, (1,)), acct(90)), ((T, (2,)), {"id": 2, "balance": 5, "note": ""}),
                     ((T, (1,)), acct(80)), ((T, (2,)), None)]
    assert conflicts == []
    final, _ = replay(changes, key_of, current, ConflictPolicy())
    assert dict(steps) == final


def test_whole_row_conflicts() -> None:
    # An insert over a row the primary has, a delete of a row the primary changed,
    # an update of a row the primary deleted.
    ins = change("INSERT", None, acct(1, "b"))
    final, conflicts = run([ins], {1: acct(2, "p")}, ConflictPolicy("primary_wins"))
    assert final[1] == acct(2, "p") and len(conflicts) == 1
    dele = change("DELETE", acct(1), None)
    final, conflicts = run([dele], {1: acct(3)}, ConflictPolicy("backup_wins"))
    assert final[1] is None and len(conflicts) == 1
    upd = change("UPDATE", acct(1), acct(2))
    final, conflicts = run([upd], {1: None}, ConflictPolicy("backup_wins"))
    assert final[1] == acct(2) and len(conflicts) == 1


def test_a_callback_decides_the_row() -> None:
    seen: list[Conflict] = []

    def resolve(c: Conflict) -> dict[str, Any]:
        seen.append(c)
        return acct(42, "cb")

    final, conflicts = run([change("UPDATE", acct(1), acct(2))], {1: acct(3)},
                           ConflictPolicy("callback", callback=resolve))
    assert final[1] == acct(42, "cb") and conflicts[0].resolution == "callback"
    assert seen[0].primary == acct(3)


def test_bad_delta_columns_are_named() -> None:
    with pytest.raises(ConfigurationError, match="table.column"):
        parse_delta_columns(["balance"])


def test_a_retried_insert_differing_only_in_its_stamp_is_no_conflict() -> None:
    mine = {"id": 1, "body": "hello", "updated_at": "2026-01-01T00:00:01"}
    theirs = {"id": 1, "body": "hello", "updated_at": "2026-01-01T00:00:00"}
    final, conflicts = run([change("INSERT", None, mine)], {1: theirs})
    assert conflicts == [] and final == {1: theirs}
    # Any other difference is one: both versions kept, the policy decides.
    final, conflicts = run([change("INSERT", None, {**mine, "body": "hi"})], {1: theirs})
    assert len(conflicts) == 1 and final == {1: {**mine, "body": "hi"}}


@pytest.mark.parametrize(("n", "refs", "want"), [
    (3, [], [0, 1, 2]),  # no foreign keys: first-change order
    (2, [(0, 1)], [1, 0]),  # the children's table changed first: the parents' still goes first
    (4, [(0, 3), (2, 3)], [1, 3, 0, 2]),  # independent tables keep their order
    (3, [(0, 1), (1, 2)], [2, 1, 0]),  # a chain, grandparents first
    (3, [(0, 1), (1, 0), (2, 0)], [0, 1, 2]),  # a cycle: first-change order, then its child
])
def test_tables_are_written_after_the_tables_they_reference(
        n: int, refs: list[tuple[int, int]], want: list[int]) -> None:
    assert dependency_order(n, refs) == want

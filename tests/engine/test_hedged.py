"""A hedged read's outcomes, as both managers follow them: no I/O, no threads."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent_factory.engine.hedge import FIRST, SECOND, Budget, HedgeLost
from agent_factory.engine.hedged import HedgedRead
from agent_factory.engine.provider import Unavailable


class _Health:
    def __init__(self) -> None:
        self.suspect = False
        self.downs: list[str] = []

    def mark_down(self, reason: str) -> None:
        self.downs.append(reason)


class _Provider:
    def __init__(self, name: str) -> None:
        self.name = name
        self.health = _Health()


class _Core:
    """What a hedged read tells the failover core: the unavailable attempts."""

    def __init__(self, target: _Provider | None) -> None:
        self.budget = Budget(0.05)
        self.unavailable: list[tuple[str, str]] = []
        self.target = target
        self.asked = 0

    def hedge_target(self, route: Any) -> _Provider | None:
        self.asked += 1
        return self.target

    def attempt_unavailable(self, provider: _Provider, exc: Unavailable, **_: Any) -> None:
        self.unavailable.append((provider.name, exc.reason))


def _read(after: float = 0.0, target: str | None = "b") -> tuple[HedgedRead[Any], _Core]:
    core = _Core(None if target is None else _Provider(target))
    route: Any = None  # only passed on to the core
    race: HedgedRead[Any] = HedgedRead(time.monotonic() + after, core, route, {},
                                       _Provider("a"), ("SELECT 1", None, None, None),
                                       lambda race: None)
    return race, core


def _started() -> tuple[HedgedRead[Any], _Core]:
    race, core = _read()
    assert race.start(race.hedge_at)
    return race, core


def test_a_healthy_read_is_the_first_providers_answer_and_decides_nothing() -> None:
    race, core = _read(after=60.0)
    assert not race.start(race.clock())  # not due
    assert race.first_answered("rows")
    assert core.budget.stats() == {"hedges_sent": 0, "hedges_won": 0,
                                   "hedges_refused_by_budget": 0}
    assert core.asked == 0 and race.target is None  # where a hedge would go: never asked


def test_the_hedges_provider_is_decided_once_when_due() -> None:
    race, core = _read()
    assert race.target is None
    assert race.start(race.hedge_at) and race.target is not None and race.target.name == "b"
    assert race.due() and core.asked == 1


def test_a_due_hedge_with_nowhere_to_go_is_never_started_nor_charged() -> None:
    race, core = _read(target=None)  # no backup fresh enough, once due
    assert not race.due()
    assert not race.start(race.hedge_at) and not race.start(race.hedge_at + 1.0)
    assert core.asked == 1 and core.budget.stats()["hedges_refused_by_budget"] == 0
    assert race.first_answered("rows")


def test_the_first_answer_wins_and_a_later_one_gets_the_winners() -> None:
    race, core = _started()
    race.second_answered("hedge rows")
    assert not race.first_answered("rows")
    assert race.answer() == (race.target, "hedge rows") and core.budget.won == 1
    race, core = _started()
    assert race.first_answered("rows")
    race.second_answered("hedge rows")  # too late: not a win
    assert core.budget.won == 0


def test_a_first_call_that_lost_takes_the_hedges_answer() -> None:
    race, _ = _started()
    race.second_answered("hedge rows")
    exc = HedgeLost()
    assert not race.awaits_hedge(exc)
    assert race.first_failed(exc) and race.answer() == (race.target, "hedge rows")


def test_an_unavailable_first_provider_waits_for_the_hedge_and_is_reported_if_it_answered(
) -> None:
    race, core = _started()
    exc = Unavailable("reset", sent=True)
    assert race.awaits_hedge(exc)
    race.second_answered("hedge rows")
    assert race.first_failed(exc)
    assert core.unavailable == [("a", "reset")]
    assert race.answer() == (race.target, "hedge rows")


def test_an_unavailable_first_provider_fails_over_as_usual_when_the_hedge_failed_too() -> None:
    race, core = _started()
    race.second_failed(Unavailable("refused", sent=False))
    exc = Unavailable("reset", sent=True)
    assert not race.first_failed(exc)  # raised: the shell moves on to the next provider
    assert core.unavailable == []  # reported there, once
    assert race.target.health.downs == ["refused"]


def test_without_a_hedge_an_unavailable_first_provider_is_not_waited_for() -> None:
    race, core = _read(after=60.0)
    exc = Unavailable("reset", sent=True)
    assert not race.awaits_hedge(exc) and not race.first_failed(exc)


def test_a_sql_error_stands_unless_the_hedge_answered_first() -> None:
    race, _ = _started()
    assert not race.first_failed(ValueError("syntax"))
    assert race.lost(SECOND)  # the hedge, when it answers, has lost
    race, _ = _started()
    race.second_answered("hedge rows")
    assert race.first_failed(ValueError("syntax"))


def test_an_interrupted_first_call_makes_the_hedge_give_up() -> None:
    race, _ = _started()
    assert not race.first_failed(KeyboardInterrupt())
    assert race.winner == FIRST and race.lost(SECOND)


def test_a_hedge_that_loses_or_fails_leaves_its_provider_alone_unless_down() -> None:
    race, _ = _started()
    race.second_failed(HedgeLost())
    assert race.winner is None and not race.wait_hedge(0)  # nothing to report
    race.second_failed(Unavailable("read-only", sent=False, down=False))
    assert race.target.health.downs == [] and race.wait_hedge(0)
    assert isinstance(race.error, Unavailable)


def test_a_hedge_due_at_checkout_goes_alone_and_back_to_the_first_if_unavailable() -> None:
    race, core = _started()
    assert race.instead_answered("rows") == (race.target, "rows")
    assert core.budget.won == 1
    race, core = _started()
    assert race.instead_failed(Unavailable("refused", sent=False)) is race.provider
    assert core.unavailable == [("b", "refused")]


@pytest.mark.parametrize("side", [FIRST, SECOND])
def test_the_hedges_side_is_its_own_and_the_first_side_is_the_race(side: int) -> None:
    race, _ = _started()
    view = race if side == FIRST else race.second()
    assert view.race is race and view.index == side

"""The hedging rules without I/O: hedge_after, freshness, the budget, the race."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from agent_factory.engine.environment import settings_from_env
from agent_factory.engine.hedge import (
    BURST,
    FIRST,
    SECOND,
    Budget,
    HedgeDue,
    HedgeLost,
    Race,
    Side,
    fresh_enough,
    hedge_after,
    is_suspect,
    raced,
)
from agent_factory.engine.settings import Settings
from agent_factory.errors import ConfigurationError


class _Health:
    """A first provider as a race sees it: suspect or not (a plain value, no I/O)."""

    def __init__(self, suspect: bool) -> None:
        self.suspect = suspect


HEALTHY = _Health(False)


def test_a_race_asks_the_budget_whether_its_first_provider_is_suspect() -> None:
    asked: list[bool] = []
    race = Race(0.0, lambda suspect: asked.append(suspect) or True, _Health(True))
    assert race.start(1.0) and asked == [True]


def test_hedge_after_follows_the_measured_latency_between_a_floor_and_half_hang_timeout() -> None:
    assert hedge_after(None, 0.1, 2.0) == 0.1  # nothing measured yet: the floor
    assert hedge_after(0.001, 0.1, 2.0) == 0.1  # loopback: the floor
    assert hedge_after(0.05, 0.1, 2.0) == pytest.approx(0.15)  # 3 x p99
    assert hedge_after(0.8, 0.1, 2.0) == 1.0  # never past half of hang_timeout
    assert hedge_after(0.001, 0.5, 0.6) == pytest.approx(0.3)


def test_a_hedge_goes_only_to_a_backup_known_fresh_unless_told_otherwise() -> None:
    assert fresh_enough("auto", 0.2, 1.0)
    assert not fresh_enough("auto", 1.5, 1.0)
    assert not fresh_enough("auto", None, 1.0)  # no replication measured
    assert fresh_enough("on", None, 1.0)  # the user accepts the backup's own data
    assert not fresh_enough("on", 1.5, 1.0)  # known too far behind: never


def test_the_lag_bound_is_the_tighter_of_hedge_max_lag_and_max_replication_lag() -> None:
    url = "postgresql://u:p@127.0.0.1:5432/d"
    assert Settings.build({"a": url}).hedge_lag_bound() == 1.0
    assert Settings.build({"a": url}, max_replication_lag=0.3).hedge_lag_bound() == 0.3
    assert Settings.build({"a": url}, max_replication_lag=30.0).hedge_lag_bound() == 1.0


@pytest.mark.parametrize("option, value, named", [
    ("hedged_reads", "sometimes", "hedged_reads"),
    ("hedge_budget", 1.5, "hedge_budget"),
    ("hedge_budget", -0.1, "hedge_budget"),
    ("hedge_after_min", 0, "hedge_after_min"),
    ("hedge_max_lag", -1, "hedge_max_lag"),
])
def test_bad_hedging_settings_name_the_setting(option: str, value: Any, named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        Settings.build({"a": "postgresql://u:p@127.0.0.1:5432/d"}, **{option: value})


def test_the_budget_holds_hedges_to_its_share_of_the_reads_while_healthy() -> None:
    budget = Budget(0.05)
    granted = 0
    for _ in range(1000):
        budget.earn()
        granted += budget.spend(suspect=False)  # every read wants a hedge
    assert granted <= BURST + 0.05 * 1000
    assert granted >= 0.05 * 1000
    assert budget.refused == 1000 - granted


def test_the_budget_lifts_while_the_primary_is_suspect() -> None:
    budget = Budget(0.0, burst=0.0)
    assert not budget.spend(suspect=False)
    assert all(budget.spend(suspect=True) for _ in range(100))
    assert budget.sent == 100


def test_a_race_starts_its_hedge_once_when_due_and_allowed() -> None:
    allowed = [False]
    race = Race(10.0, lambda suspect: allowed[0], HEALTHY)
    assert not race.start(9.9)  # not due
    assert not race.start(10.0)  # due, refused by the budget
    allowed[0] = True
    assert race.start(10.1)
    assert not race.start(10.2)  # once


def test_the_first_answer_wins_and_the_other_side_sees_it_lost() -> None:
    race = Race(0.0, lambda suspect: True, HEALTHY)
    assert race.start(0.0)
    assert race.claim(SECOND, "hedge")
    assert not race.claim(FIRST, "primary")
    assert race.result == "hedge" and race.lost(FIRST) and not race.lost(SECOND)
    assert race.wait_hedge(0)


def test_a_failed_hedge_leaves_the_race_to_the_first_call() -> None:
    race = Race(0.0, lambda suspect: True, HEALTHY)
    assert race.start(0.0)
    race.fail(SECOND, RuntimeError("down"))
    assert race.winner is None and race.wait_hedge(0)
    assert race.claim(FIRST, "primary")


def test_at_checkout_a_due_hedge_takes_the_read_and_a_lost_race_ends_the_wait() -> None:
    race = Race(5.0, lambda suspect: True, HEALTHY)
    now = [4.0]
    first = Side(race, FIRST, lambda: now[0])
    first.at_checkout()  # not due: keep waiting
    now[0] = 5.0
    with pytest.raises(HedgeDue):
        first.at_checkout()
    second = Side(race, SECOND, lambda: now[0])
    race.claim(FIRST, "primary")  # (started above, by the HedgeDue)
    with pytest.raises(HedgeLost):
        second.at_checkout()


def _psycopg_like() -> Generator[int, int, str]:
    """A stand-in for one of psycopg's generators: waits three times, then returns."""
    for _ in range(3):
        yield 1
    return "rows"


def test_raced_starts_the_hedge_on_a_silent_wake_up_and_leaves_when_lost() -> None:
    race = Race(1.0, lambda suspect: True, HEALTHY)
    started: list[bool] = []
    side = Side(race, FIRST, lambda: 2.0, lambda r: started.append(r is race))
    gen = raced(_psycopg_like(), side)
    assert next(gen) == 1
    assert gen.send(1) == 1  # data arrived: no hedge
    assert not started
    assert gen.send(0) == 1  # a silent tick past hedge_after
    assert started == [True]
    race.claim(SECOND, "hedge")
    with pytest.raises(HedgeLost):
        gen.send(0)


def test_a_race_without_a_hedge_is_the_first_call_alone() -> None:
    race = Race(1.0, lambda suspect: True, HEALTHY)
    assert race.claim(FIRST, "rows") and race.result == "rows"
    assert not race.wait_hedge(0)  # no hedge to wait for


def test_raced_returns_the_answer_of_a_call_that_wins() -> None:
    race = Race(1.0, lambda suspect: True, HEALTHY)
    gen = raced(_psycopg_like(), Side(race, FIRST, lambda: 0.0))
    next(gen)
    with pytest.raises(StopIteration) as done:
        for _ in range(3):
            gen.send(1)
    assert done.value.value == "rows"


def test_the_hedging_settings_come_from_the_environment_and_a_bad_one_names_its_variable() -> None:
    env = {"RAILWAY_DB_URL": "postgresql://u:secret@127.0.0.1:5432/d",
           "DATABASE_HEDGED_READS": "on", "DATABASE_HEDGE_BUDGET": "0.1",
           "DATABASE_HEDGE_AFTER_MIN": "0.2", "DATABASE_HEDGE_MAX_LAG": "3"}
    s = settings_from_env(env, dotenv=None)
    assert (s.hedged_reads, s.hedge_budget, s.hedge_after_min, s.hedge_max_lag) == (
        "on", 0.1, 0.2, 3.0)
    with pytest.raises(ConfigurationError, match="DATABASE_HEDGED_READS") as bad:
        settings_from_env({**env, "DATABASE_HEDGED_READS": "always"}, dotenv=None)
    assert "secret" not in str(bad.value)


def test_a_primary_is_suspect_only_once_its_probe_is_overdue() -> None:
    """A silent call asks for a probe; a live but slow server answers it within its
    usual round trip (not suspect meanwhile), a hung one never does."""
    assert not is_suspect(10.0, 10.5, 20.0, None, 2.0)        # a probe answered since
    assert not is_suspect(10.0, 9.0, 10.05, None, 2.0)        # within the 0.1 s floor
    assert is_suspect(10.0, 9.0, 10.11, None, 2.0)
    assert not is_suspect(10.0, 9.0, 10.25, 0.1, 2.0)         # 100 ms p99: 0.3 s grace
    assert is_suspect(10.0, 9.0, 10.31, 0.1, 2.0)
    assert not is_suspect(10.0, 9.0, 10.45, 0.2, 2.0)         # 0.6 s, at most hang_timeout/4
    assert is_suspect(10.0, 9.0, 10.51, 0.2, 2.0)

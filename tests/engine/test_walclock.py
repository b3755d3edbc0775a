"""WalClock: replication lag in seconds from the primary's WAL positions (no I/O)."""

from __future__ import annotations

import pytest

from agent_factory.engine.walclock import WalClock


def clock(*samples: tuple[float, int]) -> WalClock:
    c = WalClock()
    for t, position in samples:
        c.record(t, position)
    return c


def test_no_sample_no_lag() -> None:
    assert WalClock().lag(0) is None


def test_caught_up_is_zero() -> None:
    c = clock((0.0, 100), (1.0, 200))
    assert c.lag(200) == 0.0
    assert c.lag(250) == 0.0  # reported past the last sample: caught up


def test_interpolates_between_the_samples_around_the_position() -> None:
    c = clock((0.0, 0), (10.0, 1000), (20.0, 2000))
    assert c.lag(1500) == pytest.approx(5.0)  # the WAL was at 1500 at t=15
    assert c.lag(1000) == pytest.approx(10.0)
    assert c.lag(0) == pytest.approx(20.0)


def test_an_idle_primary_counts_from_the_last_time_its_wal_stood_there() -> None:
    # The WAL stood at 100 from t=0 to t=30, then moved: a subscriber at 100
    # misses what was written after t=30 at the earliest.
    c = clock((0.0, 100), (10.0, 100), (30.0, 100), (40.0, 300))
    assert c.lag(100) == pytest.approx(10.0)
    assert c.lag(200) == pytest.approx(5.0)


def test_behind_every_sample_is_at_least_the_oldest_sample_age() -> None:
    c = clock((5.0, 1000), (8.0, 2000))
    assert c.lag(10) == pytest.approx(3.0)


def test_a_new_server_starts_a_new_timeline() -> None:
    c = clock((0.0, 5000), (1.0, 6000), (2.0, 100))
    assert len(c) == 1
    assert c.lag(100) == 0.0


def test_old_samples_are_dropped() -> None:
    c = WalClock(keep=10.0, max_samples=1000)
    for t in range(100):
        c.record(float(t), t * 10)
    assert len(c) == 11
    assert c.lag(0) == pytest.approx(10.0)  # a lower bound: older samples are gone
    bounded = WalClock(max_samples=5)
    for t in range(50):
        bounded.record(float(t), t)
    assert len(bounded) == 5

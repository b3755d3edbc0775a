"""Shared fixtures: one fleet of real PostgreSQL servers for the whole session."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from fleet import Fleet, start_fleet


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """Three running providers; the state other tests left behind is not repaired."""
    started = start_fleet()
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def healthy_fleet(fleet: Fleet) -> Iterator[Fleet]:
    """The fleet with every fault undone and every provider answering through its proxy.

    Faults are released again afterwards, so a hung server never outlives its test.
    """
    fleet.heal()
    yield fleet
    fleet.release_faults()


@pytest.fixture(autouse=True, scope="module")
def no_leaked_managers() -> Iterator[None]:
    """Every manager a test module opens is closed: its threads are gone afterwards."""
    yield

    def leaked() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t.name.startswith(("agent-factory-prober", "agent-factory-watchdog"))]

    deadline = time.monotonic() + 15
    while leaked() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not leaked(), f"threads of unclosed managers: {leaked()}"

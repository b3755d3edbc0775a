"""Shared fixtures: one fleet of real PostgreSQL servers for the whole session."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fleet import Fleet, start_fleet

from agent_factory.core.database_manager import DatabaseManager

MakeDb = Callable[..., DatabaseManager]


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


@pytest.fixture
def make_db(healthy_fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[MakeDb]:
    """Managers over the fleet, closed after the test.

    Defaults come from the test module's ``ORDER`` and ``FAST`` (its timing
    options); keyword arguments override them.
    """
    order = getattr(request.module, "ORDER", list(healthy_fleet.names))
    defaults = getattr(request.module, "FAST", {})
    made: list[DatabaseManager] = []

    def make(**options: Any) -> DatabaseManager:
        db = DatabaseManager(healthy_fleet.urls(), order=order, **{**defaults, **options})
        made.append(db)
        return db

    yield make
    for db in made:
        db.close_all()


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

"""Shared fixtures: one fleet of real PostgreSQL servers for the whole session."""

from __future__ import annotations

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

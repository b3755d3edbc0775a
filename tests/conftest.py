"""Shared fixtures: one fleet of real PostgreSQL servers for the whole session."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import psycopg
import pytest
from fleet import wait_until
from pooler import PgBouncer, find_pgbouncer

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.memory import MemoryStorage, Session
from agent_factory.testing.fleet import START_TIMEOUT, Fleet, can_connect, start_fleet

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
    order, defaults = module_options(request, healthy_fleet)
    made: list[DatabaseManager] = []

    def make(**options: Any) -> DatabaseManager:
        db = DatabaseManager(healthy_fleet.urls(), order=order, **{**defaults, **options})
        made.append(db)
        return db

    yield make
    for db in made:
        db.close_all()


def module_options(request: pytest.FixtureRequest,
                   fleet: Fleet) -> tuple[list[str], dict[str, Any]]:
    """The test module's ``ORDER`` (else the fleet's) and ``FAST`` (else none)."""
    return (getattr(request.module, "ORDER", list(fleet.names)),
            getattr(request.module, "FAST", {}))


@pytest.fixture
def db(healthy_fleet: Fleet, urls: dict[str, str],
       request: pytest.FixtureRequest) -> Iterator[DatabaseManager]:
    """A manager over the test module's own databases (its ``urls`` fixture), closed after the test.

    Its order and options as with `make_db`; a module whose manager differs
    defines its own ``db``.
    """
    order, defaults = module_options(request, healthy_fleet)
    with DatabaseManager(urls, order=order, **defaults) as manager:
        yield manager


@pytest.fixture
def three_sessions(storage: MemoryStorage) -> tuple[str, list[str]]:
    """A new user's three saved sessions, a message each, in the test module's ``storage``.

    Returns the user and the session ids, in the order they were saved.
    """
    user = f"user-{uuid.uuid4().hex[:10]}"
    ids = []
    for _ in range(3):
        session = Session(user_id=user, storage=storage)
        session.add_user_message("hi")
        session.save()
        ids.append(session.session_id)
    return user, ids


@pytest.fixture(scope="session")
def pgbouncer_binary() -> str:
    """Debian's pgbouncer; without it the pooler tests skip, or fail when ``CI`` is set."""
    binary = find_pgbouncer()
    if binary is None:
        message = "the pooler tests need PgBouncer: no pgbouncer on PATH nor in /usr/sbin"
        if os.environ.get("CI"):
            pytest.fail(message + " (.ci/run installs Debian's pgbouncer)", pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture
def pooled_primary(pgbouncer_binary: str, healthy_fleet: Fleet) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode straight in front of the primary's server ("supabase").

    The test may kill or hang that server; afterwards the pooler is gone and the
    server runs again (resumed, or restarted after a crash) and answers through
    its fault proxy, for the tests that share the fleet.
    """
    member = healthy_fleet["supabase"]
    bouncer = PgBouncer(member.server, pgbouncer_binary)
    try:
        bouncer.start()
        yield bouncer
    finally:
        bouncer.close()
        member.heal()
        wait_until(partial(can_connect, member.url), START_TIMEOUT,
                   message=f"{member.name} to answer again after the pooler test")


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


@pytest.fixture
def table(healthy_fleet: Fleet) -> Iterator[str]:
    """A fresh table on every provider, dropped afterwards (request it before make_db)."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text, "
                         "updated_at timestamptz NOT NULL DEFAULT now())")
    yield name
    healthy_fleet.heal()
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            # A session orphaned by a fault may still hold a lock on the table.
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_locks "
                         "WHERE relation = to_regclass(%s) AND pid <> pg_backend_pid()", (name,))
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP TABLE IF EXISTS {name}")
            # What a backup journaled for it would stay pending for good (a table
            # the primary lacks): the shared database starts clean for the next test.
            if conn.execute("SELECT to_regclass('agent_factory_journal')").fetchone() != (None,):
                conn.execute("DELETE FROM agent_factory_journal WHERE table_name = %s",
                             (f"public.{name}",))

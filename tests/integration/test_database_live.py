"""The spec's live integration test: real managed providers, when configured.

Set any of

    TEST_SUPABASE_DB_HOST + TEST_SUPABASE_DB_PASSWORD
        (optional: TEST_SUPABASE_DB_PORT, TEST_SUPABASE_DB_USER, TEST_SUPABASE_DB_NAME)
    TEST_RAILWAY_DB_URL
    TEST_NEON_DB_URL

and run ``pytest tests/integration/test_database_live.py -v``. Without them every
test is skipped, saying which variables are missing. The only writes are one
session (and its rows) in ``session_memories``, deleted again, and only where
that table has been deployed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.memory import PostgresMemoryStorage, Session

ORDER = ("supabase", "railway", "neon")
VARIABLES = ("TEST_SUPABASE_DB_HOST (+ TEST_SUPABASE_DB_PASSWORD)", "TEST_RAILWAY_DB_URL",
             "TEST_NEON_DB_URL")
# Nothing listens on port 1 of the loopback: a primary that is certainly down.
UNREACHABLE = "postgresql://postgres:unused@127.0.0.1:1/postgres"


def live_providers() -> dict[str, str]:
    """Provider URLs from the TEST_* variables, in failover order."""
    env = os.environ.get
    found: dict[str, str] = {}
    host, password = env("TEST_SUPABASE_DB_HOST"), env("TEST_SUPABASE_DB_PASSWORD")
    if host and password:
        user = quote(env("TEST_SUPABASE_DB_USER") or "postgres", safe="")
        port = env("TEST_SUPABASE_DB_PORT") or "5432"
        name = env("TEST_SUPABASE_DB_NAME") or "postgres"
        found["supabase"] = f"postgresql://{user}:{quote(password, safe='')}@{host}:{port}/{name}"
    for name in ("railway", "neon"):
        url = env(f"TEST_{name.upper()}_DB_URL")
        if url:
            found[name] = url
    return found


PROVIDERS = live_providers()

pytestmark = pytest.mark.skipif(
    not PROVIDERS,
    reason="live provider tests: set at least one of " + ", ".join(VARIABLES),
)


@pytest.fixture(scope="module")
def db() -> Iterator[DatabaseManager]:
    with DatabaseManager(PROVIDERS, order=[n for n in ORDER if n in PROVIDERS],
                         hang_timeout=10.0, connect_timeout=10.0) as manager:
        yield manager


@pytest.mark.parametrize("name", [n for n in ORDER if n in PROVIDERS] or ["none"])
def test_each_provider_answers(name: str) -> None:
    with DatabaseManager({name: PROVIDERS[name]}, connect_timeout=10.0) as single:
        assert single.health_check(name) is True
        assert single.execute_query("SELECT 1", fetch_mode="one") == (1,)
        version = single.execute_query("SHOW server_version_num", fetch_mode="one")
        assert version is not None and int(version[0]) >= 120000


def test_manager_health_and_stats(db: DatabaseManager) -> None:
    assert db.health_check_all() == {name: True for name in PROVIDERS}
    stats = db.get_provider_stats()
    assert set(stats) == set(PROVIDERS)
    assert stats[db.primary_provider]["role"] == "primary"
    for info in stats.values():
        assert "@" not in str(info["connection_string_host"])  # no credentials


def test_queries_fail_over_from_an_unreachable_primary() -> None:
    providers = {"unreachable": UNREACHABLE, **PROVIDERS}
    with DatabaseManager(providers, order=list(providers), connect_timeout=10.0,
                         pool_min_size=0) as manager:
        assert manager.execute_query("SELECT 1", fetch_mode="one") == (1,)
        assert manager.serving_provider == next(iter(PROVIDERS))
        assert manager.health_check("unreachable") is False


def test_memory_session_round_trip(db: DatabaseManager) -> None:
    row = db.execute_query("SELECT to_regclass('session_memories') IS NOT NULL",
                           fetch_mode="one")
    if not (row and row[0]):
        pytest.skip(f"session_memories is not deployed on {db.serving_provider!r}")
    storage = PostgresMemoryStorage(db)
    session = Session(session_id=f"session_live{uuid.uuid4().hex[:8]}", user_id="live-test",
                      storage=storage)
    session.add_system_message("live integration test")
    session.add_user_message("Hello", {"n": 1})
    session.save()
    try:
        session.save()  # idempotent
        assert storage.load_session(session.session_id) == session
        assert session.session_id in storage.list_sessions("live-test")
    finally:
        assert storage.delete_session(session.session_id) is True

"""Breakers, the health monitor, read routing and provider quirks, on real servers."""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from conftest import MakeDb
from defaults import FAST, ORDER
from fleet import read_only_server, wait_until
from observers import provider_of

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.environment import settings_from_env
from agent_factory.engine.settings import Settings
from agent_factory.errors import AllProvidersUnavailableError, ConfigurationError
from agent_factory.testing.fleet import Fleet


def read_by(db: DatabaseManager, fleet: Fleet) -> str:
    (port,) = db.read("SELECT inet_server_port()", fetch_mode="one")
    return provider_of(fleet, port)


def test_nearest_routes_reads_to_the_lowest_measured_latency(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    for name, delay in (("supabase", 0.020), ("railway", 0.005), ("neon", 0.001)):
        healthy_fleet[name].proxy.set_latency(delay)
    db = make_db(read_routing="nearest", monitor_interval=0.1)

    def measured() -> bool:
        stats = db.get_provider_stats()
        return all(stats[n]["latency_avg_ms"] is not None for n in ORDER)

    wait_until(measured, timeout=20, message="latency measured on every provider")
    wait_until(lambda: read_by(db, healthy_fleet) == "neon", timeout=20,
               message="reads on the nearest provider")
    stats = db.get_provider_stats()
    assert stats["neon"]["latency_avg_ms"] < stats["railway"]["latency_avg_ms"]
    assert stats["railway"]["latency_avg_ms"] < stats["supabase"]["latency_avg_ms"]
    # Plain execute_query (not marked read-only) still goes to the primary.
    (port,) = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    assert provider_of(healthy_fleet, port) == "supabase"


def test_read_your_writes_pins_reads_to_the_primary(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    db = make_db(read_routing="round_robin", read_your_writes=30.0)
    seen = {read_by(db, healthy_fleet) for _ in range(6)}
    assert seen == set(ORDER)  # no write yet: reads rotate
    db.execute_query("CREATE TEMP TABLE ryw (a int)", fetch_mode="none")
    assert {read_by(db, healthy_fleet) for _ in range(6)} == {"supabase"}


def test_round_robin_weights_and_least_busy(healthy_fleet: Fleet) -> None:
    urls: dict[str, Any] = dict(healthy_fleet.urls())
    urls["railway"] = {"url": urls["railway"], "weight": 3}
    with DatabaseManager(urls, order=ORDER, read_routing="round_robin", **FAST) as db:
        counts = collections.Counter(read_by(db, healthy_fleet) for _ in range(50))
    assert counts["railway"] == 30 and counts["supabase"] == 10 and counts["neon"] == 10
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, read_routing="least_busy",
                         **FAST) as db:
        # Nothing in flight: ties keep the failover order.
        assert read_by(db, healthy_fleet) == "supabase"


def test_breaker_threshold(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    """Below the threshold a failing provider stays closed: each call tries it, then moves on."""
    db = make_db(failure_threshold=10**6, failure_window=60.0)
    db.execute_query("SELECT 1")
    healthy_fleet["supabase"].proxy.set_mode("reset")
    for _ in range(3):
        (port,) = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
        assert provider_of(healthy_fleet, port) == "railway"
    stats = db.get_provider_stats()["supabase"]
    assert stats["breaker"] == "closed" and stats["consecutive_failures"] >= 3
    healthy_fleet["supabase"].proxy.set_mode("pass")
    # Never opened: no probes needed, the next call is back on the primary.
    wait_until(lambda: provider_of(healthy_fleet, db.execute_query(
        "SELECT inet_server_port()", fetch_mode="one")[0]) == "supabase", timeout=10,
        message="primary serving again")
    # With the default threshold (1) the same fault opens it at once.
    db1 = make_db()
    db1.execute_query("SELECT 1")
    healthy_fleet["supabase"].proxy.set_mode("reset")
    db1.execute_query("SELECT 1")
    assert db1.get_provider_stats()["supabase"]["breaker"] in ("open", "half_open")


@pytest.fixture
def read_only_primary(healthy_fleet: Fleet) -> Iterator[None]:
    with read_only_server(healthy_fleet["supabase"]):
        yield


def test_read_only_server_takes_reads_not_writes(
    healthy_fleet: Fleet, read_only_primary: None
) -> None:
    table = f"ro_{uuid.uuid4().hex[:8]}"
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(f"CREATE TABLE {table} (a int)")
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, **FAST) as db:
        # The refused write was not applied: it is safe to run it on the next provider.
        db.execute_query(f"INSERT INTO {table} VALUES (1)", fetch_mode="none")
        stats = db.get_provider_stats()["supabase"]
        assert stats["writable"] is False and stats["healthy"] is True
        (port,) = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
        assert provider_of(healthy_fleet, port) == "supabase"  # reads stay on the primary
    counts = {}
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            counts[member.name] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            conn.execute(f"DROP TABLE {table}")
    assert counts == {"supabase": (0,), "railway": (1,), "neon": (0,)}


def test_monitor_notices_a_read_only_server(
    healthy_fleet: Fleet, read_only_primary: None
) -> None:
    with DatabaseManager(healthy_fleet.urls(), order=ORDER, monitor_interval=0.1,
                         **FAST) as db:
        wait_until(lambda: db.get_provider_stats()["supabase"]["writable"] is False,
                   timeout=20, message="the monitor to see the read-only primary")


def test_provider_quirks_and_options() -> None:
    s = Settings.build(
        {
            "neon": "postgresql://u:p@ep-x.eu-central-1.aws.neon.tech/db",
            "supabase": "postgresql://u:p@aws-0-eu.pooler.supabase.com:6543/postgres",
            "local": {"url": "postgresql://u:p@127.0.0.1/db", "pool_max_size": 3, "weight": 2},
        },
        connect_timeout=2.0,
        serverless_connect_timeout=12.0,
    )
    neon, sup, local = s.tuning("neon"), s.tuning("supabase"), s.tuning("local")
    assert neon.serverless and neon.connect_timeout == 12.0 and neon.prepare
    assert not sup.serverless and not sup.prepare and sup.connect_timeout == 2.0
    assert local.pool_max_size == 3 and local.weight == 2 and local.prepare
    with pytest.raises(ConfigurationError, match=r"providers\['x'\]\['wieght'\]"):
        Settings.build({"x": {"url": "postgresql://u:p@h/db", "wieght": 2}})
    with pytest.raises(ConfigurationError, match="read_routing"):
        Settings.build({"x": "postgresql://u:p@h/db"}, read_routing="fastest")
    env = settings_from_env(
        {"NEON_DB_URL": "postgresql://u:p@h/db", "NEON_DB_SERVERLESS": "yes",
         "NEON_DB_POOL_MAX_SIZE": "4", "DATABASE_READ_ROUTING": "nearest"},
        dotenv=None,
    )
    assert env.tuning("neon").serverless and env.tuning("neon").pool_max_size == 4
    assert env.read_routing == "nearest"
    with pytest.raises(ConfigurationError, match="NEON_DB_WEIGHT"):
        settings_from_env({"NEON_DB_URL": "postgresql://u:p@h/db", "NEON_DB_WEIGHT": "x"},
                          dotenv=None)


def test_pooler_provider_runs_without_prepared_statements(healthy_fleet: Fleet) -> None:
    urls: dict[str, Any] = {"supabase": {"url": healthy_fleet["supabase"].url, "prepare": False}}
    with DatabaseManager(urls, **FAST) as db:
        for _ in range(10):  # past psycopg's prepare threshold (5)
            db.execute_query("SELECT %s::int", (1,))
        conn_stats = db.execute_query(
            "SELECT count(*) FROM pg_prepared_statements", fetch_mode="one"
        )
    assert conn_stats == (0,)


def test_routed_reads_are_not_failovers(make_db: MakeDb, healthy_fleet: Fleet) -> None:
    from agent_factory.engine.events import Listener

    class Moves(Listener):
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
            self.events.append(f"failover {from_provider}->{to_provider}")

        def on_return_to_primary(self, primary: str, from_provider: str) -> None:
            self.events.append(f"return {from_provider}->{primary}")

    moves = Moves()
    db = make_db(read_routing="round_robin", read_your_writes=0.0, listeners=[moves])
    served = set()
    for _ in range(6):
        served.add(read_by(db, healthy_fleet))
        db.execute_query("CREATE TEMP TABLE IF NOT EXISTS rr (a int)", fetch_mode="none")
    assert served == set(ORDER)  # the reads did go to the backups
    assert moves.events == []
    assert db.serving_provider == "supabase"
    assert db.get_provider_stats()["railway"]["role"] == "backup"


@pytest.fixture
def insert_fn(healthy_fleet: Fleet) -> Iterator[tuple[str, str]]:
    """A write hidden in a SELECT: a function that inserts into a table, on every provider."""
    table, fn = f"calls_{uuid.uuid4().hex[:8]}", f"my_insert_fn_{uuid.uuid4().hex[:8]}"
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (a int)")
            conn.execute(f"CREATE FUNCTION {fn}(x int) RETURNS int LANGUAGE sql "
                         f"AS 'INSERT INTO {table} VALUES (x) RETURNING x'")
    yield fn, table
    healthy_fleet.heal()
    for member in healthy_fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f"DROP FUNCTION {fn}(int)")
            conn.execute(f"DROP TABLE {table}")


def rows_on(fleet: Fleet, table: str) -> dict[str, int]:
    counts = {}
    for member in fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        counts[member.name] = row[0] if row else 0
    return counts


def test_a_statement_declared_not_idempotent_obeys_the_replication_lag_bound(
    make_db: MakeDb, healthy_fleet: Fleet, insert_fn: tuple[str, str]
) -> None:
    """With the primary down, it is refused rather than written on a backup of unknown lag."""
    fn, table = insert_fn
    db = make_db(max_replication_lag=5.0)  # no replication: the backups' lag is unknown
    assert db.execute_query(f"SELECT {fn}(%s)", (1,), "one", idempotent=False) == (1,)
    healthy_fleet["supabase"].proxy.set_mode("refuse")
    for read_only in (None, True, False):
        with pytest.raises(AllProvidersUnavailableError, match="stale: replication lag"):
            db.execute_query(f"SELECT {fn}(%s)", (2,), "one", read_only=read_only,
                             idempotent=False)
    # Without any flag the classifier sees an unknown function: a write as well.
    with pytest.raises(AllProvidersUnavailableError, match="stale: replication lag"):
        db.execute_query(f"SELECT {fn}(%s)", (3,), "one")
    assert db.execute_query("SELECT 1") == [(1,)]  # reads may still go to a backup
    assert rows_on(healthy_fleet, table) == {"supabase": 1, "railway": 0, "neon": 0}


def test_a_statement_declared_not_idempotent_counts_as_a_write(
    make_db: MakeDb, healthy_fleet: Fleet, insert_fn: tuple[str, str]
) -> None:
    """Even with read_only=True: not routed as a read, pins reads (read-your-writes), and a
    backup that takes it while the primary is down is owed a failback (divergence)."""
    fn, table = insert_fn
    db = make_db(read_routing="round_robin", read_your_writes=30.0)
    for i in range(3):
        _, port = db.execute_query(f"SELECT {fn}(%s), inet_server_port()", (i,), "one",
                                   read_only=True, idempotent=False)
        assert provider_of(healthy_fleet, port) == "supabase"
    assert {read_by(db, healthy_fleet) for _ in range(6)} == {"supabase"}
    assert db._core.diverged == {}
    healthy_fleet["supabase"].proxy.set_mode("refuse")
    db.execute_query(f"SELECT {fn}(%s)", (9,), "one", read_only=True, idempotent=False)
    assert set(db._core.diverged) == {"railway"}
    assert rows_on(healthy_fleet, table) == {"supabase": 3, "railway": 1, "neon": 0}


def test_the_failover_warning_is_the_specs_line_then_the_reason(
    make_db: MakeDb, healthy_fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    db = make_db()
    db.execute_query("SELECT 1")
    healthy_fleet["supabase"].proxy.set_mode("refuse")
    with caplog.at_level(logging.WARNING, logger="agent_factory.core.database_manager"):
        db.execute_query("SELECT 1")
    (record,) = [r for r in caplog.records if "Executed on failover" in r.getMessage()]
    assert record.name == "agent_factory.core.database_manager"
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert "Executed on failover provider 'railway' (primary 'supabase' unavailable)" in line
    assert line.startswith(
        "Executed on failover provider 'railway' (primary 'supabase' unavailable) — reason: ")

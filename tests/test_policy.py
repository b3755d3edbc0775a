"""Failover decisions without I/O: error classes, retry rules, ranking, hysteresis."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pge
from psycopg_pool import PoolTimeout

from agent_factory.policy import Health, Kind, candidates, classify, is_read_only
from agent_factory.policy import may_retry_after_send as may_retry


@pytest.mark.parametrize(
    "exc",
    [
        PoolTimeout("no connection"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.InterfaceError("the connection is closed"),
        pge.AdminShutdown(),
        pge.CrashShutdown(),
        pge.CannotConnectNow(),
        pge.TooManyConnections(),
        pge.ConnectionFailure(),
        pge.ConnectionTimeout(),
    ],
)
def test_unavailable(exc: Exception) -> None:
    assert classify(exc) is Kind.UNAVAILABLE


@pytest.mark.parametrize(
    "exc",
    [
        pge.SyntaxError(),
        pge.UniqueViolation(),
        pge.InsufficientPrivilege(),
        pge.InvalidTextRepresentation(),
        pge.SerializationFailure(),
        pge.QueryCanceled(),
        psycopg.ProgrammingError("wrong number of parameters"),
        TypeError("not a psycopg error"),
    ],
)
def test_sql_errors_propagate(exc: Exception) -> None:
    assert classify(exc) is Kind.SQL


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1",
        "  select * from t where a = %s",
        "-- leading comment\nSELECT 1",
        "/* c */ WITH x AS (SELECT 1) SELECT * FROM x",
        "SHOW server_version",
        "VALUES (1)",
        "EXPLAIN SELECT 1",
    ],
)
def test_read_only_detected(query: str) -> None:
    assert is_read_only(query)


@pytest.mark.parametrize(
    "query",
    [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "SELECT * INTO t2 FROM t",
        "SELECT * FROM t FOR UPDATE",
        "SELECT nextval('s')",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
        "SELECT 1; DELETE FROM t",
        "EXPLAIN ANALYZE DELETE FROM t",
        "CREATE TABLE t (a int)",
    ],
)
def test_writes_not_read_only(query: str) -> None:
    assert not is_read_only(query)


def test_retry_decision() -> None:
    assert may_retry("SELECT 1", None, None)
    assert not may_retry("INSERT INTO t VALUES (1)", None, None)
    assert may_retry("INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", None, True)
    assert not may_retry("SELECT my_side_effect()", None, False)
    assert not may_retry("SELECT my_side_effect()", False, None)
    assert may_retry("SELECT refresh()", True, None)


def test_candidates() -> None:
    assert candidates("supabase", ("supabase", "railway", "neon"), True) == (
        "supabase",
        "railway",
        "neon",
    )
    # set_provider really changes where queries go: the primary comes first.
    assert candidates("neon", ("supabase", "railway", "neon"), True) == (
        "neon",
        "supabase",
        "railway",
    )
    assert candidates("neon", ("supabase", "railway"), False) == ("neon",)


def test_health_goes_down_at_once_and_up_with_hysteresis() -> None:
    h = Health()
    assert h.up and not h.checked
    assert h.fail("refused", 1.0) is True
    assert not h.up and h.last_error == "refused" and h.changed_at == 1.0
    assert h.fail("refused", 1.5) is False
    assert h.consecutive_failures == 2
    assert h.succeed(2.0, 0.001, required=2) is False
    assert not h.up
    assert h.fail("flap", 2.2) is False  # a failure resets the streak
    assert h.succeed(2.5, 0.001, required=2) is False
    assert h.succeed(3.0, 0.001, required=2) is True
    assert h.up and h.consecutive_failures == 0 and h.changed_at == 3.0

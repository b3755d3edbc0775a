"""The failover policy without I/O: error classes, retry rules, read ranking, hysteresis.

`Failover` itself, the decision core, is tested in test_failover_logic.py.
"""

from __future__ import annotations

import gc
import uuid
import weakref

import psycopg
import pytest
from psycopg import errors as pge
from psycopg_pool import PoolTimeout

from agent_factory.engine.policy import (
    MEMO_MAX_CHARS,
    Breaker,
    Kind,
    State,
    _memo,
    candidates,
    classify,
    is_read_only,
)
from agent_factory.engine.policy import may_retry_after_send as may_retry


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
        "EXPLAIN (FORMAT JSON, COSTS off) SELECT * FROM t",
        # Built-in functions with no side effect, schema-qualified in pg_catalog too.
        "SELECT count(*), max(a), coalesce(b, 0), lower(c), now(), pg_catalog.now() FROM t",
        "SELECT date_trunc('day', ts), jsonb_build_object('a', a), md5(c) FROM t",
        "SELECT embedding <=> %s::vector, cosine_distance(embedding, %s) FROM items",
        # Keywords that take a parenthesis are not calls.
        "SELECT * FROM t WHERE a IN (1, 2) AND EXISTS (SELECT 1) AND b = ANY(%s)",
        "SELECT CAST(a AS numeric(10, 2)), b::varchar(20) FROM t",
        "SELECT count(*) FILTER (WHERE a) OVER (PARTITION BY b) FROM t",
        "SELECT ARRAY(SELECT 1), ROW(1, 2) FROM t WHERE NOT (a AND b)",
        "SELECT * FROM (VALUES (1), (2)) AS v(a)",
        "SELECT * FROM generate_series(1, 3) g(n)",
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t",
        # Literals, comments and quoted identifiers are not read as code.
        "SELECT 'my_fn(1); DELETE FROM t' FROM t -- insert_fn()",
        "SELECT $$ f() $$, $x$ nextval('s') $x$",
        'SELECT "insert" FROM t',
        "SELECT %(a)s::int",
        "SELECT a FROM t WHERE b = (SELECT max(b) FROM t) AND c = %(c)s",
        # set_config(..., true) lasts for the statement's own transaction.
        "SELECT set_config('hnsw.ef_search', %s, true)",
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
        "SELECT * FROM t FOR KEY SHARE",
        "SELECT nextval('s')",
        "SELECT setval('s', 1)",
        "WITH x AS (DELETE FROM t RETURNING *) SELECT * FROM x",
        "SELECT 1; DELETE FROM t",
        "EXPLAIN ANALYZE DELETE FROM t",
        "EXPLAIN ANALYZE SELECT 1",
        "EXPLAIN ANALYSE SELECT 1",  # British spelling
        "EXPLAIN (ANALYZE, BUFFERS) SELECT 1",
        "explain (analyse true) select 1",
        "CREATE TABLE t (a int)",
        # A function that is not known to be side-effect free.
        "SELECT my_insert_fn(%s)",
        "SELECT * FROM my_table_fn(%s)",
        "SELECT app.refresh_cache()",
        "SELECT pg_catalog.my_fn()",
        'SELECT "MyFunction"(1)',
        "SELECT lower(a) FROM t WHERE my_check(b)",
        "SELECT set_config('search_path', 'x', false)",
        "SELECT set_config('search_path', %s, %s)",
        "SELECT pg_notify('channel', 'payload')",
        "SELECT dblink_exec('conn', 'DELETE FROM t')",
        "SELECT * FROM dblink('conn', 'DELETE FROM t RETURNING 1') AS (a int)",
        "SELECT lo_unlink(42)",
        "SELECT pg_advisory_lock(1)",
        "SELECT txid_current()",
        "SELECT pg_terminate_backend(1)",
        "SELECT a FROM t WHERE b = a OPERATOR(pg_catalog.=) f(b)",
        # Text that cannot be read with confidence.
        "SELECT 'unterminated",
        "SELECT E'it\\'s', f()",
        "SELECT 'a\\' , f()",
        "SELECT $$ unterminated",
        "/* a /* nested */ f() */ SELECT 1",
    ],
)
def test_writes_not_read_only(query: str) -> None:
    assert not is_read_only(query)


def test_classifier_memo_keeps_no_large_query_alive() -> None:
    """Only statements up to MEMO_MAX_CHARS are memoized: a 5 MB one is not kept."""
    class Query(str):
        """A str that can be weakly referenced, to see when it is freed."""

    small = Query("SELECT a FROM memo_probe_" + uuid.uuid4().hex)
    before = _memo.cache_info().currsize
    assert is_read_only(small)
    assert _memo.cache_info().currsize == min(before + 1, 1024)
    big = Query("SELECT '" + "x" * 5_000_000 + "'")
    ref = weakref.ref(big)
    hits, misses = _memo.cache_info().hits, _memo.cache_info().misses
    assert is_read_only(big) and is_read_only(big)
    assert (_memo.cache_info().hits, _memo.cache_info().misses) == (hits, misses)
    del big
    gc.collect()
    assert ref() is None
    assert len(small) < MEMO_MAX_CHARS < 5_000_000


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


def test_breaker_opens_at_once_and_closes_with_hysteresis() -> None:
    b = Breaker()
    assert b.up and not b.checked and b.state is State.CLOSED
    assert b.fail("refused", 1.0) is True
    assert not b.up and b.state is State.OPEN and b.last_error == "refused"
    assert b.changed_at == 1.0
    assert b.fail("refused", 1.5) is False
    assert b.consecutive_failures == 2
    assert b.succeed(2.0, 0.001, required=2) is False
    assert b.state is State.HALF_OPEN and not b.up
    assert b.fail("flap", 2.2) is False  # a failure while half-open reopens it
    assert b.state is State.OPEN
    assert b.succeed(2.5, 0.001, required=2) is False
    assert b.closes_on_next_success(2)
    assert b.succeed(3.0, 0.001, required=2) is True
    assert b.up and b.state is State.CLOSED and b.consecutive_failures == 0
    assert b.changed_at == 3.0


def test_breaker_threshold_counts_failures_in_a_window() -> None:
    b = Breaker(threshold=3, window=10.0)
    assert b.fail("x", 0.0) is False
    assert b.fail("x", 5.0) is False
    assert b.up
    # The first failure left the window: still two within it.
    assert b.fail("x", 10.5) is False
    assert b.up
    assert b.fail("x", 11.0) is True
    assert not b.up and b.state is State.OPEN


class _H:
    def __init__(self, up: bool, latency: float | None, in_flight: int, weight: int) -> None:
        self.breaker = Breaker()
        self.breaker.up = up
        self.latency_ewma = latency
        self.in_flight = in_flight
        self.tuning = type("T", (), {"weight": weight})()


class _P:
    def __init__(self, name: str, up: bool = True, latency: float | None = None,
                 in_flight: int = 0, weight: int = 1) -> None:
        self.name = name
        self.health = _H(up, latency, in_flight, weight)


def names(ps: list[_P]) -> list[str]:
    return [p.name for p in ps]


def test_read_routing_policies() -> None:
    from agent_factory.engine.policy import order_reads

    a, b, c = _P("a", latency=0.020), _P("b", latency=0.001), _P("c", latency=0.005)
    plan = [a, b, c]
    assert names(order_reads(plan, "primary", 0)) == ["a", "b", "c"]
    assert names(order_reads(plan, "nearest", 0)) == ["b", "c", "a"]
    down = _P("b", up=False, latency=0.0001)
    assert names(order_reads([a, down, c], "nearest", 0)) == ["c", "a", "b"]
    unmeasured = _P("u")
    assert names(order_reads([unmeasured, a], "nearest", 0)) == ["a", "u"]
    firsts = [order_reads(plan, "round_robin", t)[0].name for t in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    heavy = _P("h", weight=2)
    firsts = [order_reads([heavy, a], "round_robin", t)[0].name for t in range(6)]
    assert firsts.count("h") == 4 and firsts.count("a") == 2
    busy = [_P("x", in_flight=5), _P("y", in_flight=1), _P("z", in_flight=4, weight=8)]
    assert names(order_reads(busy, "least_busy", 0)) == ["z", "y", "x"]

"""Listeners and Prometheus metrics, against the real fleet.

Faults come from the fleet's proxies (``refuse``: connections refused and
reset), so a provider goes down and comes back within a second or two.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import psycopg
import pytest
from fleet import wait_until
from observers import Recorder
from prometheus_client import CollectorRegistry

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.events import Listener
from agent_factory.observability.metrics import (
    Instrumented,
    MetricsListener,
    exposition,
    instrument,
    metrics_app,
    start_http_server,
)
from agent_factory.testing.fleet import Fleet


class Exploding(Listener):
    """Raises from every method, the hot-path one included."""

    def __init__(self) -> None:
        self.calls = 0

    def _boom(self) -> None:
        self.calls += 1
        raise RuntimeError("listener bug")

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self._boom()

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self._boom()

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self._boom()

    def on_query_error(self, provider: str, error: BaseException) -> None:
        self._boom()

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        self._boom()


def _manager(fleet: Fleet, listeners: list[Listener] | None = None) -> DatabaseManager:
    return DatabaseManager(fleet.urls(), order=list(fleet.names), hang_timeout=1.0,
                           probe_interval=0.2, listeners=listeners or [])


@pytest.fixture
def db(healthy_fleet: Fleet) -> Iterator[DatabaseManager]:
    manager = _manager(healthy_fleet)
    try:
        yield manager
    finally:
        manager.close_all()


def _outage_and_return(fleet: Fleet, db: DatabaseManager) -> None:
    """Primary refused -> queries on railway; primary back -> queries on supabase again."""
    fleet["supabase"].proxy.set_mode("refuse")
    assert db.execute_query("SELECT 1") == [(1,)]
    assert db.serving_provider == "railway"
    fleet["supabase"].proxy.set_mode("pass")

    def back() -> bool:
        db.execute_query("SELECT 1")
        return db.serving_provider == "supabase"

    wait_until(back, timeout=10, interval=0.05, message="traffic back on the primary")


# -- listeners ---------------------------------------------------------------------


def test_any_number_of_listeners_each_get_every_event(healthy_fleet: Fleet) -> None:
    early = [Recorder() for _ in range(3)]
    db = _manager(healthy_fleet, list(early))
    late = [Recorder() for _ in range(4)]
    try:
        for r in late:
            db.add_listener(r)
        with pytest.raises(psycopg.errors.UndefinedTable):
            db.execute_query("SELECT * FROM no_such_table")
        _outage_and_return(healthy_fleet, db)
    finally:
        db.close_all()
    for r in early + late:
        assert {"query", "query_error", "failover", "failback", "health"} <= r.kinds()
        assert ("failover", "supabase", "railway") in r.events
        assert ("failback", "supabase", "railway") in r.events
        assert ("query", "supabase", "sql_error") in r.events
        assert ("query", "railway", "ok") in r.events


def test_a_raising_listener_never_breaks_a_query(healthy_fleet: Fleet) -> None:
    bad, after = Exploding(), Recorder()
    db = _manager(healthy_fleet, [bad, after])
    try:
        assert db.execute_query("SELECT 41 + 1", fetch_mode="one") == (42,)
        with pytest.raises(psycopg.errors.SyntaxError):  # the SQL error, not the listener's
            db.execute_query("SELEC 1")
        _outage_and_return(healthy_fleet, db)
        with db.transaction() as conn:
            conn.execute("SELECT 1")
    finally:
        db.close_all()
    assert bad.calls > 5
    assert {"query", "query_error", "failover", "failback", "health"} <= after.kinds()


def test_removed_listener_hears_nothing_more(db: DatabaseManager) -> None:
    r = Recorder()
    db.add_listener(r)
    db.execute_query("SELECT 1")
    db.remove_listener(r)
    seen = len(r.events)
    db.execute_query("SELECT 1")
    assert seen == 1 and len(r.events) == 1


# -- metrics ---------------------------------------------------------------------------


def _value(m: MetricsListener, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_queries_latency_failovers_and_failbacks_are_counted(
    healthy_fleet: Fleet, db: DatabaseManager
) -> None:
    m = instrument(db)
    for _ in range(5):
        db.execute_query("SELECT 1")
    with pytest.raises(psycopg.errors.SyntaxError):
        db.execute_query("SELEC 1")
    _outage_and_return(healthy_fleet, db)

    q = "agent_factory_db_queries_total"
    counts = m.query_counts()
    assert counts["supabase"]["ok"] >= 6  # and the one that found it back
    assert counts["supabase"]["sql_error"] == 1
    # 1 if the query met the refused primary, 0 if the pool saw it first.
    assert counts["supabase"]["unavailable"] <= 1
    assert counts["railway"]["ok"] >= 1  # the one failed over, and those while waiting
    m.on_query("neon", 0.25, "outcome_unknown")
    assert _value(m, q, provider="neon", outcome="outcome_unknown") == 1
    assert _value(m, "agent_factory_db_query_duration_seconds_bucket", provider="neon",
                  le="0.25") == 1
    assert _value(m, q, provider="neon", outcome="ok") == 0  # series exist from the start
    attempts = sum(sum(c.values()) for c in m.query_counts().values())
    timed = sum(n for n, _ in m.query_time().values())
    assert attempts == timed == sum(
        _value(m, "agent_factory_db_query_duration_seconds_count", provider=p) or 0
        for p in healthy_fleet.names
    )
    assert _value(m, "agent_factory_db_failovers_total",
                  from_provider="supabase", to_provider="railway") == 1
    assert _value(m, "agent_factory_db_failbacks_total",
                  provider="supabase", from_provider="railway") == 1
    assert _value(m, "agent_factory_db_health_changes_total", provider="supabase",
                  state="down") == 1
    assert _value(m, "agent_factory_db_health_changes_total", provider="supabase",
                  state="up") == 1


def test_gauges_are_read_from_the_stats_at_scrape_time(
    healthy_fleet: Fleet, db: DatabaseManager
) -> None:
    m = instrument(db)
    db.execute_query("SELECT 1")

    def settled() -> bool:
        # Pools fill to min_size in the background: compare once they stopped moving.
        return all(s["pool_size"] >= 1 and s["pool_idle"] == s["pool_size"]
                   for s in db.get_provider_stats().values())

    wait_until(settled, timeout=20, message="every pool filled and idle")
    stats = db.get_provider_stats()
    for name, s in stats.items():
        assert _value(m, "agent_factory_db_provider_up", provider=name) == 1
        assert _value(m, "agent_factory_db_pool_connections", provider=name) == s["pool_size"]
        assert _value(m, "agent_factory_db_pool_idle_connections",
                      provider=name) == s["pool_idle"]
        assert _value(m, "agent_factory_db_pool_waiting_requests",
                      provider=name) == s["pool_waiting"]
        assert _value(m, "agent_factory_db_pool_max_connections", provider=name) == s["pool_max"]
    assert _value(m, "agent_factory_db_provider_role", provider="supabase", state="primary") == 1
    assert _value(m, "agent_factory_db_provider_role", provider="neon", state="backup") == 1
    assert _value(m, "agent_factory_db_breaker_state", provider="neon", state="closed") == 1

    healthy_fleet["neon"].proxy.set_mode("refuse")
    db.health_check_all(max_age=0)  # nothing else runs: the scrape itself reads the state
    assert _value(m, "agent_factory_db_provider_up", provider="neon") == 0
    assert _value(m, "agent_factory_db_provider_role", provider="neon", state="down") == 1
    assert _value(m, "agent_factory_db_breaker_state", provider="neon", state="closed") == 0
    failures = _value(m, "agent_factory_db_provider_failures_total", provider="neon")
    assert failures is not None and failures >= 1
    text = exposition(m.registry).decode()
    # Declared; no sample while the manager has not measured any replication lag.
    assert "# TYPE agent_factory_db_replication_lag_seconds gauge" in text
    assert "agent_factory_db_replication_lag_seconds{" not in text
    m.on_reconcile("supabase", "railway", 12)
    assert _value(m, "agent_factory_db_reconciled_rows_total", provider="supabase",
                  from_provider="railway") == 12
    assert threading.active_count() < 50


def test_labelled_children_are_resolved_once(
    db: DatabaseManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = instrument(db)
    db.execute_query("SELECT 1")

    def no_labels(*args: object, **kwargs: object) -> None:
        raise AssertionError("labels() called on the query path")

    monkeypatch.setattr(m._queries, "labels", no_labels)
    monkeypatch.setattr(m._latency, "labels", no_labels)
    for _ in range(10):
        db.execute_query("SELECT 1")
    assert m.query_counts()["supabase"]["ok"] == 11


def test_registries_are_private_and_detachable(healthy_fleet: Fleet) -> None:
    one, two = _manager(healthy_fleet), _manager(healthy_fleet)
    try:
        m1, m2 = instrument(one), instrument(two)
        assert m1.registry is not m2.registry
        one.execute_query("SELECT 1")
        assert m1.query_counts()["supabase"]["ok"] == 1
        assert m2.query_counts()["supabase"]["ok"] == 0
        with pytest.raises(ValueError, match="Duplicated"):
            Instrumented(two, m1.registry)  # one manager per registry
        shared = CollectorRegistry()
        m3 = instrument(two, registry=shared)
        m3.detach()
        two.execute_query("SELECT 1")
        assert m3.query_counts()["supabase"]["ok"] == 0
        assert shared.get_sample_value("agent_factory_db_provider_up",
                                       {"provider": "supabase"}) is None
    finally:
        one.close_all()
        two.close_all()
    assert exposition(m1.registry)  # a closed manager scrapes without error


def test_wsgi_app_and_http_server_serve_the_registry(db: DatabaseManager) -> None:
    m = instrument(db)
    db.execute_query("SELECT 1")
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(code: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        status.append(code)
        return lambda data: None

    body = b"".join(metrics_app(m.registry)(environ, start_response))
    assert status[0].startswith("200")
    assert b'agent_factory_db_queries_total{outcome="ok",provider="supabase"} 1.0' in body

    server = start_http_server(m.registry, port=0)
    try:
        response = httpx.get(f"http://127.0.0.1:{server.port}/", timeout=5)
        assert response.status_code == 200
        assert "agent_factory_db_provider_up" in response.text
    finally:
        server.close()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)


def test_the_core_never_imports_prometheus_or_the_web_stack() -> None:
    proc = _python(
        "import sys, agent_factory, agent_factory.core.database_manager, agent_factory.cli.main\n"
        "import agent_factory.cli.monitor, agent_factory.observability.dashboard\n"
        "heavy = {'prometheus_client', 'starlette', 'uvicorn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    assert proc.returncode == 0, proc.stderr


def test_missing_prometheus_names_the_extra() -> None:
    proc = _python(
        "import sys\n"
        "sys.modules['prometheus_client'] = None\n"
        "import agent_factory.observability.metrics\n"
    )
    assert proc.returncode == 1
    assert "ImportError" in proc.stderr
    assert "pip install 'agent-factory[dashboard]'" in proc.stderr

"""OpenTelemetryListener: the spans of a real crash, failover, failback with a conflict, return.

Spans go to the SDK's in-memory exporter; the primary is killed (SIGKILL)
and restarted, and the write it missed meets a row of its own at failback.
"""

from __future__ import annotations

from typing import Any

import psycopg
from conftest import MakeDb
from defaults import FAST  # noqa: F401  (make_db's default timings)
from fleet import wait_until
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agent_factory.engine.events import Dispatcher
from agent_factory.observability.otel import SPAN_NAMES, OpenTelemetryListener
from agent_factory.testing.fleet import Fleet


def _spans(exporter: InMemorySpanExporter, event: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == SPAN_NAMES[event]]


def _attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def test_the_listener_is_never_called_per_statement() -> None:
    # What "nothing on the healthy path" rests on: the dispatcher calls only
    # listeners that override on_query for each statement.
    listener = OpenTelemetryListener(TracerProvider())
    assert Dispatcher([listener]).query_listeners == ()


def test_a_crash_and_its_failback_as_spans(
    healthy_fleet: Fleet, table: str, make_db: MakeDb
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    db = make_db(listeners=[OpenTelemetryListener(provider)], recovery_probes=2)
    db.register_table(table)
    # The primary's own version of row 1: railway's insert will meet it at failback.
    with psycopg.connect(healthy_fleet["supabase"].direct_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'primary')")
    for _ in range(50):
        db.execute_query("SELECT 1")
    assert exporter.get_finished_spans() == ()  # a healthy manager starts no span

    tracer = provider.get_tracer("the application")
    healthy_fleet["supabase"].server.kill()
    with tracer.start_as_current_span("request") as request:
        db.execute_query(f"INSERT INTO {table} (id, note) VALUES (1, 'outage')",
                         fetch_mode="none", idempotent=True)
    assert db.serving_provider == "railway"
    (failover,) = _spans(exporter, "failover")
    assert _attributes(failover) == {
        "db.system.name": "postgresql", "agent_factory.provider": "railway",
        "agent_factory.from_provider": "supabase",
        "agent_factory.reason": _attributes(failover)["agent_factory.reason"]}
    assert "failed" in _attributes(failover)["agent_factory.reason"]  # the crash, as seen
    # Seen by the application's request: the failover shows in its trace.
    assert failover.parent is not None
    assert failover.parent.span_id == request.get_span_context().span_id
    down = _spans(exporter, "provider_down")
    assert [_attributes(s)["agent_factory.provider"] for s in down] == ["supabase"]
    assert down[0].status.status_code is StatusCode.ERROR

    healthy_fleet["supabase"].server.restart()

    def back() -> bool:
        db.execute_query("SELECT 1")
        return db.serving_provider == "supabase"

    wait_until(back, timeout=30, message="queries back on the primary")
    up = _spans(exporter, "provider_up")
    assert [_attributes(s)["agent_factory.provider"] for s in up] == ["supabase"]
    (conflicts,) = _spans(exporter, "failback_conflicts")
    assert _attributes(conflicts) == {
        "db.system.name": "postgresql", "agent_factory.provider": "supabase",
        "agent_factory.from_provider": "railway", "agent_factory.conflicts": 1}
    (failback,) = _spans(exporter, "failback")
    assert _attributes(failback)["agent_factory.from_provider"] == "railway"
    assert _attributes(failback)["agent_factory.changes"] >= 1
    (returned,) = _spans(exporter, "return_to_primary")
    attributes = _attributes(returned)
    assert attributes["agent_factory.provider"] == "supabase"
    assert attributes["agent_factory.from_provider"] == "railway"
    assert 0 < attributes["agent_factory.outage_s"] < 60
    # In the order they happened.
    order = [s.name for s in sorted(exporter.get_finished_spans(), key=lambda s: s.end_time or 0)]
    assert order.index(SPAN_NAMES["failover"]) < order.index(SPAN_NAMES["failback"])
    assert order.index(SPAN_NAMES["failback"]) < order.index(SPAN_NAMES["return_to_primary"])
    for member in healthy_fleet:
        for span in exporter.get_finished_spans():
            assert member.server.password not in str(span.to_json())

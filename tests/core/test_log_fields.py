"""The library's log records of a crash carry ``event`` and ``provider`` for log pipelines."""

from __future__ import annotations

import logging

import pytest
from conftest import MakeDb
from defaults import FAST  # noqa: F401  (make_db's default timings)
from fleet import wait_until

import agent_factory
from agent_factory.testing.fleet import Fleet


def _fields(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str | None, str]]:
    return [(r.__dict__["event"], r.__dict__.get("provider"), r.levelname)
            for r in caplog.records if "event" in r.__dict__]


def test_a_failover_and_the_return_are_logged_with_their_fields(
    healthy_fleet: Fleet, make_db: MakeDb, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent_factory")
    db = make_db(recovery_probes=2)
    db.execute_query("SELECT 1")
    healthy_fleet["supabase"].server.kill()
    db.execute_query("SELECT 1")
    assert db.serving_provider == "railway"
    failover = [r for r in caplog.records if getattr(r, "event", None) == "failover"]
    assert len(failover) == 1
    record = failover[0]
    assert (record.__dict__["provider"], record.__dict__["primary"]) == ("railway", "supabase")
    assert record.levelno == logging.WARNING and record.name.startswith("agent_factory.")
    assert ("provider_down", "supabase", "WARNING") in _fields(caplog)

    healthy_fleet["supabase"].server.restart()

    def back() -> bool:
        db.execute_query("SELECT 1")
        return db.serving_provider == "supabase"

    wait_until(back, timeout=30, message="queries back on the primary")
    fields = _fields(caplog)
    assert ("provider_up", "supabase", "WARNING") in fields
    assert ("return_to_primary", "supabase", "WARNING") in fields
    for record in caplog.records:
        assert healthy_fleet["supabase"].server.password not in record.getMessage()


def test_the_package_logger_has_a_null_handler() -> None:
    # Without handlers of the application's, nothing reaches logging's
    # last-resort stderr handler.
    handlers = logging.getLogger(agent_factory.__name__).handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)

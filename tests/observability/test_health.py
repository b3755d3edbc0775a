"""health_app: /healthz and /readyz mounted in a Starlette app, through a real crash.

The decision (`readiness`) is read from the manager's state, so it is tested
here through real faults of the fleet: a killed primary with read-only
backups, and a failback left stuck by a table the primary lacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import psycopg
import pytest
from conftest import MakeDb
from defaults import FAST  # noqa: F401  (make_db's default timings)
from fleet import read_only_server, wait_until
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.observability.health import health_app
from agent_factory.testing.fleet import Fleet


def _app(db: DatabaseManager) -> Starlette:
    """An application of the user's, with the probes mounted beside its own route."""

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the app")

    return Starlette(routes=[Route("/", home), Mount("/ops", app=health_app(db))])


@pytest.fixture
def client(make_db: MakeDb) -> Iterator[tuple[TestClient, DatabaseManager]]:
    db = make_db(probe_interval=0.1)
    with TestClient(_app(db)) as client:
        yield client, db


def _ready(client: TestClient) -> dict[str, Any]:
    response = client.get("/ops/readyz")
    doc: dict[str, Any] = response.json()
    doc["http_status"] = response.status_code
    return doc


def test_probes_answer_under_the_mount_point_beside_the_app(
    client: tuple[TestClient, DatabaseManager]
) -> None:
    c, _ = client
    assert c.get("/").text == "the app"
    alive = c.get("/ops/healthz")
    assert alive.status_code == 200 and alive.json() == {"status": "alive"}
    assert alive.headers["content-type"] == "application/json"
    ready = _ready(c)
    assert ready["http_status"] == 200 and ready["status"] == "ready"
    assert ready["writable"] == ["supabase", "railway", "neon"]
    assert c.head("/ops/readyz").status_code == 200
    assert c.post("/ops/readyz").status_code == 405
    assert c.get("/ops/nothing").status_code == 404


def test_readyz_is_503_while_no_provider_can_take_writes_and_200_again(
    client: tuple[TestClient, DatabaseManager], healthy_fleet: Fleet
) -> None:
    c, db = client
    with ExitStack() as stack:
        stack.enter_context(read_only_server(healthy_fleet["railway"]))
        stack.enter_context(read_only_server(healthy_fleet["neon"]))
        healthy_fleet["supabase"].server.kill()
        wait_until(lambda: _ready(c)["http_status"] == 503, timeout=15,
                   message="readiness to fail after the crash")
        doc = _ready(c)
        wait_until(lambda: _ready(c)["providers"] == {"supabase": "down", "railway": "read-only",
                                                      "neon": "read-only"},
                   timeout=15, message="both backups seen read-only")
        doc = _ready(c)
        assert doc["status"] == "unready" and doc["writable"] == []
        assert doc["reason"] == ("no provider can take writes (supabase down, "
                                 "railway read-only, neon read-only)")
        assert c.get("/ops/healthz").status_code == 200  # alive all along
        body = c.get("/ops/readyz").text
        for member in healthy_fleet:  # no host, port or password for anyone who asks
            assert member.server.password not in body
            assert str(member.proxy.port) not in body and str(member.server.port) not in body
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: _ready(c)["http_status"] == 200, timeout=30,
                   message="readiness back with the primary")
        assert _ready(c)["writable"] == ["supabase"]  # the backups are still read-only
    assert db.execute_query("SELECT 1", fetch_mode="one") == (1,)


def test_readyz_is_503_while_failback_is_stuck(
    healthy_fleet: Fleet, table: str, make_db: MakeDb
) -> None:
    db = make_db(probe_interval=0.1, recovery_probes=2)
    db.register_table(table)
    c = TestClient(_app(db))
    healthy_fleet["supabase"].proxy.set_mode("refuse")
    db.execute_query(f"INSERT INTO {table} (id, note) VALUES (1, 'outage')", fetch_mode="none")
    assert db.serving_provider == "railway"
    # The table is gone from the primary: the drain cannot apply railway's change,
    # and no retry will until an operator acts.
    with psycopg.connect(healthy_fleet["supabase"].direct_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}")
    healthy_fleet["supabase"].proxy.set_mode("pass")
    wait_until(lambda: (d := _ready(c)).get("failback_stuck") and "supabase" in d["writable"],
               timeout=30, message="the primary back, and the stuck failback seen")
    doc = _ready(c)
    assert doc["http_status"] == 503 and doc["status"] == "unready"
    assert doc["failback_stuck"] == {"railway": "1 source transaction(s) left for an operator"}
    assert doc["reason"] == ("failback stuck (railway: 1 source transaction(s) left for an "
                             "operator)")

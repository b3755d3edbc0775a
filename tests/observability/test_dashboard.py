"""The dashboard app (Starlette test client) and command, against the real fleet.

The page logic without I/O (state document, sparkline, history, bind
policy) is tested directly; the app through HTTP; the command as a
subprocess stopped by SIGTERM or Ctrl-C, like an operator would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleet import postgres_under, wait_until

from agent_factory.cli.main import main
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.observability.dashboard.app import create_app
from agent_factory.observability.dashboard.page import render_page
from agent_factory.observability.dashboard.server import BackgroundServer, check_bind, is_loopback
from agent_factory.observability.dashboard.state import History, Timeline, build_state, sparkline
from agent_factory.testing.fleet import Fleet

TOKEN = "t0ken-for-tests"
JSON = {"Content-Type": "application/json"}
BEARER = {"Authorization": f"Bearer {TOKEN}"}
AUTH = {**JSON, **BEARER}


@pytest.fixture
def db(healthy_fleet: Fleet) -> Iterator[DatabaseManager]:
    manager = DatabaseManager(healthy_fleet.urls(), order=list(healthy_fleet.names),
                              hang_timeout=1.0, probe_interval=0.2)
    try:
        yield manager
    finally:
        manager.close_all()


Serve = Callable[..., httpx.Client]


@pytest.fixture
def serve(db: DatabaseManager) -> Iterator[Serve]:
    """Serves ``create_app(db, **options)`` over real HTTP; returns a client for it."""
    running: list[tuple[BackgroundServer, httpx.Client]] = []

    def start(**options: Any) -> httpx.Client:
        server = BackgroundServer(create_app(db, **options))
        client = httpx.Client(base_url=server.url, timeout=10)
        running.append((server, client))
        return client

    try:
        yield start
    finally:
        for server, client in running:
            client.close()
            server.close()


@pytest.fixture
def client(serve: Serve) -> httpx.Client:
    return serve(token=TOKEN, sample_interval=0.2)


def _passwords(fleet: Fleet) -> list[str]:
    return [m.server.password for m in fleet]


# -- logic without I/O ------------------------------------------------------------------


def test_sparkline_breaks_where_down_and_ends_at_the_right_edge() -> None:
    line, marks = sparkline([1.0, 2.0, None, 4.0], slots=4, width=30, height=10)
    moves = re.findall(r"([ML])([\d.]+),([\d.]+)", line)
    assert [m[0] for m in moves] == ["M", "L", "M"]  # a gap where the provider was down
    assert float(moves[-1][1]) == 30.0 and float(moves[-1][2]) == 2.0  # newest, tallest
    assert marks == "M20.0,10.0V4.0"
    assert sparkline([], 60) == ("", "")


def test_history_rates_come_from_the_metrics_deltas() -> None:
    h = History(["a"], size=3)
    up = {"a": {"healthy": True, "last_latency_ms": 0.5}}
    h.add(10.0, up, {"a": (100, 1.0)})
    assert h.rates("a") == (None, None)
    h.add(12.0, {"a": {"healthy": False, "last_latency_ms": 0.5}}, {"a": (140, 1.2)})
    qps, avg_ms = h.rates("a")
    assert qps == 20.0 and avg_ms == pytest.approx(5.0)
    h.add(13.0, up, {"a": (140, 1.2)})
    h.add(14.0, up, {"a": (140, 1.2)})
    assert h.latencies("a") == [None, 0.5, 0.5]  # the oldest fell out
    assert h.rates("a") == (0.0, None)


def test_state_whitelists_fields_and_scrubs_secrets() -> None:
    stats = {"p": {"healthy": False, "role": "down", "connection_string_host": "db.example",
                   "port": "5432", "last_error": "auth failed for hunter2",
                   "password": "hunter2", "pool_size": 2, "pool_idle": 1, "pool_max": 10}}
    timeline = Timeline(clock=lambda: 5.0)
    timeline.add("down", "p is down: hunter2 rejected")
    state = build_state(stats=stats, counts={"p": {"ok": 3, "sql_error": 1, "unavailable": 2}},
                        history=History(["p"]), events=timeline.events(), primary="p",
                        serving=None, token_required=True, secrets=["hunter2"], now=7.0)
    text = json.dumps(state)
    assert "hunter2" not in text and "password" not in text
    p = state["providers"][0]
    assert (p["queries"], p["errors"], p["pool"]["used"]) == (3, 3, 1)
    assert state["events"] == [{"at": 5.0, "kind": "down", "text": "p is down: *** rejected"}]


def test_pending_changes_conflicts_and_failing_drains_show_in_a_banner() -> None:
    stats = {"supabase": {"role": "primary", "failback_pending": 0, "failback_conflicts": 0,
                          "failback_error": None},
             "railway": {"role": "backup", "failback_pending": 12, "failback_conflicts": 3,
                         "failback_error": "UniqueViolation: key (id)=(7) hunter2"}}
    state = build_state(stats=stats, counts={}, history=History(list(stats)), events=[],
                        primary="supabase", serving="supabase", token_required=False,
                        secrets=["hunter2"], now=1.0)
    banner = state["failback"]
    assert "12 change(s) pending on railway" in banner and "3 conflict(s) from railway" in banner
    assert "drain of railway failing" in banner and "hunter2" not in banner
    page = render_page(state)
    assert '<p id="failback" class="banner">failback: 12 change(s)' in page
    quiet = {n: {**s, "failback_pending": 0, "failback_conflicts": 0, "failback_error": None}
             for n, s in stats.items()}
    state = build_state(stats=quiet, counts={}, history=History(list(stats)), events=[],
                        primary="supabase", serving="supabase", token_required=False, now=1.0)
    assert state["failback"] == ""
    assert '<p id="failback" class="banner" hidden></p>' in render_page(state)


def test_only_loopback_may_listen_without_a_token() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "dashboard.example"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match="token"):
            check_bind(host, None)
        check_bind(host, "a-token")


# -- the app ---------------------------------------------------------------------------


def test_page_shows_every_provider_and_the_actions(client: httpx.Client) -> None:
    page = client.get("/", headers=BEARER)
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("supabase", "railway", "neon"):
        assert f'data-provider="{name}"' in page.text
        assert f'data-primary="{name}"' in page.text
    assert 'id="recheck"' in page.text and 'data-token-required="true"' in page.text
    assert "data-demo=" not in page.text
    js = client.get("/static/dashboard.js")
    assert js.headers["content-type"].startswith("text/javascript") and "api/state" in js.text
    assert client.get("/static/dashboard.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../app.py").status_code == 404


def test_state_reports_roles_counts_pool_and_history(
    client: httpx.Client, db: DatabaseManager
) -> None:
    for _ in range(7):
        db.execute_query("SELECT 1")

    def sampled() -> dict[str, Any] | None:
        state: dict[str, Any] = client.get("/api/state", headers=BEARER).json()
        supabase = state["providers"][0]
        return state if supabase["spark"].count("L") >= 2 else None

    wait_until(sampled, timeout=10, message="three latency samples")
    state = sampled()
    assert state is not None
    assert [p["name"] for p in state["providers"]] == ["supabase", "railway", "neon"]
    assert [p["role"] for p in state["providers"]] == ["primary", "backup", "backup"]
    supabase = state["providers"][0]
    assert supabase["healthy"] and supabase["queries"] >= 7 and supabase["errors"] == 0
    assert supabase["pool"]["max"] == 10 and supabase["latency_ms"] > 0
    assert state["primary"] == "supabase" and state["token_required"] is True
    assert "dashboard started" in state["events"][-1]["text"]


def test_an_outage_shows_without_any_query_load(
    client: httpx.Client, healthy_fleet: Fleet
) -> None:
    healthy_fleet["railway"].proxy.set_mode("refuse")

    def railway() -> dict[str, Any]:
        state = client.get("/api/state", headers=BEARER).json()
        providers: list[dict[str, Any]] = state["providers"]
        return providers[1]

    wait_until(lambda: railway()["role"] == "down", timeout=10, message="railway shown down")
    assert railway()["last_error"]
    healthy_fleet["railway"].proxy.set_mode("pass")
    wait_until(lambda: railway()["role"] == "backup", timeout=10, message="railway back")
    texts = [e["text"] for e in client.get("/api/state", headers=BEARER).json()["events"]]
    assert any(t.startswith("railway is down") for t in texts)
    assert "railway is healthy again" in texts


def test_no_password_anywhere(client: httpx.Client, healthy_fleet: Fleet) -> None:
    healthy_fleet["neon"].proxy.set_mode("refuse")  # error texts, too
    client.post("/api/health-check", headers=AUTH, json={})
    bodies = [client.get(path, headers=BEARER).text for path in ("/", "/api/state", "/metrics")]
    for secret in _passwords(healthy_fleet):
        for body in bodies:
            assert secret not in body
    assert "agent_factory_db_provider_up" in bodies[2]


def test_actions_need_the_token(client: httpx.Client, db: DatabaseManager) -> None:
    body = json.dumps({"provider": "railway"})
    missing = client.post("/api/primary", headers=JSON, content=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post("/api/primary", content=body,
                        headers={**JSON, "Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.post("/api/health-check", headers=JSON, content="{}").status_code == 401
    assert db.primary_provider == "supabase"

    ok = client.post("/api/primary", headers=AUTH, content=body)
    assert ok.status_code == 200 and ok.json() == {"primary": "railway"}
    assert db.primary_provider == "railway"
    state = client.get("/api/state", headers=BEARER).json()
    assert state["primary"] == "railway"
    assert state["events"][0]["text"] == "operator: primary supabase → railway"

    unknown = client.post("/api/primary", headers=AUTH, json={"provider": "nope"})
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]
    checked = client.post("/api/health-check", headers=AUTH, json={})
    assert checked.json() == {"healthy": {"supabase": True, "railway": True, "neon": True}}
    assert client.post("/api/demo", headers=AUTH, json={"action": "x"}).status_code == 404


def test_cross_site_posts_are_refused_even_without_a_token(
    serve: Serve, db: DatabaseManager
) -> None:
    c = serve()
    form = c.post("/api/primary", data={"provider": "neon"})
    assert form.status_code == 415
    foreign = c.post("/api/primary", json={"provider": "neon"},
                     headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403
    assert c.post("/api/primary", json={"provider": "neon"},
                  headers={"Origin": "null"}).status_code == 403
    assert db.primary_provider == "supabase"
    same = c.post("/api/primary", json={"provider": "neon"},
                  headers={"Origin": str(c.base_url).rstrip("/")})
    assert same.status_code == 200 and db.primary_provider == "neon"
    assert c.post("/api/primary", content="{oops", headers=JSON).status_code == 400


def test_loopback_dashboard_refuses_foreign_host_names(serve: Serve) -> None:
    c = serve(allowed_hosts=["127.0.0.1", "localhost"])
    assert c.get("/api/state").status_code == 200
    assert c.get("/api/state", headers={"Host": "rebound.example"}).status_code == 400


def test_demo_buttons_run_their_action(serve: Serve) -> None:
    calls: list[str] = []

    def crash() -> str:
        calls.append("crash")
        return "crashed it"

    def fail() -> str:
        raise RuntimeError("server already stopped")

    controls = {"crash primary": crash, "fail": fail}
    c = serve(demo_controls=controls)
    assert 'data-demo="crash primary"' in c.get("/").text
    done = c.post("/api/demo", json={"action": "crash primary"})
    assert done.status_code == 200 and done.json() == {"done": "crashed it"}
    failed = c.post("/api/demo", json={"action": "fail"})
    assert failed.status_code == 409 and "already stopped" in failed.json()["error"]
    texts = [e["text"] for e in c.get("/api/state").json()["events"]]
    assert calls == ["crash"]
    assert "demo: crashed it" in texts and "demo: fail failed: server already stopped" in texts


# -- the command -------------------------------------------------------------------------


def test_command_refuses_a_public_address_without_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AGENT_FACTORY_DASHBOARD_TOKEN", raising=False)
    assert main(["dashboard", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without a token" in err
    assert "AGENT_FACTORY_DASHBOARD_TOKEN" in err


def test_command_help_says_what_the_token_guards(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dashboard", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "required by everything but /healthz and /readyz" in out
    assert "state-changing" not in out


def _start(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "agent_factory.cli.main", "dashboard", *args],
                            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        found = re.search(r"dashboard on (http://\S+/)", line)
        if found:
            return proc, found.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"dashboard did not start: {proc.communicate()[1]}")


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"), **extra}


def test_command_serves_env_providers_and_stops_on_sigterm(
    healthy_fleet: Fleet, tmp_path: Path
) -> None:
    urls = healthy_fleet.urls()
    env = _env(SUPABASE_DB_URL=urls["supabase"], RAILWAY_DB_URL=urls["railway"],
               NEON_DB_URL=urls["neon"], AGENT_FACTORY_DASHBOARD_TOKEN=TOKEN)
    proc, url = _start(["--port", "0"], env, tmp_path)
    assert proc.stdout is not None
    hint = proc.stdout.readline()  # printed with the address: the sign-in, not ?token=
    try:
        assert httpx.get(url + "api/state", timeout=10).status_code == 401
        assert httpx.get(url + "readyz", timeout=10).status_code == 200
        state = httpx.get(url + "api/state", headers=BEARER, timeout=10).json()
        assert [p["name"] for p in state["providers"]] == ["supabase", "railway", "neon"]
        assert httpx.post(url + "api/primary", json={"provider": "neon"},
                          timeout=10).status_code == 401
        made = httpx.post(url + "api/primary", json={"provider": "neon"},
                          headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert made.status_code == 200
        metrics = httpx.get(url + "metrics", headers=BEARER, timeout=10).text
        assert 'agent_factory_db_provider_role{provider="neon",state="primary"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "dashboard stopped" in out and "Traceback" not in err
    assert "sign in on the page with the token" in hint
    assert "Authorization: Bearer <token>" in hint and "?token=" not in hint + out
    for secret in _passwords(healthy_fleet):
        assert secret not in out + err


def test_demo_mode_fails_over_live_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="afdash-"))  # short: Unix socket paths are limited
    try:
        proc, url = _start(["--demo", "--port", "0"], _env(TMPDIR=str(base)), tmp_path)
        try:
            state = httpx.get(url + "api/state", timeout=10).json()
            assert state["demo_actions"] == ["crash primary", "hang primary",
                                             "resume primary", "restart primary"]
            crash = httpx.post(url + "api/demo", json={"action": "crash primary"}, timeout=30)
            assert crash.json() == {"done": "crashed supabase (kill -9)"}

            def serving() -> str | None:
                serving: str | None = httpx.get(url + "api/state", timeout=10).json()["serving"]
                return serving

            wait_until(lambda: serving() == "railway", timeout=10, message="failover to railway")
            assert postgres_under(base)
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "stopping the demo servers" in out and "Traceback" not in err
        wait_until(lambda: not postgres_under(base), timeout=10, message="servers stopped")
    finally:
        shutil.rmtree(base, ignore_errors=True)

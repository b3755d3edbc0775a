"""``--json`` on every command that prints data: one document on stdout, nothing else there.

Commands run in-process through their module's ``main(argv, environ=...)``
(no ``.env`` is read) against fresh databases on the real fleet; ``monitor``
runs as ``python -m agent_factory`` in an empty directory. Every output is
checked for the providers' passwords.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases

from agent_factory.cli import failback_command, replication_command, schema_command
from agent_factory.schema import load_migrations
from agent_factory.testing.fleet import Fleet

NAMES = ("supabase", "railway")
Main = Callable[..., int]


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    """Two fresh databases, no schema yet (the first test deploys it)."""
    fleet.heal()
    made = create_databases(fleet, "clijson")
    yield {name: made[name] for name in NAMES}
    fleet.heal()
    drop_databases(fleet, made)


@pytest.fixture
def env(urls: dict[str, str]) -> dict[str, str]:
    return {**{f"{n.upper()}_DB_URL": u for n, u in urls.items()},
            "DATABASE_FAILOVER_ORDER": ",".join(NAMES)}


def run_json(fleet: Fleet, capsys: pytest.CaptureFixture[str], main: Main,
             env: Mapping[str, str], *args: str) -> tuple[int, Any]:
    """Run a command with ``--json``: its exit code and the one document it printed."""
    code = main([*args, "--json"], environ=env)
    out, err = capsys.readouterr()
    for member in fleet:
        assert member.server.password not in out + err
    return code, json.loads(out)  # fails if anything but one document is on stdout


def test_schema_deploy_status_and_verify(
    healthy_fleet: Fleet, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = [m.label for m in load_migrations()]
    code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "deploy", "--all")
    assert code == 0
    assert doc["shipped"] == shipped
    assert {n: p["applied"] for n, p in doc["providers"].items()} == dict.fromkeys(NAMES, shipped)
    code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "deploy", "--all")
    assert code == 0 and all(p["applied"] == [] for p in doc["providers"].values())

    code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "status")
    assert code == 0 and set(doc) == set(NAMES)
    for status in doc.values():
        assert status["reachable"] and status["up_to_date"] and status["pending"] == []
        assert [a["migration"] for a in status["applied"]] == shipped
        assert status["applied"][0]["applied_at"].startswith("20")  # ISO 8601
        assert status["extensions"]["vector"]["state"] == "installed"

    code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "verify")
    assert code == 0
    assert doc["match"] is True and doc["differences"] == [] and doc["problems"] == []
    assert all(p["applied"] == len(shipped) for p in doc["providers"].values())

    with psycopg.connect(env["RAILWAY_DB_URL"], autocommit=True) as conn:
        conn.execute("ALTER TABLE session_memories ADD COLUMN extra int")
    try:
        code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "verify")
        assert code == 1 and doc["match"] is False
        assert {"kind": "column", "name": "session_memories.extra",
                "values": {"supabase": None, "railway": "integer (nullable)"}} in doc["differences"]
    finally:
        with psycopg.connect(env["RAILWAY_DB_URL"], autocommit=True) as conn:
            conn.execute("ALTER TABLE session_memories DROP COLUMN extra")

    code = schema_command.main(["deploy", "--dry-run", "--json"], environ=env)
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["dry_run"] is True and "CREATE TABLE" in doc["sql"]


def _insert(url: str, session_ids: Sequence[str]) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for sid in session_ids:
            conn.execute("INSERT INTO session_memories (session_id, memory_type, content) "
                         "VALUES (%s, 'session_metadata', '{}')", (sid,))


def test_copy_sync_and_failback_run(
    healthy_fleet: Fleet, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _insert(env["SUPABASE_DB_URL"], ["a", "b"])
    code, doc = run_json(healthy_fleet, capsys, schema_command.main, env, "copy",
                         "--from", "supabase", "--to", "railway", "--table", "session_memories")
    assert code == 0
    assert (doc["source"], doc["target"], doc["written"]) == ("supabase", "railway", 2)
    assert doc["tables"]["session_memories"] == {
        "table": "session_memories", "source_rows": 2, "inserted": 2, "updated": 0,
        "unchanged": 0, "skipped": 0, "copied": 2}

    _insert(env["RAILWAY_DB_URL"], ["c"])
    code, doc = run_json(healthy_fleet, capsys, replication_command.main, env, "sync",
                         "--from", "railway", "--to", "supabase", "--since",
                         "2000-01-01T00:00:00Z")
    assert code == 0 and doc["since"] == "2000-01-01T00:00:00+00:00"
    tables = doc["tables"]
    assert tables["session_memories"]["inserted"] == 1
    assert tables["session_memories"]["unchanged"] == 2
    assert doc["written"] == sum(t["copied"] for t in tables.values())

    code, doc = run_json(healthy_fleet, capsys, failback_command.main, env, "failback", "run")
    assert code == 0
    assert doc == {"primary": "supabase",
                   "backups": {"railway": {"state": "drained", "changes": 0, "conflicts": 0}}}


def test_monitor_once_prints_one_json_line(
    healthy_fleet: Fleet, env: dict[str, str], tmp_path: Path
) -> None:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-m", "agent_factory", "monitor", "--once", "--json"],
                          env=clean, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for member in healthy_fleet:
        assert member.server.password not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert doc["primary"] == "supabase" and doc["at"].endswith("+00:00")
    rows = {r["name"]: r for r in doc["providers"]}
    assert list(rows) == list(NAMES)
    assert all(r["healthy"] and r["last_error"] == "" for r in rows.values())
    assert rows["supabase"]["role"] == "primary"

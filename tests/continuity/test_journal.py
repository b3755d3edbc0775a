"""Failback from the backups' journals across restarts: exited processes, the CLI, keys.

Real servers; the primary is killed (kill -9) and restarted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from bank import (  # noqa: F401 - bank is a fixture
    FAST,
    bank,
    bank_db,
    direct,
    journal_size,
    query,
    query_none,
)
from defaults import ORDER
from fleet import until_accepted, wait_until

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import (
    ConfigurationError,
)
from agent_factory.testing.fleet import Fleet


def test_a_table_without_primary_key_is_refused_at_registration(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    for url in direct(healthy_fleet, bank).values():
        query_none(url, "CREATE TABLE keyless (x int)")
    with DatabaseManager(bank, order=ORDER, **FAST) as db, \
            pytest.raises(ConfigurationError, match="keyless.*no primary key"):
        db.register_table("keyless")


WRITER = """
import json, sys, uuid
from agent_factory.core.database_manager import DatabaseManager
urls, order, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
acked = []
with DatabaseManager(urls, order=order, hang_timeout=1.0, probe_interval=0.1,
                     drain_interval=60.0) as db:
    for i in range(n):
        row = str(uuid.uuid4())
        db.execute_query(
            "INSERT INTO session_memories (id, session_id, memory_type, message_id, content) "
            "VALUES (%s, 'restart', 'log', %s, '{}'::jsonb)", (row, f"m{i}"),
            fetch_mode="none", idempotent=True)
        acked.append((row, db.serving_provider))
print(json.dumps(acked))
"""


@pytest.mark.parametrize("primary_back", [True, False], ids=["back-before", "down-at-start"])
def test_rows_written_by_an_exited_process_reach_the_primary(
        healthy_fleet: Fleet, bank: dict[str, str], primary_back: bool) -> None:
    """Process A writes through failover and exits; B, started later, drains them."""
    plain = direct(healthy_fleet, bank)
    healthy_fleet["supabase"].server.kill()
    done = subprocess.run([sys.executable, "-c", WRITER, json.dumps(bank), json.dumps(ORDER),
                           "300"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    acked = json.loads(done.stdout)
    assert len(acked) == 300 and {p for _, p in acked} == {"railway"}
    ids = {r for r, _ in acked}
    if primary_back:
        healthy_fleet["supabase"].server.restart()
    with DatabaseManager(bank, order=ORDER, **FAST) as db:
        if primary_back:
            # B's first write waits for A's rows: none of them is missed by it.
            touched = db.execute_query("UPDATE session_memories SET metadata = '{\"b\": 1}' "
                                       "WHERE session_id = 'restart' RETURNING id::text")
            assert {r[0] for r in touched} == ids
        else:
            healthy_fleet["supabase"].server.restart()

        def on_primary() -> bool:
            rows = query(plain["supabase"], "SELECT id::text FROM session_memories "
                         "WHERE session_id = 'restart'")
            return {r[0] for r in rows} >= ids
        wait_until(on_primary, timeout=15, message="every acknowledged row on the primary")
    assert journal_size(plain["railway"]) == 0


def test_the_cli_shows_and_drains_what_an_exited_process_left(
        healthy_fleet: Fleet, bank: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    from agent_factory.cli.failback_command import main

    plain = direct(healthy_fleet, bank)
    env = {f"{n.upper()}_DB_URL": u for n, u in bank.items()}
    env["DATABASE_FAILOVER_ORDER"] = ",".join(ORDER)
    healthy_fleet["supabase"].server.kill()
    done = subprocess.run([sys.executable, "-c", WRITER, json.dumps(bank), json.dumps(ORDER),
                           "50"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    healthy_fleet["supabase"].server.restart()
    capsys.readouterr()
    assert main(["failback", "status", "--json"], environ=env) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["pending"]["railway"] == 50 and report["conflicts"] == {}
    assert main(["failback", "run"], environ=env) == 0
    assert "railway: 50 change(s) replayed, 0 conflict(s)" in capsys.readouterr().out
    assert query(plain["supabase"], "SELECT count(*) FROM session_memories "
                 "WHERE session_id = 'restart'") == [(50,)]
    assert main(["failback", "status", "--json"], environ=env) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == {"railway": 0, "neon": 0}


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_serial_keys_work_through_an_outage_with_replication(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """A backup's sequence is kept ahead of the primary's: its outage inserts never collide."""
    plain = direct(healthy_fleet, bank)
    insert = "INSERT INTO events (note) VALUES (%s)"
    with bank_db(bank) as db:
        db.register_table("events")
        for _ in range(50):
            db.execute_query(insert, ("primary",), fetch_mode="none")
        for backup in ("railway", "neon"):
            wait_until(lambda b=backup: query(plain[b], "SELECT count(*) FROM events") == [(50,)],
                       timeout=30, message=f"the rows on {backup}")
            wait_until(lambda b=backup: query(plain[b], "SELECT coalesce(pg_sequence_last_value("
                                              "'events_id_seq'), 0)")[0][0] >= 50, timeout=30,
                       message=f"{backup}'s sequence moved ahead of the primary's")
        healthy_fleet["supabase"].server.kill()
        db.execute_query("SELECT 1")  # a read finds the primary gone (retried on railway)
        for _ in range(10):
            until_accepted(lambda: db.execute_query(insert, ("outage",), fetch_mode="none"))
        assert db.serving_provider == "railway"
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], "SELECT count(*) FROM events") == [(60,)],
                   timeout=30, message="the outage rows on the primary")
        wait_until(lambda: db.serving_provider == "supabase" or db.execute_query("SELECT 1")
                   and db.serving_provider == "supabase", timeout=30, message="back")
        db.execute_query(insert, ("after",), fetch_mode="none")  # its sequence moved past
    want = query(plain["supabase"], "SELECT id, note FROM events ORDER BY id")
    assert len(want) == 61 and len({r[0] for r in want}) == 61
    for backup in ("railway", "neon"):
        wait_until(lambda b=backup: query(plain[b], "SELECT id, note FROM events ORDER BY id")
                   == want, timeout=30, message=f"{backup} converged")

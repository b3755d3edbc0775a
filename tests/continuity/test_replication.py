"""``replicate setup|status|teardown`` and ``sync`` against the real fleet.

Every test gets the module's fresh databases (schema deployed, supabase the
primary) and leaves them without subscriptions, slots or publication, even
when it fails: a slot left on a fleet server would keep its WAL forever.
Commands run in-process through ``main(argv, environ=...)`` with the
providers' direct URLs (the backups subscribe to the primary directly); one
runs as a subprocess with a clean environment in an empty directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases, with_dbname
from fleet import wait_until
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agent_factory.cli.replication_command import main
from agent_factory.continuity.replication import (
    BackupStatus,
    publisher_conninfo,
    replication_status,
    subscription_name,
)
from agent_factory.engine.environment import settings_from_env
from agent_factory.engine.settings import Settings
from agent_factory.schema import apply_migrations
from agent_factory.testing.embedded import EmbeddedPostgres, free_port
from agent_factory.testing.fleet import Fleet

BACKUPS = ("railway", "neon")
PASSWORDS: list[str] = []  # extra secrets that must never be printed
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def dbs(fleet: Fleet) -> Iterator[dict[str, str]]:
    """Direct URLs of one fresh database per provider, the schema deployed."""
    fleet.heal()
    made = create_databases(fleet, "replication")
    name = conninfo_to_dict(made["supabase"])["dbname"]
    direct = {member.name: with_dbname(member.direct_url, name) for member in fleet}
    try:
        for url in direct.values():
            apply_migrations(url, embedding_dim=8)
        yield direct
    finally:
        fleet.heal()
        force_cleanup(fleet, direct)
        drop_databases(fleet, made)


@pytest.fixture
def env(healthy_fleet: Fleet, dbs: dict[str, str]) -> Iterator[dict[str, str]]:
    """The commands' environment; afterwards no replication object is left, whatever happened."""
    try:
        yield {f"{name.upper()}_DB_URL": url for name, url in dbs.items()}
    finally:
        healthy_fleet.heal()
        force_cleanup(healthy_fleet, dbs)
        for url in dbs.values():
            execute(url, "TRUNCATE session_memories, knowledge_atoms")


def force_cleanup(fleet: Fleet, dbs: Mapping[str, str]) -> None:
    """Drop subscriptions (detaching their slots if need be), then slots and publication."""
    for name in BACKUPS:
        with psycopg.connect(dbs[name], autocommit=True) as conn:
            subs = [r[0] for r in conn.execute(
                "SELECT subname FROM pg_subscription WHERE subdbid = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())")]
            for sub in subs:
                try:
                    conn.execute(f'DROP SUBSCRIPTION "{sub}"')
                except psycopg.Error:
                    conn.execute(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
                    conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
                    conn.execute(f'DROP SUBSCRIPTION "{sub}"')
    for member in fleet:
        url = dbs[member.name]
        wait_until(lambda url=url: not execute(
            url, "SELECT 1 FROM pg_replication_slots WHERE active AND "
            "database = current_database()"), 10, message="slots to be released")
        execute(url, "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE database = current_database()")
        execute(url, "DROP PUBLICATION IF EXISTS agent_factory")


def execute(url: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def count(url: str, table: str = "session_memories") -> int:
    return int(execute(url, f"SELECT count(*) FROM {table}")[0][0])


def insert(url: str, session: str, n: int = 1) -> None:
    with psycopg.connect(url) as conn:
        for i in range(n):
            conn.execute("INSERT INTO session_memories (session_id, memory_type, message_id, "
                         "content) VALUES (%s, 'message_user', %s, '{}')", (session, f"m{i}"))


def assert_no_secret(fleet: Fleet, *texts: str) -> None:
    for secret in [member.server.password for member in fleet] + PASSWORDS:
        for text in texts:
            assert secret not in text


def statuses(env: Mapping[str, str]) -> dict[str, BackupStatus]:
    return {s.provider: s for s in replication_status(settings_from_env(env, dotenv=None))}


def synced(env: Mapping[str, str]) -> bool:
    """Both backups streaming, their initial copy over."""
    return all(s.streaming and not s.tables_syncing for s in statuses(env).values())


@pytest.fixture
def cli(healthy_fleet: Fleet, env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    """Runs the command in-process with ``env`` (or ``environ``): its code, stdout and stderr.

    No password may show in what it printed.
    """

    def run(*args: str, environ: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        code = main(list(args), environ=env if environ is None else environ)
        out, err = capsys.readouterr()
        assert_no_secret(healthy_fleet, out, err)
        return code, out, err

    return run


@pytest.fixture
def streaming(cli: Cli, env: dict[str, str]) -> None:
    """``replicate setup`` done, both backups streaming and their initial copy over."""
    code, out, err = cli("replicate", "setup")
    assert code == 0, out + err
    wait_until(lambda: synced(env), 30, message="both backups streaming")


def test_setup_streams_rows_to_both_backups_twice_is_a_no_op_and_teardown_removes_all(
    healthy_fleet: Fleet, dbs: dict[str, str], env: dict[str, str], cli: Cli, tmp_path: Path,
) -> None:
    insert(dbs["supabase"], "before", 2)  # copied: the backups' tables are empty
    code, out, err = cli("replicate", "setup")
    assert code == 0, out + err
    assert "publication agent_factory: created (public.session_memories, " \
           "public.knowledge_atoms, public.agent_factory_heartbeat)" in out
    for name in BACKUPS:
        assert f"subscription agent_factory_{name} created, copying the primary's rows" in out

    insert(dbs["supabase"], "after", 3)
    execute(dbs["supabase"], "INSERT INTO knowledge_atoms (atom_id, atom_type, title, content, "
                             "embedding) VALUES ('a1', 'concept', 't', 'c', %s::vector)",
            (str([0.5] * 8),))
    for name in BACKUPS:
        wait_until(lambda name=name: count(dbs[name]) == 5
                   and count(dbs[name], "knowledge_atoms") == 1, 15, message=f"rows on {name}")
    execute(dbs["supabase"], "UPDATE session_memories SET content = '{\"x\": 1}' "
                             "WHERE session_id = 'before'")
    primary_rows = execute(dbs["supabase"], "SELECT * FROM session_memories ORDER BY id")
    for name in BACKUPS:
        wait_until(lambda name=name: execute(
            dbs[name], "SELECT * FROM session_memories ORDER BY id") == primary_rows, 15,
            message=f"the update (updated_at included) on {name}")

    wait_until(lambda: synced(env), 15, message="both backups streaming")
    code, out, err = cli("replicate", "status", "--max-lag", "60")
    assert code == 0, out + err
    for name in BACKUPS:
        assert f"{name} (postgres@127.0.0.1:" in out
    assert out.count(": streaming; subscription agent_factory_") == 2
    assert "lag " in out and " bytes" in out
    for status in statuses(env).values():
        assert status.lag_bytes is not None and status.lag_bytes >= 0
        assert status.lag_seconds is not None and status.apply_errors == 0

    # A second setup changes nothing: same subscription, same tables, same publication.
    before = [execute(dbs[n], "SELECT oid, subenabled FROM pg_subscription") for n in BACKUPS]
    code, out, err = cli("replicate", "setup")
    assert code == 0, out + err
    assert "publication agent_factory: unchanged" in out
    assert out.count("unchanged") == 3
    assert [execute(dbs[n], "SELECT oid, subenabled FROM pg_subscription")
            for n in BACKUPS] == before

    # The same status, as JSON, from a clean process that reads no .env.
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env}
    done = subprocess.run([sys.executable, "-m", "agent_factory.cli.replication_command",
                           "replicate", "status", "--json"], cwd=tmp_path, env=clean,
                          capture_output=True, text=True, timeout=60)
    assert_no_secret(healthy_fleet, done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert [r["provider"] for r in report] == list(BACKUPS)
    assert all(r["streaming"] and r["enabled"] and r["lag_bytes"] is not None for r in report)

    code, out, err = cli("replicate", "teardown")
    assert code == 0, out + err
    assert "subscription agent_factory_railway dropped" in out
    assert "publication agent_factory on supabase: dropped" in out
    for name in BACKUPS:
        assert execute(dbs[name], "SELECT subname FROM pg_subscription") == []
    assert execute(dbs["supabase"], "SELECT * FROM pg_publication") == []
    wait_until(lambda: not execute(dbs["supabase"], "SELECT slot_name FROM pg_replication_slots"),
               5, message="the slots to be gone")
    code, out, err = cli("replicate", "teardown")
    assert code == 0, out + err
    assert "publication agent_factory on supabase: absent" in out


def test_status_reports_a_streaming_backup_that_stopped_applying_as_lagging(
    dbs: dict[str, str], env: dict[str, str], cli: Cli, streaming: None,
) -> None:
    """replay_lag is NULL for subscribers: the lag in seconds comes from watching the WAL."""
    insert(dbs["supabase"], "warm")
    wait_until(lambda: count(dbs["railway"]) == 1 and count(dbs["neon"]) == 1, 15,
               message="caught up")
    with psycopg.connect(dbs["railway"]) as blocker:  # railway's apply worker waits on it
        blocker.execute("LOCK TABLE session_memories IN ACCESS EXCLUSIVE MODE")
        insert(dbs["supabase"], "stuck")
        wait_until(lambda: count(dbs["neon"]) == 2, 15, message="the row on neon")
        code, out, err = cli("replicate", "status", "--max-lag", "0.5")
        now = statuses(env)
    assert code == 1, out + err
    railway = next(line for line in out.splitlines() if line.startswith("railway"))
    # "at least 1.0 s", or a little more on a loaded machine (the watch lasts 1 s).
    seconds = re.search(r"at least (\d+\.\d) s \(over --max-lag\)", railway)
    assert ": streaming;" in railway and seconds and float(seconds[1]) >= 1.0, out
    assert now["railway"].lag_at_least and now["railway"].lag_bytes
    assert now["railway"].lag_seconds is not None and now["railway"].lag_seconds >= 1.0
    assert now["neon"].lag_seconds is not None and now["neon"].lag_seconds < 0.5, now["neon"]
    assert not now["neon"].lag_at_least
    wait_until(lambda: count(dbs["railway"]) == 2, 15, message="railway caught up")
    caught_up = statuses(env)["railway"]
    assert caught_up.lag_seconds is not None and caught_up.lag_seconds < 0.5
    assert not caught_up.lag_at_least


def test_replication_resumes_by_itself_after_a_primary_crash(
    healthy_fleet: Fleet, dbs: dict[str, str], cli: Cli, streaming: None,
) -> None:
    primary = healthy_fleet["supabase"].server
    primary.kill()
    code, out, err = cli("replicate", "status")
    assert code == 3, out + err
    assert "railway (postgres@127.0.0.1:" in out and "UNREACHABLE: primary: provider " \
           "'supabase' unavailable" in out

    primary.restart()
    insert(dbs["supabase"], "after-crash")
    for name in BACKUPS:
        wait_until(lambda name=name: count(dbs[name]) == 1, 30,
                   message=f"streaming again to {name}")
    wait_until(lambda: cli("replicate", "status")[0] == 0, 30, message="status back to streaming")


def test_a_conflicting_row_stops_that_backups_apply_and_status_counts_its_errors(
    dbs: dict[str, str], env: dict[str, str], cli: Cli, streaming: None,
) -> None:
    row = str(uuid.uuid4())
    sql = ("INSERT INTO session_memories (id, session_id, memory_type, message_id, content) "
           "VALUES (%s, 'clash', 'message_user', %s, '{}')")
    execute(dbs["railway"], sql, (row, "on-railway"))  # the key railway already has
    execute(dbs["supabase"], sql, (row, "on-primary"))
    wait_until(lambda: statuses(env)["railway"].apply_errors > 0, 30,
               message="railway's apply failing on the duplicate key")
    insert(dbs["supabase"], "after")
    wait_until(lambda: count(dbs["neon"]) == 2, 15, message="neon unaffected")
    assert count(dbs["railway"]) == 1  # stopped: nothing after the conflict arrives
    code, out, err = cli("replicate", "status")
    railway = next(line for line in out.splitlines() if line.startswith("railway"))
    assert "apply error(s)" in railway, out + err
    execute(dbs["railway"], "DELETE FROM session_memories WHERE id = %s", (row,))  # resolved
    wait_until(lambda: count(dbs["railway"]) == 2, 30, message="railway applying again")


def test_teardown_with_the_primary_down_detaches_the_slots_and_says_so(
    healthy_fleet: Fleet, dbs: dict[str, str], cli: Cli, streaming: None,
) -> None:
    # Killed during the initial copy, the primary would keep its table-sync slots too:
    # ``streaming`` waits for its end.
    healthy_fleet["supabase"].server.kill()
    code, out, err = cli("replicate", "teardown")
    assert code == 3, out + err
    assert "its slot on the primary could not be dropped from there (unreachable?)" in out
    assert "SELECT pg_drop_replication_slot('agent_factory_neon')" in out
    assert "if an initial copy was interrupted, also drop the slots named pg_" in out
    for name in BACKUPS:
        assert execute(dbs[name], "SELECT subname FROM pg_subscription") == []
    healthy_fleet["supabase"].server.restart()
    code, out, err = cli("replicate", "teardown")
    assert code == 0, out + err
    assert execute(dbs["supabase"], "SELECT slot_name FROM pg_replication_slots") == []
    assert execute(dbs["supabase"], "SELECT * FROM pg_publication") == []


def test_a_role_that_may_not_subscribe_gets_a_clear_error_and_the_others_are_set_up(
    dbs: dict[str, str], env: dict[str, str], cli: Cli,
) -> None:
    role, password = f"af_plain_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    PASSWORDS.append(password)
    execute(dbs["railway"], f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    try:
        railway = {**conninfo_to_dict(dbs["railway"]), "user": role, "password": password}
        plain = {**env, "RAILWAY_DB_URL": make_conninfo("", **railway)}
        code, out, err = cli("replicate", "setup", environ=plain)
        assert code == 2, out + err
        assert f"error: role '{role}' on provider 'railway' may not create subscriptions" in err
        assert f"GRANT pg_create_subscription TO {role}" in err
        assert "neon (postgres@127.0.0.1:" in out and "agent_factory_neon created" in out
        # A member of pg_create_subscription that cannot act as the tables' owner.
        execute(dbs["railway"], f"GRANT pg_create_subscription TO {role}")
        execute(dbs["railway"], f'GRANT CREATE ON DATABASE "{railway["dbname"]}" TO {role}')
        code, out, err = cli("replicate", "setup", environ=plain)
        assert code == 2, out + err
        assert "cannot act as postgres, who own(s) the replicated tables" in err
    finally:
        execute(dbs["railway"], f"DROP OWNED BY {role}")
        execute(dbs["railway"], f"DROP ROLE {role}")


def test_sync_brings_rows_written_on_a_backup_and_they_are_not_replicated_back(
    healthy_fleet: Fleet, dbs: dict[str, str], env: dict[str, str], cli: Cli,
) -> None:
    dbname = conninfo_to_dict(dbs["supabase"])["dbname"]
    proxied = with_dbname(healthy_fleet["supabase"].url, dbname)
    code, out, err = cli("replicate", "setup", "--publisher-url", proxied)
    assert code == 0, out + err
    port = str(healthy_fleet["supabase"].proxy.port)
    assert execute(dbs["neon"], "SELECT subconninfo LIKE %s FROM pg_subscription",
                   (f"%port={port}%",)) == [(True,)]
    # During the initial copy, rows that sync writes would be copied too: wait for its end.
    wait_until(lambda: synced(env), 15, message="the initial copy to end")
    insert(dbs["railway"], "outage", 2)  # written on a backup while the primary was away
    code, out, err = cli("sync", "--from", "railway", "--to", "supabase", "--table",
                         "session_memories", "--since", "2000-01-01T00:00:00Z")
    assert code == 0, out + err
    assert "Syncing session_memories updated since 2000-01-01T00:00:00+00:00 from railway" in out
    assert "session_memories: 2 row(s) considered, 2 copied (2 inserted, 0 updated)" in out
    assert count(dbs["supabase"]) == 2
    insert(dbs["supabase"], "marker")  # replicated: once neon has it, it had its chance
    wait_until(lambda: count(dbs["neon"]) == 1 and count(dbs["railway"]) == 3, 15,
               message="the marker on the backups")
    # origin = none: rows the sync wrote are not sent back (railway has them) nor to neon.
    assert execute(dbs["neon"], "SELECT session_id FROM session_memories") == [("marker",)]
    assert all(s.streaming for s in statuses(env).values())

    code, out, err = cli("sync", "--from", "railway", "--to", "supabase")
    assert code == 0, out + err
    assert "session_memories: 3 row(s) considered, 0 copied (0 inserted, 0 updated), " \
           "3 unchanged or newer on the target (kept)" in out
    code, out, err = cli("sync", "--from", "railway", "--to", "mars")
    assert code == 2 and "--to 'mars' is not a configured provider" in err


def test_a_publisher_the_backups_cannot_reach_fails_without_showing_its_password(
    dbs: dict[str, str], cli: Cli,
) -> None:
    password = secrets.token_urlsafe(16)
    PASSWORDS.append(password)
    nowhere = f"postgresql://postgres:{password}@127.0.0.1:{free_port()}/app"
    code, out, err = cli("replicate", "setup", "--publisher-url", nowhere)
    assert code == 2, out + err
    assert "error: subscription agent_factory_railway on 'railway': could not connect to " \
           "the publisher" in err
    for name in BACKUPS:
        assert execute(dbs[name], "SELECT subname FROM pg_subscription") == []


def test_wal_level_below_logical_is_refused_with_the_fix(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with EmbeddedPostgres("replica", settings={"wal_level": "replica"}) as pg:
        pg.start(60.0)
        code = main(["replicate", "setup"],
                    environ={"SUPABASE_DB_URL": pg.url, "NEON_DB_URL": pg.url})
    out, err = capsys.readouterr()
    assert pg.password not in out + err
    assert code == 2, out + err
    assert "provider 'supabase' (the primary) has wal_level = replica" in err
    assert "ALTER SYSTEM SET wal_level = logical" in err and "on Neon enable logical" in err


def test_the_subscription_names_itself_to_the_primary_and_hides_the_password() -> None:
    settings = Settings.build({"supabase": "postgresql://u:s3cret-pw@db.example.com/app",
                               "neon": "postgresql://u:x@n.example.com/app"})
    conninfo, password = publisher_conninfo(settings.providers["supabase"], "neon")
    params = conninfo_to_dict(conninfo)
    assert password == "s3cret-pw" and params["password"] == "s3cret-pw"
    assert params["application_name"] == subscription_name("neon") == "agent_factory_neon"
    assert params["sslmode"] == "require" and params["host"] == "db.example.com"
    other, _ = publisher_conninfo(settings.providers["supabase"], "neon",
                                  "postgresql://u:pw2@10.0.0.5:6543/app")
    assert conninfo_to_dict(other)["host"] == "10.0.0.5"
    assert conninfo_to_dict(other)["application_name"] == "agent_factory_neon"

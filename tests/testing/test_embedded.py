"""Embedded PostgreSQL: real servers, real crashes and freezes."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from chaos import run_in_thread
from psycopg.conninfo import make_conninfo

from agent_factory.errors import EmbeddedPostgresError, PostgresNotFoundError
from agent_factory.testing.embedded import EmbeddedPostgres, pgvector_available
from agent_factory.testing.fleet import PROVIDERS, Fleet


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_start_stop_restart_and_cleanup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent_factory.testing.embedded")
    server = EmbeddedPostgres("solo", settings={"max_connections": "20"})
    with server:
        server.start()
        assert server.is_running() and server.pid is not None
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("20",)
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        server.stop()
        assert not server.is_running() and server.pid is None
        assert refused(server.host, server.port)
        server.start()
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert server.log_path.is_file()
    assert not server.base_dir.exists()
    assert server.password not in caplog.text
    with pytest.raises(EmbeddedPostgresError):
        server.start()


def test_repr_hides_password(healthy_fleet: Fleet) -> None:
    server = healthy_fleet["supabase"].server
    assert server.password not in repr(server)
    assert "supabase" in repr(server) and "running" in repr(server)


def test_fleet_members_answer_through_their_proxies(healthy_fleet: Fleet) -> None:
    assert healthy_fleet.names == PROVIDERS
    assert list(healthy_fleet.urls()) == list(PROVIDERS)
    for member in healthy_fleet:
        assert f":{member.proxy.port}/" in member.url
        with psycopg.connect(member.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT inet_server_port()").fetchone() == (member.server.port,)


def test_password_authentication_is_required(healthy_fleet: Fleet) -> None:
    server = healthy_fleet["supabase"].server
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(make_conninfo(server.url, password="wrong"), connect_timeout=5)
    with psycopg.connect(server.url) as conn:
        methods = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules").fetchall()
    assert methods == [("scram-sha-256",)]


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop happens only as root")
def test_as_root_the_server_runs_unprivileged(healthy_fleet: Fleet) -> None:
    server = healthy_fleet["supabase"].server
    status = Path(f"/proc/{server.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()
    assert "0" not in uids and "0" not in groups[1:]
    for directory in (server.data_dir, server.base_dir):
        assert not directory.stat().st_mode & stat.S_IWOTH


def test_kill_fails_fast_and_restart_recovers_committed_data(healthy_fleet: Fleet) -> None:
    member = healthy_fleet["railway"]
    server = member.server
    table = f"crash_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")  # WAL reaches the OS before COMMIT returns
        conn.execute(f"CREATE TABLE {table} (v text)")
        conn.execute(f"INSERT INTO {table} VALUES ('committed')")
    in_flight = psycopg.connect(server.url)
    in_flight.execute(f"INSERT INTO {table} VALUES ('uncommitted')")
    old_pid = server.pid
    try:
        server.kill()
        assert not server.is_running() and server.pid is None
        assert refused(server.host, server.port)
        for url in (member.direct_url, member.url):
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(url, connect_timeout=10)
            assert time.monotonic() - started < 5, "a crashed server must fail fast"
    finally:
        in_flight.close()
    server.restart()
    assert server.pid != old_pid
    with psycopg.connect(member.url, connect_timeout=5) as conn:
        assert conn.execute(f"SELECT v FROM {table}").fetchall() == [("committed",)]


def test_hang_gets_no_answer_until_resume(healthy_fleet: Fleet) -> None:
    server = healthy_fleet["neon"].server
    conn = psycopg.connect(server.url, autocommit=True, connect_timeout=5)
    server.hang()
    try:
        assert server.is_running() and "hung" in repr(server)
        worker, answer = run_in_thread(lambda: conn.execute("SELECT 42").fetchone())
        worker.join(1.0)
        assert worker.is_alive() and not answer
        socket.create_connection((server.host, server.port), timeout=2).close()  # TCP works
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url, connect_timeout=2)
        assert time.monotonic() - started >= 1.5, "a hung server times out, it does not refuse"
    finally:
        server.resume()
    worker.join(10)
    assert "error" not in answer and answer.get("result") == (42,), answer
    conn.close()


def test_pgvector_works_on_every_provider(healthy_fleet: Fleet) -> None:
    assert pgvector_available(healthy_fleet["neon"].server.bin_dir)
    for member in healthy_fleet:
        with psycopg.connect(member.url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,5]'::vector").fetchone()
            assert row == (2.0,)


def test_missing_binaries_say_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(PostgresNotFoundError, match=r"agent-factory\[embedded\].*PG_BIN"):
        EmbeddedPostgres("nobin", bin_dir=tmp_path)
    monkeypatch.setenv("PG_BIN", str(tmp_path))
    with pytest.raises(RuntimeError, match="PG_BIN"):
        EmbeddedPostgres("nobin")
    assert not pgvector_available(tmp_path)

"""The agent-factory-db command and the demo scenario, against real embedded servers.

``health`` and ``stats`` run as subprocesses with an environment built here
(only PATH, HOME and the database variables, in an empty directory so no
``.env`` is read). The demo runs in-process with short durations.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fleet import postgres_under
from rich.console import Console

from agent_factory.cli.demo.scenario import Demo, DemoConfig
from agent_factory.cli.main import _render
from agent_factory.continuity import journal
from agent_factory.errors import PostgresNotFoundError
from agent_factory.testing.embedded import EmbeddedPostgres, find_bin_dir
from agent_factory.testing.fleet import PROVIDERS, start_fleet

try:
    find_bin_dir()
except PostgresNotFoundError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no PostgreSQL binaries: {exc}", allow_module_level=True)

NAMES = PROVIDERS[:2]


def _assert_no_postgres_left(path: Path) -> None:
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + 10.0
    while (left := postgres_under(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"postgres processes left behind: {left}"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, EmbeddedPostgres]]:
    base = Path(tempfile.mkdtemp(prefix="afcli-"))  # short: Unix socket paths are limited
    try:
        with start_fleet(NAMES, base_dir=base, proxy=False,
                         password=lambda _: f"pw-{secrets.token_hex(12)}") as fleet:
            yield {member.name: member.server for member in fleet}
    finally:
        _assert_no_postgres_left(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="afcli-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    # An empty working directory: no .env of the developer gets read.
    return tmp_path


def _env(servers: dict[str, EmbeddedPostgres], **extra: str) -> dict[str, str]:
    supabase, railway = servers["supabase"], servers["railway"]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "SUPABASE_DB_HOST": supabase.host,
        "SUPABASE_DB_PORT": str(supabase.port),
        "SUPABASE_DB_PASSWORD": supabase.password,
        "RAILWAY_DB_URL": railway.url,
        "DATABASE_FAILOVER_ORDER": "supabase,railway",
    }
    env.update(extra)
    return env


def _cli(
    args: list[str], env: dict[str, str], cwd: Path, servers: dict[str, EmbeddedPostgres]
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "agent_factory.cli.main", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
    )
    for server in servers.values():
        for out in (proc.stdout, proc.stderr):
            assert server.password not in out
    return proc


def test_health_lists_every_provider_and_exits_0(
    servers: dict[str, EmbeddedPostgres], workdir: Path
) -> None:
    proc = _cli(["health"], _env(servers), workdir, servers)
    assert proc.returncode == 0, proc.stderr
    for name, server in servers.items():
        assert name in proc.stdout
        assert f"{server.host}:{server.port}" in proc.stdout
    assert "primary supabase: healthy" in proc.stdout


def test_health_json(servers: dict[str, EmbeddedPostgres], workdir: Path) -> None:
    proc = _cli(["health", "--json"], _env(servers), workdir, servers)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["primary"] == "supabase" and doc["primary_healthy"] is True
    assert set(doc["providers"]) == set(NAMES)
    assert all(p["healthy"] and p["latency_ms"] is not None for p in doc["providers"].values())


def test_stats_table_and_json(servers: dict[str, EmbeddedPostgres], workdir: Path) -> None:
    table = _cli(["stats"], _env(servers), workdir, servers)
    assert table.returncode == 0, table.stderr
    assert "supabase" in table.stdout and "railway" in table.stdout
    proc = _cli(["stats", "--json"], _env(servers), workdir, servers)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["supabase"]["role"] == "primary"
    assert stats["railway"]["port"] == str(servers["railway"].port)
    assert "password" not in proc.stdout


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"DATABASE_FAILOVER_ENABLED": "maybe"}, "DATABASE_FAILOVER_ENABLED"),
        ({"DATABASE_HANG_TIMEOUT": "soon"}, "DATABASE_HANG_TIMEOUT"),
        ({"DATABASE_PROVIDER": "neon"}, "DATABASE_PROVIDER"),
    ],
)
def test_configuration_error_exits_2_naming_the_setting(
    servers: dict[str, EmbeddedPostgres], workdir: Path, extra: dict[str, str], named: str
) -> None:
    for command in ("health", "stats"):
        proc = _cli([command], _env(servers, **extra), workdir, servers)
        assert proc.returncode == 2
        assert named in proc.stderr
        assert "Traceback" not in proc.stderr


def test_no_provider_configured_exits_2(workdir: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir)}
    proc = _cli(["health"], env, workdir, {})
    assert proc.returncode == 2
    assert "SUPABASE_DB_HOST" in proc.stderr


def test_demo_without_postgres_binaries_says_how_to_install(workdir: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir),
           "PG_BIN": str(workdir / "missing")}
    proc = _cli(["demo", "--no-live"], env, workdir, {})
    assert proc.returncode == 2
    assert "pip install 'agent-factory[embedded]'" in proc.stderr


def test_health_exits_1_when_the_primary_is_down(
    servers: dict[str, EmbeddedPostgres], workdir: Path
) -> None:
    primary = servers["supabase"]
    primary.kill()
    try:
        proc = _cli(["health", "--json"], _env(servers), workdir, servers)
        assert proc.returncode == 1, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["providers"]["supabase"]["healthy"] is False
        assert doc["providers"]["supabase"]["error"]
        assert doc["providers"]["railway"]["healthy"] is True
        table = _cli(["health"], _env(servers), workdir, servers)
        assert table.returncode == 1
        assert "primary supabase: DOWN" in table.stdout
    finally:
        primary.restart()


def test_demo_scenario_fails_over_and_returns(short_tmp: Path) -> None:
    lines: list[str] = []
    config = DemoConfig(warmup=1.0, down_seconds=1.0, hang=True, settle=0.5,
                        base_dir=short_tmp)
    demo = Demo(config, on_log=lines.append)
    drawn: list[str] = []
    done = threading.Event()

    def draw() -> None:
        # What the live view does ~4 times a second, from its own thread.
        while not done.wait(0.25):
            console = Console(file=io.StringIO(), width=120)
            console.print(_render(demo.view()))
            drawn.append(console.file.getvalue())  # type: ignore[attr-defined]

    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        result = demo.run()
    finally:
        done.set()
        drawer.join()
        _assert_no_postgres_left(short_tmp)
    log = "\n".join(lines)
    assert [f.fault for f in result.faults] == ["crash (kill -9)", "hang (SIGSTOP)"], log
    for fault in result.faults:
        assert fault.failed_reads == 0, log
        assert fault.failover_s is not None, log
        assert fault.failover_s < config.hang_timeout + 1.0, log
        assert fault.back_to_primary_s is not None, log
        # Every row written on a backup so far is on the primary after failback,
        # including those of the instance that restarted away mid-outage.
        assert fault.missing_on_primary == 0, log
        # demo_events has a bigserial key and no replication: the backup's
        # sequence is kept ahead, so no outage insert meets a primary row.
        assert fault.conflicts == 0, log
    assert "RESTART: the application restarts during the outage" in log
    assert result.faults[0].backup_rows > 0, log
    assert result.totals.failed_reads == 0 and result.totals.failed_writes == 0, log
    assert result.totals.reads > 100 and result.totals.writes > 20, log
    assert result.ok, log
    assert "FAULT: crash" in log and "event: failover supabase -> railway" in log
    assert any("railway" in frame and "serving" in frame for frame in drawn)


def test_demo_command_plain_output(short_tmp: Path) -> None:
    # TMPDIR puts the servers' data under short_tmp, so leftovers can be told apart.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(short_tmp),
           "TMPDIR": str(short_tmp)}
    if os.environ.get("PG_BIN"):
        env["PG_BIN"] = os.environ["PG_BIN"]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "agent_factory.cli.main", "demo", "--no-hang",
             "--down-seconds", "1"],
            env=env, cwd=short_tmp, capture_output=True, text=True, timeout=60,
        )
    finally:
        _assert_no_postgres_left(short_tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAULT: crash (kill -9) of the primary supabase" in out
    assert "status: supabase[" in out
    assert "Failover summary" in out and "PASS:" in out
    assert "hang (SIGSTOP)" not in out
    assert "postgresql://" not in out + proc.stderr


def test_schema_commands_are_wired(
    servers: dict[str, EmbeddedPostgres], workdir: Path
) -> None:
    env = _env(servers)
    dry = _cli(["schema", "deploy", "--dry-run", "--embedding-dim", "8"], env, workdir, servers)
    assert dry.returncode == 0, dry.stderr
    assert "vector(8)" in dry.stdout
    status = _cli(["schema", "status"], env, workdir, servers)
    assert status.returncode in (0, 1), status.stderr
    assert "supabase" in status.stdout and "railway" in status.stdout


def test_health_exits_1_while_a_backups_drain_into_the_primary_fails(
    servers: dict[str, EmbeddedPostgres], workdir: Path
) -> None:
    # Railway holds an outage's change that the primary cannot take (a column
    # the primary requires and the backup never had: schema drift).
    with psycopg.connect(servers["supabase"].url, autocommit=True) as conn:
        conn.execute("CREATE TABLE drift (id int PRIMARY KEY, v int, w int NOT NULL)")
        journal.install(conn, "drift")
    with psycopg.connect(servers["railway"].url, autocommit=True) as conn:
        conn.execute("CREATE TABLE drift (id int PRIMARY KEY, v int)")
        journal.install(conn, "drift")
        conn.execute("SET agent_factory.journal = on")
        conn.execute("INSERT INTO drift VALUES (1, 1)")
    try:
        proc = _cli(["health", "--json"], _env(servers), workdir, servers)
        assert proc.returncode == 1, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["primary_healthy"] is True
        assert doc["failback"]["pending"]["railway"] == 1
        assert '"w"' in doc["failback"]["failing"]["railway"]  # names the column
        table = _cli(["health"], _env(servers), workdir, servers)
        assert table.returncode == 1 and "failback from railway FAILING" in table.stdout
        # Once the cause is fixed, the drain goes through and health is 0 again.
        with psycopg.connect(servers["supabase"].url, autocommit=True) as conn:
            conn.execute("ALTER TABLE drift ALTER COLUMN w SET DEFAULT 0")
        proc = _cli(["health", "--json"], _env(servers), workdir, servers)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert json.loads(proc.stdout)["failback"] == {"pending": {"railway": 0}, "failing": {}}
        with psycopg.connect(servers["supabase"].url) as conn:
            assert conn.execute("SELECT id, v, w FROM drift").fetchall() == [(1, 1, 0)]
        # The other drift: a column only the backup has is never dropped silently.
        with psycopg.connect(servers["railway"].url, autocommit=True) as conn:
            conn.execute("ALTER TABLE drift ADD COLUMN note text")
            conn.execute("SET agent_factory.journal = on")
            conn.execute("INSERT INTO drift VALUES (2, 2, 'kept')")
        proc = _cli(["health", "--json"], _env(servers), workdir, servers)
        assert proc.returncode == 1
        assert "note" in json.loads(proc.stdout)["failback"]["failing"]["railway"]
    finally:
        for server in servers.values():
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS drift")
                conn.execute("DELETE FROM agent_factory_journal WHERE table_name = 'drift'")

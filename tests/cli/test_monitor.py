"""``agent-factory-db monitor``: rows, plain and live output, the command, Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet import wait_until
from rich.console import Console

from agent_factory.cli.monitor import plain_lines, run_monitor, snapshot_of
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.fleet import Fleet


@pytest.fixture
def db(healthy_fleet: Fleet) -> Iterator[DatabaseManager]:
    manager = DatabaseManager(healthy_fleet.urls(), order=list(healthy_fleet.names),
                              hang_timeout=1.0)
    try:
        yield manager
    finally:
        manager.close_all()


def _env(fleet: Fleet) -> dict[str, str]:
    urls = fleet.urls()
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"), "SUPABASE_DB_URL": urls["supabase"],
            "RAILWAY_DB_URL": urls["railway"], "NEON_DB_URL": urls["neon"]}


def test_rows_in_the_spec_format_with_errors_only_when_down() -> None:
    stats = {
        "a": {"role": "primary", "connection_string_host": "db.a", "port": "5432",
              "last_latency_ms": 1.25, "pool_size": 3, "pool_idle": 1, "pool_max": 10,
              "consecutive_failures": 0, "last_error": "old news"},
        "b": {"role": "down", "connection_string_host": "db.b", "port": "6543",
              "last_latency_ms": 9.0, "pool_size": 0, "pool_idle": 0, "pool_max": 10,
              "consecutive_failures": 4, "last_error": "refused for s3cret"},
    }
    snap = snapshot_of({"a": True, "b": False}, stats, primary="a", serving="a",
                       at=0.0, secrets=["s3cret"])
    lines = plain_lines(snap)
    assert lines[0].endswith("primary a, serving a")
    assert lines[1] == ("[UP] a (db.a:5432) role=primary latency=1.2 ms pool=2/3 of 10 "
                        "failures=0")
    assert lines[2] == ("[DOWN] b (db.b:6543) role=down latency=- pool=0/0 of 10 failures=4 "
                        "error=refused for ***")


def test_once_prints_one_plain_snapshot(db: DatabaseManager, healthy_fleet: Fleet) -> None:
    out = io.StringIO()
    run_monitor(db, once=True, out=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    for line, member in zip(lines[1:], healthy_fleet, strict=True):
        assert line.startswith(f"[UP] {member.name} (127.0.0.1:{member.proxy.port}) ")


def test_live_table_refreshes_until_stopped(db: DatabaseManager, healthy_fleet: Fleet) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    stop = threading.Event()
    thread = threading.Thread(target=run_monitor, args=(db,),
                              kwargs={"interval": 0.1, "console": console, "stop": stop})
    thread.start()
    try:
        healthy_fleet["neon"].proxy.set_mode("refuse")
        wait_until(lambda: "DOWN" in buffer.getvalue(), timeout=10, message="neon shown DOWN")
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    text = buffer.getvalue()
    assert "Provider health at" in text and "every 0.1s" in text
    assert text.count("Provider health at") >= 2  # redrawn in place


def test_command_once_plain_without_a_terminal(healthy_fleet: Fleet, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "agent_factory.cli.main", "monitor", "--once"],
                          env=_env(healthy_fleet), cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in healthy_fleet.names:
        assert f"[UP] {name} (127.0.0.1:" in proc.stdout
    for member in healthy_fleet:
        assert member.server.password not in proc.stdout + proc.stderr


def test_command_loops_until_ctrl_c_and_exits_0(healthy_fleet: Fleet, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_factory.cli.main", "monitor", "--interval", "0.2"],
        env=_env(healthy_fleet), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    blocks, deadline = 0, time.monotonic() + 30
    for line in proc.stdout:
        blocks += "primary supabase" in line
        if blocks >= 3 or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert blocks >= 3
    assert proc.returncode == 0, err
    assert "Traceback" not in err

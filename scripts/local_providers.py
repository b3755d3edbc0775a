#!/usr/bin/env python3
"""Three local PostgreSQL servers for the README's quickstart: no provider account needed.

    python scripts/local_providers.py start    # returns once all three accept logins
    python scripts/local_providers.py stop     # stops them and deletes their data

They stand in for the spec's providers, at the addresses `.env.example` points
at: supabase on 127.0.0.1:54321, railway on 54322, neon on 54323, user
`postgres`, password `local`. The servers are the embedded ones of the demo and
the tests (`pip install -e ".[embedded]"`, or `PG_BIN`), with pgvector; their
data is thrown away on `stop`. Replace the URLs in `.env` with your providers'
when you have them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PASSWORD = "local"
SERVERS = (("supabase", 54321), ("railway", 54322), ("neon", 54323))
_UID = os.getuid() if hasattr(os, "getuid") else 0
STATE = Path(tempfile.gettempdir()) / f"agent-factory-local-{_UID}"
PIDFILE = STATE / "serve.pid"
LOG = STATE / "serve.log"
START_TIMEOUT = 120.0


def serve() -> None:
    """Run the servers in the foreground until SIGTERM or Ctrl-C."""
    from agent_factory.testing.embedded import EmbeddedPostgres

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers = [EmbeddedPostgres(name, port=port, password=PASSWORD) for name, port in SERVERS]
    try:
        for server in servers:
            server.start(START_TIMEOUT)
            print(f"{server.name}: 127.0.0.1:{server.port} ready", flush=True)
        stop.wait()
    finally:
        for server in servers:
            server.close()
        print("stopped", flush=True)


def _ready() -> bool:
    import psycopg

    for _, port in SERVERS:
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
        try:
            with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error:
            return False
    return True


def _running_pid() -> int | None:
    try:
        pid = int(PIDFILE.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def start() -> int:
    if _running_pid() is not None and _ready():
        print("local providers already running (supabase :54321, railway :54322, neon :54323)")
        return 0
    STATE.mkdir(parents=True, exist_ok=True)
    with LOG.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    PIDFILE.write_text(str(child.pid))
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if child.poll() is not None:
            print(f"the servers did not start:\n{LOG.read_text()}", file=sys.stderr)
            return 1
        if _ready():
            print("local providers running: supabase 127.0.0.1:54321, railway :54322, "
                  "neon :54323 (stop: python scripts/local_providers.py stop)")
            return 0
        time.sleep(0.2)
    print(f"not ready after {START_TIMEOUT:g}s; log: {LOG}", file=sys.stderr)
    return 1


def stop() -> int:
    pid = _running_pid()
    if pid is None:
        print("no local providers running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while _running_pid() is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    PIDFILE.unlink(missing_ok=True)
    print("local providers stopped")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "serve"])
    action = parser.parse_args(argv).action
    if action == "serve":
        serve()
        return 0
    return start() if action == "start" else stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A real PgBouncer in transaction mode in front of one embedded server, for the tests.

`PgBouncer` runs Debian's ``pgbouncer`` on 127.0.0.1 and a free port, straight to
the server (not through its fault proxy), so that the faults are the server's own:
``kill()`` and ``hang()``. The settings are PgBouncer's defaults except those of
`SETTINGS`, the ones the pooler figures of issue 9 were measured with.

Clients log in with the server's user and password (SCRAM); PgBouncer checks them
against its own user list, then logs in to the server with the same password.
Like PostgreSQL, PgBouncer refuses to run as root: under root it runs as the
embedded servers' system user. `pooled_providers` declares a manager's providers
behind it (the ``pooled_primary`` fixture of conftest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg

from agent_factory.testing.embedded import EmbeddedPostgres, free_port
from agent_factory.testing.fleet import Fleet
from agent_factory.testing.postgres_process import (
    Account,
    identity,
    make_traversable,
    service_account,
)

#: Where Debian installs it (``/usr/sbin`` is often not on a user's PATH).
DEBIAN_BINARY = "/usr/sbin/pgbouncer"
SETTINGS: Mapping[str, str] = {
    "pool_mode": "transaction",
    "server_connect_timeout": "2",
    "query_wait_timeout": "30",
    "server_login_retry": "1",
}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class PgBouncerError(RuntimeError):
    """PgBouncer could not be started."""


def find_pgbouncer() -> str | None:
    """The pgbouncer binary: ``AGENT_FACTORY_PGBOUNCER``, then PATH, then Debian's place."""
    for candidate in (os.environ.get("AGENT_FACTORY_PGBOUNCER"), shutil.which("pgbouncer"),
                      DEBIAN_BINARY):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _quoted(value: str) -> str:
    """A value for PgBouncer's user list: in double quotes, inner ones doubled."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One PgBouncer process in front of ``server``; ``url`` is for the clients."""

    def __init__(self, server: EmbeddedPostgres, binary: str,
                 settings: Mapping[str, str] | None = None) -> None:
        self.server = server
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix="agent-factory-pgbouncer-"))
        self._settings = {**SETTINGS, **(settings or {})}
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's credentials, the pooler's address (contains the password)."""
        s = self.server
        return (f"postgresql://{s.user}:{quote(s.password, safe='')}@{self.host}:{self.port}"
                f"/{s.dbname}")

    @property
    def log_path(self) -> Path:
        return self.dir / "pgbouncer.log"

    def is_running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the configuration, launch, return once a login through it runs a query."""
        account = service_account()
        if account is not None:
            os.chown(self.dir, account.uid, account.gid)
            make_traversable(self.dir, account)
        for attempt in range(3):  # a free port can be taken before PgBouncer binds it
            self.port = free_port(self.host)
            self._write_config(account)
            # Without a logfile setting it logs to stderr: ours, opened as root.
            with open(self.log_path, "ab") as log:
                self._popen = subprocess.Popen(
                    [self.binary, str(self.dir / "pgbouncer.ini")],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.dir, start_new_session=True, **identity(account),
                )
            try:
                self._wait_ready(time.monotonic() + timeout)
                return
            except PgBouncerError:
                self.stop()
                if attempt == 2 or "Address already in use" not in self._log_tail():
                    raise

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM), SIGKILL if it lingers; clients are disconnected."""
        popen, self._popen = self._popen, None
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(STOP_TIMEOUT)

    def close(self) -> None:
        """Stop and delete the configuration, log and pidfile."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _write_config(self, account: Account | None) -> None:
        s = self.server
        lines = [
            "[databases]",
            f"{s.dbname} = host={s.host} port={s.port} dbname={s.dbname}",
            f"* = host={s.host} port={s.port}",  # any other database, same name
            "",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {self.dir / 'userlist.txt'}",
            f"pidfile = {self.dir / 'pgbouncer.pid'}",
            *(f"{key} = {value}" for key, value in self._settings.items()),
        ]
        files = {"pgbouncer.ini": "\n".join(lines) + "\n",
                 "userlist.txt": f"{_quoted(s.user)} {_quoted(s.password)}\n"}
        for name, text in files.items():
            path = self.dir / name
            path.write_text(text)
            path.chmod(0o600)
            if account is not None:
                os.chown(path, account.uid, account.gid)

    def _wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while True:
            assert self._popen is not None
            code = self._popen.poll()
            if code is not None:
                raise PgBouncerError(f"pgbouncer exited with code {code} while starting:\n"
                                     f"{self._log_tail()}")
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True,
                                     prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise PgBouncerError(f"pgbouncer not serving queries in time ({last}):\n"
                                     f"{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"


def pooled_providers(pooler: PgBouncer, fleet: Fleet) -> dict[str, Any]:
    """A manager's providers with the ``pooled_primary`` fixture: two, not the fleet's three.

    The primary ("supabase") through ``pooler``, declared ``pooler=True``; the
    backup ("railway") reached directly (through its fault proxy).
    """
    return {"supabase": {"url": pooler.url, "pooler": True}, "railway": fleet["railway"].url}

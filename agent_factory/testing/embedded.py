"""Real PostgreSQL servers on loopback, for the demo and the tests.

The ``postgres`` binary is run directly (not through ``pg_ctl``) in a session of its
own, so that we hold the postmaster's pid and can reach all of its processes: that
is what lets ``kill()`` crash every backend at once and ``hang()`` freeze them, the
way a provider outage looks from the client. Binaries come from ``bin_dir``, else
``PG_BIN``, else the ``pgserver`` wheel (``pip install 'agent-factory[embedded]'``).

PostgreSQL refuses to run as root, so under root the server runs as the system user
``agentfactory-pg``, created on first use.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from importlib.util import find_spec
from pathlib import Path
from urllib.parse import quote

import psycopg

from ..errors import EmbeddedPostgresError, PostgresNotFoundError
from .postgres_process import (
    RUN_AS_USER,
    Account,
    ServerProcess,
    all_gone,
    check_platform,
    identity,
    make_traversable,
    reap,
    service_account,
)

__all__ = [
    "RUN_AS_USER",
    "EmbeddedPostgres",
    "find_bin_dir",
    "free_port",
    "pgvector_available",
]

logger = logging.getLogger("agent_factory.testing.embedded")

_HOST = "127.0.0.1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# fsync is off (throwaway data, only a machine crash would lose it), but
# synchronous_commit stays on: an acknowledged commit must survive kill(),
# which is what the demo and the failover tests crash the server with.
_DEFAULT_SETTINGS: Mapping[str, str] = {
    "listen_addresses": _HOST,
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "max_connections": "100",
    "shared_buffers": "32MB",
}
_INSTALL_HINT = (
    "install the 'embedded' extra (pip install 'agent-factory[embedded]') "
    "or set PG_BIN to the bin/ directory of a PostgreSQL installation"
)
# sun_path holds 107 bytes plus NUL on Linux, 103 on macOS and the BSDs;
# PostgreSQL appends "/.s.PGSQL.<port>" (up to 16).
_SOCKET_PATH_MAX = (107 if sys.platform.startswith("linux") else 103) - 16
_STOP_TIMEOUT = 30.0


def find_bin_dir(bin_dir: Path | None = None) -> Path:
    """Return the directory holding ``initdb`` and ``postgres``.

    An explicit choice (argument, then ``PG_BIN``) that is wrong is an error rather
    than a silent fall back, so a typo never runs a different PostgreSQL.
    """
    if bin_dir is not None:
        candidate, origin = Path(bin_dir), "bin_dir"
    elif os.environ.get("PG_BIN"):
        candidate, origin = Path(os.environ["PG_BIN"]), "PG_BIN"
    else:
        # find_spec locates the wheel without importing it (its import has side effects).
        spec = find_spec("pgserver")
        if spec is None or spec.origin is None:
            raise PostgresNotFoundError(f"no PostgreSQL binaries found: {_INSTALL_HINT}")
        candidate, origin = Path(spec.origin).parent / "pginstall" / "bin", "pgserver"
    for program in ("initdb", "postgres"):
        if not (candidate / program).is_file():
            raise PostgresNotFoundError(
                f"no {program} in {candidate} (from {origin}): {_INSTALL_HINT}"
            )
    return candidate


def pgvector_available(bin_dir: Path | None = None) -> bool:
    """Tell whether the installation next to ``bin_dir`` ships the pgvector extension."""
    try:
        bin_dir = find_bin_dir(bin_dir)
    except PostgresNotFoundError:
        return False
    share_dirs = [bin_dir.parent / "share" / "postgresql", bin_dir.parent / "share"]
    pg_config = bin_dir / "pg_config"
    if pg_config.is_file():
        try:
            out = subprocess.run(
                [str(pg_config), "--sharedir"], capture_output=True, text=True, timeout=10
            )
            if out.returncode == 0 and out.stdout.strip():
                share_dirs.append(Path(out.stdout.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    return any((d / "extension" / "vector.control").is_file() for d in share_dirs)


def free_port(host: str = _HOST) -> int:
    """Return a TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class EmbeddedPostgres:
    """One PostgreSQL server on 127.0.0.1 with password (SCRAM) authentication.

    The data directory is ``base_dir/name``; an existing cluster there is reused
    (pass its password). ``is_running()`` stays true while the server is hung.
    """

    def __init__(
        self,
        name: str,
        *,
        port: int | None = None,
        base_dir: Path | None = None,
        bin_dir: Path | None = None,
        password: str | None = None,
        settings: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise ValueError(f"server name must be a simple file name, got {name!r}")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        if password == "":
            raise ValueError("password must not be empty")
        check_platform()
        self.bin_dir = find_bin_dir(bin_dir)  # first: a missing install leaves nothing behind
        self.name = name
        self.host = _HOST
        self.user = "postgres"
        self.dbname = "postgres"
        self.password = password if password is not None else secrets.token_urlsafe(24)
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self._settings = {**_DEFAULT_SETTINGS, **(settings or {})}
        self._env = dict(env or {})  # for the server's processes (e.g. libfaketime)
        if base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="agent-factory-pg-"))
            owned: Path | None = self.base_dir
        else:
            self.base_dir = Path(base_dir)
            owned = None if (self.base_dir / name).exists() else self.base_dir / name
        self.data_dir = self.base_dir / name
        self._process = ServerProcess()
        self._started_once = False
        self._finalizer = weakref.finalize(self, reap, self._process, owned)

    @property
    def url(self) -> str:
        """The connection URL; it contains the password, so never log it."""
        secret = quote(self.password, safe="")
        return f"postgresql://{self.user}:{secret}@{self.host}:{self.port}/{self.dbname}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        popen = self._process.popen
        return popen.pid if popen is not None and self._process.running() else None

    def is_running(self) -> bool:
        return self._process.running()

    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster if needed, start the server, return once it accepts logins."""
        if not self._finalizer.alive:
            raise EmbeddedPostgresError(f"{self.name}: server was closed")
        if self.is_running():
            return
        account = service_account()
        self._prepare(account)
        # An auto-picked port can be taken between picking and binding: pick again.
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._launch(account)
                self._wait_ready(time.monotonic() + timeout)
                break
            except EmbeddedPostgresError as exc:
                if attempt + 1 == attempts or "could not bind" not in str(exc):
                    raise
                self.port = free_port()
        self._started_once = True
        logger.info("%s: PostgreSQL running on %s:%d (pid %s)", self.name, self.host,
                    self.port, self.pid)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are ended, committed data is kept."""
        popen = self._process.popen
        if popen is None or popen.poll() is not None:
            self._process.popen = None
            return
        self.resume()
        popen.send_signal(signal.SIGINT)
        try:
            popen.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.warning("%s: no exit %ss after SIGINT, killing", self.name, _STOP_TIMEOUT)
            self._process.signal_server(signal.SIGKILL)
            popen.wait(_STOP_TIMEOUT)
        self._process.popen = None
        logger.info("%s: stopped", self.name)

    def kill(self) -> None:
        """Crash the server: SIGKILL every process, return once the port refuses."""
        popen = self._process.popen
        if popen is None:
            return
        killed = self._process.signal_server(signal.SIGKILL)
        popen.wait(_STOP_TIMEOUT)
        self._process.popen = None
        self._process.hung = False
        deadline = time.monotonic() + _STOP_TIMEOUT
        while not (all_gone(killed) and self._port_refuses()):
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"{self.name}: still reachable after SIGKILL")
            time.sleep(0.01)
        logger.info("%s: killed", self.name)

    def hang(self) -> None:
        """Freeze every process (SIGSTOP): the kernel still accepts TCP, nobody answers."""
        if not self.is_running():
            raise EmbeddedPostgresError(f"{self.name}: cannot hang a server that is not running")
        self._process.signal_server(signal.SIGSTOP)
        self._process.hung = True
        logger.info("%s: hung", self.name)

    def resume(self) -> None:
        """Undo ``hang()``; a no-op when the server is not hung."""
        if self._process.hung:
            self._process.signal_server(signal.SIGCONT)
            self._process.hung = False
            logger.info("%s: resumed", self.name)

    def restart(self) -> None:
        """Start again on the same port and data; after ``kill()`` this runs crash recovery."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete the data directory if this object created it."""
        if self.is_running():
            self.stop()
        self._finalizer()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "hung" if self._process.hung else "running" if self.is_running() else "stopped"
        return f"EmbeddedPostgres(name={self.name!r}, port={self.port}, state={state})"

    def _child_env(self) -> dict[str, str]:
        # PG* variables of the caller (PGDATA, PGPORT...) must not steer our servers.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.update(self._env)
        return env

    def _prepare(self, account: Account | None) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if account is not None:
            os.chown(self.data_dir, account.uid, account.gid)
            make_traversable(self.base_dir, account)
            make_traversable(self.bin_dir, account)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(account)
        self._socket_dir.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            os.chown(self._socket_dir, account.uid, account.gid)

    @property
    def _socket_dir(self) -> Path:
        return self.data_dir / "sockets"

    def _initdb(self, account: Account | None) -> None:
        fd, pwfile = tempfile.mkstemp(prefix=".pwfile-", dir=self.base_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.password + "\n")
            if account is not None:
                os.chown(pwfile, account.uid, account.gid)
            cmd = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
                   "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                   "--no-locale", "--no-sync", "--no-instructions"]
            logger.info("%s: initdb in %s", self.name, self.data_dir)
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=300, cwd=self.data_dir,
                env=self._child_env(), **identity(account),
            )
        finally:
            os.unlink(pwfile)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
            raise EmbeddedPostgresError(f"{self.name}: initdb failed:\n{output}")

    def _launch(self, account: Account | None) -> None:
        socket_dir = str(self._socket_dir)
        if len(socket_dir) > _SOCKET_PATH_MAX:
            socket_dir = ""  # too long for a Unix socket: TCP only
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-h", self.host, "-k", socket_dir]
        for key, value in self._settings.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._process.popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.data_dir, env=self._child_env(), start_new_session=True,
                **identity(account),
            )

    def _wait_ready(self, deadline: float) -> None:
        popen = self._process.popen
        assert popen is not None
        while True:
            code = popen.poll()
            if code is not None:
                self._process.popen = None
                raise EmbeddedPostgresError(
                    f"{self.name}: postgres exited with code {code} while starting; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                last = exc
            if time.monotonic() > deadline:
                self._process.signal_server(signal.SIGKILL)
                popen.wait(_STOP_TIMEOUT)
                self._process.popen = None
                raise EmbeddedPostgresError(
                    f"{self.name}: not accepting connections in time ({last}); "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def _port_refuses(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

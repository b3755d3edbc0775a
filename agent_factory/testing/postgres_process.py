"""The processes of an embedded PostgreSQL server, and the account they run as.

The postmaster runs in a session of its own and each backend calls setsid(), so its
children are found by parent pid, from /proc or else from ``ps``. Under root the
server runs as the system user ``agentfactory-pg``, created on first use, and every
directory on the way to its files must let that user through.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from ..errors import EmbeddedPostgresError

__all__ = [
    "RUN_AS_USER",
    "Account",
    "Identity",
    "ServerProcess",
    "all_gone",
    "check_platform",
    "identity",
    "make_traversable",
    "process_table",
    "reap",
    "service_account",
]

# The embedded server's logger: these messages are part of its story.
logger = logging.getLogger("agent_factory.testing.embedded")

RUN_AS_USER = "agentfactory-pg"
_account_lock = threading.Lock()  # useradd must not race with itself


def check_platform(platform: str | None = None) -> None:
    """Refuse, saying what is needed, where the servers cannot be run and faulted.

    Crashing and freezing a server (SIGKILL, SIGSTOP to its process group)
    and dropping root need POSIX; Windows has none of them. ``platform``
    defaults to ``sys.platform``.
    """
    platform = platform or sys.platform
    if platform.startswith(("win", "cygwin", "msys")):
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL servers (demo, dashboard --demo, test fleet) need a POSIX "
            "system, Linux or macOS: they crash and freeze servers with POSIX signals "
            f"(this is {platform}). Run them under WSL 2, or point the library and "
            "'agent-factory-db health' at a PostgreSQL server of your own"
        )


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int


def service_account() -> Account | None:
    """Return the unprivileged account to run as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    import pwd  # POSIX only: importing it at the top broke the whole CLI on Windows

    with _account_lock:
        try:
            entry = pwd.getpwnam(RUN_AS_USER)
        except KeyError:
            logger.info("running as root: creating system user %s for PostgreSQL", RUN_AS_USER)
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            cmd = [useradd, "--system", "--user-group", "--no-create-home",
                   "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", RUN_AS_USER]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
                detail = result.stderr.strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                detail = str(exc)
            try:  # another process may have created it concurrently
                entry = pwd.getpwnam(RUN_AS_USER)
            except KeyError:
                raise EmbeddedPostgresError(
                    f"PostgreSQL refuses to run as root and creating the system user "
                    f"{RUN_AS_USER} failed: {detail}; create it or run as another user"
                ) from None
    return Account(entry.pw_uid, entry.pw_gid)


def make_traversable(path: Path, account: Account) -> None:
    """Let ``account`` reach ``path``: add o+x to the directories that block it, only."""
    resolved = path.resolve()
    for directory in [*reversed(resolved.parents), resolved]:
        st = directory.stat()
        if st.st_uid == account.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == account.gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            logger.info("adding o+x to %s so %s can reach PostgreSQL files", directory, RUN_AS_USER)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def process_table() -> dict[int, tuple[str, int]]:
    """Map pid to (state, parent pid), from /proc or else from ps."""
    table: dict[int, tuple[str, int]] = {}
    if os.path.isdir("/proc"):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            table[int(name)] = (fields[0], int(fields[1]))
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "stat=", "-o", "ppid="],
                         capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
        pid, state, ppid = line.split()
        table[int(pid)] = (state[0], int(ppid))
    return table


def _wait_stopped(pid: int) -> None:
    """Wait (briefly) until SIGSTOP took effect: only then can it no longer fork."""
    deadline = time.monotonic() + 2.0
    while process_table().get(pid, ("T", 0))[0] not in ("T", "Z", "X"):
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)


@dataclass
class ServerProcess:
    """What the finalizer needs: kept apart from EmbeddedPostgres so it can be collected."""

    popen: subprocess.Popen[bytes] | None = None
    hung: bool = False

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal_server(self, sig: signal.Signals) -> list[int]:
        """Signal the postmaster and every child; return the pids signalled.

        Each backend calls setsid() when forked, so the postmaster's process group
        holds only the postmaster: its children are found by parent pid instead.
        The postmaster is frozen first so that it cannot fork while we look.
        """
        if self.popen is None:
            return []
        postmaster = self.popen.pid
        if sig != signal.SIGCONT:
            with contextlib.suppress(ProcessLookupError):
                os.kill(postmaster, signal.SIGSTOP)
            _wait_stopped(postmaster)
        children = [pid for pid, (_, ppid) in process_table().items() if ppid == postmaster]
        for pid in [*children, postmaster]:
            # The group catches what a backend spawned (archive_command, COPY PROGRAM).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return [postmaster, *children]


def reap(process: ServerProcess, remove: Path | None) -> None:
    """Last-resort cleanup (close() or interpreter exit): never leave a server behind."""
    if process.popen is not None:
        process.signal_server(signal.SIGKILL)
        try:
            process.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.warning("postgres pid %d did not exit after SIGKILL", process.popen.pid)
        process.popen = None
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


def all_gone(pids: list[int]) -> bool:
    """True when none of ``pids`` is alive; zombies count as gone.

    pid 1 of a container may never reap orphaned backends, and a zombie holds no
    shared memory that would stop the next postmaster from starting.
    """
    table = process_table()
    return all(table.get(pid, ("X", 0))[0] in ("Z", "X") for pid in pids)


class Identity(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def identity(account: Account | None) -> Identity:
    """Process identity arguments: drop root, including its supplementary groups."""
    if account is None:
        return Identity(user=None, group=None, extra_groups=None)
    return Identity(user=account.uid, group=account.gid, extra_groups=[])

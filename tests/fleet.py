"""Test-only helpers around the fleet of `agent_factory.testing.fleet`.

The fleet itself (``Fleet``, ``Member``, ``start_fleet``, ``PROVIDERS``) lives in the
package, shared with the benchmarks, the demo and the examples; import it from there.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from agent_factory.testing.fleet import Member

T = TypeVar("T")

__all__ = ["local_port", "postgres_under", "read_only_server", "run_concurrently",
           "wait_until"]


def local_port(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> int:
    """The client-side port of ``conn`` (what `FaultProxy.blackhole_client` takes)."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return int(sock.getsockname()[1])


def postgres_under(path: Path) -> list[int]:
    """Live (non-zombie) processes whose working directory is under ``path``.

    PostgreSQL processes run in their data directory, so this finds the
    servers started there and no one else's (Linux: it reads ``/proc``).
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cwd = os.readlink(entry / "cwd")
        except (OSError, IndexError):
            continue  # gone, a zombie, or not ours to read
        if state not in ("Z", "X") and cwd.startswith(str(path)):
            found.append(int(entry.name))
    return found


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> None:
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def run_concurrently(target: Callable[[str], object], names: Iterable[str],
                     timeout: float) -> list[BaseException]:
    """Run ``target(name)`` for every name at once, a thread each; return what they raised.

    Each thread is waited for up to ``timeout`` seconds; one still running then fails the test.
    """
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            target(name)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"still running after {timeout}s"
    return errors


@contextmanager
def read_only_server(member: Member) -> Iterator[None]:
    """``member``'s server refuses writes (a demoted primary), until the block ends."""

    def setting(value: str) -> None:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            conn.execute("SELECT pg_reload_conf()")
        # The reload is asynchronous: once a new session sees the value, the
        # postmaster has reloaded and signalled the running sessions too.
        wait_until(lambda: seen() == value, timeout=10,
                   message=f"default_transaction_read_only = {value} in force")

    def seen() -> str:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
        return "" if row is None else str(row[0])

    setting("on")
    try:
        yield
    finally:
        member.heal()
        setting("off")


def until_accepted(call: Callable[[], T], timeout: float = 15.0) -> T:
    """``call()``, retried while the split-brain fence refuses it (right after a crash,
    until the primary's heartbeat has stood still on the backup for witness_quiet)."""
    from agent_factory.errors import SplitBrainRefusedError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except SplitBrainRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)

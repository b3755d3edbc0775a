"""The watchdog: what counts as news for a call, and firing atomic with the call's end."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import Any

import psycopg
import pytest
from fleet import wait_until
from psycopg.conninfo import make_conninfo

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.provider import DatabaseProvider
from agent_factory.engine.settings import Settings
from agent_factory.engine.watchdog import (
    TRANSPORT_EVIDENCE,
    Watch,
    Watchdog,
    _shutdown,
    answer_waiting,
    tcp_progress,
    vouches,
)
from agent_factory.testing.fleet import Fleet

# -- what a probe's view of a call's server process means (no I/O) -------------------


@pytest.mark.parametrize(
    ("state", "idle_for", "waited", "present", "news"),
    [
        ("active", 0.1, 3.0, True, True),  # running: a long statement
        ("active", 9.0, 0.6, True, True),  # waiting on a lock: still "active"
        ("fastpath function call", 1.0, 0.6, True, True),
        ("idle in transaction", 0.2, 0.6, True, False),  # answered after the call was sent
        ("idle", 0.2, 0.6, True, False),
        ("idle in transaction (aborted)", 0.1, 0.6, True, False),
        (None, None, 0.6, True, True),  # another role's session: the server's liveness
        ("idle", None, 0.6, True, True),
        (None, None, 0.6, False, False),  # gone from pg_stat_activity
        ("active", 0.1, 0.6, False, False),
    ],
)
@pytest.mark.parametrize("counted", [True, False])
def test_vouches(state: str | None, idle_for: float | None, waited: float, present: bool,
                 news: bool, counted: bool) -> None:
    assert vouches(state, idle_for, waited, present, counted) is news


def test_request_not_arrived_is_decided_by_the_socket_where_it_can_be() -> None:
    """Idle since before the call was sent: the socket's counters decide, where there are any."""
    assert vouches("idle", 5.0, 0.6, True, counted=True) is False
    assert vouches("idle in transaction", 0.61, 0.6, True, counted=True) is False
    assert vouches("idle", 5.0, 0.6, True, counted=False) is True


@pytest.mark.skipif(not TRANSPORT_EVIDENCE, reason="TCP_INFO counters are Linux-only")
def test_tcp_progress_counts_bytes_acked_and_received() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            before = tcp_progress(client.fileno())
            assert before is not None
            client.sendall(b"x" * 5000)
            assert peer.recv(10000)
            peer.sendall(b"y" * 300)
            assert client.recv(1000) == b"y" * 300
            wait_until(lambda: tcp_progress(client.fileno()) == before + 5300, timeout=5,
                       message="5,000 bytes acknowledged and 300 received")
    assert tcp_progress(-1) is None


# -- the shutdown goes through a socket object, not a descriptor -------------------


class _Silent:
    """A provider whose server never answers: no news, no probes."""

    name = "silent"
    last_alive = 0.0
    hang_timeout = 1000.0
    tracks_backends = False

    def request_probe(self, watch: Watch | None = None) -> None:
        pass


def _blocked_recv(sock: socket.socket) -> tuple[threading.Thread, list[bytes]]:
    """A thread blocked reading ``sock``, as a call waits for a server that never answers."""
    got: list[bytes] = []
    thread = threading.Thread(target=lambda: got.append(sock.recv(1)), daemon=True)
    thread.start()
    return thread, got


def test_shutdown_interrupts_the_call_and_leaves_the_socket_to_its_owner() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            thread, got = _blocked_recv(client)
            assert _shutdown(client.fileno(), "p") is True
            thread.join(timeout=10)
            assert not thread.is_alive() and got == [b""]  # the blocked read ended
            assert peer.recv(1) == b""  # the server side sees the connection end
            # Borrowed, not closed: libpq still owns the handle and closes it itself.
            assert client.fileno() >= 0 and client.getsockname()


def test_the_watchdog_interrupts_where_a_socket_handle_is_no_descriptor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Windows' path (CI has none): ``os.dup`` refuses a Winsock handle, as it does here now.

    The watchdog used to dup the handle and, when that failed, return without
    a word: hang detection silently did nothing.
    """

    def no_dup(fd: int) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(os, "dup", no_dup)
    watchdog = Watchdog(probe_after=1000.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            thread, got = _blocked_recv(client)
            try:
                w = watchdog.watch(client.fileno(), _Silent(), hard_deadline=watchdog.clock())
                thread.join(timeout=10)
            finally:
                watchdog.close()
            assert not thread.is_alive() and got == [b""]
            assert w.fired


class _Slow(_Silent):
    name = "slow"
    hang_timeout = 0.3


@pytest.mark.parametrize("hard", [True, False], ids=["probe", "call"])
def test_an_answer_waiting_unread_is_no_hang(hard: bool) -> None:
    """A starved caller: the server answered, the caller's thread has not read it yet.

    On a busy machine a thread of a process with many threads can wait seconds
    for its turn; the deadline passing then is the caller's delay, not the
    server's. The watchdog gives the call one more hang_timeout; a caller that
    still has not read by then is cut.
    """
    watchdog = Watchdog(probe_after=1000.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            peer.sendall(b"answer")  # answered; nobody reads it
            wait_until(lambda: answer_waiting(client.fileno()), timeout=5,
                       message="the answer in the client's receive buffer")
            target = _Slow()
            now = watchdog.clock()
            try:
                w = watchdog.watch(client.fileno(), target,
                                   hard_deadline=now + 0.2 if hard else None)
                if not hard:
                    w.started = now - 1.0  # silent since before its deadline
                wait_until(lambda: w.extended, timeout=10, message="the deadline moved")
                assert not w.fired
                assert client.recv(100) == b"answer"  # the connection is intact
                # The caller read it; a second silence is a hang like any other.
                wait_until(lambda: w.fired, timeout=10, message="the call cut at last")
                assert client.recv(1) == b""
            finally:
                watchdog.close()


def test_a_shutdown_that_cannot_be_done_is_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read, write = os.pipe()
    try:
        with caplog.at_level(logging.ERROR, logger="agent_factory"):
            assert _shutdown(read, "neon") is False  # a pipe: not a socket
            assert _shutdown(-1, "neon") is False
        assert caplog.text.count("'neon': could not shut down the socket") == 2
        os.fstat(read)  # still open: the handle was only borrowed
    finally:
        os.close(read)
        os.close(write)


# -- firing is atomic with the call's end -------------------------------------------


def test_a_call_that_ends_while_it_is_being_abandoned_never_cuts_the_next_user(
    healthy_fleet: Fleet,
) -> None:
    """The decision to abandon, then (delayed) the shutdown, while the call completes meanwhile.

    Before the fix, the call released its connection to the pool during the
    delay and the shutdown cut the *next* caller's statement on it. Now the
    call cannot release its connection until the shutdown is done: the next
    caller gets a fresh connection.
    """
    offset = [0.0]
    watchdog = Watchdog(probe_after=1000.0, clock=lambda: time.monotonic() + offset[0])
    url = healthy_fleet["supabase"].direct_url
    settings = Settings.build({"p": url}, pool_min_size=1, pool_max_size=1,
                              monitor_interval=0, checkout_timeout=10.0)
    provider = DatabaseProvider("p", url, settings=settings, watchdog=watchdog)
    first_done = threading.Event()
    results: dict[str, Any] = {}

    def call(key: str, query: str, done: threading.Event | None = None) -> None:
        try:
            results[key] = provider.execute_query(query, fetch_mode="one")
        except Exception as exc:  # noqa: BLE001 - inspected below
            results[key] = exc
        if done is not None:
            done.set()

    def delayed_shutdown(w: Watch) -> None:
        # The server answers the first call meanwhile; then give the next caller
        # every chance to start on the same connection (it cannot, now).
        wait_until(lambda: not running(url, "SELECT 1 FROM"), timeout=10,
                   message="the first call answered")
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not running(url, "SELECT 2 FROM"):
            time.sleep(0.02)

    watchdog.before_shutdown = delayed_shutdown
    try:
        first = threading.Thread(target=call, args=("first", "SELECT 1 FROM pg_sleep(0.5)",
                                                    first_done))
        first.start()
        wait_until(lambda: watchdog._watches, timeout=10, message="the first call watched")
        second = threading.Thread(target=call, args=("second", "SELECT 2 FROM pg_sleep(0.3)"))
        second.start()
        offset[0] = 100.0  # the first call's deadline has passed
        first.join(timeout=20)
        second.join(timeout=20)
        assert not first.is_alive() and not second.is_alive()
        assert results["first"] == (1,), results  # it completed: its answer is kept
        assert results["second"] == (2,), results  # never cut
    finally:
        provider.close()
        watchdog.close()


def running(url: str, text: str) -> bool:
    """A statement containing ``text`` runs on the server (the next caller's, if it started)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                           "AND pid <> pg_backend_pid() AND position(%s in query) > 0",
                           (text,)).fetchone()
    return row is not None and row[0] > 0


# -- what is no proof of life -------------------------------------------------------


def test_an_answer_with_an_error_is_no_proof_that_the_database_lives(
    healthy_fleet: Fleet,
) -> None:
    """A refused login carries a SQLSTATE, like a pooler's own errors: liveness is not refreshed.

    Behind a pooler such an answer ("server login has been failing") comes
    from the pooler while the database behind it is dead or hung; only a
    query that completed proves the database alive.
    """
    url = make_conninfo(healthy_fleet["supabase"].direct_url, dbname="no_such_database")
    settings = Settings.build({"p": url}, monitor_interval=0, pool_min_size=0)
    provider = DatabaseProvider("p", url, settings=settings)
    try:
        assert provider.health.probe() is False
        assert provider.health.last_error is not None
        assert "does not exist" in provider.health.last_error
        assert provider.health.last_alive == 0.0
    finally:
        provider.close()


def test_waiting_for_notifications_is_not_a_call(healthy_fleet: Fleet) -> None:
    """A LISTEN waiting three hang_timeouts for notifications that do not come is not abandoned."""
    url = healthy_fleet["supabase"].url
    with DatabaseManager({"supabase": url}, hang_timeout=1.0, probe_interval=0.1) as db:
        with db.transaction() as conn:
            conn.execute("LISTEN agent_factory_quiet")
            t0 = time.monotonic()
            assert list(conn.notifies(timeout=3.0)) == []
            assert time.monotonic() - t0 >= 2.9
            assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = db.get_provider_stats()["supabase"]
        assert stats["healthy"] is True and stats["errors"] == 0

"""FaultProxy against a real PostgreSQL server: every fault is a real socket event."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from chaos import run_in_thread
from fleet import local_port, wait_until

from agent_factory.testing.embedded import EmbeddedPostgres
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet


@pytest.fixture
def server(healthy_fleet: Fleet) -> EmbeddedPostgres:
    return healthy_fleet["supabase"].server


@pytest.fixture
def proxy(server: EmbeddedPostgres) -> Iterator[FaultProxy]:
    """A private proxy, so mode changes never leak into the fleet's own proxies."""
    with FaultProxy(server.host, server.port) as fresh:
        yield fresh


def round_trip(conn: psycopg.Connection[tuple[object, ...]]) -> float:
    started = time.monotonic()
    conn.execute("SELECT 1").fetchone()
    return time.monotonic() - started


def test_pass_forwards_queries_and_counts_connections(
    proxy: FaultProxy, server: EmbeddedPostgres
) -> None:
    assert proxy.mode == "pass" and proxy.connection_count == 0
    with psycopg.connect(proxy.url_for(server.url), connect_timeout=5) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (server.port,)
        assert proxy.connection_count == 1
    wait_until(lambda: proxy.connection_count == 0, message="the link to close")


def test_latency_delays_each_direction_and_keeps_order(
    proxy: FaultProxy, server: EmbeddedPostgres
) -> None:
    latency = 0.15
    with psycopg.connect(proxy.url_for(server.url), autocommit=True) as conn:
        proxy.set_latency(latency)
        assert round_trip(conn) >= 2 * latency  # request and answer are each delayed
        # Several megabytes arrive as many chunks; any reordering breaks the digest.
        big = conn.execute("SELECT repeat(md5(g::text), 1000) FROM generate_series(1, 100) g")
        received = hashlib.md5("".join(row[0] for row in big.fetchall()).encode()).hexdigest()
        expected = conn.execute(
            "SELECT md5(string_agg(repeat(md5(g::text), 1000), '' ORDER BY g))"
            " FROM generate_series(1, 100) g"
        ).fetchone()
        assert expected == (received,)
        proxy.set_latency(0)
        assert proxy.latency == 0 and conn.execute("SELECT 1").fetchone() == (1,)


class Peer:
    """A raw TCP server for one connection: ``echo`` sends back what it gets, else it sinks.

    ``received`` counts the bytes it read, so a test sees what crossed the proxy.
    """

    def __init__(self, echo: bool) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.received = 0
        self._echo = echo
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn, self._listener:
            try:
                while data := conn.recv(1 << 20):
                    self.received += len(data)
                    if self._echo:
                        conn.sendall(data)
            except OSError:
                pass

    def join(self) -> None:
        self._thread.join(5)


@pytest.fixture
def peer_proxy() -> Iterator[Callable[[bool], tuple[Peer, FaultProxy]]]:
    made: list[tuple[Peer, FaultProxy]] = []

    def make(echo: bool) -> tuple[Peer, FaultProxy]:
        peer = Peer(echo)
        proxy = FaultProxy("127.0.0.1", peer.port)
        proxy.start()
        made.append((peer, proxy))
        return peer, proxy

    yield make
    for peer, proxy in made:
        proxy.close()
        peer.join()


def test_rate_limits_each_direction_and_keeps_bytes_intact(
    peer_proxy: Callable[[bool], tuple[Peer, FaultProxy]],
) -> None:
    _, proxy = peer_proxy(True)
    proxy.set_rate(1_000_000)
    assert proxy.rate == 1_000_000.0
    payload = os.urandom(2_000_000)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        started = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        echoed = bytearray()
        while len(echoed) < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk, "the echo ended early"
            echoed += chunk
        elapsed = time.monotonic() - started
        sender.join(5)
    # Both directions run at 1 MB/s side by side: 2 MB each way take about 2 s.
    assert 1.5 <= elapsed < 6, elapsed
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_throttled_sender_is_held_back_until_the_rate_is_lifted(
    peer_proxy: Callable[[bool], tuple[Peer, FaultProxy]],
) -> None:
    peer, proxy = peer_proxy(False)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        # A small send buffer of our own: what the sender got rid of is then
        # (nearly) what the proxy took from it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        wait_until(lambda: proxy.connection_count == 1, message="the link to open")
        proxy.set_rate(200_000)  # an open link is throttled too
        sock.setblocking(False)
        accepted = 0
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            try:
                accepted += sock.send(b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.005)
        assert 100_000 <= peer.received <= 400_000, peer.received
        # Without backpressure the proxy would have swallowed megabytes by now.
        assert accepted - peer.received < 512 * 1024, (accepted, peer.received)
        proxy.set_rate(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        sock.setblocking(True)
        lifted = time.monotonic()
        sock.sendall(b"y" * 2_000_000)  # 10 s at the old rate
        total = accepted + 2_000_000
        wait_until(lambda: peer.received == total, timeout=5, message="every byte to arrive")
        assert time.monotonic() - lifted < 2


def test_rate_and_latency_together(proxy: FaultProxy, server: EmbeddedPostgres) -> None:
    latency = 0.05
    with psycopg.connect(proxy.url_for(server.url), autocommit=True) as conn:
        proxy.set_latency(latency)
        proxy.set_rate(1_000_000)
        assert round_trip(conn) >= 2 * latency
        started = time.monotonic()
        (text,) = conn.execute("SELECT repeat(md5('a'), 62500)").fetchall()[0]
        elapsed = time.monotonic() - started
        assert text == hashlib.md5(b"a").hexdigest() * 62500
        assert elapsed >= 1.5, elapsed  # 2 MB at 1 MB/s
        proxy.set_rate(None)
        assert proxy.rate is None and round_trip(conn) < 1


def test_blackhole_accepts_and_never_answers(proxy: FaultProxy, server: EmbeddedPostgres) -> None:
    proxied = proxy.url_for(server.url)
    before = psycopg.connect(proxied, autocommit=True)
    proxy.set_mode("blackhole")
    worker, answer = run_in_thread(lambda: before.execute("SELECT 1").fetchone())
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxied, connect_timeout=2)
        assert time.monotonic() - started >= 1.5, "blackhole must time out, not refuse"
        with socket.create_connection((proxy.host, proxy.port), timeout=2) as raw:
            raw.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest: never answered
            raw.settimeout(0.3)
            with pytest.raises(socket.timeout):
                raw.recv(1)
        assert worker.is_alive() and not answer
        with psycopg.connect(server.url, connect_timeout=5) as direct:
            assert direct.execute("SELECT 1").fetchone() == (1,)
    finally:
        proxy.set_mode("reset")  # frees the stuck query
        worker.join(5)
        before.close()
    assert "result" not in answer
    assert isinstance(answer.get("error"), psycopg.OperationalError), answer
    proxy.set_mode("pass")
    with psycopg.connect(proxied, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_blackhole_client_silences_one_connection_only(
    proxy: FaultProxy, server: EmbeddedPostgres
) -> None:
    proxied = proxy.url_for(server.url)
    victim = psycopg.connect(proxied, autocommit=True)
    other = psycopg.connect(proxied, autocommit=True)
    proxy.blackhole_client(local_port(victim))
    worker, answer = run_in_thread(lambda: victim.execute("SELECT 1").fetchone())
    try:
        assert proxy.mode == "pass"
        worker.join(0.5)
        assert worker.is_alive() and not answer  # its bytes are dropped
        assert other.execute("SELECT 2").fetchone() == (2,)  # the others flow
        with psycopg.connect(proxied, connect_timeout=5) as fresh:  # and new ones
            assert fresh.execute("SELECT 3").fetchone() == (3,)
        with pytest.raises(ValueError, match="no open connection from client port 1"):
            proxy.blackhole_client(1)
    finally:
        proxy.set_mode("reset")  # frees the stuck query
        worker.join(5)
        victim.close()
        other.close()
    assert not worker.is_alive() and "result" not in answer
    assert isinstance(answer.get("error"), psycopg.OperationalError), answer


def test_reset_breaks_open_connections_at_once(
    proxy: FaultProxy, server: EmbeddedPostgres
) -> None:
    conn = psycopg.connect(proxy.url_for(server.url), autocommit=True)
    try:
        proxy.set_mode("reset")
        assert proxy.connection_count == 0
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.url_for(server.url), connect_timeout=10)
        assert time.monotonic() - started < 5
    finally:
        conn.close()
    proxy.set_mode("pass")
    with psycopg.connect(proxy.url_for(server.url), connect_timeout=5) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_refuse_stops_listening_and_pass_listens_again(
    proxy: FaultProxy, server: EmbeddedPostgres
) -> None:
    port = proxy.port
    conn = psycopg.connect(proxy.url_for(server.url), autocommit=True)
    try:
        proxy.set_mode("refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, port), timeout=2)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="refused"):
            psycopg.connect(proxy.url_for(server.url), connect_timeout=10)
        assert time.monotonic() - started < 5
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    proxy.set_mode("pass")
    assert proxy.port == port
    with psycopg.connect(proxy.url_for(server.url), connect_timeout=5) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_close_is_prompt_with_busy_connections(server: EmbeddedPostgres) -> None:
    proxy = FaultProxy(server.host, server.port)
    proxy.start()
    name = f"faultproxy-{proxy.port}-"
    live = psycopg.connect(proxy.url_for(server.url), autocommit=True)
    proxy.set_latency(5.0)
    proxy.set_mode("blackhole")
    silent = socket.create_connection((proxy.host, proxy.port), timeout=2)
    wait_until(lambda: proxy.connection_count == 2, message="both connections accepted")
    started = time.monotonic()
    proxy.close()
    assert time.monotonic() - started < 3
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(name)],
               timeout=5, message="the proxy's threads to end")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=2)
    live.close()
    silent.close()


def test_url_for_replaces_only_host_and_port(proxy: FaultProxy) -> None:
    url = "postgresql://user:p%40ss@db.example.com:6543/app?sslmode=disable"
    assert proxy.url_for(url) == (
        f"postgresql://user:p%40ss@127.0.0.1:{proxy.port}/app?sslmode=disable"
    )
    assert proxy.url_for("postgres://[::1]:5432/x") == f"postgres://127.0.0.1:{proxy.port}/x"
    with pytest.raises(ValueError):
        proxy.url_for("mysql://h:1/x")


def test_bad_arguments_are_rejected(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        proxy.set_mode("flaky")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        proxy.set_latency(-1)
    for rate in (0, -5, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            proxy.set_rate(rate)
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1", 0)

"""Three real PostgreSQL "providers", each behind a fault proxy, for the tests.

Tests reach a provider through ``fleet[name].url`` (the proxy, where network faults
are injected) and break the server itself through ``fleet[name].server``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg

from agent_factory.testing.embedded import EmbeddedPostgres
from agent_factory.testing.faultproxy import FaultProxy

PROVIDERS = ("supabase", "railway", "neon")
START_TIMEOUT = 60.0  # three initdb runs share two cores on CI


def local_port(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> int:
    """The client-side port of ``conn`` (what `FaultProxy.blackhole_client` takes)."""
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return int(sock.getsockname()[1])


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


def can_connect(url: str, timeout: int = 2) -> bool:
    """True when a login and a query succeed within ``timeout`` seconds (libpq min: 2)."""
    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@dataclass
class Member:
    """One provider: its server and the proxy the clients go through."""

    name: str
    server: EmbeddedPostgres
    proxy: FaultProxy

    @property
    def url(self) -> str:
        return self.proxy.url_for(self.server.url)

    @property
    def direct_url(self) -> str:
        return self.server.url

    def release_faults(self) -> None:
        """Undo every fault without waiting: resume, forward, no latency, no rate limit."""
        self.server.resume()
        self.proxy.set_mode("pass")
        self.proxy.set_latency(0)
        self.proxy.set_rate(None)

    def heal(self) -> None:
        self.release_faults()
        if not self.server.is_running():
            self.server.start(START_TIMEOUT)


class Fleet:
    """The providers in a fixed order; ``fleet["neon"]`` is a :class:`Member`."""

    def __init__(self, members: Sequence[Member]) -> None:
        self._members = {member.name: member for member in members}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    def __getitem__(self, name: str) -> Member:
        return self._members[name]

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def __len__(self) -> int:
        return len(self._members)

    def urls(self) -> dict[str, str]:
        """Proxied URLs by provider name, in fleet order."""
        return {member.name: member.url for member in self}

    def heal(self, timeout: float = 30.0) -> None:
        """Bring every provider back and wait until each answers through its proxy."""
        for member in self:
            member.heal()
        for member in self:
            wait_until(partial(can_connect, member.url), timeout,
                       message=f"{member.name} to answer through its proxy")

    def release_faults(self) -> None:
        for member in self:
            member.release_faults()

    def close(self) -> None:
        for member in self:
            member.proxy.close()
            member.server.close()


def start_fleet(names: Sequence[str] = PROVIDERS) -> Fleet:
    """Start one server per name (in parallel: initdb dominates) and front each with a proxy."""
    servers = [EmbeddedPostgres(name) for name in names]
    try:
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda server: server.start(START_TIMEOUT), servers))
    except BaseException:
        for server in servers:
            server.close()
        raise
    members = []
    for server in servers:
        proxy = FaultProxy(server.host, server.port)
        proxy.start()
        members.append(Member(server.name, server, proxy))
    return Fleet(members)


@contextmanager
def read_only_server(member: Member) -> Iterator[None]:
    """``member``'s server refuses writes (a demoted primary), until the block ends."""

    def setting(value: str) -> None:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            conn.execute("SELECT pg_reload_conf()")

    setting("on")
    try:
        yield
    finally:
        member.heal()
        setting("off")

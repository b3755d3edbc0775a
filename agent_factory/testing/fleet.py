"""Several embedded PostgreSQL "providers" started together: the one fleet helper.

The tests, the benchmarks, the demo, the dashboard demo and the examples all
start their servers with `start_fleet()`: one `EmbeddedPostgres` per provider
name, each fronted (unless ``proxy=False``) by a `FaultProxy`. Clients reach a
provider through ``fleet[name].url`` (the proxy, where network faults are
injected); ``fleet[name].server`` is the server itself, to crash or freeze.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

from ..errors import EmbeddedPostgresError
from .embedded import EmbeddedPostgres
from .faultproxy import FaultProxy

__all__ = ["PROVIDERS", "START_TIMEOUT", "Fleet", "Member", "can_connect", "start_fleet"]

#: The providers of the spec, primary first: the one place their names are written.
PROVIDERS: tuple[str, ...] = ("supabase", "railway", "neon")
#: Seconds for a server to accept logins once launched (three share two cores on CI).
START_TIMEOUT = 60.0
_POLL = 0.02


def can_connect(url: str, timeout: int = 2) -> bool:
    """True when a login and a query succeed within ``timeout`` seconds (libpq min: 2)."""
    try:
        with psycopg.connect(url, connect_timeout=timeout, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


class Member:
    """One provider: its server and, when the fleet has them, the proxy in front of it."""

    def __init__(self, name: str, server: EmbeddedPostgres,
                 proxy: FaultProxy | None = None) -> None:
        self.name = name
        self.server = server
        self._proxy = proxy

    @property
    def proxy(self) -> FaultProxy:
        if self._proxy is None:
            raise EmbeddedPostgresError(f"{self.name}: no fault proxy (started with proxy=False)")
        return self._proxy

    @property
    def url(self) -> str:
        """How clients reach the provider: through the proxy if there is one."""
        if self._proxy is None:
            return self.server.url
        return self._proxy.url_for(self.server.url)

    @property
    def direct_url(self) -> str:
        return self.server.url

    def release_faults(self) -> None:
        """Undo every fault without waiting: resume, forward, no latency, no rate limit."""
        self.server.resume()
        if self._proxy is not None:
            self._proxy.set_mode("pass")
            self._proxy.set_latency(0)
            self._proxy.set_rate(None)

    def heal(self) -> None:
        """Undo every fault and start the server again if it is down."""
        self.release_faults()
        if not self.server.is_running():
            self.server.start(START_TIMEOUT)

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
        self.server.close()

    def __repr__(self) -> str:
        return f"Member(name={self.name!r}, server={self.server!r}, proxy={self._proxy!r})"


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
        """Client URLs (proxied when there are proxies) by provider name, in fleet order."""
        return {member.name: member.url for member in self}

    def port_names(self) -> dict[int, str]:
        """Provider name by server port (what ``inet_server_port()`` answers)."""
        return {member.server.port: member.name for member in self}

    def heal(self, timeout: float = 30.0) -> None:
        """Bring every provider back and wait until each answers at its client URL."""
        for member in self:
            member.heal()
        for member in self:
            deadline = time.monotonic() + timeout
            while not can_connect(member.url):
                if time.monotonic() >= deadline:
                    raise EmbeddedPostgresError(
                        f"{member.name}: not answering at its client URL after {timeout:g}s")
                time.sleep(_POLL)

    def release_faults(self) -> None:
        for member in self:
            member.release_faults()

    def close(self, on_error: Callable[[str, Exception], None] | None = None) -> None:
        """Stop every proxy and server and delete their data.

        A member that fails to close does not stop the others: its error goes to
        ``on_error(name, exc)``, or without one the first error is raised at the end
        (a server left running is killed by its finalizer at exit anyway).
        """
        first: Exception | None = None
        for member in self:
            try:
                member.close()
            except Exception as exc:
                if on_error is not None:
                    on_error(member.name, exc)
                elif first is None:
                    first = exc
        if first is not None:
            raise first

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fleet({list(self._members.values())!r})"


def start_fleet(
    names: Sequence[str] = PROVIDERS,
    *,
    prefix: str = "",
    base_dir: Path | None = None,
    password: str | Callable[[str], str] | None = None,
    settings: Mapping[str, str] | None = None,
    proxy: bool = True,
    timeout: float = START_TIMEOUT,
    parallel: bool = True,
) -> Fleet:
    """Start one server per provider name and return them as a `Fleet`.

    Server ``name`` is called ``prefix + name`` and keeps its data under
    ``base_dir`` (a temporary directory of its own when None). ``password`` is
    one password for all (a libpq multi-host URL needs that), a function of the
    provider name, or None for a random one each. ``settings`` are extra
    ``postgres -c`` settings (``max_connections``, ``wal_level``...). Servers
    start in parallel unless ``parallel=False`` (initdb dominates); each gets a
    `FaultProxy` in front unless ``proxy=False``. Every server is created before
    any starts, so a missing PostgreSQL install starts nothing; on any failure
    whatever was started is stopped again.
    """
    servers: list[EmbeddedPostgres] = []
    members: list[Member] = []
    try:
        for name in names:
            secret = password(name) if callable(password) else password
            servers.append(EmbeddedPostgres(prefix + name, base_dir=base_dir,
                                            password=secret, settings=settings))
        if parallel and len(servers) > 1:
            with ThreadPoolExecutor(len(servers), thread_name_prefix="fleet-start") as pool:
                list(pool.map(lambda server: server.start(timeout), servers))
        else:
            for server in servers:
                server.start(timeout)
        for name, server in zip(names, servers, strict=True):
            # The port is final only now: start() may have picked another one.
            front = FaultProxy(server.host, server.port) if proxy else None
            members.append(Member(name, server, front))
            if front is not None:
                front.start()
    except BaseException:
        # Stop what was started; the error that got us here is the one to report.
        left: list[Member | EmbeddedPostgres] = [*members, *servers[len(members):]]
        for closable in left:
            with contextlib.suppress(Exception):
                closable.close()
        raise
    return Fleet(members)

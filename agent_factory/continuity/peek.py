"""Short queries on kept connections, each under the watchdog: the background threads' I/O."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg

from ..engine.watchdog import Watch, Watchdog

__all__ = ["Peeker", "Stall"]

logger = logging.getLogger("agent_factory.core.database_manager")
T = TypeVar("T")


class Stall:
    """A watchdog target whose sign of life is progress of the work it watches."""

    tracks_backends = False

    def __init__(self, name: str, hang_timeout: float) -> None:
        self.name = name
        self.hang_timeout = hang_timeout
        self.last_alive = time.monotonic()

    def alive(self) -> None:
        self.last_alive = time.monotonic()

    def request_probe(self, watch: Watch | None = None) -> None:
        """Nothing to probe: only progress proves the work alive."""


class Peeker:
    """One kept autocommit connection per provider, for one background thread."""

    def __init__(self, conninfos: Mapping[str, str], watchdog: Watchdog, hang_timeout: float,
                 connect_timeout: float) -> None:
        self._conninfos = conninfos
        self._watchdog = watchdog
        self._hang_timeout = hang_timeout
        self._connect_timeout = max(1, round(connect_timeout))
        self._conns: dict[str, psycopg.Connection[Any]] = {}

    def run(self, name: str, work: Callable[[psycopg.Connection[Any]], T]) -> T | None:
        """``work`` on the connection to ``name``; None if it failed (or went silent)."""
        conn = self._conns.get(name)
        stall = Stall(name, 3 * self._hang_timeout)
        try:
            if conn is None or conn.closed or conn.broken:
                conn = self._conns[name] = psycopg.connect(
                    self._conninfos[name], autocommit=True,
                    connect_timeout=self._connect_timeout)
            stall.alive()
            watch = self._watchdog.watch(conn.pgconn.socket, stall)
            try:
                return work(conn)
            finally:
                self._watchdog.unwatch(watch)
        except psycopg.Error as exc:
            logger.debug("background query on %r failed: %s", name, type(exc).__name__)
            if conn is not None:
                conn.close()
            return None

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()

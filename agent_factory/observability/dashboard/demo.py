"""``dashboard --demo``: three embedded providers under light traffic, and fault buttons.

`DemoFleet.start()` starts the servers (like ``agent-factory-db demo``),
returns a `DatabaseManager` over them and keeps a few reads and writes per
second flowing, so the manager notices faults the way an application would.
`controls()` are the dashboard's extra buttons; they act on the server of
whichever provider is the primary at the time.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg

from ...core.database_manager import DatabaseManager
from ...errors import ManagerClosedError
from ...testing.embedded import EmbeddedPostgres
from ...testing.fleet import PROVIDERS, Fleet, start_fleet

__all__ = ["DemoFleet"]

logger = logging.getLogger("agent_factory.observability.dashboard")
_SCHEMA = "CREATE TABLE IF NOT EXISTS dashboard_demo (id bigserial PRIMARY KEY, at timestamptz)"
_READ = "SELECT max(id) FROM dashboard_demo"
_WRITE = "INSERT INTO dashboard_demo (at) VALUES (now())"


class DemoFleet:
    """Embedded servers, a manager over them, background traffic; `close()` stops it all."""

    def __init__(
        self,
        *,
        names: tuple[str, ...] = PROVIDERS,
        hang_timeout: float = 2.0,
        ops_per_second: float = 20.0,
        write_share: float = 0.3,
        workers: int = 2,
        base_dir: Path | None = None,
    ) -> None:
        if not ops_per_second > 0 or workers < 1:
            raise ValueError("ops_per_second must be > 0 and workers >= 1")
        self.names = names
        self.hang_timeout = hang_timeout
        self._interval = workers / ops_per_second
        self._write_share = write_share
        self._workers = workers
        self._base_dir = base_dir
        self._fleet = Fleet(())
        self.db: DatabaseManager | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._action_lock = threading.Lock()

    def start(self) -> DatabaseManager:
        """Start everything; on failure whatever was started is stopped again."""
        try:
            self._fleet = start_fleet(self.names, base_dir=self._base_dir, proxy=False)
            for member in self._fleet:
                _prepare(member.server)
            self.db = DatabaseManager(
                providers=self._fleet.urls(),
                order=list(self.names),
                hang_timeout=self.hang_timeout,
            )
            for i in range(self._workers):
                t = threading.Thread(target=self._work, args=(i,), daemon=True,
                                     name=f"dashboard-demo-load-{i}")
                t.start()
                self._threads.append(t)
        except BaseException:
            self.close()
            raise
        return self.db

    def controls(self) -> dict[str, Callable[[], str]]:
        """Button label -> action on the current primary's server."""
        return {
            "crash primary": lambda: self._act("crashed {} (kill -9)", lambda s: s.kill()),
            "hang primary": lambda: self._act("froze {} (SIGSTOP)", lambda s: s.hang()),
            "resume primary": lambda: self._act("resumed {} (SIGCONT)", lambda s: s.resume()),
            "restart primary": lambda: self._act("restarted {}", lambda s: s.restart()),
        }

    def _act(self, done: str, action: Callable[[EmbeddedPostgres], None]) -> str:
        if self.db is None:
            raise RuntimeError("the demo is not running")
        name = self.db.primary_provider
        with self._action_lock:
            action(self._fleet[name].server)
        return done.format(name)

    def _work(self, index: int) -> None:
        rng = random.Random(index)
        while not self._stop.wait(self._interval * rng.uniform(0.5, 1.5)):
            db = self.db
            if db is None:
                return
            try:
                if rng.random() < self._write_share:
                    db.execute_query(_WRITE, fetch_mode="none")
                else:
                    db.execute_query(_READ, fetch_mode="one")
            except ManagerClosedError:
                return
            except Exception:  # counted by the manager's metrics; the load carries on
                continue

    def close(self) -> None:
        """Stop the traffic, the manager and every server. Idempotent."""
        self._stop.set()
        self._fleet.release_faults()  # a frozen server would hold the workers until their deadline
        for t in self._threads:
            t.join(timeout=self.hang_timeout + 5.0)
        self._threads = []
        if self.db is not None:
            self.db.close_all()
        # A server that fails to stop does not keep the others running; its finalizer kills it.
        self._fleet.close(on_error=lambda name, exc: logger.warning(
            "could not stop the demo server %s cleanly", name, exc_info=exc))


def _prepare(server: EmbeddedPostgres) -> None:
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(_SCHEMA)

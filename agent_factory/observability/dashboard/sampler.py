"""The dashboard's clock: records the history once per period and keeps probes fresh.

One daemon thread per running dashboard, started and stopped by the app's
lifespan. Each period it records a sample (stats and metrics, no I/O) and,
unless the previous one is still running, starts a probe of every provider
(``health_check_all``) on a helper thread: a hung provider's probe takes up
to ``hang_timeout`` plus the connect timeout, and must not stall the page's
rates and latency lines of the others.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .state import History

if TYPE_CHECKING:
    from ...core.database_manager import DatabaseManager
    from ..metrics import MetricsListener

__all__ = ["Sampler"]

logger = logging.getLogger("agent_factory.observability.dashboard")


class Sampler:
    """Feeds `History` from ``db`` and ``metrics`` every ``interval`` seconds."""

    def __init__(
        self,
        db: DatabaseManager,
        metrics: MetricsListener,
        history: History,
        *,
        interval: float = 1.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.db = db
        self.metrics = metrics
        self.history = history
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = threading.Event()
        self._lock = threading.Lock()
        self._prober: threading.Thread | None = None

    def sample(self) -> None:
        """Record one sample now; start a probe round unless one is running."""
        if self.db.closed:
            return
        self._probe_in_background()
        self.history.add(time.monotonic(), self.db.get_provider_stats(), self.metrics.query_time())
        self._sampled.set()

    def ensure_sampled(self) -> None:
        """Take a sample now unless one exists (a page served before the thread ran)."""
        if not self._sampled.is_set():
            self.sample()

    def _probe_in_background(self) -> None:
        with self._lock:
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe, daemon=True,
                                            name="agent-factory-dashboard-probe")
            self._prober.start()

    def _probe(self) -> None:
        try:
            # Half a period: each round probes again, whatever the manager did meanwhile.
            self.db.health_check_all(max_age=self.interval / 2)
        except Exception:  # a closed or closing manager; the next round tries again
            logger.debug("dashboard probe failed", exc_info=True)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="agent-factory-dashboard-sampler",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            prober = self._prober
        if prober is not None:
            prober.join(timeout)  # before the caller closes the manager under it

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a closed or closing manager; keep the page alive
                logger.debug("dashboard sample failed", exc_info=True)
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(next_at - time.monotonic())

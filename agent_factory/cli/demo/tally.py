"""What the failover demo counts and tells while it runs.

The workers report every operation to a `Tally` (which provider served it, or
that it failed); the scenario waits on its marks to time a failover and a
return to the primary. `EventLog` is the narration: the scenario's lines and
the `DatabaseManager`'s events, timestamped from the start of the demo.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ...engine.events import Listener

__all__ = ["Counts", "EventLog", "Mark", "Served", "Tally"]


@dataclass(frozen=True)
class Counts:
    """Operation outcomes so far; subtract two to get those of a period."""

    reads: int = 0
    writes: int = 0
    failed_reads: int = 0
    unknown_writes: int = 0
    failed_writes: int = 0

    def __sub__(self, other: Counts) -> Counts:
        return Counts(
            self.reads - other.reads,
            self.writes - other.writes,
            self.failed_reads - other.failed_reads,
            self.unknown_writes - other.unknown_writes,
            self.failed_writes - other.failed_writes,
        )


@dataclass
class Served:
    reads: int = 0
    writes: int = 0
    latency_ms: float | None = None


@dataclass
class Mark:
    """Waits for the first operation served by the primary (or by a backup) after ``since``."""

    since: float
    on_primary: bool
    at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float) -> float | None:
        if self.done.wait(timeout) and self.at is not None:
            return self.at - self.since
        return None


class Tally:
    """Operation outcomes, written by the workers, read by the scenario and the view."""

    def __init__(self, names: tuple[str, ...], primary: str) -> None:
        self._lock = threading.Lock()
        self._primary = primary
        self._served = {n: Served() for n in names}
        self._failed_reads = self._unknown_writes = self._failed_writes = 0
        self._marks: list[Mark] = []

    def ok(self, write: bool, provider: str, started: float, ended: float) -> None:
        on_primary = provider == self._primary
        with self._lock:
            s = self._served.setdefault(provider, Served())
            if write:
                s.writes += 1
            else:
                s.reads += 1
            s.latency_ms = (ended - started) * 1e3
            for m in self._marks:
                # Return to the primary counts only writes started after the
                # recovery: one stuck through a hang and answered on resume
                # says nothing about routing, and reads reach the primary
                # before writes do (while the backups' changes are drained).
                t = started if on_primary else ended
                if m.on_primary == on_primary and t >= m.since and (write or not on_primary):
                    m.at = ended
                    m.done.set()
            self._marks = [m for m in self._marks if m.at is None]

    def failed(self, write: bool, *, unknown: bool) -> None:
        with self._lock:
            if not write:
                self._failed_reads += 1
            elif unknown:
                self._unknown_writes += 1
            else:
                self._failed_writes += 1

    def mark(self, since: float, *, on_primary: bool) -> Mark:
        m = Mark(since, on_primary)
        with self._lock:
            self._marks.append(m)
        return m

    def counts(self) -> Counts:
        with self._lock:
            return Counts(
                sum(s.reads for s in self._served.values()),
                sum(s.writes for s in self._served.values()),
                self._failed_reads,
                self._unknown_writes,
                self._failed_writes,
            )

    def served(self) -> dict[str, Served]:
        with self._lock:
            return {n: Served(s.reads, s.writes, s.latency_ms) for n, s in self._served.items()}


class EventLog(Listener):
    """Timestamped narration plus the manager's events, passed on to ``sink`` as they come."""

    def __init__(self, t0: float, sink: Callable[[str], None] | None) -> None:
        self._t0 = t0
        self._sink = sink
        self._lock = threading.Lock()
        self._lines: deque[str] = deque(maxlen=200)

    def add(self, text: str) -> None:
        line = f"+{time.monotonic() - self._t0:6.2f}s  {text}"
        with self._lock:
            self._lines.append(line)
        if self._sink is not None:
            self._sink(line)

    def lines(self, last: int) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._lines)[-last:]

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self.add(f"event: failover {from_provider} -> {to_provider} ({reason or 'unavailable'})")

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self.add(f"event: back on primary {primary} (from {from_provider})")

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        state = "healthy again" if healthy else f"down ({reason or 'unavailable'})"
        self.add(f"event: {provider} {state}")

    def on_query_error(self, provider: str, error: BaseException) -> None:
        self.add(f"event: query error on {provider}: {type(error).__name__}: {error}")

"""Failover decisions, without I/O.

What counts as a provider being unavailable (as opposed to a SQL error that
must reach the caller unchanged), which statements may be retried on another
provider after they were sent, in which order providers are tried, and the
health state machine with its hysteresis. The sync manager (and later an
async twin) drives these; nothing here touches a socket or a clock of its own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

# SQLSTATEs that mean "this server cannot serve now", not "your SQL is wrong":
# admin/crash/cannot-connect-now shutdown and too many connections.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


class Kind(enum.Enum):
    UNAVAILABLE = "unavailable"
    READ_ONLY = "read_only"  # a write refused by a read-only server: nothing applied
    SQL = "sql"


def classify(exc: BaseException) -> Kind:
    """Whether an error means the provider is unavailable or the SQL failed."""
    if isinstance(exc, PoolTimeout):
        return Kind.UNAVAILABLE
    if not isinstance(exc, psycopg.Error):
        return Kind.SQL
    state = exc.sqlstate
    if state is not None:
        if state.startswith("08") or state in _UNAVAILABLE_SQLSTATES:
            return Kind.UNAVAILABLE
        if state == "25006":  # read_only_sql_transaction: a standby or demoted server
            return Kind.READ_ONLY
        return Kind.SQL
    # No SQLSTATE: a client-side error. Lost/closed connections are
    # OperationalError or InterfaceError; anything else (bad placeholders,
    # wrong fetch) is the caller's.
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return Kind.UNAVAILABLE
    return Kind.SQL


_COMMENTS = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*", re.DOTALL)
_READ_START = re.compile(r"(?:select|show|values|table|explain|with)\b", re.IGNORECASE)
_WRITE_WORDS = re.compile(
    r"\b(?:insert|update|delete|merge|into|copy|call|lock|truncate|nextval|setval|"
    r"analyze|pg_advisory_\w*|share)\b",
    re.IGNORECASE,
)


@lru_cache(maxsize=1024)
def is_read_only(query: str) -> bool:
    """Conservatively true when a statement cannot change data.

    A SELECT that calls a function with side effects is not detected: pass
    ``idempotent=False`` (or ``read_only=False``) for those.
    """
    body = _COMMENTS.sub("", query, count=1)
    if not _READ_START.match(body):
        return False
    return ";" not in body.rstrip().rstrip(";") and not _WRITE_WORDS.search(body)


def may_retry_after_send(query: str, read_only: bool | None, idempotent: bool | None) -> bool:
    """Whether a statement whose connection broke after sending may run elsewhere."""
    reads = read_only if read_only is not None else is_read_only(query)
    return retry_rule(reads, idempotent)


def retry_rule(reads: bool, idempotent: bool | None) -> bool:
    """The rule itself, for a statement already judged a read or not: `idempotent` wins."""
    return reads if idempotent is None else idempotent


class Routable(Protocol):
    name: str

    @property
    def health(self) -> Any: ...


R = TypeVar("R", bound=Routable)


def order_reads(plan: Sequence[R], policy: str, turn: int) -> list[R]:
    """Order providers for an opt-in read by the routing policy.

    ``nearest``: lowest measured latency first (unmeasured last);
    ``round_robin``: rotate, ``turn`` times, over a weighted ring;
    ``least_busy``: fewest calls in flight per unit of weight. Ties keep the
    failover order; the unhealthy ones keep their place at the end.
    """
    if policy == "primary" or len(plan) < 2:
        return list(plan)
    live = [p for p in plan if p.health.breaker.up]
    rest = [p for p in plan if not p.health.breaker.up]
    if policy == "nearest":
        live.sort(key=lambda p: (p.health.latency_ewma is None, p.health.latency_ewma or 0.0))
    elif policy == "round_robin" and live:
        ring = [p for p in live for _ in range(max(1, p.health.tuning.weight))]
        first = ring[turn % len(ring)]
        i = live.index(first)
        live = live[i:] + live[:i]
    elif policy == "least_busy":
        live.sort(key=lambda p: p.health.in_flight / max(1, p.health.tuning.weight))
    return live + rest


def candidates(primary: str, order: tuple[str, ...], failover_enabled: bool) -> tuple[str, ...]:
    """Providers to try, in order: the primary, then the failover order."""
    if not failover_enabled:
        return (primary,)
    return tuple(dict.fromkeys((primary, *order)))


class State(enum.Enum):
    CLOSED = "closed"  # takes traffic
    OPEN = "open"  # skipped at no cost; probed in the background
    HALF_OPEN = "half_open"  # probes passing, not yet enough of them


@dataclass
class Breaker:
    """A provider's circuit breaker, with hysteresis on the way back.

    Closed: failures are counted in a sliding ``window`` (seconds); the
    ``threshold``-th one opens the breaker (threshold 1: down at once). Open:
    traffic skips the provider; a background probe is the half-open trial.
    Each good probe moves towards closed, which takes ``required``
    consecutive ones; a failure reopens it. Times are monotonic seconds
    supplied by the caller; nothing here blocks or reads a clock.
    """

    threshold: int = 1
    window: float = 30.0
    state: State = State.CLOSED
    up: bool = True  # state is CLOSED; a plain attribute for the hot path
    checked: bool = False
    last_error: str | None = None
    consecutive_failures: int = 0
    probe_successes: int = 0
    changed_at: float = 0.0
    last_check: float = 0.0
    last_latency: float | None = None
    recent: list[float] = field(default_factory=list)

    def fail(self, reason: str, now: float) -> bool:
        """Record a failure; True when this opened the breaker."""
        self.consecutive_failures += 1
        self.probe_successes = 0
        self.last_error = reason
        self.last_check = now
        self.checked = True
        if self.state is State.CLOSED:
            self.recent = [t for t in self.recent if now - t < self.window]
            self.recent.append(now)
            if len(self.recent) < self.threshold:
                return False
        opened = self.state is State.CLOSED
        self._move(State.OPEN, now)
        return opened

    def succeed(self, now: float, latency: float | None, required: int) -> bool:
        """Record a good probe; True when this closed the breaker."""
        self.last_check = now
        self.checked = True
        if latency is not None:
            self.last_latency = latency
        if self.state is State.CLOSED:
            self.consecutive_failures = 0
            return False
        self.probe_successes += 1
        if self.probe_successes < required:
            self._move(State.HALF_OPEN, now)
            return False
        self.consecutive_failures = 0
        self.probe_successes = 0
        self.recent = []
        self._move(State.CLOSED, now)
        return True

    def closes_on_next_success(self, required: int) -> bool:
        return self.state is not State.CLOSED and self.probe_successes + 1 >= required

    def _move(self, state: State, now: float) -> None:
        if state is not self.state:
            self.state = state
            self.changed_at = now
        self.up = state is State.CLOSED

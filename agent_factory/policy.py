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
from dataclasses import dataclass
from functools import lru_cache

import psycopg
from psycopg_pool import PoolTimeout

# SQLSTATEs that mean "this server cannot serve now", not "your SQL is wrong":
# admin/crash/cannot-connect-now shutdown and too many connections.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


class Kind(enum.Enum):
    UNAVAILABLE = "unavailable"
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
    if idempotent is not None:
        return idempotent
    if read_only is not None:
        return read_only
    return is_read_only(query)


def candidates(primary: str, order: tuple[str, ...], failover_enabled: bool) -> tuple[str, ...]:
    """Providers to try, in order: the primary, then the failover order."""
    if not failover_enabled:
        return (primary,)
    return tuple(dict.fromkeys((primary, *order)))


@dataclass
class Health:
    """A provider's health, with hysteresis on the way back up.

    Any failure marks the provider down at once; it comes back only after
    ``required`` consecutive successful probes. Times are monotonic seconds
    supplied by the caller.
    """

    up: bool = True
    checked: bool = False
    last_error: str | None = None
    consecutive_failures: int = 0
    probe_successes: int = 0
    changed_at: float = 0.0
    last_check: float = 0.0
    last_latency: float | None = None

    def fail(self, reason: str, now: float) -> bool:
        """Record a failure; True when this turned the provider down."""
        self.consecutive_failures += 1
        self.probe_successes = 0
        self.last_error = reason
        self.last_check = now
        self.checked = True
        if self.up:
            self.up = False
            self.changed_at = now
            return True
        return False

    def succeed(self, now: float, latency: float | None, required: int) -> bool:
        """Record a successful probe; True when this brought the provider back up."""
        self.last_check = now
        self.checked = True
        self.last_latency = latency
        if self.up:
            self.consecutive_failures = 0
            return False
        self.probe_successes += 1
        if self.probe_successes >= required:
            self.up = True
            self.consecutive_failures = 0
            self.probe_successes = 0
            self.changed_at = now
            return True
        return False

"""The shape of a provider's stats: what `get_provider_stats()` returns for each one.

The CLI, the metrics and the dashboard read these keys; the types say what
each holds. Three parts, filled by the layer that knows them: the pool (the
provider's I/O shell), the health (breaker, probes, watchdog evidence) and
the role (the manager's routing: primary, serving, lag, pending failback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypedDict

from .settings import ProviderSettings, Tuning

if TYPE_CHECKING:
    from .connections import ConnectionSetup

__all__ = [
    "HealthStats", "PoolStats", "ProviderStats", "RoleStats", "ShellStats", "pool_stats",
]


class PoolStats(TypedDict):
    """Where the provider is and how its pool is used (never a password)."""

    healthy: bool
    connection_string_host: str
    port: str
    database: str
    pool_active: bool
    pool_size: int
    pool_idle: int
    pool_max: int
    #: psycopg_pool's own ``get_stats()`` of the current pool, unrenamed (its
    #: counters start again when the pool is renewed at a recovery).
    pool: dict[str, int]
    #: The user's ``configure`` failed on the last new connection (None: it did not).
    configure_error: str | None


class HealthStats(TypedDict):
    """The provider's breaker, probes and calls (see `engine.health`)."""

    healthy: bool
    breaker: str
    writable: bool
    last_error: str | None
    consecutive_failures: int
    errors: int
    last_latency_ms: float | None
    latency_avg_ms: float | None
    latency_p99_ms: float | None
    in_flight: int
    pool_waiting: int
    weight: int
    serverless: bool
    per_call_hang_check: bool
    prober_errors: int
    checked: bool


class RoleStats(TypedDict):
    """What the manager adds: the provider's role, replication lag, pending failback."""

    role: str
    replication_lag_s: float | None
    replication_lag_bytes: int | None
    stale: bool
    failback_pending_since: str | None


class FailbackStats(TypedDict):
    """What the failback adds: the provider's journal as last read, and its conflicts."""

    failback_pending: int  # changes recorded on it and not yet drained
    failback_conflicts: int  # conflicts met by this process's drains of it
    failback_error: str | None  # the last drain's error, while it keeps failing
    failback_failing_s: float | None  # how long its drain has kept failing (None: it has not)
    failback_stuck: int  # source transactions its drain left for an operator (missing tables)


class ShellStats(PoolStats, HealthStats):
    """What a provider reports on its own (`DatabaseProvider.stats()`)."""


class ProviderStats(ShellStats, RoleStats, FailbackStats):
    """One provider's entry in `get_provider_stats()`."""


def pool_stats(
    target: ProviderSettings, tuning: Tuning, healthy: bool, active: bool,
    pool: Mapping[str, int], setup: ConnectionSetup | None,
) -> PoolStats:
    """The pool part, from psycopg_pool's ``get_stats()`` (the same for both shells)."""
    return {
        "healthy": healthy,
        "connection_string_host": target.host,
        "port": target.port,
        "database": target.params.get("dbname", ""),
        "pool_active": active,
        "pool_size": pool.get("pool_size", 0),
        "pool_idle": pool.get("pool_available", 0),
        "pool_max": tuning.pool_max_size,
        "pool": dict(pool),
        "configure_error": None if setup is None else setup.error,
    }

"""Prometheus metrics for a `DatabaseManager`: queries, latency, failovers, health, pools.

    from agent_factory.observability.metrics import instrument, start_http_server

    metrics = instrument(db)                  # a MetricsListener on its own registry
    start_http_server(metrics.registry, port=9464)

Events (queries, failovers, returns to primary, health changes) are counted
by a listener as they happen; gauges (health, role, pool usage) are read
from ``get_provider_stats()`` when Prometheus scrapes, by a collector, so no
thread runs in the background. Each `instrument()` call gets a registry of
its own unless one is given: tests and several managers never collide (one
manager per registry). Needs the ``dashboard`` extra; importing
``agent_factory`` or the manager never imports ``prometheus_client``.

Adding a metric later: a number or a state the manager reports in its
stats is one row of ``_GAUGES`` or ``_STATES`` (read at scrape time, like
the circuit breaker's state); something only an event announces gets a
metric in `MetricsListener.__init__` and one listener method that updates it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,
        CollectorRegistry,
        Counter,
        Histogram,
        generate_latest,
        make_asgi_app,
        make_wsgi_app,
    )
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "agent_factory.observability.metrics needs prometheus-client; install it with: "
        "pip install 'agent-factory[dashboard]'"
    ) from exc

from ..engine.events import Listener

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

    from ..core.database_manager import DatabaseManager

__all__ = [
    "CONTENT_TYPE_LATEST",
    "OUTCOMES",
    "Instrumented",
    "MetricsListener",
    "MetricsServer",
    "ProviderStatsCollector",
    "exposition",
    "instrument",
    "metrics_app",
    "metrics_asgi_app",
    "start_http_server",
]

PREFIX = "agent_factory_db"
OUTCOMES = ("ok", "sql_error", "unavailable", "outcome_unknown")
# Statements on a healthy loopback server take ~0.1 ms, on a managed one a
# few ms; a hung provider is abandoned after hang_timeout (2 s by default).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class _Gauge(NamedTuple):
    key: str  # in get_provider_stats()
    name: str
    help: str
    scale: float = 1.0


class _State(NamedTuple):
    key: str  # in get_provider_stats()
    name: str
    help: str
    states: tuple[str, ...]


# Read at scrape time. A provider whose stats lack a key (or hold None) has no
# sample: replication lag appears once the manager has measured it.
_STATES = (
    _State("role", f"{PREFIX}_provider_role",
           "1 for the provider's current role, 0 for the others.",
           ("primary", "serving", "backup", "returning", "down")),
    _State("breaker", f"{PREFIX}_breaker_state",
           "1 for the state of the provider's circuit breaker, 0 for the others.",
           ("closed", "open", "half_open")),
)
_GAUGES = (
    _Gauge("pool_size", f"{PREFIX}_pool_connections", "Connections open in the provider's pool."),
    _Gauge("pool_idle", f"{PREFIX}_pool_idle_connections", "Idle connections in the pool."),
    _Gauge("pool_waiting", f"{PREFIX}_pool_waiting_requests",
           "Callers waiting for a pooled connection."),
    _Gauge("pool_max", f"{PREFIX}_pool_max_connections", "Maximum size of the pool."),
    _Gauge("consecutive_failures", f"{PREFIX}_provider_consecutive_failures",
           "Failures since the provider last succeeded."),
    _Gauge("in_flight", f"{PREFIX}_statements_in_flight",
           "Statements running on the provider now."),
    _Gauge("last_latency_ms", f"{PREFIX}_provider_probe_latency_seconds",
           "Round trip of the last health probe.", 1e-3),
    _Gauge("replication_lag_s", f"{PREFIX}_replication_lag_seconds",
           "How far the provider's data is behind the primary's, when measured."),
    _Gauge("replication_lag_bytes", f"{PREFIX}_replication_lag_bytes",
           "WAL bytes the provider has yet to replay from the primary, when measured."),
    _Gauge("stale", f"{PREFIX}_provider_stale",
           "1 when the provider's replication lag exceeds max_replication_lag."),
    _Gauge("failback_pending", f"{PREFIX}_failback_pending_changes",
           "Changes recorded in the provider's journal and not yet drained to the primary."),
    _Gauge("failback_conflicts", f"{PREFIX}_failback_conflicts",
           "Conflicts this process's drains of the provider met (kept on the primary)."),
)


# The bound ``inc`` of a counter child and ``observe`` of a histogram child.
_Record = tuple[Callable[[], None], Callable[[float], None]]


class MetricsListener(Listener):
    """Counts the manager's events into Prometheus metrics on ``registry``.

    The labelled children are resolved once per (provider, outcome) and
    kept in a dict, so a query costs one dict lookup, one counter increment
    and one histogram observation.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._queries = Counter(f"{PREFIX}_queries", "Statement attempts by provider and outcome.",
                                ["provider", "outcome"], registry=r)
        self._latency = Histogram(f"{PREFIX}_query_duration_seconds",
                                  "Duration of statement attempts, whatever their outcome.",
                                  ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self._failovers = Counter(f"{PREFIX}_failovers",
                                  "Traffic moved to a provider other than the primary.",
                                  ["from_provider", "to_provider"], registry=r)
        self._failbacks = Counter(f"{PREFIX}_failbacks", "Traffic returned to the primary.",
                                  ["provider", "from_provider"], registry=r)
        self._health_changes = Counter(f"{PREFIX}_health_changes",
                                       "A provider went down or came back up.",
                                       ["provider", "state"], registry=r)
        self._reconciled = Counter(f"{PREFIX}_reconciled_rows",
                                   "Rows written on a backup during an outage and brought "
                                   "back to the primary by failback.",
                                   ["provider", "from_provider"], registry=r)
        self._children: dict[tuple[str, str], _Record] = {}

    def prepare(self, providers: Iterable[str]) -> None:
        """Create every series at zero, so rates exist before the first event."""
        for name in providers:
            for outcome in OUTCOMES:
                self._child(name, outcome)
            for state in ("up", "down"):
                self._health_changes.labels(name, state)

    def _child(self, provider: str, outcome: str) -> _Record:
        pair = (self._queries.labels(provider, outcome).inc,
                self._latency.labels(provider).observe)
        self._children[(provider, outcome)] = pair
        return pair

    # -- events ----------------------------------------------------------------

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        pair = self._children.get((provider, outcome)) or self._child(provider, outcome)
        pair[0]()
        pair[1](seconds)

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self._failovers.labels(from_provider, to_provider).inc()

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self._failbacks.labels(primary, from_provider).inc()

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self._health_changes.labels(provider, "up" if healthy else "down").inc()

    def on_reconcile(self, primary: str, source: str, rows: int) -> None:
        self._reconciled.labels(primary, source).inc(rows)

    # -- reading back (the dashboard) ----------------------------------------------

    def query_counts(self) -> dict[str, dict[str, int]]:
        """``{provider: {outcome: attempts}}`` so far."""
        out: dict[str, dict[str, int]] = {}
        for sample in _samples(self._queries.collect(), "_total"):
            labels = sample.labels
            out.setdefault(labels["provider"], {})[labels["outcome"]] = int(sample.value)
        return out

    def query_time(self) -> dict[str, tuple[int, float]]:
        """``{provider: (attempts, total seconds)}`` so far."""
        counts = {s.labels["provider"]: int(s.value)
                  for s in _samples(self._latency.collect(), "_count")}
        sums = {s.labels["provider"]: s.value for s in _samples(self._latency.collect(), "_sum")}
        return {name: (n, sums.get(name, 0.0)) for name, n in counts.items()}


def _samples(families: Iterable[Metric], suffix: str) -> Iterable[Any]:
    for family in families:
        for sample in family.samples:
            if sample.name == family.name + suffix:
                yield sample


class ProviderStatsCollector:
    """Gauges read from ``db.get_provider_stats()`` each time the registry is collected."""

    def __init__(self, db: DatabaseManager) -> None:
        self._db = db

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> list[Metric]:
        if self._db.closed:
            return []
        return list(self._families(self._db.get_provider_stats()))

    def _families(self, stats: Mapping[str, Mapping[str, Any]] | None = None) -> Iterable[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_provider_up", "1 when the provider is healthy.",
                               labels=["provider"])
        states = [GaugeMetricFamily(st.name, st.help, labels=["provider", "state"])
                  for st in _STATES]
        failures = CounterMetricFamily(f"{PREFIX}_provider_failures",
                                       "Failures seen on the provider: statements, pool "
                                       "connections, probes.", labels=["provider"])
        gauges = [GaugeMetricFamily(g.name, g.help, labels=["provider"]) for g in _GAUGES]
        for name, s in (stats or {}).items():
            up.add_metric([name], 1.0 if s.get("healthy") else 0.0)
            failures.add_metric([name], float(s.get("errors") or 0))
            for st, family in zip(_STATES, states, strict=True):
                current = s.get(st.key)
                if current is not None:
                    for state in st.states:
                        family.add_metric([name, state], 1.0 if current == state else 0.0)
            for g, family in zip(_GAUGES, gauges, strict=True):
                value = s.get(g.key)
                if isinstance(value, (int, float)):  # bool too: 1 or 0
                    family.add_metric([name], float(value) * g.scale)
        yield up
        yield from states
        yield failures
        yield from gauges


class Instrumented(MetricsListener):
    """A `MetricsListener` attached to one manager, with its stats collector."""

    def __init__(self, db: DatabaseManager, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.db = db
        self.collector = ProviderStatsCollector(db)
        self.registry.register(self.collector)
        self.prepare(db.providers)
        db.add_listener(self)

    def detach(self) -> None:
        """Stop counting and drop the collector from the registry."""
        self.db.remove_listener(self)
        self.registry.unregister(self.collector)


def instrument(db: DatabaseManager, registry: CollectorRegistry | None = None) -> Instrumented:
    """Count ``db``'s events and expose its stats on ``registry`` (a new one by default)."""
    return Instrumented(db, registry)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format (content type `CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry)


def metrics_app(registry: CollectorRegistry) -> WSGIApplication:
    """A WSGI app serving ``registry``, to mount in an application's own server."""
    app: WSGIApplication = make_wsgi_app(registry)
    return app


def metrics_asgi_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """An ASGI app serving ``registry`` (e.g. ``starlette_app.mount("/metrics", ...)``)."""
    app: Callable[..., Any] = make_asgi_app(registry)
    return app


class MetricsServer:
    """A metrics endpoint served from a daemon thread; `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        self._server, self._thread = _start_http_server(port, addr=addr, registry=registry)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_http_server(
    registry: CollectorRegistry, port: int = 9464, addr: str = "127.0.0.1"
) -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/`` (port 0: any free port).

    Bound to loopback by default: the metrics name every provider.
    """
    return MetricsServer(registry, port, addr)

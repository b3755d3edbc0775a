"""OpenTelemetry spans for a manager's failovers, returns, health changes and failbacks.

    from agent_factory.observability.otel import OpenTelemetryListener
    db.add_listener(OpenTelemetryListener())       # the global tracer provider

Each event becomes one short span, a child of whatever span is current on
the thread that caused it: a failover seen by a request shows inside that
request's trace, a provider marked down by the background prober is a trace
of its own. Span names and attributes are listed in ``docs/operations.md``.

Only the ``opentelemetry-api`` package is needed (``pip install
'agent-factory[otel]'``); the application chooses the SDK and exporter. The
listener does not override `Listener.on_query`, so it costs nothing per
statement: the healthy path never calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from importlib import metadata

try:
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode, Tracer, TracerProvider
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "agent_factory.observability.otel needs opentelemetry-api; install it with: "
        "pip install 'agent-factory[otel]'"
    ) from exc

from ..engine.events import Listener

__all__ = ["SPAN_NAMES", "OpenTelemetryListener"]

#: Every span the listener starts, by the event that starts it.
SPAN_NAMES = {
    "failover": "agent_factory.failover",
    "return_to_primary": "agent_factory.return_to_primary",
    "provider_down": "agent_factory.provider_down",
    "provider_up": "agent_factory.provider_up",
    "failback": "agent_factory.failback",
    "failback_conflicts": "agent_factory.failback_conflicts",
}

Attributes = Mapping[str, "str | int | float | bool"]


def _version() -> str | None:
    try:
        return metadata.version("agent-factory")
    except metadata.PackageNotFoundError:
        return None


class OpenTelemetryListener(Listener):
    """Turns manager events into spans (see the module's docstring).

    ``tracer_provider``: where the spans go; OpenTelemetry's global one when
    None. ``clock``: monotonic seconds, for the outage's length reported
    when queries return to the primary.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self._tracer: Tracer = trace.get_tracer("agent_factory", _version(),
                                                tracer_provider=tracer_provider)
        self._clock = clock
        #: When queries left the primary (None: they are on it, or no failover seen).
        self._left_primary: float | None = None

    def _span(self, event: str, attributes: Attributes, error: str | None = None) -> None:
        span = self._tracer.start_span(
            SPAN_NAMES[event], attributes={"db.system.name": "postgresql", **attributes})
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        if self._left_primary is None:
            self._left_primary = self._clock()
        attributes: dict[str, str] = {"agent_factory.provider": to_provider,
                                      "agent_factory.from_provider": from_provider}
        if reason:
            attributes["agent_factory.reason"] = reason
        self._span("failover", attributes)

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        attributes: dict[str, str | float] = {"agent_factory.provider": primary,
                                              "agent_factory.from_provider": from_provider}
        left, self._left_primary = self._left_primary, None
        if left is not None:
            attributes["agent_factory.outage_s"] = round(self._clock() - left, 3)
        self._span("return_to_primary", attributes)

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        if healthy:
            self._span("provider_up", {"agent_factory.provider": provider})
            return
        attributes = {"agent_factory.provider": provider}
        if reason:
            attributes["agent_factory.reason"] = reason
        self._span("provider_down", attributes, error=reason or "unavailable")

    def on_reconcile(self, primary: str, source: str, rows: int) -> None:
        self._span("failback", {"agent_factory.provider": primary,
                                "agent_factory.from_provider": source,
                                "agent_factory.changes": rows})

    def on_conflicts(self, primary: str, source: str, conflicts: int) -> None:
        self._span("failback_conflicts", {"agent_factory.provider": primary,
                                          "agent_factory.from_provider": source,
                                          "agent_factory.conflicts": conflicts})

"""What the dashboard shows, computed without I/O: timeline, history, the state document.

`build_state()` turns the manager's stats, the query counts of the metrics
listener, the sampled `History` and the `Timeline` into the JSON document
served at ``/api/state`` and rendered into the page. Only whitelisted fields
leave: names, hosts, ports, numbers and (scrubbed) error texts.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...engine.events import Listener

__all__ = ["Event", "History", "Timeline", "TimelineListener", "build_state", "sparkline"]

SPARK_WIDTH, SPARK_HEIGHT = 120.0, 28.0
_ERROR_OUTCOMES = ("sql_error", "unavailable", "outcome_unknown")


@dataclass(frozen=True)
class Event:
    """One line of the failover timeline; ``at`` is wall-clock seconds since the epoch."""

    at: float
    kind: str  # failover, failback, down, up, operator, demo
    text: str


class Timeline:
    """The last ``size`` events, oldest first; safe to add to from any thread."""

    def __init__(self, size: int = 200, clock: Callable[[], float] = time.time) -> None:
        self._events: deque[Event] = deque(maxlen=size)
        self._lock = threading.Lock()
        self._clock = clock

    def add(self, kind: str, text: str) -> None:
        event = Event(self._clock(), kind, text)
        with self._lock:
            self._events.append(event)

    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)


class TimelineListener(Listener):
    """Writes the manager's failovers, returns to primary and health changes to a timeline."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        because = f" ({reason})" if reason else ""
        self.timeline.add("failover", f"failover {from_provider} → {to_provider}{because}")

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self.timeline.add("failback", f"back on primary {primary} (from {from_provider})")

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        if healthy:
            self.timeline.add("up", f"{provider} is healthy again")
        else:
            self.timeline.add("down", f"{provider} is down: {reason or 'unavailable'}")


@dataclass
class _Series:
    latencies: deque[float | None]
    count: int = 0
    seconds: float = 0.0
    qps: float | None = None
    avg_ms: float | None = None


class History:
    """Per provider: the probe latency of the last ``size`` samples, and query rates.

    `add()` is fed once per sample period with the stats and the metrics'
    ``{provider: (attempts, total seconds)}``; a sample taken while the
    provider is down holds None, one before its first probe is left out.
    """

    def __init__(self, names: Iterable[str], size: int = 60) -> None:
        self._series = {n: _Series(deque(maxlen=size)) for n in names}
        self._lock = threading.Lock()
        self._at: float | None = None
        self.size = size

    def add(
        self,
        at: float,
        stats: Mapping[str, Mapping[str, Any]],
        times: Mapping[str, tuple[int, float]],
    ) -> None:
        with self._lock:
            elapsed = None if self._at is None else at - self._at
            self._at = at
            for name, series in self._series.items():
                s = stats.get(name, {})
                latency = s.get("last_latency_ms")
                if not s.get("healthy"):
                    series.latencies.append(None)
                elif isinstance(latency, (int, float)):
                    series.latencies.append(float(latency))
                # else: healthy but never probed yet; nothing to draw
                count, seconds = times.get(name, (series.count, series.seconds))
                if elapsed is not None and elapsed > 0:
                    n = count - series.count
                    series.qps = n / elapsed
                    series.avg_ms = (seconds - series.seconds) / n * 1e3 if n > 0 else None
                series.count, series.seconds = count, seconds

    def latencies(self, name: str) -> list[float | None]:
        with self._lock:
            series = self._series.get(name)
            return list(series.latencies) if series else []

    def rates(self, name: str) -> tuple[float | None, float | None]:
        """(attempts per second, mean attempt duration in ms) over the last period."""
        with self._lock:
            series = self._series.get(name)
            return (series.qps, series.avg_ms) if series else (None, None)


def sparkline(
    values: Sequence[float | None], slots: int,
    width: float = SPARK_WIDTH, height: float = SPARK_HEIGHT,
) -> tuple[str, str]:
    """SVG path data: the latency line (broken where down) and ticks marking down samples.

    The newest value is at the right edge. The scale runs from 0 to twice
    the 90th percentile (at least 1 ms): a lone slow probe, such as the one
    that opens a connection, is clipped instead of flattening the rest.
    """
    step = width / max(slots - 1, 1)
    known = sorted(v for v in values if v is not None)
    top = max(1.0, 2 * known[int(0.9 * (len(known) - 1))]) if known else 1.0
    line: list[str] = []
    marks: list[str] = []
    pen_down = False
    for i, v in enumerate(values):
        x = width - (len(values) - 1 - i) * step
        if v is None:
            marks.append(f"M{x:.1f},{height:.1f}V{height - 6:.1f}")
            pen_down = False
            continue
        y = height - 1 - min(v / top, 1.0) * (height - 3)
        line.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
        pen_down = True
    return "".join(line), "".join(marks)


def build_state(
    *,
    stats: Mapping[str, Mapping[str, Any]],
    counts: Mapping[str, Mapping[str, int]],
    history: History,
    events: Sequence[Event],
    primary: str,
    serving: str | None,
    token_required: bool,
    demo_actions: Sequence[str] = (),
    secrets: Sequence[str] = (),
    now: float | None = None,
    last_events: int = 50,
) -> dict[str, Any]:
    """The document behind the page; every string passes through the password scrub."""

    def clean(text: object) -> str | None:
        if text is None:
            return None
        out = str(text)
        for secret in secrets:
            out = out.replace(secret, "***")
        return out

    providers = [_provider_card(name, s, counts.get(name, {}), history, clean)
                 for name, s in stats.items()]
    return {
        "failback": failback_banner(stats, clean),
        "now": time.time() if now is None else now,
        "primary": primary,
        "serving": serving,
        "token_required": token_required,
        "demo_actions": list(demo_actions),
        "providers": providers,
        "events": [
            {"at": e.at, "kind": e.kind, "text": clean(e.text)}
            for e in reversed(events[-last_events:])
        ],
    }


def failback_banner(stats: Mapping[str, Mapping[str, Any]],
                    clean: Callable[[object], str | None] = str) -> str:
    """One line on changes pending in backups' journals, conflicts, failing drains ('' if none)."""
    parts = []
    for name, s in stats.items():
        pending, conflicts = _int(s.get("failback_pending")), _int(s.get("failback_conflicts"))
        if pending:
            parts.append(f"{pending} change(s) pending on {name}")
        if conflicts:
            parts.append(f"{conflicts} conflict(s) from {name} (both versions kept in "
                         "agent_factory_conflicts)")
        if s.get("failback_error"):
            parts.append(f"drain of {name} failing: {clean(s.get('failback_error'))}")
    return ("failback: " + " · ".join(parts)) if parts else ""


def _provider_card(
    name: str, s: Mapping[str, Any], counts: Mapping[str, int], history: History,
    clean: Callable[[object], str | None],
) -> dict[str, Any]:
    """One provider's card: its stats, outcome counts, rates and sparkline."""
    outcomes = {k: int(v) for k, v in counts.items()}
    qps, avg_ms = history.rates(name)
    line, marks = sparkline(history.latencies(name), history.size)
    size, idle = _int(s.get("pool_size")), _int(s.get("pool_idle"))
    return {
        "name": name,
        "role": str(s.get("role", "?")),
        "healthy": bool(s.get("healthy")),
        "breaker": clean(s.get("breaker")),
        "host": clean(s.get("connection_string_host")),
        "port": clean(s.get("port")),
        "latency_ms": s.get("last_latency_ms"),
        "spark": line,
        "spark_down": marks,
        "queries": outcomes.get("ok", 0),
        "errors": sum(outcomes.get(k, 0) for k in _ERROR_OUTCOMES),
        "outcomes": outcomes,
        "qps": None if qps is None else round(qps, 1),
        "avg_query_ms": None if avg_ms is None else round(avg_ms, 2),
        "pool": {"size": size, "idle": idle, "used": max(size - idle, 0),
                 "waiting": _int(s.get("pool_waiting")), "max": _int(s.get("pool_max"))},
        "consecutive_failures": _int(s.get("consecutive_failures")),
        "last_error": clean(s.get("last_error")),
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0

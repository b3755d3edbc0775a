"""``agent-factory-db monitor``: the spec's health-check loop as a live terminal table.

Every ``interval`` seconds: probe the providers (``health_check_all``), read
``get_provider_stats()``, redraw. A terminal gets a Rich Live table; a pipe
gets plain lines in the spec's ``[UP] name (host)`` form, one block per
refresh, so logs and ``grep`` work; ``--json`` prints one JSON document per
refresh, each on one line (JSON Lines). Only names, hosts, ports and numbers are
shown, and every line is scrubbed of the providers' passwords once more.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ..core.database_manager import DatabaseManager

__all__ = ["Row", "Snapshot", "json_line", "plain_lines", "run_monitor", "snapshot_of",
           "take_snapshot"]

_ROLE_STYLE = {"primary": "green", "serving": "yellow", "backup": "cyan", "returning": "green",
               "down": "bold red"}


@dataclass(frozen=True)
class Row:
    name: str
    role: str
    healthy: bool
    address: str
    latency_ms: float | None
    pool: str
    failures: int
    last_error: str


@dataclass(frozen=True)
class Snapshot:
    at: float  # wall clock
    primary: str
    serving: str | None
    rows: tuple[Row, ...]


def snapshot_of(
    healthy: Mapping[str, bool],
    stats: Mapping[str, Mapping[str, Any]],
    *,
    primary: str,
    serving: str | None,
    at: float,
    secrets: Sequence[str] = (),
) -> Snapshot:
    """The displayed rows from ``health_check_all()`` and ``get_provider_stats()``."""

    def clean(value: object) -> str:
        text = "" if value is None else str(value)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    rows = []
    for name, s in stats.items():
        up = bool(healthy.get(name, s.get("healthy")))
        latency = s.get("last_latency_ms")
        size, idle = int(s.get("pool_size") or 0), int(s.get("pool_idle") or 0)
        rows.append(Row(
            name=name,
            role=str(s.get("role", "?")),
            healthy=up,
            address=clean(f"{s.get('connection_string_host')}:{s.get('port')}"),
            latency_ms=float(latency) if up and isinstance(latency, (int, float)) else None,
            pool=f"{size - idle}/{size} of {s.get('pool_max', '?')}",
            failures=int(s.get("consecutive_failures") or 0),
            last_error="" if up else clean(s.get("last_error")),
        ))
    return Snapshot(at, primary, serving, tuple(rows))


def take_snapshot(
    db: DatabaseManager, *, max_age: float | None, secrets: Sequence[str] = ()
) -> Snapshot:
    healthy = db.health_check_all(max_age=max_age)
    return snapshot_of(healthy, db.get_provider_stats(), primary=db.primary_provider,
                       serving=db.serving_provider, at=time.time(), secrets=secrets)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def plain_lines(snap: Snapshot) -> list[str]:
    """The spec's ``[UP] name (host)`` lines, with role, latency, pool and the error."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.at))
    lines = [f"{stamp}  primary {snap.primary}, serving {snap.serving or '-'}"]
    for r in snap.rows:
        line = (f"[{'UP' if r.healthy else 'DOWN'}] {r.name} ({r.address}) role={r.role} "
                f"latency={_ms(r.latency_ms)} pool={r.pool} failures={r.failures}")
        lines.append(line + (f" error={r.last_error}" if r.last_error else ""))
    return lines


def json_line(snap: Snapshot) -> str:
    """One refresh as one line of JSON: the time (UTC, ISO 8601), roles and every row."""
    at = datetime.fromtimestamp(snap.at, timezone.utc).isoformat()
    return json.dumps({"at": at, "primary": snap.primary, "serving": snap.serving,
                       "providers": [asdict(r) for r in snap.rows]}, sort_keys=True)


def table(snap: Snapshot, interval: float | None = None) -> Table:
    from rich.table import Table
    from rich.text import Text

    stamp = time.strftime("%H:%M:%S", time.localtime(snap.at))
    every = f", every {interval:g}s (Ctrl-C to stop)" if interval else ""
    t = Table(title=f"Provider health at {stamp}{every}", title_justify="left",
              caption=f"primary {snap.primary} · serving {snap.serving or '-'}",
              caption_justify="left")
    for header in ("provider", "role", "health", "host:port", "latency", "pool",
                   "failures", "last error"):
        t.add_column(header, overflow="fold",
                     justify="right" if header in ("latency", "failures") else "left")
    for r in snap.rows:
        t.add_row(r.name, Text(r.role, style=_ROLE_STYLE.get(r.role, "")),
                  Text("UP", style="green") if r.healthy else Text("DOWN", style="bold red"),
                  r.address, _ms(r.latency_ms), r.pool, str(r.failures), r.last_error)
    return t


def run_monitor(
    db: DatabaseManager,
    *,
    interval: float = 2.0,
    once: bool = False,
    console: Console | None = None,
    out: TextIO | None = None,
    secrets: Sequence[str] = (),
    stop: threading.Event | None = None,
    as_json: bool = False,
) -> None:
    """Refresh every ``interval`` s until ``stop`` is set or Ctrl-C (KeyboardInterrupt).

    With a Rich ``console`` the table is redrawn in place; without, plain
    lines go to ``out`` (stdout by default). ``once``: one snapshot and return.
    ``as_json``: one JSON line per refresh to ``out``, whatever the console.
    """
    stop = stop or threading.Event()

    def take(max_age: float | None) -> Snapshot:
        return take_snapshot(db, max_age=max_age, secrets=secrets)

    if console is None or as_json:
        _run_plain(take, interval, once, out, stop, as_json)
        return
    if once:
        console.print(table(take(0)))
        return
    from rich.live import Live

    with Live(table(take(0), interval), console=console, auto_refresh=False) as live:
        while not stop.wait(interval):
            live.update(table(take(interval / 2), interval), refresh=True)


def _run_plain(
    take: Callable[[float | None], Snapshot], interval: float, once: bool,
    out: TextIO | None, stop: threading.Event, as_json: bool = False,
) -> None:
    import sys

    stream = out or sys.stdout
    max_age: float | None = 0
    while True:
        snap = take(max_age)
        for line in [json_line(snap)] if as_json else plain_lines(snap):
            print(line, file=stream)
        stream.flush()
        if once or stop.wait(interval):
            return
        if not as_json:
            print(file=stream)
        max_age = interval / 2

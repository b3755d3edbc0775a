"""What the failover demo shows on a terminal: a live Rich screen, or plain lines.

`run_live` redraws `Demo.view()` a few times a second; `run_plain` prints the
narration as it comes plus a status line every second; `print_summary` ends
both with a table of what each fault cost. Rich and the demo itself are
imported only when used, so importing this module stays cheap.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..console import ms, print_table, rich_console, secs, yes_no

if TYPE_CHECKING:
    from rich.console import RenderableType

    from .scenario import Demo, DemoConfig, DemoResult, DemoView

__all__ = ["print_summary", "render", "run_live", "run_plain", "status_line"]

_ROLE_STYLE = {"primary": "green", "serving": "yellow", "backup": "cyan", "down": "bold red"}


def run_live(demo: Demo) -> DemoResult:
    from rich.live import Live

    with Live(get_renderable=lambda: render(demo.view()), refresh_per_second=4,
              console=rich_console()):
        return demo.run()


def run_plain(config: DemoConfig) -> DemoResult:
    from .scenario import Demo

    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            print(line, flush=True)

    demo = Demo(config, on_log=emit)
    done = threading.Event()

    def tick() -> None:
        # A status line per second shows the traffic between events.
        while not done.wait(1.0):
            emit(status_line(demo.view(events=0)))

    ticker = threading.Thread(target=tick, name="demo-status", daemon=True)
    ticker.start()
    try:
        return demo.run()
    finally:
        done.set()
        ticker.join()


def status_line(view: DemoView) -> str:
    parts = []
    for p in view.providers:
        mark = "" if p.healthy is not False else " DOWN"
        parts.append(f"{p.name}[{p.role}{mark}] r={p.reads} w={p.writes}")
    c = view.counts
    return (f"+{view.elapsed:6.2f}s  status: {' | '.join(parts)} | failed reads={c.failed_reads}"
            f" unknown writes={c.unknown_writes} failed writes={c.failed_writes}")


def render(view: DemoView) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"agent-factory failover demo  +{view.elapsed:.1f}s  [{view.phase}]",
                  title_justify="left", expand=True)
    for header in ("provider", "role", "healthy", "reads", "writes", "errors", "pool",
                   "last latency"):
        table.add_column(header, justify="left" if header in ("provider", "role") else "right")
    for p in view.providers:
        style = _ROLE_STYLE.get(p.role, "dim")
        # Not pool_waiting: psycopg_pool keeps timed-out waiters queued and the
        # provider polls getconn() in short slices, so it overcounts callers.
        pool = f"{p.pool_used}/{p.pool_size} of {p.pool_max}"
        table.add_row(p.name, Text(p.role, style=style), yes_no(p.healthy), str(p.reads),
                      str(p.writes), str(p.errors), pool, ms(p.latency_ms))
    c = view.counts
    totals = Text(f"failed reads {c.failed_reads}   unknown-outcome writes {c.unknown_writes}"
                  f"   failed writes {c.failed_writes}",
                  style="bold red" if c.failed_reads or c.failed_writes else "")
    events = Text("\n".join(view.events) or "(no events yet)")
    return Group(table, totals, Panel(events, title="events", title_align="left"))


def print_summary(result: DemoResult) -> None:
    rows = [
        [f.fault, secs(f.failover_s), str(f.failed_reads), str(f.unknown_writes),
         str(f.failed_writes), secs(f.back_to_primary_s),
         f"{'?' if f.missing_on_primary is None else f.backup_rows - f.missing_on_primary}"
         f"/{f.backup_rows}", str(f.conflicts)]
        for f in result.faults
    ]
    headers = ["fault", "first op on a backup", "failed reads", "unknown-outcome writes",
               "failed writes", "back on primary", "backup rows on primary", "conflicts"]
    print_table("Failover summary", headers, rows)
    t = result.totals
    verdict = "PASS" if result.ok else "FAIL"
    print(f"{verdict}: {t.reads} reads, {t.writes} writes in {result.duration_s:.1f}s; "
          f"failover bound {result.failover_bound_s:g}s (hang_timeout + 1s); "
          "'back on primary': its first write, counted from the server being up again")

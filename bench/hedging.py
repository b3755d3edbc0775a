"""Hedged reads: what readers see through a hang or a crash of the primary, and a slow primary.

    python -m bench --suite hedging     # full run, updates bench/RESULTS.md (~5 min)
    python -m bench.hedging [--quick]   # prints the tables only

Three embedded servers (supabase = primary, railway, neon). Reader threads
run ``SELECT inet_server_port()`` on one monotonic schedule, 200 reads/s in
all (a late reader catches up at once, no read is skipped); the port says who
answered. A healthy period (a minute in a full run), then the fault on the
primary for ``outage`` seconds, then a few seconds more:

* ``hang``: SIGSTOP to the postmaster and every backend, then SIGCONT;
* ``crash``: SIGKILL to all of them, then a restart on the same port;
* ``slow``: the primary behind a `FaultProxy` adding 100 ms each way (+200 ms
  per round trip) for the whole fault period; nothing fails.

Clients: the `DatabaseManager` with ``hedged_reads="on"`` (the servers are
independent databases, so "auto" would not hedge: see docs/failover.md), the
same with ``hedged_reads="off"``, and the libpq multi-host pool of
bench/failover.py. All servers are restarted between scenarios.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import PROVIDERS, Fleet
from bench import common, failover
from bench.common import Paced, Progress, first_line, run_alone, server_version, sleep_until
from bench.report import row, section, targets

QUERY = "SELECT inet_server_port()"
ON = "DatabaseManager, hedging on"
OFF = "DatabaseManager, hedging off"
PEER = failover.MULTIHOST


@dataclass(frozen=True)
class Config:
    healthy: float  # seconds of reads before the fault
    outage: float  # seconds the fault lasts
    after: float  # seconds observed after it ends
    rate: float = 200.0  # reads/s, all readers together
    readers: int = 40
    hang_timeout: float = 2.0
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout: int = 2
    slow_one_way: float = 0.1


@dataclass
class Read:
    sched: float
    end: float
    port: int | None
    error: str | None


@dataclass
class Outcome:
    client: str
    fault: str
    reads: int
    failed: int
    on_time: float  # share of the reads scheduled during the fault answered within 1 s
    worst: float  # seconds: the longest wait (answer - schedule) of those reads
    healthy_reads: int
    healthy_extra: int  # statements sent to a backup during the healthy period
    hedges: dict[str, int] = field(default_factory=dict)  # during the fault and after
    primary_errors: int = 0  # times the primary was marked down
    on_backup: int = 0  # reads of the fault period answered by a backup
    p50_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def client(kind: str, urls: dict[str, str], fleet: Fleet,
           cfg: Config) -> Iterator[tuple[Callable[[], int], Any]]:
    if kind == PEER:
        peer_cfg = failover.Config(outage=cfg.outage, hang_outage=cfg.outage, before=cfg.healthy,
                                   after=cfg.after, pool_min=cfg.pool_min, pool_max=cfg.pool_max,
                                   connect_timeout=cfg.connect_timeout)
        with failover.multihost_client(fleet, peer_cfg) as pair:
            yield pair
        return
    db = DatabaseManager(urls, order=list(PROVIDERS), hang_timeout=cfg.hang_timeout,
                         pool_min_size=cfg.pool_min, pool_max_size=cfg.pool_max,
                         connect_timeout=float(cfg.connect_timeout), dotenv=None,
                         hedged_reads="on" if kind == ON else "off")

    def read() -> int:
        return int(db.execute_query(QUERY, fetch_mode="one")[0])

    try:
        yield read, db
    finally:
        db.close_all()


def _step(read: Callable[[], int]) -> Callable[[int, int, float], Read]:
    def step(reader: int, i: int, sched: float) -> Read:
        port: int | None = None
        error: str | None = None
        try:
            port = read()
        except Exception as exc:  # every failure counts
            error = first_line(exc, 160)
        return Read(sched, time.monotonic(), port, error)

    return step


def scenario(fleet: Fleet, kind: str, fault: str, cfg: Config, progress: Progress) -> Outcome:
    failover.fresh(fleet)
    primary = fleet[PROVIDERS[0]].server
    urls = fleet.urls()
    proxy: FaultProxy | None = None
    if fault == "slow":
        proxy = FaultProxy(primary.host, primary.port)
        proxy.start()
        urls[PROVIDERS[0]] = proxy.url_for(urls[PROVIDERS[0]])
    try:
        with client(kind, urls, fleet, cfg) as (read, handle):
            for _ in range(50):
                read()
            readers = Paced(_step(read), cfg.readers, cfg.readers / cfg.rate,
                            name="bench-hedging", lead=0.05)
            # The healthy period measures the extra load of hedging: long only where it hedges.
            t_fault = readers.started + (cfg.healthy if kind == ON else min(cfg.healthy, 5.0))
            sleep_until(t_fault)
            before = dict(handle.get_hedge_stats()) if kind != PEER else {}
            _inject(fault, primary, proxy, cfg.slow_one_way)
            sleep_until(t_fault + cfg.outage)
            t_end = time.monotonic()
            _undo(fault, primary, proxy)
            time.sleep(cfg.after)
            readers.stop()
            stats = handle.get_hedge_stats() if kind != PEER else {}
            down = handle.get_provider_stats()[PROVIDERS[0]]["errors"] if kind != PEER else 0
    finally:
        if proxy is not None:
            proxy.close()
    out = summarize(kind, fault, readers.results, primary.port, (t_fault, t_end))
    out.healthy_extra = before.get("hedges_sent", 0)
    out.hedges = {k: v - before.get(k, 0) for k, v in stats.items()}
    out.primary_errors = down
    progress(f"{kind:28s} {fault:5s}: failed {out.failed}, on time {out.on_time:.1%}, "
             f"worst {out.worst:.2f} s, healthy extra {out.healthy_extra}/{out.healthy_reads}")
    return out


def _inject(fault: str, server: Any, proxy: FaultProxy | None, one_way: float) -> None:
    if fault == "crash":
        server.kill()
    elif fault == "hang":
        server.hang()
    elif proxy is not None:
        proxy.set_latency(one_way)


def _undo(fault: str, server: Any, proxy: FaultProxy | None) -> None:
    if fault == "crash":
        server.restart()
    elif fault == "hang":
        server.resume()
    elif proxy is not None:
        proxy.set_latency(0.0)


def summarize(kind: str, fault: str, reads: list[Read], primary_port: int,
              window: tuple[float, float]) -> Outcome:
    t_fault, t_end = window
    healthy = [r for r in reads if r.sched < t_fault]
    during = [r for r in reads if t_fault <= r.sched <= t_end]
    ok = [r for r in during if r.error is None]
    waits = [r.end - r.sched for r in during]
    errors: dict[str, int] = {}
    for r in reads:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return Outcome(
        client=kind, fault=fault, reads=len(reads), failed=sum(errors.values()),
        on_time=sum(1 for r in ok if r.end - r.sched <= 1.0) / len(during) if during else 0.0,
        worst=max(waits, default=0.0), healthy_reads=len(healthy), healthy_extra=0,
        on_backup=sum(1 for r in ok if r.port != primary_port),
        p50_ms=1e3 * statistics.median(waits) if waits else 0.0, errors=errors,
    )


@dataclass
class HedgingResult:
    cfg: Config
    quick: bool
    pg_version: str = "?"
    outcomes: list[Outcome] = field(default_factory=list)


def run(quick: bool = False, progress: Progress = common.progress) -> HedgingResult:
    cfg = Config(healthy=5.0, outage=5.0, after=3.0) if quick else Config(
        healthy=60.0, outage=10.0, after=5.0)
    res = HedgingResult(cfg, quick)
    plan = [(k, f) for f in ("hang", "crash") for k in (ON, OFF, PEER)]
    plan += [(ON, "slow"), (OFF, "slow")]
    with common.fleet("hedge") as servers:
        res.pg_version = server_version(servers)
        for kind, fault in plan:
            res.outcomes.append(scenario(servers, kind, fault, cfg, progress))
    return res


# -- report ----------------------------------------------------------------------------


def render(res: HedgingResult, header: list[str]) -> str:
    cfg = res.cfg
    lines = ["## Hedged reads through a hang, a crash and a slow primary", "", *header, ""]
    intro = (
        f"Three embedded servers; {cfg.readers} reader threads, {cfg.rate:.0f} reads/s in all "
        f"on one schedule, `SELECT inet_server_port()`. {cfg.healthy:.0f} s healthy (hedging "
        f"on; {min(cfg.healthy, 5.0):.0f} s for the other clients), then the "
        f"fault on the primary for {cfg.outage:.0f} s, then {cfg.after:.0f} s more. Managers: "
        f"`hang_timeout={cfg.hang_timeout:g}`, pool {cfg.pool_min}–{cfg.pool_max} per provider, "
        "other settings at their defaults (`hedge_after_min=0.1`, `hedge_budget=0.05`); the "
        "servers are independent databases, so hedging is on only with `hedged_reads=\"on\"`. "
        "The multi-host pool as in the failover windows, with the same pool sizes."
    )
    table = [
        "| client | fault | reads | failed | on time (≤ 1 s) | worst wait | median wait | "
        "answered by a backup | hedges sent / won (fault and after) | primary marked down | "
        "extra statements on backups, healthy period |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in res.outcomes:
        hedges = f"{o.hedges.get('hedges_sent', 0)} / {o.hedges.get('hedges_won', 0)}" \
            if o.client != PEER else "—"
        extra = f"{o.healthy_extra} of {o.healthy_reads} reads" if o.client != PEER else "0"
        table.append(row(o.client, o.fault, o.reads, o.failed, f"{o.on_time:.1%}",
                         f"{o.worst:.2f} s", f"{o.p50_ms:.1f} ms", o.on_backup, hedges,
                         o.primary_errors if o.client != PEER else "—", extra))
    notes = [
        "- *on time*, *worst wait*, *median wait*: over the reads scheduled during the fault "
        "(from the signal to the primary being back), the wait from the scheduled time to the "
        "answer (or the error).",
        "- *primary marked down*: failures recorded on the primary (0 means no failover).",
    ]
    errors = [f"- {o.client}, {o.fault}: {n} × `{e}`" for o in res.outcomes
              for e, n in o.errors.items()]
    lines += section("", intro, table, notes, errors or None)[2:]
    lines += section("### Targets", targets(_targets(res)))
    return "\n".join(lines)


def _targets(res: HedgingResult) -> list[tuple[str, str, bool]]:
    by = {(o.client, o.fault): o for o in res.outcomes}
    out = []
    if (hang := by.get((ON, "hang"))) is not None:
        out += [
            ("hang, hedging on: ≥ 97 % within 1 s", f"{hang.on_time:.1%}", hang.on_time >= 0.97),
            ("hang, hedging on: worst wait ≤ 1.2 s", f"{hang.worst:.2f} s", hang.worst <= 1.2),
            ("hang, hedging on: 0 failed reads", str(hang.failed), hang.failed == 0),
        ]
    if (crash := by.get((ON, "crash"))) is not None:
        out.append(("crash, hedging on: 100 % within 1 s, 0 failed",
                    f"{crash.on_time:.1%}, {crash.failed}",
                    crash.on_time >= 1.0 and crash.failed == 0))
    if (slow := by.get((ON, "slow"))) is not None:
        sent = slow.hedges.get("hedges_sent", 0)
        bound = 10 + 0.05 * slow.reads
        out.append(("slow primary: hedges within the budget (10 + 5 % of the reads)",
                    f"{sent} ≤ {bound:.0f}", sent <= bound))
        out.append(("slow primary: no failover", f"marked down {slow.primary_errors} times",
                    slow.primary_errors == 0))
    for o in res.outcomes:
        if o.client == ON and o.fault in ("hang", "crash"):
            out.append((f"{o.fault}: no extra statement on the backups while healthy "
                        "(no read slower than hedge_after)", str(o.healthy_extra),
                        o.healthy_extra == 0))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_alone(__doc__ or "", run, render, "short healthy period and outages", argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmarks: per-query overhead and failover windows of the DatabaseManager, and more.

    python -m bench            # the core suite, updates bench/RESULTS.md (~3 min)
    python -m bench --quick    # fewer rounds, short outages, < 60 s; prints only
    python -m bench --suite resilience   # open-breaker skip, nearest routing, async
    python -m bench --suite continuity   # acknowledged writes, replication lag, reconcile
    python -m bench --suite memory       # bench/memory.py (saves, vector search)
    python -m bench --suite metrics      # bench/metrics.py (metrics listener cost)
    python -m bench --suite journal      # bench/journal.py (failback journal cost, drain rate)
    python -m bench --suite hedging      # bench/hedging.py (hedged reads: hang, crash, slow)
    python -m bench --suite floor        # bench/floor.py (µs per call over a plain pool)
    python -m bench --suite all          # all of them, one after the other (~6 min)
    python3 dev.py bench [--quick] [--suite ...]

Each suite replaces only its own part of bench/RESULTS.md: the core suite the
title and the sections before the first delimited one, every other suite its
section between ``<!-- suite:NAME -->`` and ``<!-- /suite:NAME -->``.

Run it from the repository root (``bench`` is a package). Needs the embedded
PostgreSQL binaries (``pip install 'agent-factory[embedded]'``).
Progress goes to stderr, the Markdown tables to stdout. ``--out FILE`` writes
the report elsewhere (or, with --quick, at all); ``--log FILE`` keeps every
log record of the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.common import fleet, progress, server_version
from bench.report import row, signed, targets

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

OVERHEAD_TARGET = 1.10
HANG_SLACK = 0.5
RETURN_TARGET = 5.0


class Collector(logging.Handler):
    """Keeps log records; counts warnings and worse, and records tracebacks."""

    def __init__(self, path: Path | None) -> None:
        super().__init__(logging.DEBUG)
        self.problems: list[str] = []
        self._file = path.open("w") if path is not None else None
        self.setFormatter(
            logging.Formatter(
                "%(relativeCreated)9.0f %(threadName)s %(name)s %(levelname)s %(message)s"
            )
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.write(self.format(record) + "\n")
        if record.levelno >= logging.ERROR and record.name.startswith("agent_factory"):
            self.problems.append(f"{record.name}: {record.getMessage()}")
        elif record.exc_info and record.name.startswith("agent_factory"):
            self.problems.append(f"{record.name}: {record.getMessage()} (with traceback)")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


SUITES = ("core", "resilience", "continuity", "memory", "metrics", "journal", "hedging", "floor")


@dataclass
class Context:
    """What every suite shares: the arguments, and where problems are collected."""

    args: argparse.Namespace
    collector: Collector
    thread_errors: list[str]

    def problems_since(self, mark: tuple[int, int]) -> list[str]:
        return self.collector.problems[mark[0] :] + self.thread_errors[mark[1] :]

    def mark(self) -> tuple[int, int]:
        return len(self.collector.problems), len(self.thread_errors)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    collector = Collector(args.log)
    root = logging.getLogger()
    root.addHandler(collector)
    # WARNING and up only: psycopg_pool logs three INFO records per
    # getconn/putconn, which would add their cost to every measured query.
    root.setLevel(logging.WARNING)
    logging.getLogger("agent_factory").setLevel(logging.INFO)
    ctx = Context(args, collector, _catch_thread_errors())
    started = time.monotonic()
    try:
        status = _run_suites(ctx, SUITES if args.suite == "all" else (args.suite,))
    finally:
        root.removeHandler(collector)
        collector.close()
    progress(f"done in {time.monotonic() - started:.0f} s")
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite",
        choices=("all", *SUITES),
        default="core",
        help="which benchmarks to run (default: core, the per-query overhead and the "
        "failover windows); each suite replaces its own section of the report",
    )
    parser.add_argument("--quick", action="store_true", help="short run (< 60 s), no report")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--log", type=Path, help="write every log record here")
    parser.add_argument("--skip-overhead", action="store_true", help="core suite: no overhead")
    parser.add_argument("--skip-failover", action="store_true", help="core suite: no failover")
    return parser


def _catch_thread_errors() -> list[str]:
    """Record every exception that ends a thread (in the list returned) instead of printing it."""
    thread_errors: list[str] = []

    def excepthook(hook_args: threading.ExceptHookArgs) -> None:
        name = hook_args.thread.name if hook_args.thread else "?"
        thread_errors.append(f"thread {name}: {hook_args.exc_type.__name__}: {hook_args.exc_value}")

    threading.excepthook = excepthook
    return thread_errors


def _run_suites(ctx: Context, suites: tuple[str, ...]) -> int:
    """Run each suite, print its report and write its section: 2 if a suite could not run."""
    runners = {
        "core": run_core,
        "resilience": run_resilience,
        "continuity": run_continuity,
        "memory": run_memory,
        "metrics": run_metrics,
        "journal": run_journal,
        "hedging": run_hedging,
        "floor": run_floor,
    }
    out = ctx.args.out or (None if ctx.args.quick else HERE / "RESULTS.md")
    status = 0
    for suite in suites:
        t0 = time.monotonic()
        progress(f"suite {suite}")
        report = runners[suite](ctx)
        if report is None:
            status = 2
            continue
        print(report)
        if out is not None:
            update_report(out, suite, report)
            progress(f"{suite}: wrote its section of {out.name}")
        progress(f"{suite}: done in {time.monotonic() - t0:.0f} s")
    return status


# -- the report file: one core part, then one delimited section per other suite ---------

_SECTION = re.compile(r"<!-- suite:(\w+) -->\n.*?<!-- /suite:\1 -->\n?", re.DOTALL)


def update_report(path: Path, suite: str, text: str) -> None:
    """Replace ``suite``'s part of the report at ``path``, keeping every other part.

    The core suite owns everything outside the delimited sections (it writes
    the file's title and its own sections first); every other suite owns the
    section between ``<!-- suite:NAME -->`` and ``<!-- /suite:NAME -->``,
    replaced in place or appended at the end.
    """
    old = path.read_text() if path.exists() else ""
    sections = [(m.group(1), m.group(0)) for m in _SECTION.finditer(old)]
    if suite == "core":
        kept = "\n".join(block.rstrip("\n") + "\n" for _, block in sections)
        new = text.rstrip("\n") + "\n" + ("\n" + kept if kept else "")
    else:
        block = f"<!-- suite:{suite} -->\n{text.strip()}\n<!-- /suite:{suite} -->\n"
        if any(name == suite for name, _ in sections):
            new = _SECTION.sub(lambda m: block if m.group(1) == suite else m.group(0), old)
        elif old.strip():
            new = old.rstrip("\n") + "\n\n" + block
        else:
            new = "# Benchmark results\n\n" + block
    path.write_text(new)


@dataclass
class CoreResult:
    """What the core suite measured; a skipped part stays empty."""

    ov_cfg: dict[str, Any]  # keyword arguments of overhead.run
    fo_cfg: Any  # failover.Config
    pg_version: str = "?"
    ov: Any = None  # overhead.OverheadResult
    layers: dict[str, float] | None = None
    same: list[Any] | None = None
    outcomes: list[Any] = field(default_factory=list)  # failover.Outcome


def run_core(ctx: Context) -> str | None:
    """The per-query overhead and the failover windows (the original benchmark)."""
    mark = ctx.mark()
    quick = ctx.args.quick
    started = time.monotonic()
    when = dt.datetime.now(dt.timezone.utc)
    res = _unless_no_postgres(lambda: _measure_core(ctx.args))
    if res is None:
        return None
    header = _HEADER.format(when=when, mode=_mode(quick), elapsed=time.monotonic() - started,
                            versions=_versions(res.pg_version), revision=_revision(),
                            quick=" --quick" if quick else "")
    return render(res, header, ctx.problems_since(mark))


def _unless_no_postgres(measure: Callable[[], T]) -> T | None:
    """``measure()``, or None (and why, on stderr) if the embedded PostgreSQL cannot run."""
    from agent_factory.errors import EmbeddedPostgresError

    try:
        return measure()
    except EmbeddedPostgresError as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        return None


def _measure_core(args: argparse.Namespace) -> CoreResult:
    from bench import failover

    if args.quick:
        res = CoreResult({"rounds": 6, "queries": 1000, "warmup": 300},
                         failover.Config(outage=2.0, hang_outage=3.0, before=1.0, after=3.0))
    else:
        res = CoreResult({"rounds": 40, "queries": 1000, "warmup": 1000},
                         failover.Config(outage=5.0, hang_outage=5.0, before=2.0, after=8.0))
    if not args.skip_overhead:
        _measure_overhead(res, args.quick)
    if not args.skip_failover:
        progress("failover: 2 clients x 2 faults, fresh servers each")
        res.outcomes = failover.run(res.fo_cfg, progress=progress)
    return res


def _measure_overhead(res: CoreResult, quick: bool) -> None:
    """One server: the interleaved rounds; in a full run also the diagnostics."""
    from bench import overhead

    with fleet("bench", names=("overhead",)) as f:
        url = f["overhead"].url
        res.pg_version = server_version(f)
        progress("overhead: interleaved rounds")
        res.ov = overhead.run(url, progress=progress, **res.ov_cfg)
        if not quick:
            progress("overhead: Python-level costs, same-backend comparison")
            res.layers = overhead.python_costs(url)
            res.same = overhead.same_backend(url)


def _versions(pg_version: str) -> str:
    import psycopg
    import psycopg_pool

    return (
        f"Python {platform.python_version()}, psycopg {psycopg.__version__} "
        f"(libpq {_libpq(psycopg.pq.version())}, {psycopg.pq.__impl__}), "
        f"psycopg-pool {psycopg_pool.__version__}, PostgreSQL {pg_version} (pgserver)"
    )


def _pg_version() -> str:
    """The embedded PostgreSQL's version, from its binary (no server needed)."""
    import subprocess

    from agent_factory.testing.embedded import find_bin_dir

    try:
        out = subprocess.run(
            [str(find_bin_dir() / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except Exception:
        return "?"
    return out.strip().rsplit(" ", 1)[-1] or "?"


def _mode(quick: bool) -> str:
    return "quick run (`--quick`)" if quick else "full run"


def suite_header(ctx: Context, when: dt.datetime, elapsed: float, pg_version: str,
                 command: str) -> list[str]:
    return [
        f"- Date: {when:%Y-%m-%d %H:%M} UTC, {_mode(ctx.args.quick)}, {elapsed:.0f} s.",
        "- Machine: 2 shared cores (other work ran at the same time), loopback (127.0.0.1).",
        f"- Software: {_versions(pg_version)}.",
        f"- Code: commit {_revision()}.",
        f"- Command: `{command}`.",
    ]


def _notes(problems: list[str]) -> str:
    lines = ["### Notes", ""]
    if problems:
        lines += [f"- {p}" for p in dict.fromkeys(problems)]
    else:
        lines.append("- No error was logged by agent_factory and no thread died during the run.")
    return "\n".join(lines) + "\n"


def _command(ctx: Context, suite: str) -> str:
    return f"python -m bench --suite {suite}" + (" --quick" if ctx.args.quick else "")


def run_resilience(ctx: Context) -> str | None:
    return _run_module(ctx, "resilience")


def run_hedging(ctx: Context) -> str | None:
    return _run_module(ctx, "hedging")


def run_floor(ctx: Context) -> str | None:
    return _run_module(ctx, "floor")


def run_continuity(ctx: Context) -> str | None:
    return _run_module(ctx, "continuity")


def _run_module(ctx: Context, suite: str) -> str | None:
    """Run the suite of module ``bench.<suite>``: its tables, then the run's notes."""
    import importlib

    mark = ctx.mark()
    when = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    module = importlib.import_module(f"bench.{suite}")
    res = _unless_no_postgres(lambda: module.run(ctx.args.quick, progress))
    if res is None:
        return None
    header = suite_header(ctx, when, time.monotonic() - t0, res.pg_version,
                          _command(ctx, suite))
    tables: str = module.render(res, header)
    return tables + "\n" + _notes(ctx.problems_since(mark))


def _run_script(ctx: Context, suite: str, title: str, script: str, extra: list[str]) -> str:
    """Run a standalone benchmark script and keep its output as the section's body."""
    import subprocess

    when = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", f"bench.{script}", *extra]
    progress(f"{suite}: running {script} {' '.join(extra)}".rstrip())
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        body, status = proc.stdout.strip(), f"exit status {proc.returncode}"
        if proc.returncode not in (0, 1):
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            body += f"\n--- stderr (last lines) ---\n{tail}"
    except subprocess.TimeoutExpired as exc:
        body, status = str(exc.stdout or ""), "killed after 600 s"
    meaning = {"exit status 0": " (every target met)", "exit status 1": " (a target missed)"}
    header = suite_header(ctx, when, time.monotonic() - t0, _pg_version(),
                          _command(ctx, suite))
    header[-1] = header[-1].rstrip(".") + (
        f", which runs `python -m bench.{script}{' ' if extra else ''}{' '.join(extra)}`; "
        f"{status}{meaning.get(status, '')}."
    )
    return "\n".join([f"## {title}", "", *header, "", "```text", body, "```", ""])


def run_memory(ctx: Context) -> str | None:
    extra = ["--quick"] if ctx.args.quick else []
    return _run_script(ctx, "memory", "Memory storage: saves and vector search", "memory",
                       extra)


def run_journal(ctx: Context) -> str | None:
    extra = ["--quick"] if ctx.args.quick else []
    return _run_script(ctx, "journal", "Failback journal: write-path cost and drain rate",
                       "journal", extra)


def run_metrics(ctx: Context) -> str | None:
    extra = ["--rounds", "7", "--queries", "1000"] if ctx.args.quick else []
    return _run_script(ctx, "metrics", "Prometheus metrics listener: per-query cost",
                       "metrics", extra)


def _revision() -> str:
    """The commit benchmarked, and whether the package had uncommitted changes.

    ``AGENT_FACTORY_BENCH_REVISION`` names it instead, for a run from an
    exported tree (``git archive``) that has no git metadata.
    """
    import os
    import subprocess

    if os.environ.get("AGENT_FACTORY_BENCH_REVISION"):
        return os.environ["AGENT_FACTORY_BENCH_REVISION"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "agent_factory")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + (" with uncommitted changes in agent_factory/" if dirty else "")


def _libpq(v: int) -> str:
    return f"{v // 10000}.{v % 100}" if v >= 100000 else str(v)


def _sec(v: float | None, observed: float | None = None) -> str:
    if v is None:
        return "never" if observed is None else f"not within {observed:g} s"
    return f"{v:.2f} s"


_HEADER = """\
# Benchmark results

- Date: {when:%Y-%m-%d %H:%M} UTC, {mode}, {elapsed:.0f} s in all.
- Machine: 2 shared cores (other work ran at the same time), loopback (127.0.0.1).
- Software: {versions}.
- Code: commit {revision}.
- Command: `python -m bench{quick}`.
"""

_OVERHEAD_INTRO = (
    "`SELECT 1` on one embedded server, same process, pools of {ov.pool_size} "
    "connections (min = max = {ov.pool_size}) for every client. {ov.warmup} warm-up "
    "queries per client, then {ov.rounds} rounds of {ov.queries} queries per client, "
    "interleaved (the order rotates every round). With 4 threads the same number "
    "of queries is shared by 4 threads and the time is wall time / queries. The "
    "manager has one provider and `hang_timeout=2.0`."
)

_OVERHEAD_TABLE = """\
| client | threads | median µs/query | fastest–slowest round | CPU µs/query | \
context switches/query | vs plain autocommit (ratio of medians) | per-round ratio, median |
|---|---:|---:|---:|---:|---:|---:|---:|"""

_OVERHEAD_TERMS = """\
- *manager*: `DatabaseManager.execute_query("SELECT 1")`.
- *manager, watchdog never woken (diagnostic)*: the same on a second manager \
whose watchdog holds one watch parked far in the future, so that starting a \
call can never wake the watchdog thread. Not a configuration anyone runs: \
it shows how much of the overhead such wake-ups cost.
- *plain-autocommit*: `ConnectionPool(url, kwargs={"autocommit": True})`, \
`with pool.connection() as c: c.execute("SELECT 1").fetchall()` — the like-for-like peer.
- *plain-autocommit, identical twin pool (A/A)*: a second pool configured \
exactly like plain-autocommit. Its distance from 1.00× is the noise floor \
of this machine: differences of that size mean nothing.
- *plain-default*: the same without autocommit: psycopg sends BEGIN, the \
statement, and the pool's context manager COMMIT (three round trips).
- *median µs/query*: median over rounds of (round time / queries in the round).
- *CPU µs/query*: median over rounds of the process CPU time (user + system, \
all threads of the benchmark process, so the manager's watchdog thread counts) \
per query; the server's CPU is not included.
- *context switches/query*: voluntary + involuntary context switches of the \
benchmark process (all threads, `getrusage`) per query, median over rounds.
- *per-round ratio*: manager (or plain-default) / plain-autocommit within the \
same round, which cancels slow drifts of the shared machine.

### Reading the numbers

Wall-clock times on this machine move by ±20 % and more between runs (other \
work on the same 2 cores, see the fastest–slowest column); process CPU time \
and context switches per query are steadier and show where the difference \
comes from:
"""

_READING = (
    "- {t} thread(s): compared with the plain autocommit pool, the manager "
    "uses {m_cpu} µs CPU and {m_sw} context switches per query; with the watchdog "
    "never woken, {k_cpu} µs and {k_sw}; the identical twin pool (A/A), {a_cpu} µs "
    "and {a_sw}."
)

_WATCHDOG_NOTE = """\
- The diagnostic row isolates the cost of waking the watchdog thread when a \
call starts. Up to commit 043467a `Watchdog.watch()` notified the thread \
whenever its set of watches went from empty to one, i.e. on every query of a \
single caller (+25 to +30 µs CPU and +2 to +3.5 context switches per query in \
earlier runs); since then the thread wakes by itself every 0.1 s and \
a call never wakes it, so the two manager rows should match.
"""

_LAYERS_INTRO = """\
### Python-level costs (CPU µs per call, no network I/O)

Best of 5 `timeit` runs of 20000 calls, watchdog parked (no thread woken); \
the dispatch row replaces `provider.run` by a no-op.

| piece | CPU µs/call |
|---|---:|"""

_SAME_INTRO = """\
### Same pool, same server backend (diagnostic)

The plain-pool idiom and the manager on one pool of one connection (the \
manager's own), so both use the very same socket and server backend and the \
pool-to-pool noise drops out. Single thread, 30 interleaved rounds of 1000 \
queries; ratios and differences are per round, then the median.

| path | median µs/query | vs plain idiom | CPU µs/query | CPU vs plain idiom |
|---|---:|---:|---:|---:|"""

_FAILOVER_INTRO = """\
## Failover windows

Three embedded servers: supabase (primary), railway, neon. \
{c.readers} reader threads, each {c.rate:g} reads/s on a monotonic \
clock schedule (a late reader catches up, no read is skipped), each read is \
`SELECT inet_server_port()` so the port tells which server answered. \
{c.before:g} s of normal reads, then the fault on the primary: *crash* = \
SIGKILL to the postmaster and every backend, restarted (crash recovery) \
{c.outage:g} s later; *hang* = SIGSTOP to all of them, SIGCONT \
{c.hang_outage:g} s later. Then {c.after:g} s more of reads. All \
servers are restarted between scenarios.

- DatabaseManager: `hang_timeout={c.hang_timeout:g}`, \
`connect_timeout={c.connect_timeout}`, pool {c.pool_min}–\
{c.pool_max} per provider, other settings at their defaults \
(probe_interval 0.5 s, recovery_probes 2, checkout_timeout 5 s).
- libpq multi-host pool: `ConnectionPool("host=127.0.0.1,127.0.0.1,127.0.0.1 \
port=p1,p2,p3 ... connect_timeout={c.connect_timeout} \
target_session_attrs=any load_balance_hosts=disable", \
min_size={c.pool_min}, max_size={c.pool_max}, \
kwargs={{"autocommit": True}})`, otherwise defaults.

| client | fault | reads | failed reads | fault → first read on a backup | \
longest read during the fault | on time (≤ 1 s late) | primary restored → first read on it |
|---|---|---:|---:|---:|---:|---:|---:|"""

_FAILOVER_TERMS = """\
- *reads*: reads completed by all reader threads in the whole scenario.
- *failed reads*: reads that raised an exception (whole scenario).
- *fault → first read on a backup*: from the signal to the end of the first \
read answered by railway or neon; `never` = every read waited for the primary.
- *longest read during the fault*: the slowest single read that was running at \
any time between the signal and the primary being back.
- *on time*: of the reads scheduled between the signal and the primary being \
back, the share that succeeded at most 1 s after their scheduled time.
- *primary restored → first read on it*: from the restart (server accepting \
logins again) or SIGCONT to the end of the first read, started after that \
moment, answered by the primary.

Restart after the crash took {crash}; SIGCONT took {hang}.
"""

_NO_NOTES = (
    "- No correctness problem seen: every scenario ended with all providers healthy "
    "and the primary serving; no thread died, no error was logged."
)


def render(res: CoreResult, header: str, problems: list[str]) -> str:
    """The core suite's report: the title (``header``), its sections, its notes."""
    lines = [header]
    if res.ov is not None:
        lines += _overhead_section(res.ov)
        if res.layers:
            lines += _layers_section(res.layers)
    if res.same:
        lines += _same_section(res.same)
    if res.outcomes:
        lines += _failover_section(res.outcomes, res.fo_cfg)
        lines += ["### Targets", "", _targets(res.ov, res.outcomes, res.fo_cfg), ""]
    notes = [f"{o.client}, {o.fault}: {n}" for o in res.outcomes for n in o.notes]
    notes.extend(dict.fromkeys(problems))
    lines += ["## Notes", "", "\n".join(f"- {n}" for n in notes) if notes else _NO_NOTES, ""]
    return "\n".join(lines)


def _overhead_section(ov: Any) -> list[str]:
    from bench import overhead

    lines = ["## Per-query overhead", "", _OVERHEAD_INTRO.format(ov=ov), "", _OVERHEAD_TABLE]
    threads_seen = sorted({t for (_, t) in ov.series})
    for t in threads_seen:
        base = ov.series[(overhead.PLAIN_AC, t)].median
        for v in overhead.VARIANTS:
            s = ov.series[(v, t)]
            paired = "—"
            if v != overhead.PLAIN_AC:
                paired = f"{statistics.median(ov.paired_ratios(t, v)):.2f}×"
            lines.append(row(v, t, f"{s.median:.1f}",
                             f"{min(s.samples):.0f}–{max(s.samples):.0f}",
                             f"{s.cpu_median:.1f}", f"{s.switches_median:.2f}",
                             f"{s.median / base:.2f}×", paired))
    lines += ["", _OVERHEAD_TERMS]
    for t in threads_seen:
        p = ov.series[(overhead.PLAIN_AC, t)]
        diffs = {}
        for key, v in (("m", overhead.MANAGER), ("k", overhead.PARKED), ("a", overhead.TWIN)):
            s = ov.series[(v, t)]
            diffs[f"{key}_cpu"] = signed(s.cpu_median - p.cpu_median, 0)
            diffs[f"{key}_sw"] = signed(s.switches_median - p.switches_median, 2)
        lines.append(_READING.format(t=t, **diffs))
    return lines + [_WATCHDOG_NOTE]


def _layers_section(layers: dict[str, float]) -> list[str]:
    added = sum(v for name, v in layers.items() if name.startswith("manager"))
    plain = sum(v for name, v in layers.items() if name.startswith("plain"))
    return [
        _LAYERS_INTRO,
        *(f"| {name} | {v:.2f} |" for name, v in layers.items()),
        "",
        f"Net Python-level cost of the manager: {added:.1f} − {plain:.1f} = "
        f"{added - plain:+.1f} µs CPU per query.",
        "",
    ]


def _same_section(same: list[Any]) -> list[str]:
    rows = [row(r.name, f"{r.wall:.1f}", f"{r.ratio:.2f}×", f"{r.cpu:.1f}",
                f"{signed(r.cpu_diff, 1)} µs") for r in same]
    return [_SAME_INTRO, *rows, ""]


def _failover_section(outcomes: list[Any], cfg: Any) -> list[str]:
    lines = [_FAILOVER_INTRO.format(c=cfg)]
    for o in outcomes:
        back = _sec(o.back_to_primary, o.observed_after)
        if o.first_backup is None and o.back_to_primary is not None:
            back += " (never left)"
        lines.append(row(o.client, o.fault, o.reads, o.failed, _sec(o.first_backup),
                         f"{o.max_latency * 1e3:.0f} ms", f"{o.on_time:.1f}%", back))
    lines += ["", _FAILOVER_TERMS.format(crash=_restore(outcomes, "crash"),
                                         hang=_restore(outcomes, "hang"))]
    errs = [(o, e, n) for o in outcomes for e, n in o.errors.items()]
    if errs:
        lines += ["Errors seen by the readers:", ""]
        lines += [f"- {o.client}, {o.fault}: {n} × `{e}`" for o, e, n in errs]
        lines.append("")
    return lines


def _restore(outcomes: list[Any], fault: str) -> str:
    vals = sorted(o.restore_took for o in outcomes if o.fault == fault)
    if not vals:
        return "—"
    return ", ".join(f"{v:.2f} s" for v in vals)


def _targets(ov: Any, outcomes: list[Any], cfg: Any) -> str:
    from bench import failover

    rows: list[tuple[str, str, bool]] = []
    if ov is not None:
        for t in sorted({t for (_, t) in ov.series}):
            r = ov.ratio(t)
            paired = statistics.median(ov.paired_ratios(t))
            rows.append((
                f"overhead ≤ {OVERHEAD_TARGET:.2f}× plain autocommit pool ({t} thread(s))",
                f"{r:.2f}× (per-round median {paired:.2f}×)",
                r <= OVERHEAD_TARGET,
            ))
    for o in outcomes:
        if o.client != failover.MANAGER:
            continue
        fb, b = o.first_backup, o.back_to_primary
        if o.fault == "crash":
            rows.append(("crash: zero failed reads", f"{o.failed}", o.failed == 0))
            rows.append(("crash: first backup-served read within 1 s", _sec(fb),
                         fb is not None and fb <= 1.0))
        else:
            limit = cfg.hang_timeout + HANG_SLACK
            rows.append((
                f"hang: backup-served read within hang_timeout + {HANG_SLACK:g} s = {limit:g} s",
                _sec(fb),
                fb is not None and fb <= limit,
            ))
        rows.append((
            f"{o.fault}: back on the primary within {RETURN_TARGET:g} s of it being healthy",
            _sec(b, o.observed_after),
            b is not None and b <= RETURN_TARGET,
        ))
    return "\n".join(targets(rows))

"""What the suites share: progress lines, servers, paced threads, faults, measured series.

The servers come from ``agent_factory.testing.fleet`` (`fleet` here only
names them and logs a server that fails to close); the rest is the plumbing
every suite repeated: threads that run a step on a monotonic schedule, a
crash or hang of a server and its restore, polling until a condition holds,
and the per-round samples of the overhead measures.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import psycopg

from agent_factory.testing.embedded import EmbeddedPostgres
from agent_factory.testing.fleet import PROVIDERS, Fleet, start_fleet

T = TypeVar("T")
Progress = Callable[[str], None]
logger = logging.getLogger("bench")


def progress(text: str) -> None:
    """A timestamped progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- servers ------------------------------------------------------------------------


@contextlib.contextmanager
def fleet(prefix: str, names: Sequence[str] = PROVIDERS) -> Iterator[Fleet]:
    """Embedded servers ``prefix-NAME`` sharing one password, started one after the other.

    No fault proxies: the suites reach the servers directly (the multi-host
    peer of the failover windows needs one password for all).
    """
    f = start_fleet(names, prefix=f"{prefix}-", password=secrets.token_urlsafe(18),
                    proxy=False, parallel=False)
    try:
        yield f
    finally:
        f.close(on_error=lambda name, exc: logger.error("could not close server %s: %s",
                                                        name, exc))


def server_version(f: Fleet) -> str:
    """``SHOW server_version`` of the fleet's first server."""
    with psycopg.connect(next(iter(f)).url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# -- time -----------------------------------------------------------------------------


def sleep_until(moment: float) -> None:
    """Sleep until ``moment`` on the monotonic clock (no sleep if it has passed)."""
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def wait_for(cond: Callable[[], bool], timeout: float, step: float) -> float | None:
    """Poll ``cond`` every ``step`` s: seconds until it held, or None after ``timeout`` s."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(step)
    return time.monotonic() - t0


def first_line(exc: BaseException, width: int) -> str:
    """``Type: first line of the message`` (the line cut at ``width`` characters)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:width] if text else ''}"


# -- paced threads ----------------------------------------------------------------------


class Paced(Generic[T]):
    """``count`` threads calling ``step(thread, i, scheduled)`` on one monotonic schedule.

    Each thread runs every ``period`` s, the threads evenly staggered, the
    first call ``lead`` s after the start; a late thread catches up at once,
    no call is skipped. What the calls return is collected in ``results``.
    """

    def __init__(self, step: Callable[[int, int, float], T], count: int, period: float, *,
                 name: str, lead: float) -> None:
        self.results: list[T] = []
        self._stop = threading.Event()
        self.started = time.monotonic() + lead
        self.threads = [
            threading.Thread(target=self._loop,
                             args=(step, k, self.started + k * period / count, period),
                             name=f"{name}-{k}", daemon=True)
            for k in range(count)
        ]
        for t in self.threads:
            t.start()

    def _loop(self, step: Callable[[int, int, float], T], k: int, t0: float,
              period: float) -> None:
        i = 0
        while not self._stop.is_set():
            sched = t0 + i * period
            sleep_until(sched)
            self.results.append(step(k, i, sched))
            i += 1

    def stop(self) -> bool:
        """Stop and join; False if a thread was still blocked 30 s later."""
        self._stop.set()
        for t in self.threads:
            t.join(timeout=30.0)
        return not any(t.is_alive() for t in self.threads)


# -- faults -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultTimes:
    """Monotonic times of one fault: the signal, and the server coming back."""

    fault: float  # just before the signal
    signalled: float  # the signal sent
    restore_began: float
    restored: float  # accepting logins again (crash) or resumed (hang)

    @property
    def restore_took(self) -> float:
        return self.restored - self.restore_began


def fault_cycle(server: EmbeddedPostgres, fault: str, *, at: float,
                outage: float) -> FaultTimes:
    """At ``at`` crash or hang ``server``; ``outage`` s later bring it back.

    *crash*: SIGKILL to the postmaster and every backend, then a restart on
    the same port (crash recovery); *hang*: SIGSTOP to all of them, then
    SIGCONT.
    """
    sleep_until(at)
    t_fault = time.monotonic()
    if fault == "crash":
        server.kill()
    else:
        server.hang()
    signalled = time.monotonic()
    sleep_until(t_fault + outage)
    began = time.monotonic()
    if fault == "crash":
        server.restart()
    else:
        server.resume()
    return FaultTimes(t_fault, signalled, began, time.monotonic())


# -- measured series --------------------------------------------------------------------


@dataclass
class Series:
    """One variant, per round: wall µs/query, CPU µs/query, context switches/query.

    The CPU time is the whole process's (every thread); the context switches
    are recorded only where a measure counts them.
    """

    name: str
    threads: int = 1
    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    switches: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def switches_median(self) -> float:
        return statistics.median(self.switches)

    def add(self, wall: float, cpu: float, switches: float | None = None) -> None:
        self.samples.append(wall)
        self.cpu.append(cpu)
        if switches is not None:
            self.switches.append(switches)


def paired(a: Series, b: Series, *, cpu: bool = False, ratio: bool = False) -> list[float]:
    """Per round: a - b (or a / b), wall or CPU; both were measured in the same round."""
    xs, ys = (a.cpu, b.cpu) if cpu else (a.samples, b.samples)
    if ratio:
        return [x / y for x, y in zip(xs, ys, strict=True)]
    return [x - y for x, y in zip(xs, ys, strict=True)]


def interleaved(variants: Sequence[T], rounds: int) -> Iterator[T]:
    """Every variant once per round, the order rotated by one each round."""
    for r in range(rounds):
        shift = r % len(variants)
        yield from variants[shift:]
        yield from variants[:shift]


# -- running a suite module alone -------------------------------------------------------


def run_alone(doc: str, run: Callable[[bool], Any], render: Callable[[Any, list[str]], str],
              quick_help: str, argv: list[str] | None) -> int:
    """``python -m bench.NAME [--quick]``: run the suite, print its tables."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.monotonic()
    res = run(args.quick)
    print(render(res, [f"- {time.monotonic() - t0:.0f} s, PostgreSQL {res.pg_version}."]))
    return 0

"""Hedged reads: when a read also goes to a second provider, and which answer wins. No I/O.

A read that has had no answer from its provider for ``hedge_after`` is sent
to a fresh backup as well ("The Tail at Scale", Dean & Barroso, 2013); the
first answer wins and the other call is cancelled. The shells
(`DatabaseManager`, `AsyncDatabaseManager`) run the two calls; this module
decides:

* `hedge_after`: a multiple of the provider's measured round trip, never
  below a floor and never past half of ``hang_timeout`` (a hedge is meant to
  come before the watchdog's own verdict);
* `fresh_enough`: a hedge goes only to a backup whose replication lag is
  known and within the bound, unless ``hedged_reads="on"`` says the backups'
  own data will do (independent databases, no replication);
* `Budget`: in the healthy state hedges are a small share of the reads, so a
  slow but healthy primary does not double the backups' load; the budget
  lifts while the primary is suspect (the watchdog asked for a probe about a
  silent call and no probe has answered since);
* `Race`: one hedged read, its two sides and the first answer. A losing
  call notices at its next wake-up (`raced`) and is cancelled by its shell.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from psycopg.abc import RV, PQGen

__all__ = ["HEDGE_MODES", "Budget", "HedgeDue", "HedgeLost", "Race", "Side", "fresh_enough",
           "hedge_after", "is_suspect", "raced"]

HEDGE_MODES = ("auto", "on", "off")
#: hedge_after is this multiple of the provider's p99 round trip (above the floor).
P99_FACTOR = 3.0
#: ... and at most this share of hang_timeout.
CEILING = 0.5
#: A cancel request for a losing call gets this long (a hung server never answers it).
CANCEL_TIMEOUT = 0.5
#: How often a call in a race wakes up while its server is silent: a sync
#: caller's thread returns at most this long after the winning answer.
TICK = 0.005
#: A silent call's probe is overdue (its provider suspect) after at least this long.
SUSPECT_GRACE_MIN = 0.1
#: Hedges the budget holds in reserve (a burst after a quiet period).
BURST = 10.0

FIRST, SECOND = 0, 1


class HedgeLost(Exception):
    """Internal: the other side of a race answered first; this call is abandoned."""


class HedgeDue(Exception):
    """Internal: the first side was still waiting for a pooled connection when its
    hedge became due: nothing was sent, so the read goes to the hedge's provider alone."""


def hedge_after(p99: float | None, floor: float, hang_timeout: float) -> float:
    """Seconds of silence after which a read is hedged."""
    wait = floor if p99 is None else max(floor, P99_FACTOR * p99)
    return min(wait, CEILING * hang_timeout)


def is_suspect(suspected_at: float, probed_at: float, now: float, p99: float | None,
            hang_timeout: float) -> bool:
    """Whether a provider is suspect: a call there went silent (the watchdog asked for
    a probe at ``suspected_at``) and no probe has answered for longer than the
    provider's usual round trip since — 3 × its recent p99, at least
    `SUSPECT_GRACE_MIN`, at most a quarter of ``hang_timeout``.

    A slow but live server answers that probe within about one round trip, so
    its reads stay within the budget however often they go silent; a hung one
    never answers, and the budget lifts a moment later.
    """
    if suspected_at <= probed_at:
        return False
    grace = SUSPECT_GRACE_MIN if p99 is None else max(SUSPECT_GRACE_MIN, P99_FACTOR * p99)
    return now - suspected_at >= min(grace, hang_timeout / 4)


def fresh_enough(mode: str, lag: float | None, bound: float) -> bool:
    """May a hedge go to a backup whose replication lag is ``lag`` seconds (None: unknown)?

    Unknown lag means no replication was measured: the backup holds its own
    data, which only ``hedged_reads="on"`` accepts. A known lag beyond the
    bound is refused in every mode.
    """
    if lag is None:
        return mode == "on"
    return lag <= bound


class Budget:
    """A token bucket: each hedgeable read earns ``share`` of a hedge, up to `BURST`.

    ``share=0.05``: hedges add at most 5 % to the reads (plus the burst) while
    the primary is not suspect. A read only ticks a counter (`earn`, C code:
    no lock, no lost update between threads, no Python frame); the tokens
    it earned are added up when a hedge asks for one (`spend`, under a lock,
    once per slow read).
    """

    def __init__(self, share: float, burst: float = BURST) -> None:
        self.share = share
        self.burst = burst
        self.tokens = burst
        self._lock = threading.Lock()
        #: Counts every earn() and every spend(): reads are the ticks not spent.
        self.earn: Callable[[], int] = itertools.count().__next__
        self._ticks = -1  # the tick of the last spend()
        #: Counters for the stats.
        self.sent = 0
        self.won = 0
        self.refused = 0

    def spend(self, suspect: bool) -> bool:
        """Whether a hedge may start now (counted)."""
        with self._lock:
            ticks = self.earn()  # this spend's own tick: not a read
            tokens = self.tokens + self.share * (ticks - self._ticks - 1)
            self._ticks = ticks
            tokens = tokens if tokens < self.burst else self.burst
            if not suspect:
                if tokens < 1.0:
                    self.tokens = tokens
                    self.refused += 1
                    return False
                tokens -= 1.0
            self.tokens = tokens
            self.sent += 1
            return True

    def stats(self) -> dict[str, int]:
        return {"hedges_sent": self.sent, "hedges_won": self.won,
                "hedges_refused_by_budget": self.refused}


class Suspect(Protocol):
    """What a race needs to know of its first provider (a `ProviderHealth`)."""

    @property
    def suspect(self) -> bool: ...


class Side:
    """A call's place in a race: what its connection's wait looks at.

    The first side is the `Race` itself (a healthy hedged read allocates
    nothing else); the hedge gets a `Side` of its own when it starts.
    """

    __slots__ = ("_race", "index", "clock", "on_due")

    def __init__(self, race: Race, index: int, clock: Callable[[], float],
                 on_due: Callable[[Any], None] | None = None) -> None:
        self._race = race
        self.index = index
        self.clock = clock
        #: Called (first side only) when the hedge should start while this
        #: call waits: the sync shell starts it on a thread.
        self.on_due = on_due

    @property
    def race(self) -> Race:
        return self._race

    @property
    def hedge_at(self) -> float:
        """When the race's hedge is due: the call's wait times out then (see `due`)."""
        return self.race.hedge_at

    def due(self) -> bool:
        """The call has been silent until ``hedge_at``: does it race from now on (its wait
        then looks at the race at each tick, see `raced`)? A side does."""
        return True

    def at_checkout(self) -> None:
        """Between two waits for a pooled connection (the wait counts towards hedge_after)."""
        race = self.race
        if race.lost(self.index):
            raise HedgeLost
        if self.index == FIRST and race.start(self.clock()):
            raise HedgeDue

    def wake(self, silent: bool) -> None:
        """At each wake-up of the call's wait: start the hedge when due, leave when lost."""
        race = self.race
        if race.winner is not None and race.winner != self.index:
            raise HedgeLost
        if silent and self.on_due is not None and race.start(self.clock()):
            self.on_due(race)


class Race(Side):
    """One hedged read, seen by its first side: the planned provider; the second is the hedge.

    ``allow(suspect)`` is asked (with no lock held) whether the hedge may
    start once ``hedge_at`` has passed: the budget, told whether ``first``
    is suspect. ``context`` is the shell's: what the hedge runs. The first
    answer claims the race; the loser sees `lost` and is cancelled by its
    shell. Only the first side's own thread (or event loop) starts the
    hedge, so a race that never starts one (every healthy read) needs no
    lock, no event and no other object.
    """

    # What a race that never starts its hedge keeps unchanged (no per-read stores).
    index = FIRST
    hedge_at: float = 0.0  # an instance's own (not `Side.hedge_at`)
    context: Any = None
    #: The hedge was started.
    started = False
    winner: int | None = None
    result: Any = None
    #: The hedge's failure, if it failed (the first side's answer still counts).
    error: BaseException | None = None
    _lock: threading.Lock | None = None
    _done: threading.Event | None = None

    def __init__(self, hedge_at: float, allow: Callable[[bool], bool], first: Suspect,
                 context: Any = None, *, clock: Callable[[], float] = time.monotonic,
                 on_due: Callable[[Any], None] | None = None) -> None:
        self.hedge_at = hedge_at
        self.allow = allow
        self.first = first
        self.context = context
        self.clock = clock
        self.on_due = on_due

    @property
    def race(self) -> Race:
        return self

    def start(self, now: float) -> bool:
        """Start the hedge now? True exactly once, when due and allowed."""
        if self.started or now < self.hedge_at or self.winner is not None:
            return False
        if not self._allowed():
            return False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.started = True
        return True

    def _allowed(self) -> bool:
        """The budget's verdict, asked once the hedge is due."""
        return self.allow(self.first.suspect)

    def claim(self, side: int, result: Any) -> bool:
        """The answer of ``side``: True if it is the first (it wins)."""
        lock, done = self._lock, self._done
        if lock is None or done is None:  # no hedge: the first side is alone
            self.winner, self.result = side, result
            return True
        with lock:
            if self.winner is not None:
                return False
            self.winner, self.result = side, result
        done.set()
        return True

    def fail(self, side: int, error: BaseException) -> None:
        """The hedge failed: the first side's answer is awaited alone."""
        if side == SECOND and self._done is not None:
            self.error = error
            self._done.set()

    def lost(self, side: int) -> bool:
        winner = self.winner
        return winner is not None and winner != side

    def wait_hedge(self, timeout: float | None) -> bool:
        """Wait for the hedge's outcome (an answer or a failure); False on timeout or none."""
        return self._done is not None and self._done.wait(timeout)


def raced(gen: PQGen[RV], side: Side) -> PQGen[RV]:
    """Forward psycopg's generator, looking at the race at each wake-up.

    The connection's wait runs with a `TICK` interval, so a silent server
    still wakes the generator (with a zero ``ready``) every tick. Used only
    once ``hedge_after`` has passed: until then psycopg waits on its own.
    """
    race = side.race
    try:
        wait_for = next(gen)
        while True:
            ready = yield wait_for
            if not ready or race.winner is not None:
                side.wake(not ready)
            wait_for = gen.send(ready)
    except StopIteration as ex:
        return ex.value  # type: ignore[no-any-return]
    finally:
        gen.close()

"""A hedged read as both managers run it: which answer the caller gets, what becomes of the
loser. No I/O.

`Failover.hedge_at` says whether a read may be hedged and when; the shells
(`DatabaseManager._race`, `AsyncDatabaseManager._race`) run the read on its
provider as any other, its connection's wait timing out at that moment. Only
then is the hedge decided (`HedgedRead.due`: where it may go, the budget) --
a healthy read answers before and decides nothing. The caller's thread or
task runs the first call, a thread or task of its own the hedge, and the
shells ask the `HedgedRead` at each outcome what follows:

* the first call answers: it wins unless the hedge answered before it;
* the first call lost (`HedgeLost`): the hedge's answer is the read's;
* the first provider became unavailable: once the hedge has answered, its
  answer stands and the first provider's failure is reported as any
  attempt's; if the hedge failed too, the failure moves on as without a hedge;
* a SQL error on the first call: raised, unless the hedge answered first;
* the hedge came due while the first call still waited for a pooled
  connection (`HedgeDue`): nothing was sent there, so the read goes to the
  hedge's provider alone, and back to the first if that one is unavailable;
* the hedge's own failure marks its provider down when it is an outage,
  and leaves the race to the first call; a hedge that answers first counts
  as won.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic

from .failover import Failover, P, Route
from .hedge import FIRST, SECOND, HedgeLost, Race, Side
from .provider import Unavailable

__all__ = ["HedgedRead"]


class HedgedRead(Race, Generic[P]):
    """One read that may be hedged: the race, decided once the hedge is due, and what each
    outcome means.

    ``hedge_at`` is `Failover.hedge_at`'s; ``call`` is the statement both
    sides run: ``(query, params, fetch, row_factory)``. ``on_due`` starts
    the hedge (a thread or a task). ``target``, the hedge's provider, is
    None until the hedge is due (and stays None if there is nowhere to send it).
    """

    clock = staticmethod(time.monotonic)
    #: Where the hedge goes: decided by `due`.
    target: P | None = None
    _decided = False

    def __init__(self, hedge_at: float, core: Failover[P], route: Route[P],
                 failures: dict[str, str], provider: P, call: tuple[Any, ...],
                 on_due: Callable[[Any], None]) -> None:
        # Race's fields without Race.__init__ (on every hedgeable read): the
        # budget is asked through `_allowed` below, the clock is the class's.
        self.hedge_at = hedge_at
        self.core = core
        self.route = route
        self.failures = failures
        #: Where the read was planned (the first side).
        self.provider = provider
        self.call = call
        self.on_due = on_due

    def due(self) -> bool:
        """The hedge is due: is there a provider fresh enough to send it to? Asked once,
        now (later calls give the same answer)."""
        if not self._decided:
            self._decided = True
            self.target = self.core.hedge_target(self.route)
        return self.target is not None

    def _allowed(self) -> bool:
        return self.due() and self.core.budget.spend(self.provider.health.suspect)

    # -- the first call (the caller's own thread or task) -----------------------------

    def first_answered(self, result: Any) -> bool:
        """The first call answered: True if that is the read's answer (else `answer`)."""
        return self._lock is None or self.claim(FIRST, result)  # no hedge: no one to race

    def awaits_hedge(self, exc: BaseException) -> bool:
        """Whether the shell waits for the hedge's outcome before `first_failed`: the first
        provider is unavailable while a hedge runs (its answer may still come)."""
        return self.started and isinstance(exc, Unavailable)

    def first_failed(self, exc: BaseException) -> bool:
        """The first call raised ``exc``: True if the hedge's answer (`answer`) stands
        instead, False to raise ``exc`` (as without a hedge)."""
        if isinstance(exc, HedgeLost):
            return True
        if isinstance(exc, Unavailable):
            if self.winner != SECOND:
                return False
            self.core.attempt_unavailable(self.provider, exc, route=self.route,
                                          failures=self.failures, t0=None)
            return True
        # A SQL error stands unless the hedge answered first; an interrupt
        # (Ctrl-C, a cancelled task) makes the hedge give up too.
        return not self.claim(FIRST, None) and isinstance(exc, Exception)

    def answer(self) -> tuple[P, Any]:
        """The hedge's answer, which won."""
        return self.second_provider(), self.result

    # -- the hedge (a thread or task of its own) ----------------------------------------

    def second_provider(self) -> P:
        """The hedge's provider, once the hedge has started."""
        target = self.target
        assert target is not None, "the hedge never started"
        return target

    def second(self) -> Side:
        """The hedge's side of the race (its connection's wait looks at it)."""
        return Side(self, SECOND, self.clock)

    def second_answered(self, result: Any) -> None:
        if self.claim(SECOND, result):
            self.core.budget.won += 1

    def second_failed(self, exc: Exception) -> None:
        """The hedge failed (or lost): an outage marks its provider down, as any attempt
        there would; the first call's answer is then awaited alone."""
        if isinstance(exc, HedgeLost):
            return
        if isinstance(exc, Unavailable) and exc.down:
            self.second_provider().health.mark_down(exc.reason)
        self.fail(SECOND, exc)

    # -- a hedge due at checkout: the read on the hedge's provider alone ----------------

    def instead_answered(self, result: Any) -> tuple[P, Any]:
        self.core.budget.won += 1
        return self.second_provider(), result

    def instead_failed(self, exc: Unavailable) -> P:
        """The hedge's provider could not serve the read: reported; the first provider
        (where nothing was sent) takes it after all."""
        self.core.attempt_unavailable(self.second_provider(), exc, route=self.route,
                                      failures=self.failures, t0=None)
        return self.provider

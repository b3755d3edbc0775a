"""Where statements go and what a failure means: shared by both managers, no I/O.

`Failover` holds the primary, the order, the routing policy and the events;
the sync `DatabaseManager` and the `AsyncDatabaseManager` ask it for a
`Route`, run the statement on each provider of the route in turn, and tell it
how each attempt went.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Generic, Protocol, TypeVar

import psycopg

from ..errors import (
    AllProvidersUnavailableError,
    ConfigurationError,
    HangTimeoutError,
    ManagerClosedError,
    OutcomeUnknownError,
    ProviderUnavailableError,
)
from .events import Dispatcher
from .health import ProviderHealth
from .hedge import Budget, fresh_enough, hedge_after
from .lag import Lag
from .policy import Kind, candidates, classify, is_read_only, order_reads, retry_rule
from .provider import Unavailable, tag
from .settings import Settings
from .stats import RoleStats, ShellStats

logger = logging.getLogger("agent_factory.core.database_manager")


class HasHealth(Protocol):
    name: str
    health: ProviderHealth

    def stats(self) -> ShellStats: ...


P = TypeVar("P", bound=HasHealth)


@dataclass
class Route(Generic[P]):
    """The providers to try for one statement, and how to treat a lost connection."""

    providers: list[P]
    retry_after_send: bool
    write: bool
    #: Ordered by a read routing policy: where it lands says nothing about
    #: failover (no serving change, no failover event).
    routed: bool = False


class Failover(Generic[P]):
    """The decision logic of a manager, over its providers."""

    def __init__(
        self,
        settings: Settings,
        providers: Mapping[str, P],
        events: Dispatcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.providers = providers
        self.events = events
        self._clock = clock
        self._lock = threading.Lock()
        self.primary = settings.primary
        self.order = tuple(settings.failover_order)
        self.failover_enabled = settings.failover_enabled
        self.serving: str | None = None
        self.epoch = 0  # bumped on every health change
        self.last_write = -1e18
        self.closed = False
        #: Backups that took writes while the primary was down, with the
        #: (wall-clock, UTC) time from which their rows must be brought back.
        self.diverged: dict[str, datetime] = {}
        #: Writes are counted (and can be paused) only when failback needs it.
        self.track_writes = settings.failback_reconcile
        self._gate = threading.Condition(threading.Lock())
        self._paused = False
        #: Writes held until then (time.monotonic; 0: no hold), see `hold_writes`.
        self._held_until = 0.0
        self._writers = 0
        self._turn = 0
        self.budget = Budget(settings.hedge_budget)
        #: Reads may be hedged at all (``hedged_reads`` is not "off").
        self.hedging = settings.hedged_reads != "off"
        self._hedge_auto = settings.hedged_reads == "auto"
        self._hedge_bound = settings.hedge_lag_bound()
        self._hedge_after: dict[str, tuple[float | None, float]] = {}
        self._next_log = 0.0
        self._suppressed = 0
        # Filled by replan() once the shell has created its providers.
        self.plan: tuple[P, ...] = ()
        #: The route of a read judged by its text while every provider of the
        #: plan is up: built once per plan, not once per statement.
        self._reads: Route[P] = Route([], True, False)

    # -- configuration -------------------------------------------------------------

    def replan(self) -> None:
        names = candidates(self.primary, self.order, self.failover_enabled)
        plan = tuple(self.providers[n] for n in names)
        self._reads = Route(list(plan), True, False)
        self.plan = plan

    def set_primary(self, name: str) -> None:
        if name not in self.providers:
            raise ValueError(
                f"Provider {name!r} not configured. Available: {', '.join(self.providers)}"
            )
        if not self.providers[name].health.breaker.up:
            logger.warning("primary set to %r, which is down: queries go to the next "
                           "provider until it recovers", name,
                           extra={"event": "primary_set", "provider": name})
        else:
            logger.info("primary provider set to %r", name,
                        extra={"event": "primary_set", "provider": name})
        self.primary = name
        self.replan()

    def set_order(self, order: list[str] | tuple[str, ...]) -> None:
        unknown = [n for n in order if n not in self.providers]
        if unknown:
            raise ConfigurationError(
                f"failover_order names unconfigured providers {unknown}; "
                f"available: {', '.join(self.providers)}"
            )
        self.order = tuple(order)
        self.replan()

    # -- routing -------------------------------------------------------------------

    def route(
        self, query: object, *, read_only: bool | None = None, idempotent: bool | None = None
    ) -> Route[P]:
        """Which providers to try, in order, for one statement.

        A statement is a read when ``read_only=True`` says so or, without it,
        when `is_read_only` recognises one. ``idempotent=False`` makes it a
        write whatever ``read_only`` says: a statement that must not run twice
        changes something, so it gets every safety of a write (the failback
        write gate, ``max_replication_lag``, read-your-writes, divergence
        tracking), not only no retry. A composed (non-string) query is judged
        by the flags alone.
        """
        if read_only is None and idempotent is None and isinstance(query, str) and (
            is_read_only(query)
        ):
            # The usual read: the same route object while every provider is up.
            for p in self.plan:
                if not p.health.breaker.up:
                    break
            else:
                return self._reads
        text = query if isinstance(query, str) else ""
        reads = idempotent is not False and (
            read_only if read_only is not None else bool(text) and is_read_only(text)
        )
        retry = retry_rule(reads, idempotent)
        plan: list[P] | tuple[P, ...] = self.plan
        policy = self.settings.read_routing
        if (
            reads
            and read_only
            and policy != "primary"
            and self._clock() - self.last_write >= self.settings.read_your_writes
        ):
            self._turn += 1
            plan = order_reads(plan, policy, self._turn)
            return Route([p for p in plan if p.health.breaker.up], retry, False, True)
        if reads:
            primary = plan[0] if plan and plan[0].name == self.primary else None
            if primary is not None and primary.health.returning:
                # The failback window: the primary answers again while the
                # backups' changes are brought back (writes still go to a
                # backup until then). The primary's rows are a consistent
                # history -- its own plus whole backup transactions, replayed in
                # order; a backup that still holds changes not drained yet and
                # already applies the primary's stream again may hold a mix of
                # both. Reads go to the primary, and stay there after the return.
                return Route([primary, *(p for p in plan if p.health.breaker.up)], retry, False)
            return Route([p for p in plan if p.health.breaker.up], retry, False)
        bound = self.settings.max_replication_lag
        return Route(
            [
                p
                for p in plan
                if p.health.breaker.up
                and p.health.writable
                and (bound is None or self.lag_ok(p.name, bound))
            ],
            retry,
            True,
        )

    def hedge_at(self, route: Route[P]) -> float | None:
        """When a read on ``route`` is due for a hedge (``time.monotonic``); None: never.

        Asked on every read, so only what is known cheaply: never a write (nor
        `transaction()` or `connection()`, which do not come here), never
        inside the read-your-writes window, never in "auto" mode without
        measured replication. The read earns its share of the budget here.
        While the first provider is suspect (a call there went silent and its
        probe is overdue) the hedge is due at once. Where it goes is decided
        only once it is due (`hedge_target`): a healthy read never asks.
        """
        providers = route.providers
        if route.write or len(providers) < 2 or not self.hedging:
            return None
        if self._hedge_auto and not self.providers[self.primary].health.lag.replication:
            return None  # no backup's lag is known: nowhere to hedge
        now = self._clock()
        if self.last_write + self.settings.read_your_writes > now:
            return None
        self.budget.earn()
        first = providers[0].health
        # `suspect`'s own first test, inline: a healthy read makes no call for it.
        if first.suspected_at > first.probed_at and first.suspect:
            return now  # a silent call there already: both at once
        # hedge_after changes only with the p99, i.e. at a probe: reuse it until then.
        p99 = first.latency.recent_p99
        cached = self._hedge_after.get(first.name)
        if cached is None or cached[0] is not p99:
            cached = (p99, hedge_after(p99, self.settings.hedge_after_min, first.hang_timeout))
            self._hedge_after[first.name] = cached
        return now + cached[1]

    def hedge_target(self, route: Route[P]) -> P | None:
        """Where a read on ``route`` whose hedge is due goes as well; None: nowhere.

        Only to a backup fresh enough now (`hedge.fresh_enough`): with
        replication, the first one whose measured lag is within the bound;
        without, the next provider if ``hedged_reads="on"`` says its own data
        will do.
        """
        providers = route.providers
        if self.providers[self.primary].health.lag.replication:
            return self._fresh_target(providers, self.settings.hedged_reads)
        if self._hedge_auto:
            return None
        return providers[1]

    def _fresh_target(self, providers: list[P], mode: str) -> P | None:
        """The first provider after ``providers[0]`` fresh enough for a hedge."""
        primary = self.primary
        for target in providers[1:]:
            if target.name == primary:
                return target  # the primary is never behind
            if fresh_enough(mode, self.lag_seconds(target.name), self._hedge_bound):
                return target
        return None

    @staticmethod
    def hedged(route: Route[P]) -> Route[P]:
        """``route`` as seen by a hedge that answered: evidence, not proof, so the
        serving provider does not change and no failover is reported (the
        watchdog still decides whether the first provider is down)."""
        return Route(route.providers, route.retry_after_send, route.write, True)

    def lag_seconds(self, name: str) -> float | None:
        """`lag` in seconds, without building it (on every hedgeable read; None for the
        primary, which is not its own subscriber)."""
        primary = self.providers[self.primary].health
        sample = primary.lag.replication.get(name)
        if sample is None:
            return None
        written_since = primary.last_alive - sample.measured_at
        return sample.seconds + written_since if written_since > 0 else sample.seconds

    def lag(self, name: str) -> Lag | None:
        """A backup's replication lag, bounded as a failover now would find it (None: unknown).

        The primary measured it at its last probe (``measured_at``), but may
        have written on until its last sign of life (a probe or a call that
        succeeded); a backup that received none of that is behind by the
        sample plus that time. A dead primary writes no more WAL, so this
        bound does not grow with the outage: ``seconds`` is the sample's
        plus the time from the sample to the primary's last sign of life.
        ``bytes`` stays the sample's (a lower bound).
        """
        if name == self.primary:
            return None
        primary = self.providers[self.primary].health
        sample: Lag | None = primary.replication.get(name)
        if sample is None:
            return None
        written_since = max(0.0, primary.last_alive - sample.measured_at)
        return sample._replace(seconds=sample.seconds + written_since)

    def lag_ok(self, name: str, bound: float) -> bool:
        """May this provider take writes under the RPO bound?"""
        if name == self.primary:
            return True
        lag = self.lag(name)
        return lag is not None and lag.seconds <= bound

    # -- outcomes --------------------------------------------------------------------

    def succeeded(self, provider: P, *, epoch: int, failures: dict[str, str] | None,
                  write: bool) -> None:
        if write:
            self.last_write = self._clock()
            if provider.name != self.primary and self.track_writes and (
                provider.name not in self.diverged
            ):
                margin = timedelta(seconds=self.settings.reconcile_margin)
                self.diverged[provider.name] = datetime.now(timezone.utc) - margin
        # A call that started before the last health change (e.g. stuck on a
        # hung primary that just resumed) says nothing about where traffic
        # goes now -- unless what it says agrees with health now: served by the
        # primary while it is up (a read routed there just as its breaker
        # closed, before the change was counted, is the return), or by a backup
        # while the primary is down (the change was the primary going down while
        # this call ran, e.g. found by a probe).
        name = provider.name
        if name == self.primary:
            up = provider.health.breaker.up
            if not up and not write:
                return  # a read in the failback window: writes still go to a backup
            if (up or epoch == self.epoch) and name != self.serving:
                self._served_by(name, failures)
        elif epoch == self.epoch or not self.providers[self.primary].health.breaker.up:
            self._served_by(name, failures)

    # -- one attempt, as both shells see it ---------------------------------------------

    def attempt_unavailable(
        self, provider: P, exc: Unavailable, *, route: Route[P], failures: dict[str, str],
        t0: float | None,
    ) -> Exception | None:
        """A provider could not serve: the error to raise, or None to try the next one."""
        failures[provider.name] = exc.reason
        if exc.down:
            provider.health.mark_down(exc.reason)
        unknown = exc.sent and not route.retry_after_send
        if t0 is not None:
            outcome = "outcome_unknown" if unknown else "unavailable"
            self.events.query_done(provider.name, time.perf_counter() - t0, outcome)
        if exc.busy and route.write and provider.name == self.primary:
            return busy_primary_error(provider.name, exc.reason)
        return OutcomeUnknownError(provider.name, exc.reason) if unknown else None

    def checkout_refused(self, provider: P, exc: Unavailable, failures: dict[str, str]) -> None:
        """A transaction's checkout failed: move on, or raise for a busy primary."""
        failures[provider.name] = exc.reason
        if exc.busy and provider.name == self.primary:
            raise busy_primary_error(provider.name, exc.reason)
        if exc.down:
            provider.health.mark_down(exc.reason)

    def attempt_error(self, provider: P, exc: BaseException, *, t0: float | None) -> None:
        """The statement failed with a SQL error (it propagates unchanged)."""
        if t0 is not None:
            self.events.query_done(provider.name, time.perf_counter() - t0, "sql_error")
        if self.events:
            self.events.query_error(provider.name, exc)

    def attempt_ok(self, provider: P, epoch: int, failures: dict[str, str] | None,
                   route: Route[P], t0: float | None) -> None:
        if t0 is not None:
            self.events.query_done(provider.name, time.perf_counter() - t0, "ok")
        if route.routed:
            return
        name = provider.name
        # A read served by the primary that served the last one changes nothing.
        if route.write or name != self.serving or name != self.primary:
            self.succeeded(provider, epoch=epoch, failures=failures, write=route.write)

    def transaction_error(
        self, provider: P, exc: psycopg.Error, *, phase: str, hung: bool
    ) -> Exception | None:
        """Why a pinned transaction failed; None for a SQL error (re-raise it unchanged).

        A read-only refusal (SQLSTATE 25006) is the caller's SQL error too: the
        connection is fine. Inside a block it may be the caller's own ``SET
        TRANSACTION READ ONLY``, so a probe at once decides whether the server
        is writable (a demoted one is then marked so); it is never marked down.
        """
        kind = classify(exc)
        if kind is not Kind.UNAVAILABLE:
            tag(exc, provider.name)
            if kind is Kind.READ_ONLY:
                provider.health.request_probe()
            return None
        health = provider.health
        reason = health.failure_reason(exc, hung)
        health.mark_down(reason)
        if phase == "commit":
            return OutcomeUnknownError(provider.name, reason)
        error = HangTimeoutError if hung else ProviderUnavailableError
        return error(
            provider.name,
            reason,
            f"transaction on provider {provider.name!r} lost its connection before "
            f"COMMIT ({reason}); nothing was committed",
        )

    def all_failed(self, failures: dict[str, str] | None, *, write: bool) -> Exception:
        if self.closed:
            return ManagerClosedError("DatabaseManager is closed; create a new one")
        reasons = dict(failures or {})
        for p in self.plan:
            if p.name in reasons:
                continue
            h = p.health
            if not h.breaker.up:
                reasons[p.name] = f"down: {h.last_error or 'unavailable'}"
            elif write and not h.writable:
                reasons[p.name] = "read-only: cannot take writes"
            elif write and (bound := self.settings.max_replication_lag) is not None:
                lag = self.lag(p.name)
                seen = "unknown" if lag is None else f"{lag.seconds:.1f}s"
                reasons[p.name] = (
                    f"stale: replication lag {seen} exceeds max_replication_lag {bound:g}s; "
                    "writes refused so that nothing is written onto stale data"
                )
        return AllProvidersUnavailableError(reasons)

    def on_health_change(self, name: str, up: bool, reason: str | None) -> None:
        self.epoch += 1
        self.events.emit(lambda li: li.on_health_change(name, up, reason))

    def _served_by(self, name: str, failures: dict[str, str] | None) -> None:
        primary = self.primary
        if name == self.serving and name != primary:
            # Still on the same backup: only the rate-limited warning is due.
            now = self._clock()
            if now < self._next_log:
                self._suppressed += 1
                return
        with self._lock:
            previous, self.serving = self.serving, name
        if name == primary:
            if previous is not None and previous != primary:
                logger.warning("returned to primary provider %r (from %r)", primary, previous,
                               extra={"event": "return_to_primary", "provider": primary,
                                      "from_provider": previous})
                self.events.emit(lambda li: li.on_return_to_primary(primary, previous))
            return
        reason = (failures or {}).get(primary) or self.providers[primary].health.last_error
        if previous != name:
            self.events.emit(lambda li: li.on_failover(previous or primary, name, reason))
        now = self._clock()
        if now < self._next_log:
            self._suppressed += 1
            return
        self._next_log = now + self.settings.failover_log_interval
        more = f" ({self._suppressed} more since last log)" if self._suppressed else ""
        self._suppressed = 0
        logger.warning(
            "Executed on failover provider %r (primary %r unavailable) — reason: %s%s",
            name, primary, reason, more,
            extra={"event": "failover", "provider": name, "primary": primary},
        )

    # -- the write gate (failback) -------------------------------------------------

    def enter_write(self, block: bool = True, force: bool = False) -> bool | None:
        """Count a write in, waiting while writes are paused (at most write_pause_timeout).

        True when it waited (route the write again: the primary may be back),
        False when it did not, None when ``block`` is False and it would wait.
        ``force`` counts it in even while paused (a waiter that ran out of time).
        """
        with self._gate:
            waited = self._blocked()
            if waited and not force:
                if not block:
                    return None
                if not self._wait_unblocked(time.monotonic() + self.settings.write_pause_timeout):
                    logger.warning("writes paused longer than write_pause_timeout; going on",
                                   extra={"event": "write_pause_timeout",
                                          "provider": self.primary})
            self._writers += 1
            return waited

    def _blocked(self) -> bool:
        """Writes wait now (the gate's lock held): paused, or held and the hold not over.

        A write with no hold set reads no clock."""
        if self._held_until and time.monotonic() >= self._held_until:
            self._held_until = 0.0
        return self._paused or bool(self._held_until)

    def _wait_unblocked(self, limit: float) -> bool:
        """Wait (the gate's lock held) until writes may go, at most until ``limit``."""
        while self._blocked():
            now = time.monotonic()
            if now >= limit:
                return False
            wake = min(limit, self._held_until) if self._held_until and not self._paused else limit
            self._gate.wait(wake - now)
        return True

    def exit_write(self) -> None:
        with self._gate:
            self._writers -= 1
            if self._paused and self._writers == 0:
                self._gate.notify_all()

    def pause_writes(self, timeout: float) -> bool:
        """Stop new writes and wait for those in flight; False if they did not finish."""
        with self._gate:
            self._paused = True
            return self._gate.wait_for(lambda: self._writers == 0, timeout)

    def resume_writes(self) -> None:
        with self._gate:
            self._paused = False
            self._gate.notify_all()

    def hold_writes(self, seconds: float) -> None:
        """Hold new writes for ``seconds`` from now (0: release them): the start-up
        drain's gate, apart from the failback switch's `pause_writes` (either one
        holds them). A hold ends by itself when its time is up."""
        with self._gate:
            self._held_until = time.monotonic() + seconds if seconds > 0 else 0.0
            self._gate.notify_all()

    def describe(self, provider: P) -> RoleStats:
        """What the manager adds to a provider's stats: role, lag, pending failback."""
        lag = self.lag(provider.name)
        bound = self.settings.max_replication_lag
        since = self.diverged.get(provider.name)
        return {
            "role": self.role(provider),
            "replication_lag_s": None if lag is None else lag.seconds,
            "replication_lag_bytes": None if lag is None else lag.bytes,
            "stale": bound is not None and not self.lag_ok(provider.name, bound),
            "failback_pending_since": None if since is None else since.isoformat(),
        }

    def role(self, provider: P) -> str:
        if not provider.health.breaker.up:
            # The primary in the failback window serves reads, not writes yet
            # (as `route` decides: only the primary).
            returning = provider.health.returning and provider.name == self.primary
            return "returning" if returning else "down"
        if provider.name == self.primary:
            return "primary"
        return "serving" if provider.name == self.serving else "backup"


def busy_primary_error(name: str, reason: str) -> ProviderUnavailableError:
    """A write on a busy (but live) primary waits there; it never moves to a backup.

    A write on a backup while the primary takes others would fork the data
    (a conflict to settle at failback); back-pressure is the caller's to see.
    """
    return ProviderUnavailableError(
        name, f"{reason}; a write does not move to a backup while the primary is up "
        "(nothing was sent: retry, or raise pool_max_size / checkout_timeout)")

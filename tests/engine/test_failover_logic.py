"""`Failover`, the decision core, without servers: routing, outcomes, the write gate, lag.

The providers are fakes holding what the core reads of them: a name and a
health with a real `Breaker`, writability, latency, load and the replication
lag its publisher measured. Time is a fake clock, so nothing here sleeps
except the write gate's waits, which are real threads with short timeouts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from psycopg import sql

from agent_factory.engine.events import Dispatcher, Listener
from agent_factory.engine.failover import Failover, Route
from agent_factory.engine.lag import Lag
from agent_factory.engine.policy import Breaker, may_retry_after_send
from agent_factory.engine.provider import Unavailable
from agent_factory.engine.settings import Settings
from agent_factory.errors import (
    AllProvidersUnavailableError,
    ManagerClosedError,
    OutcomeUnknownError,
)

NAMES = ("a", "b", "c")  # "a" is the primary, then the failover order
LOGGER = "agent_factory.core.database_manager"
READ, WRITE = "SELECT 1", "INSERT INTO t VALUES (1)"


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeHealth:
    """What the core reads of a provider's health, around a real breaker."""

    def __init__(self, clock: Clock) -> None:
        self.breaker = Breaker()
        self.writable = True
        self.returning = False
        self.replication: dict[str, Lag] = {}
        self.last_alive = 0.0
        self.latency_ewma: float | None = None
        self.in_flight = 0
        self.tuning = SimpleNamespace(weight=1)
        self.probes_requested = 0
        #: Wired to `Failover.on_health_change`, as the managers do.
        self.on_change: Callable[[bool, str | None], None] = lambda up, reason: None
        self._clock = clock

    @property
    def last_error(self) -> str | None:
        return self.breaker.last_error

    def mark_down(self, reason: str) -> None:
        if self.breaker.fail(reason, self._clock()):
            self.on_change(False, reason)

    def recover(self, required: int = 2) -> None:
        """Good probes in a row until the breaker closes."""
        for _ in range(required):
            if self.breaker.succeed(self._clock(), 0.001, required):
                self.on_change(True, None)

    def request_probe(self) -> None:
        self.probes_requested += 1


class FakeProvider:
    def __init__(self, name: str, clock: Clock) -> None:
        self.name = name
        self.health = FakeHealth(clock)

    def stats(self) -> dict[str, Any]:
        return {}


class Events(Listener):
    """Every event the core emitted, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        self.seen.append(("failover", from_provider, to_provider, reason))

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        self.seen.append(("return", primary, from_provider))

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        self.seen.append(("health", provider, healthy))

    def on_query_error(self, provider: str, error: BaseException) -> None:
        self.seen.append(("sql_error", provider, error))

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        self.seen.append(("query", provider, outcome))


class Rig:
    """A `Failover` over three fake providers, its clock and what it emitted."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.events = Events()
        urls = {n: f"postgresql://app@127.0.0.1:{5001 + i}/db" for i, n in enumerate(NAMES)}
        self.providers = {n: FakeProvider(n, self.clock) for n in NAMES}
        self.core: Failover[Any] = Failover(
            Settings.build(urls, **options), self.providers, Dispatcher([self.events]),
            clock=self.clock)
        self.core.replan()
        for name, provider in self.providers.items():
            provider.health.on_change = (
                lambda up, reason, name=name: self.core.on_health_change(name, up, reason))

    def __getitem__(self, name: str) -> FakeProvider:
        return self.providers[name]

    def route(self, query: str = READ, read_only: bool | None = None,
              idempotent: bool | None = None) -> Route[Any]:
        return self.core.route(query, read_only=read_only, idempotent=idempotent)

    def names(self, query: str = READ, read_only: bool | None = None,
              idempotent: bool | None = None) -> list[str]:
        return [p.name for p in self.route(query, read_only, idempotent).providers]

    def serve(self, name: str, query: str = READ, failures: dict[str, str] | None = None,
              epoch: int | None = None) -> None:
        """``name`` served the statement (a routed read, unless the route says otherwise)."""
        route = self.route(query)
        self.core.attempt_ok(self[name], epoch=self.core.epoch if epoch is None else epoch,
                             failures=failures, route=route, t0=None)

    def lose(self, name: str, query: str = READ, *, sent: bool = False,
             idempotent: bool | None = None) -> tuple[Exception | None, dict[str, str]]:
        """``name`` could not serve (its connection refused, or lost once ``sent``)."""
        failures: dict[str, str] = {}
        error = self.core.attempt_unavailable(
            self[name], Unavailable(f"{name} refused", sent=sent),
            route=self.route(query, idempotent=idempotent), failures=failures, t0=None)
        return error, failures

    def failover_warnings(self, caplog: pytest.LogCaptureFixture) -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == LOGGER and r.getMessage().startswith("Executed on failover")]


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- routing -------------------------------------------------------------------------


def test_statements_go_to_the_primary_first_then_the_failover_order(rig: Rig) -> None:
    assert rig.names(READ) == ["a", "b", "c"]
    assert rig.names(WRITE) == ["a", "b", "c"]
    rig.core.set_order(["c", "b"])
    assert rig.names(READ) == ["a", "c", "b"]
    rig.core.set_primary("b")
    assert rig.names(WRITE) == ["b", "c"]
    with pytest.raises(ValueError, match="'z' not configured"):
        rig.core.set_primary("z")


def test_only_the_primary_without_failover() -> None:
    assert Rig(failover_enabled=False).names(READ) == ["a"]


def test_a_provider_with_an_open_breaker_is_skipped_until_it_recovers(rig: Rig) -> None:
    rig["a"].health.mark_down("refused")
    assert rig.names(READ) == ["b", "c"]
    assert rig.names(WRITE) == ["b", "c"]
    rig["a"].health.recover()
    assert rig.names(READ) == ["a", "b", "c"]
    assert [e for e in rig.events.seen if e[0] == "health"] == [
        ("health", "a", False), ("health", "a", True)]


def test_reads_and_writes_are_told_apart_and_only_reads_are_retried_after_sending(
    rig: Rig,
) -> None:
    read, write = rig.route(READ), rig.route(WRITE)
    assert not read.write and read.retry_after_send
    assert write.write and not write.retry_after_send
    assert rig.route(WRITE, idempotent=True).retry_after_send
    assert rig.route("SELECT my_fn()", read_only=True).write is False  # the caller's word


def test_writes_skip_read_only_providers_reads_do_not(rig: Rig) -> None:
    rig["a"].health.writable = False
    assert rig.names(WRITE) == ["b", "c"]
    assert rig.names(READ) == ["a", "b", "c"]


def test_writes_skip_backups_beyond_the_replication_lag_bound() -> None:
    rig = Rig(max_replication_lag=2.0)
    primary = rig["a"].health
    primary.last_alive = rig.clock.now
    primary.replication = {"b": Lag(0, 1.0, measured_at=rig.clock.now)}  # "c": unknown
    assert rig.names(WRITE) == ["a", "b"]
    assert rig.names(READ) == ["a", "b", "c"]  # the bound is for writes only
    primary.replication["b"] = Lag(0, 2.5, measured_at=rig.clock.now)
    assert rig.names(WRITE) == ["a"]


def test_a_statement_declared_not_idempotent_is_routed_as_a_write() -> None:
    rig = Rig(read_routing="round_robin")
    rig["a"].health.writable = False
    route = rig.route(READ, read_only=True, idempotent=False)
    assert route.write and not route.routed and not route.retry_after_send
    assert [p.name for p in route.providers] == ["b", "c"]


@pytest.mark.parametrize("read_only", [True, None])
def test_a_statement_declared_not_idempotent_gets_every_safety_of_a_write(
    read_only: bool | None,
) -> None:
    """No retry, no backup of unknown lag, divergence and read-your-writes once written."""
    rig = Rig(read_routing="round_robin", read_your_writes=5.0, max_replication_lag=10.0)
    insert = "SELECT my_insert_fn(%s)"
    route = rig.route(insert, read_only=read_only, idempotent=False)
    assert route.write and not route.routed and not route.retry_after_send
    # max_replication_lag: the backups' lag is unknown, so they may not take it.
    assert [p.name for p in route.providers] == ["a"]
    rig["a"].health.breaker.up = False
    assert rig.route(insert, read_only=read_only, idempotent=False).providers == []
    # Written on the backup (once its lag is known): divergence and read-your-writes.
    rig["a"].health.replication["b"] = Lag(0, 0.5, 99.0)
    rig["a"].health.last_alive = 99.0
    (backup,) = rig.route(insert, read_only=read_only, idempotent=False).providers
    rig.core.succeeded(backup, epoch=rig.core.epoch, failures={"a": "refused"}, write=True)
    assert "b" in rig.core.diverged and rig.core.last_write == rig.clock.now
    rig["a"].health.breaker.up = True
    assert not rig.route(READ, read_only=True).routed  # reads stay on the primary a while
    rig.clock.advance(5.0)
    assert rig.route(READ, read_only=True).routed


@pytest.mark.parametrize("read_only", [True, False, None])
@pytest.mark.parametrize("idempotent", [True, False, None])
def test_route_retries_by_the_same_rule_for_text_and_composed_queries(
    rig: Rig, read_only: bool | None, idempotent: bool | None
) -> None:
    """`idempotent` wins, then `read_only`; without either a composed query is not retried."""
    text = rig.route(READ, read_only=read_only, idempotent=idempotent)
    composed = rig.core.route(sql.SQL("SELECT {}").format(1), read_only=read_only,
                              idempotent=idempotent)
    assert text.retry_after_send is may_retry_after_send(READ, read_only, idempotent)
    if idempotent is False:
        assert composed.write is text.write is True  # must not run twice: a write
    elif read_only is None:
        assert composed.write is True  # cannot tell what it does: treated as a write
    else:
        assert composed.write is text.write is not read_only
    if read_only is None and idempotent is None:
        assert composed.retry_after_send is False
    else:
        assert composed.retry_after_send is text.retry_after_send


def test_the_classifier_alone_routes_an_unknown_function_as_a_write(rig: Rig) -> None:
    assert rig.route("SELECT my_insert_fn(%s)").write
    assert not rig.route("SELECT lower(%s)").write
    assert rig.route("SELECT lower(%s)", idempotent=False).write


def test_round_robin_rotates_declared_reads_only() -> None:
    rig = Rig(read_routing="round_robin", read_your_writes=0.0)
    firsts = [rig.names(READ, read_only=True)[0] for _ in range(6)]
    assert firsts == ["b", "c", "a", "b", "c", "a"]
    assert rig.route(READ, read_only=True).routed
    # Without read_only=True a read stays on the primary, and is not "routed".
    assert rig.names(READ) == ["a", "b", "c"]
    assert not rig.route(READ).routed
    rig["b"].health.mark_down("refused")
    assert all("b" not in rig.names(READ, read_only=True) for _ in range(3))


def test_nearest_and_least_busy_order_declared_reads() -> None:
    nearest = Rig(read_routing="nearest", read_your_writes=0.0)
    for name, latency in zip(NAMES, (0.030, 0.001, 0.010), strict=True):
        nearest[name].health.latency_ewma = latency
    assert nearest.names(READ, read_only=True) == ["b", "c", "a"]
    busy = Rig(read_routing="least_busy", read_your_writes=0.0)
    for name, calls in zip(NAMES, (5, 3, 0), strict=True):
        busy[name].health.in_flight = calls
    assert busy.names(READ, read_only=True) == ["c", "b", "a"]
    assert Rig(read_routing="primary").names(READ, read_only=True) == ["a", "b", "c"]


def test_declared_reads_stay_on_the_primary_for_read_your_writes_after_a_write() -> None:
    rig = Rig(read_routing="nearest", read_your_writes=2.0)
    rig["a"].health.latency_ewma = 0.050
    rig["b"].health.latency_ewma = 0.001
    rig.clock.advance(10.0)
    assert rig.names(READ, read_only=True)[0] == "b"
    rig.serve("a", WRITE)
    assert not rig.route(READ, read_only=True).routed
    assert rig.names(READ, read_only=True)[0] == "a"
    rig.clock.advance(2.0)
    assert rig.names(READ, read_only=True)[0] == "b"


# -- outcomes ------------------------------------------------------------------------


def test_the_primary_serving_emits_nothing(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.serve("a")
    assert rig.core.serving == "a"
    assert rig.events.seen == []
    assert caplog.records == []


def test_failover_then_return_to_the_primary(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    rig.serve("a")
    error, failures = rig.lose("a")
    assert error is None  # not sent: try the next provider
    assert failures == {"a": "a refused"}
    assert not rig["a"].health.breaker.up
    rig.serve("b", failures=failures)
    assert rig.core.serving == "b"
    assert rig.core.role(rig["b"]) == "serving" and rig.core.role(rig["a"]) == "down"
    assert rig.events.seen[-1] == ("failover", "a", "b", "a refused")
    assert rig.failover_warnings(caplog) == [
        "Executed on failover provider 'b' (primary 'a' unavailable) — reason: a refused"]
    rig["a"].health.recover()
    rig.serve("a")
    assert rig.core.serving == "a"
    assert rig.events.seen[-1] == ("return", "a", "b")
    assert "returned to primary provider 'a' (from 'b')" in caplog.text


def test_reads_go_to_a_returning_primary_and_writes_wait_for_its_return(rig: Rig) -> None:
    """The failback window: probes pass, the drain still holds the breaker open."""
    rig["a"].health.mark_down("refused")
    rig.serve("b", WRITE)
    assert rig.core.serving == "b"
    rig["a"].health.returning = True
    assert rig.core.role(rig["a"]) == "returning"
    assert rig.names(READ) == ["a", "b", "c"]
    assert rig.names(WRITE) == ["b", "c"]
    rig.serve("a")  # a read there is no return: writes still go to b
    assert rig.core.serving == "b"
    assert not [e for e in rig.events.seen if e[0] == "return"]
    rig["a"].health.returning = False
    rig["a"].health.recover()
    rig.serve("a", WRITE)
    assert rig.core.serving == "a"
    assert rig.events.seen[-1] == ("return", "a", "b")
    # Only the primary is read while it returns: a backup returning is not.
    rig["b"].health.mark_down("refused")
    rig["b"].health.returning = True
    assert rig.names(READ) == ["a", "c"]
    assert rig.core.role(rig["b"]) == "down"


def test_a_write_lost_after_sending_is_an_unknown_outcome(rig: Rig) -> None:
    error, failures = rig.lose("a", WRITE, sent=True)
    assert isinstance(error, OutcomeUnknownError)
    assert error.provider == "a" and "a refused" in str(error)
    assert failures == {"a": "a refused"}
    # A read, or a write declared idempotent, is retried elsewhere instead.
    assert rig.lose("b", READ, sent=True)[0] is None
    assert rig.lose("c", WRITE, sent=True, idempotent=True)[0] is None


def test_a_read_only_refusal_moves_on_without_marking_the_provider_down(rig: Rig) -> None:
    failures: dict[str, str] = {}
    refused = Unavailable("read-only", sent=False, down=False)
    outcome = rig.core.attempt_unavailable(rig["a"], refused, route=rig.route(WRITE),
                                           failures=failures, t0=0.0)
    assert outcome is None
    assert rig["a"].health.breaker.up
    assert failures == {"a": "read-only"}
    assert rig.events.seen == [("query", "a", "unavailable")]


def test_a_sql_error_is_reported_and_changes_nothing(rig: Rig) -> None:
    error = ValueError("syntax error")
    rig.core.attempt_error(rig["a"], error, t0=0.0)
    assert rig.events.seen == [("query", "a", "sql_error"), ("sql_error", "a", error)]
    assert rig["a"].health.breaker.up and rig.core.serving is None


def test_a_call_that_began_before_a_health_change_does_not_move_the_traffic(rig: Rig) -> None:
    rig.serve("a")
    before = rig.core.epoch
    rig["a"].health.mark_down("hung")
    rig["a"].health.recover()
    assert rig.core.epoch == before + 2
    rig.serve("b", epoch=before)  # stuck since before the primary went and came back
    assert rig.core.serving == "a"
    rig.serve("b")
    assert rig.core.serving == "b"


def test_a_backup_answering_while_the_primary_went_down_is_the_failover(rig: Rig) -> None:
    # CI: a write refused by the primary went to b; a probe marked the primary
    # down while b ran it. The answer came from the stale epoch, yet it is
    # where traffic goes now: serving stayed None and the failover unreported.
    rig.serve("a")
    before = rig.core.epoch
    rig["a"].health.mark_down("refused")
    rig.serve("b", epoch=before)
    assert rig.core.serving == "b"


def test_the_failover_warning_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig(failover_log_interval=10.0)
    rig["a"].health.mark_down("refused")
    rig.serve("b")
    rig.clock.advance(4.0)
    rig.serve("b")
    rig.serve("b")
    assert len(rig.failover_warnings(caplog)) == 1
    rig.clock.advance(6.0)
    rig.serve("b")
    assert rig.failover_warnings(caplog)[1].endswith("reason: refused (2 more since last log)")
    assert [e for e in rig.events.seen if e[0] == "failover"] == [
        ("failover", "a", "b", "refused")]  # one event, not one per call


def test_a_write_on_a_backup_is_remembered_for_failback() -> None:
    rig = Rig(reconcile_margin=120.0)
    rig["a"].health.mark_down("refused")
    rig.serve("b", READ)
    assert rig.core.diverged == {}  # a read diverges nothing
    rig.serve("b", WRITE)
    assert set(rig.core.diverged) == {"b"}
    assert rig.core.last_write == rig.clock.now
    assert Rig(failback_reconcile=False).core.track_writes is False


def test_all_failed_names_why_each_provider_could_not_serve() -> None:
    rig = Rig(max_replication_lag=2.0)
    rig["a"].health.mark_down("refused")
    rig["b"].health.writable = False
    error = rig.core.all_failed({"a": "connection refused"}, write=True)
    assert isinstance(error, AllProvidersUnavailableError)
    assert error.reasons["a"] == "connection refused"  # what the attempt saw wins
    assert error.reasons["b"] == "read-only: cannot take writes"
    assert error.reasons["c"].startswith("stale: replication lag unknown")
    rig["c"].health.mark_down("timeout")
    assert rig.core.all_failed(None, write=False).reasons == {
        "a": "down: refused", "c": "down: timeout"}
    rig.core.closed = True
    assert isinstance(rig.core.all_failed(None, write=False), ManagerClosedError)


# -- the write gate ------------------------------------------------------------------


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


@pytest.fixture
def gate() -> Iterator[Failover[Any]]:
    core = Rig(write_pause_timeout=5.0).core
    yield core
    core.resume_writes()  # frees a waiter a failed test left behind


def test_writes_pass_the_gate_while_it_is_open(gate: Failover[Any]) -> None:
    assert gate.enter_write() is False  # did not wait
    assert gate.enter_write(block=False) is False
    gate.exit_write()
    gate.exit_write()
    assert gate.pause_writes(timeout=0.0) is True  # none left in flight


def test_pausing_waits_for_the_writes_in_flight(gate: Failover[Any]) -> None:
    gate.enter_write()
    assert gate.pause_writes(timeout=0.01) is False  # one still in flight
    pauser, out = in_thread(lambda: gate.pause_writes(timeout=5.0))
    pauser.join(0.05)
    assert pauser.is_alive()
    gate.exit_write()
    pauser.join(2.0)  # woken by the last write's exit, long before its 5 s timeout
    assert not pauser.is_alive() and out == [True]


def test_a_write_waits_while_paused_and_goes_on_when_resumed(
    gate: Failover[Any],
) -> None:
    assert gate.pause_writes(timeout=1.0)
    assert gate.enter_write(block=False) is None  # would wait
    writer, out = in_thread(gate.enter_write)
    writer.join(0.05)
    assert writer.is_alive()
    gate.resume_writes()
    writer.join(2.0)  # woken by the resume, long before write_pause_timeout (5 s)
    assert not writer.is_alive()
    assert out == [True]  # it waited: route it again, the primary may be back
    assert gate.pause_writes(timeout=0.01) is False  # and it is counted in
    gate.exit_write()


def test_the_start_up_hold_and_a_failback_pause_hold_writes_apart(
    gate: Failover[Any],
) -> None:
    gate.hold_writes(30.0)  # a new instance's first drain pass
    assert gate.enter_write(block=False) is None
    assert gate.pause_writes(timeout=1.0)  # a failback switch meanwhile ...
    gate.resume_writes()  # ... ends: the start-up hold still holds
    assert gate.enter_write(block=False) is None
    writer, out = in_thread(gate.enter_write)
    writer.join(0.05)
    assert writer.is_alive()
    gate.hold_writes(0)
    writer.join(2.0)
    assert not writer.is_alive() and out == [True]
    gate.exit_write()


def test_a_start_up_hold_ends_by_itself(gate: Failover[Any]) -> None:
    gate.hold_writes(0.2)
    assert gate.enter_write(block=False) is None
    writer, out = in_thread(gate.enter_write)
    writer.join(3.0)  # released when the hold's time is up, long before write_pause_timeout
    assert not writer.is_alive() and out == [True]
    assert gate.enter_write(block=False) is False
    gate.exit_write()
    gate.exit_write()


def test_a_write_paused_too_long_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    core = Rig(write_pause_timeout=0.05).core
    assert core.pause_writes(timeout=1.0)
    assert core.enter_write() is True
    assert "writes paused longer than write_pause_timeout; going on" in caplog.text
    assert core.pause_writes(timeout=0.0) is False  # counted in, though still paused
    assert core.enter_write(force=True) is True  # a forced one does not wait at all
    core.exit_write()
    core.exit_write()
    core.resume_writes()


# -- the replication lag bound -------------------------------------------------------


def lagging(sample: Lag | None, primary_alive: float, **options: Any) -> Rig:
    """A rig whose primary measured ``sample`` of b's lag and was last alive at ``primary_alive``.

    "c"'s lag is unknown.
    """
    rig = Rig(**options)
    health = rig["a"].health
    health.replication = {} if sample is None else {"b": sample}
    health.last_alive = primary_alive
    return rig


def test_lag_is_bounded_by_the_primarys_last_sign_of_life() -> None:
    """The sample, plus what the primary may have written after it until it fell silent."""
    core = lagging(Lag(1024, 1.0, measured_at=100.0), primary_alive=100.0).core
    lag = core.lag("b")
    assert lag is not None and lag.seconds == 1.0 and lag.bytes == 1024
    # The primary kept answering (and maybe writing) for 3 s after its last probe.
    core = lagging(Lag(1024, 1.0, measured_at=100.0), primary_alive=103.0).core
    lag = core.lag("b")
    assert lag is not None and lag.seconds == 4.0 and lag.bytes == 1024
    assert core.lag("a") is None  # the primary itself
    assert lagging(None, primary_alive=103.0).core.lag("b") is None


def test_writes_after_the_primary_died_obey_the_bounded_lag() -> None:
    """Not refused for the whole outage; not let through onto a backup already too far behind."""
    fresh = lagging(Lag(0, 0.5, measured_at=100.0), 101.0, max_replication_lag=2.0)
    fresh["a"].health.breaker.up = False  # the primary died at ~101
    for later in (0.0, 60.0, 3600.0):  # however long the outage lasts
        fresh.clock.now = 101.0 + later
        assert fresh.names(WRITE) == ["b"]  # "c": lag unknown
        assert fresh.core.describe(fresh["b"])["replication_lag_s"] == 1.5
        assert fresh.core.describe(fresh["b"])["stale"] is False
    # The sample alone (0.5 s) is within the bound, but the primary wrote for 5 s more.
    wrote_on = lagging(Lag(0, 0.5, measured_at=100.0), 105.0, max_replication_lag=2.0)
    wrote_on["a"].health.breaker.up = False
    assert wrote_on.names(WRITE) == []
    stats = wrote_on.core.describe(wrote_on["b"])
    assert stats["replication_lag_s"] == 5.5 and stats["stale"] is True
    error = wrote_on.core.all_failed({}, write=True)
    assert "stale: replication lag 5.5s exceeds max_replication_lag 2s" in str(error)
    # A backup already too far behind at the last sample stays refused.
    behind = lagging(Lag(0, 3.0, measured_at=100.0), 100.0, max_replication_lag=2.0)
    behind["a"].health.breaker.up = False
    assert behind.names(WRITE) == []


def test_lag_ok_bounds_the_lag_by_the_primarys_last_sign_of_life(rig: Rig) -> None:
    primary = rig["a"].health
    assert rig.core.lag_ok("a", 0.1)  # the primary is never behind itself
    assert not rig.core.lag_ok("b", 2.0)  # never measured: not known to be fresh
    primary.replication["b"] = Lag(512, 1.5, measured_at=100.0)
    primary.last_alive = 100.0
    assert rig.core.lag_ok("b", 2.0)
    assert rig.core.lag_ok("b", 1.5)  # the bound itself is within
    primary.last_alive = 101.0  # it may have written for one more second
    assert not rig.core.lag_ok("b", 2.0)
    lag = rig.core.lag("b")
    assert lag is not None and (lag.seconds, lag.bytes) == (2.5, 512)
    rig.clock.advance(3600.0)  # a dead primary writes no more: the bound does not grow
    assert rig.core.lag("b") == lag

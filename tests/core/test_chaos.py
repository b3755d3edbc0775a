"""Chaos tests: a mixed load of reads and writes while the fault proxy and the servers misbehave.

Each test runs worker threads against a `DatabaseManager` over the real fleet
and injects real faults (proxy resets and blackholes, added latency, kill -9,
SIGSTOP, an exhausted pool). The assertions are the ones that matter to an
application:

* bounded latency: no call ever blocks much past the documented deadlines;
* no write applied twice: every write carries a unique id; an acknowledged
  write exists exactly once, on the provider that acknowledged it; a write
  whose outcome is unknown exists at most once, and only on the provider it was
  sent to; a write refused everywhere exists nowhere;
* only documented errors: `OutcomeUnknownError` for a non-idempotent write
  that lost its connection, `AllProvidersUnavailableError` when nothing can
  serve, nothing else;
* recovery: once the faults stop, traffic returns to the primary.

The load's table is not registered for failback reconciliation, so a write
served by a backup stays there: "on two providers" always means applied twice.
Bounds are generous (CI runs this on two shared cores) but far below "hung".
The tests at the end pin down bugs these scenarios once found (a silent
primary during the failback copy, a slow primary, a cancelled async write);
each raises `StillBroken` for that symptom only. The harness (the load, its
checks, the faults) is tests/chaos.py.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from chaos import (
    CALL_BOUND,
    FAST,  # noqa: F401  (make_db's default timings)
    HANG_TIMEOUT,
    Load,
    StillBroken,
    active_backends,
    blackhole_while_blocked,
    can_query,
    diverge,
    ids_on,
    inject,
    join_or_unblock,
    reset_while_running,
    run_in_thread,
    silence,
    silence_pooled_connection,
    summary,
    unblock,
    undo,
)
from conftest import MakeDb
from defaults import ORDER
from fleet import local_port, wait_until
from observers import HealthLog, Reconciled, provider_of, served_by

from agent_factory.errors import (
    AllProvidersUnavailableError,
    HangTimeoutError,
    OutcomeUnknownError,
    ProviderError,
)
from agent_factory.testing.fleet import Fleet

# -- 1. flapping primary ------------------------------------------------------------


FLAPS = [
    pytest.param(("reset", "hang", "refuse") * 2, {}, id="reset-hang-refuse"),
    pytest.param(("reset", "blackhole") * 3, {}, id="reset-blackhole"),
    # The same with failback reconciliation off: the data path on its own.
    pytest.param(("reset", "blackhole") * 3, {"failback_reconcile": False},
                 id="reset-blackhole-no-failback"),
]


@pytest.mark.parametrize(("faults", "options"), FLAPS)
def test_flapping_primary_bounded_no_double_write_and_recovery(
    table: str, make_db: MakeDb, healthy_fleet: Fleet,
    faults: tuple[str, ...], options: dict[str, Any],
) -> None:
    """The primary fails and comes back six times in ~4 s under a mixed load.

    No call takes longer than CALL_BOUND. The backups stay up, so every read
    succeeds and every write is either acknowledged (exactly once, where it
    says) or unknown (at most once, only on the primary). Afterwards the calls
    settle on the primary again.
    """
    db = make_db(pool_max_size=6, **options)
    assert served_by(db, healthy_fleet) == "supabase"
    with Load(db, healthy_fleet, table, workers=4) as load:
        wait_until(lambda: load.count() > 40, timeout=20, message="warm-up load")
        for fault in faults:
            inject(healthy_fleet, fault)
            time.sleep(0.4)  # pacing the faults, not synchronising
            undo(healthy_fleet, fault)
            time.sleep(0.25)
        # Recovery: the calls settle on the primary again (a connection left
        # silent by the last blackhole may still cost one more blip first).
        wait_until(load.settled_on_primary, timeout=20,
                   message="traffic settled back on the primary after the flapping")
    load.assert_bounded()
    load.assert_only(reads={"ok"}, writes={"ok", "unknown"})
    outcomes = load.assert_no_write_twice()
    # The faults really moved traffic (or lost writes).
    assert any(o.provider != "supabase" or o.outcome != "ok" for o in load.ops), summary(load.ops)
    assert outcomes["ok"] > 0


# -- 2. slow primary --------------------------------------------------------------

SLOW = 0.1  # added each way by the proxy: 200 ms more per round trip


def test_slow_primary_is_not_failed_over(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """200 ms more per round trip on the primary's link: slower, but alive, so it keeps the traffic.

    Even a statement that runs longer than hang_timeout on the slow link is not
    abandoned: the watchdog's liveness probes keep proving the server alive.
    The pool and the health monitor's connection are opened (and its probe
    statements prepared) before the link slows down: a probe that opens its
    connection on the slow link is the bug of
    `test_slow_primary_cold_probe_is_not_failed_over`.
    """
    health = HealthLog()
    db = make_db(listeners=[health], pool_min_size=4, pool_max_size=4)
    assert served_by(db, healthy_fleet) == "supabase"
    wait_until(lambda: db.get_provider_stats()["supabase"]["pool_size"] == 4, timeout=10,
               message="the pool filled")
    for _ in range(6):  # past psycopg's prepare threshold: no probe pays for preparing
        assert db.health_check_all(max_age=0) == dict.fromkeys(ORDER, True)
    healthy_fleet["supabase"].proxy.set_latency(SLOW)
    with Load(db, healthy_fleet, table, workers=3) as load:
        # One statement longer than hang_timeout, on the slow link.
        t0 = time.monotonic()
        (port,) = db.execute_query("SELECT inet_server_port() FROM pg_sleep(1.2)",
                                   fetch_mode="one")
        long_call = time.monotonic() - t0
        wait_until(lambda: load.count() > 30, timeout=30, message="load on the slow primary")
    assert provider_of(healthy_fleet, port) == "supabase"
    assert 1.2 + 2 * SLOW <= long_call < 1.2 + 2 * SLOW + 2.0, long_call
    load.assert_only(reads={"ok"}, writes={"ok"})
    assert {o.provider for o in load.ops} == {"supabase"}, summary(load.ops)
    # Really slowed down (one round trip each, at least), yet bounded.
    assert min(o.seconds for o in load.ops) >= 2 * SLOW - 0.02, summary(load.ops)
    load.assert_bounded(2 * SLOW * 3 + 2.0)
    load.assert_no_write_twice()
    assert health.changes == []  # never marked down
    assert db.get_provider_stats()["supabase"]["healthy"] is True


def test_slow_primary_cold_probe_is_not_failed_over(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """The same slow link, with the health monitor's connection not opened yet (a fresh manager)."""
    health = HealthLog()
    db = make_db(listeners=[health])
    assert served_by(db, healthy_fleet) == "supabase"  # the pooled connection is open
    healthy_fleet["supabase"].proxy.set_latency(SLOW)
    served = collections.Counter(served_by(db, healthy_fleet) for _ in range(10))
    t0 = time.monotonic()
    (port,) = db.execute_query("SELECT inet_server_port() FROM pg_sleep(1.2)", fetch_mode="one")
    served[provider_of(healthy_fleet, port)] += 1
    served.update(served_by(db, healthy_fleet) for _ in range(5))
    if set(served) != {"supabase"} or health.changes:
        raise StillBroken(f"a slow primary was failed over: served {dict(served)}, health "
                          f"{health.changes}, {time.monotonic() - t0:.1f}s, "
                          f"{db.get_provider_stats()['supabase']['last_error']}")


# -- 3. connection reset mid-query ---------------------------------------------------


def test_reset_mid_query_retries_reads_and_never_replays_writes(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """The primary's link is reset while a 0.5 s statement runs there.

    A read is retried on the first backup; a plain write raises
    OutcomeUnknownError and exists at most once (on the primary, if the orphaned
    statement committed); an idempotent write is retried on the backup.
    """
    db = make_db()
    fleet = healthy_fleet
    assert served_by(db, fleet) == "supabase"

    # A read: retried on the first backup, which runs the whole statement again.
    marker = f"read-{uuid.uuid4().hex[:8]}"
    out = reset_while_running(fleet, marker, lambda: db.execute_query(
        f"/* {marker} */ SELECT inet_server_port() FROM pg_sleep(0.5)", fetch_mode="one"))
    assert "error" not in out, out
    assert provider_of(fleet, out["result"][0]) == "railway"
    assert out["seconds"] < 0.5 + 0.5 + 2.0

    # Reads reach the primary while its drain runs; writes once it is done.
    wait_until(lambda: served_by(db, fleet) == "supabase" and db.serving_provider == "supabase",
               timeout=20, message="traffic back on the primary")

    # A plain write: never replayed; its fate on the primary is unknown.
    marker = f"write-{uuid.uuid4().hex[:8]}"
    out = reset_while_running(fleet, marker, lambda: db.execute_query(
        f"/* {marker} */ INSERT INTO {table} (id, note) SELECT 1, 'slow' FROM pg_sleep(0.5)",
        fetch_mode="none"))
    error = out.get("error")
    assert isinstance(error, OutcomeUnknownError), out
    assert error.provider == "supabase"
    assert out["seconds"] < 0.5 + 2.0
    # The server may still finish (and commit) the orphaned statement: wait for it.
    wait_until(lambda: active_backends(fleet, "supabase", marker) == 0, timeout=10,
               message="the orphaned statement to end on the primary")
    assert ids_on(fleet, "supabase", table) in ([], [1])
    assert ids_on(fleet, "railway", table) == []
    assert ids_on(fleet, "neon", table) == []

    # Reads reach the primary while its drain runs; writes once it is done.
    wait_until(lambda: served_by(db, fleet) == "supabase" and db.serving_provider == "supabase",
               timeout=20, message="traffic back on the primary")

    # The same write declared idempotent: retried on the backup, at most once per server.
    marker = f"idem-{uuid.uuid4().hex[:8]}"
    out = reset_while_running(fleet, marker, lambda: db.execute_query(
        f"/* {marker} */ INSERT INTO {table} (id, note) SELECT 2, 'idem' FROM pg_sleep(0.5) "
        "ON CONFLICT (id) DO NOTHING RETURNING inet_server_port()",
        fetch_mode="one", idempotent=True))
    assert "error" not in out, out
    assert provider_of(fleet, out["result"][0]) == "railway"
    wait_until(lambda: active_backends(fleet, "supabase", marker) == 0, timeout=10,
               message="the orphaned statement to end on the primary")
    assert ids_on(fleet, "railway", table) == [2]
    assert 2 not in ids_on(fleet, "neon", table)


# -- 4. pool exhaustion ------------------------------------------------------------


def test_pool_exhaustion_is_bounded_and_moves_calls_on(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """8 threads, 2 pooled connections per provider, 0.3 s statements, checkout_timeout 1 s.

    What happens (and is documented): a caller that gets no pooled connection
    within checkout_timeout moves on: the statement had not been sent, so it
    runs on the next provider. The provider is *not* marked down for it (the
    saturation is the client's own load; a dead or silent server is caught by
    its failed connects and the watchdog). With 6 connections in the whole fleet for 8 callers, some
    calls are served by backups and a call may even find every provider
    saturated (`AllProvidersUnavailableError`). No call waits more than one
    checkout_timeout per provider plus its own run time, nothing hangs, and no
    other error appears.
    """
    checkout = 1.0
    query = 0.3
    health = HealthLog()
    db = make_db(listeners=[health], pool_max_size=2, checkout_timeout=checkout)
    assert served_by(db, healthy_fleet) == "supabase"
    results: list[tuple[str, float, str | None]] = []
    lock = threading.Lock()

    def call() -> None:
        for _ in range(4):
            t0 = time.monotonic()
            try:
                (port,) = db.execute_query(
                    "SELECT inet_server_port() FROM pg_sleep(%s)", (query,), fetch_mode="one")
            except AllProvidersUnavailableError:
                outcome, provider = "all_down", None
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome, provider = f"error: {exc!r}", None
            else:
                outcome, provider = "ok", provider_of(healthy_fleet, port)
            with lock:
                results.append((outcome, time.monotonic() - t0, provider))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call) for _ in range(8)]
        for f in futures:
            f.result(timeout=60)
    assert len(results) == 32
    outcomes = collections.Counter(r[0] for r in results)
    assert set(outcomes) <= {"ok", "all_down"}, outcomes
    worst = max(r[1] for r in results)
    assert worst < len(ORDER) * checkout + query + 2.0, (worst, outcomes)
    served = collections.Counter(r[2] for r in results if r[0] == "ok")
    # 8 callers, 2 connections: the primary cannot hold them all within 1 s.
    assert set(served) - {"supabase"}, served
    assert "supabase" not in health.downs()
    # And the primary takes the traffic back once the burst is over.
    wait_until(lambda: served_by(db, healthy_fleet) == "supabase", timeout=20,
               message="traffic back on the primary after the burst")


# -- 5. all providers down, then back ---------------------------------------------


def test_all_providers_down_then_back(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """kill -9 of all three servers under load, then a restart of all three.

    While everything is down every call fails fast (AllProvidersUnavailableError,
    < 0.5 s: no waiting on providers known down); after the restart the calls
    settle on the primary within 10 s; acknowledged writes survived the crash,
    none is on two providers, and none that failed everywhere exists.
    """
    db = make_db()
    fleet = healthy_fleet
    assert served_by(db, fleet) == "supabase"
    with Load(db, fleet, table, workers=3, pace=0.02) as load:
        wait_until(lambda: load.count() > 30, timeout=20, message="warm-up load")
        for member in fleet:
            member.server.kill()
        down_at = time.monotonic()
        wait_until(lambda: sum(o.outcome == "all_down" and o.started > down_at
                               for o in load.ops) >= 20,
                   timeout=10, message="calls failing while everything is down")
        # Every provider is known down: a call fails fast, listing all of them.
        t0 = time.monotonic()
        with pytest.raises(AllProvidersUnavailableError) as info:
            db.execute_query("SELECT 1")
        assert time.monotonic() - t0 < 0.5
        assert set(info.value.reasons) == set(ORDER)
        restart_at = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda m: m.server.restart(), fleet))
        back_at = time.monotonic()
        wait_until(load.settled_on_primary, timeout=20,
                   message="traffic settled back on the primary after the restart")
        recovered_in = time.monotonic() - back_at
    assert recovered_in < 10.0, recovered_in
    load.assert_bounded()
    load.assert_only(reads={"ok", "all_down"}, writes={"ok", "unknown", "all_down"})
    outage = [o for o in load.ops if down_at < o.started < restart_at]
    assert outage and all(o.outcome == "all_down" for o in outage), summary(outage)
    assert max(o.seconds for o in outage) < 0.5, summary(outage)
    # Acknowledged writes survived kill -9 (synchronous commit), none twice.
    load.assert_no_write_twice()


# -- 6. hung primary inside a long transaction --------------------------------------


def test_long_transaction_on_a_live_primary_is_not_interrupted(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """A transaction held open for 2.5 hang_timeouts on a healthy server commits."""
    db = make_db()
    with db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
        until = time.monotonic() + 2.5 * HANG_TIMEOUT
        while time.monotonic() < until:
            time.sleep(0.05)  # the application thinking, with the transaction open
        conn.execute(f"INSERT INTO {table} (id) VALUES (2)")
    assert sorted(ids_on(healthy_fleet, "supabase", table)) == [1, 2]


def test_hung_primary_inside_a_transaction_fails_the_block_in_time(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """SIGSTOP of the primary with a transaction open: the block fails within the deadline.

    HangTimeoutError (a ProviderError; the README's `ProviderUnavailableError`
    is what a dead connection gives) within hang_timeout + margin, nothing
    committed, and the next transaction runs on a backup.
    """
    db = make_db()
    server = healthy_fleet["supabase"].server
    t0 = 0.0
    with pytest.raises(HangTimeoutError) as info, db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
        server.hang()
        t0 = time.monotonic()
        conn.execute(f"INSERT INTO {table} (id) VALUES (2)")
    elapsed = time.monotonic() - t0
    assert elapsed < HANG_TIMEOUT + 2.0, elapsed
    assert isinstance(info.value, ProviderError)
    assert info.value.provider == "supabase"
    assert "nothing was committed" in str(info.value)
    assert db.get_provider_stats()["supabase"]["healthy"] is False
    server.resume()
    assert ids_on(healthy_fleet, "supabase", table) == []
    # The next transaction goes to a backup, and commits there.
    with db.transaction() as conn:
        conn.execute(f"INSERT INTO {table} (id) VALUES (3)")
    assert ids_on(healthy_fleet, "railway", table) == [3]
    assert ids_on(healthy_fleet, "supabase", table) == []


# -- 7. one connection silenced while its server stays alive ----------------------


def test_silenced_connection_on_a_live_server_is_abandoned_and_the_read_moves_on(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """The flapping test's CI failure: probes of a live server kept a lost call waiting forever."""
    db = silence_pooled_connection(make_db, healthy_fleet)
    # A direct session (no pooler): the probes can vouch for each call.
    assert db.get_provider_stats()["supabase"]["per_call_hang_check"] is True
    thread, out = run_in_thread(lambda: served_by(db, healthy_fleet))
    join_or_unblock(thread, healthy_fleet, CALL_BOUND + 10,
                    "a read on a silenced connection waited while probes said the server "
                    "was alive")
    assert "error" not in out, out
    assert out["result"] == "railway"
    assert out["seconds"] < CALL_BOUND, out


def test_running_statement_is_news_until_its_server_process_is_gone(
    make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """A call whose server process works is not abandoned; once that process is gone, it is.

    The one pooled connection runs a long statement; its link is then silenced
    (the answer could never arrive). While the server process runs the
    statement, probes vouch for the call, however long. When the process is
    terminated, it is missing from pg_stat_activity: no news any more, and the
    call is abandoned within about hang_timeout (it was waited on for ever).
    """
    db = make_db(pool_min_size=1, pool_max_size=1)
    db.health_check_all(max_age=0)
    with db.transaction() as conn:
        port, pid = local_port(conn), conn.info.backend_pid
    marker = f"gone_{uuid.uuid4().hex[:8]}"
    primary = db.providers["supabase"]
    thread, out = run_in_thread(lambda: primary.execute_query(
        f"SELECT '{marker}' FROM pg_sleep(60)", fetch_mode="one"))
    wait_until(lambda: active_backends(healthy_fleet, "supabase", marker) > 0, timeout=10,
               message="the statement running on the primary")
    healthy_fleet["supabase"].proxy.blackhole_client(port)
    # Three hang_timeouts of a silent link: the running process keeps the call alive.
    thread.join(timeout=3 * HANG_TIMEOUT)
    if not thread.is_alive():
        raise AssertionError(f"a call whose statement was running was abandoned: {out}")
    with psycopg.connect(healthy_fleet["supabase"].direct_url, autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    t0 = time.monotonic()
    join_or_unblock(thread, healthy_fleet, CALL_BOUND + 10,
                    "a call whose server process is gone waited on")
    assert isinstance(out.get("error"), HangTimeoutError), out
    assert time.monotonic() - t0 < CALL_BOUND


def test_silenced_connection_on_a_live_server_fails_a_write_as_unknown(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    db = silence_pooled_connection(make_db, healthy_fleet)
    thread, out = run_in_thread(
        lambda: db.execute_query(f"INSERT INTO {table} (id) VALUES (1)", fetch_mode="none"))
    join_or_unblock(thread, healthy_fleet, CALL_BOUND + 10,
                    "a write on a silenced connection waited forever")
    assert isinstance(out.get("error"), OutcomeUnknownError), out
    assert out["seconds"] < CALL_BOUND, out
    # The statement never reached the server: nothing applied anywhere.
    for name in ORDER:
        assert ids_on(healthy_fleet, name, table) == []


def test_silenced_connection_inside_a_transaction_fails_the_block_in_time(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    """Think time inside the block is not a hang; a lost statement is."""
    db = make_db(pool_min_size=1, pool_max_size=1)
    t0 = 0.0

    def block() -> None:
        nonlocal t0
        with db.transaction() as conn:
            conn.execute(f"INSERT INTO {table} (id) VALUES (1)")
            until = time.monotonic() + 2.5 * HANG_TIMEOUT
            while time.monotonic() < until:
                time.sleep(0.05)  # thinking with the transaction open: not a hang
            silence(healthy_fleet, conn)
            t0 = time.monotonic()
            conn.execute(f"INSERT INTO {table} (id) VALUES (2)")

    thread, out = run_in_thread(block)
    join_or_unblock(thread, healthy_fleet, 2.5 * HANG_TIMEOUT + CALL_BOUND + 10,
                    "a statement lost inside a transaction waited forever")
    assert isinstance(out.get("error"), ProviderError), out
    assert "nothing was committed" in str(out["error"])
    assert time.monotonic() - t0 < CALL_BOUND + 1.0
    assert ids_on(healthy_fleet, "supabase", table) == []


# -- failback reconciliation caught by a silent fault --------------------------------


def test_primary_silent_during_failback_pass1_still_comes_back(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    fleet = healthy_fleet
    db = make_db()
    diverge(db, fleet, table)
    try:
        with psycopg.connect(fleet["supabase"].direct_url) as locker:
            locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            fleet["supabase"].proxy.set_mode("pass")  # the primary recovers: pass 1 starts
            blackhole_while_blocked(fleet, table, locker)
        # The primary answers again (a fresh probe connection would pass at once).
        assert can_query(fleet["supabase"].url)
        try:
            wait_until(lambda: served_by(db, fleet) == "supabase", timeout=5,
                       message="traffic back on the primary")
        except AssertionError as exc:
            raise StillBroken(str(exc)) from exc
    finally:
        unblock(fleet)


def test_primary_silent_during_failback_pass2_does_not_stall_writes(
    table: str, make_db: MakeDb, healthy_fleet: Fleet
) -> None:
    fleet = healthy_fleet
    reconciled = Reconciled()
    db = make_db(listeners=[reconciled])
    diverge(db, fleet, table)
    try:
        # A transaction open on the backup holds the failback's write pause
        # between its two passes, so the lock below catches pass 2 (which has
        # this transaction's row to bring back).
        with db.transaction() as tx:
            tx.execute(f"INSERT INTO {table} (id, note) VALUES (3, 'in the pause')")
            fleet["supabase"].proxy.set_mode("pass")  # the primary recovers: pass 1 runs
            wait_until(lambda: reconciled.events, timeout=15, message="failback pass 1")
            locker = psycopg.connect(fleet["supabase"].direct_url)
            locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with locker:
            blackhole_while_blocked(fleet, table, locker)  # pass 2, writes paused
        # A write while the primary is still half-open: it belongs on the backup, now.
        thread, out = run_in_thread(lambda: db.execute_query(
            f"INSERT INTO {table} (id, note) VALUES (2, 'later') RETURNING inet_server_port()",
            fetch_mode="one"))
        thread.join(timeout=CALL_BOUND)
        if thread.is_alive():
            raise StillBroken(f"a write blocked for more than {CALL_BOUND:g}s "
                              "behind a stuck failback")
        assert "error" not in out, out
    finally:
        unblock(fleet)

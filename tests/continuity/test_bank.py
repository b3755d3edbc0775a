"""The bank through outages of the primary: every transfer kept, every provider converged.

Real servers; the primary is killed (kill -9), hung (SIGSTOP) and restarted;
with and without replication, a replication backlog, a transaction-mode
pooler, three teller processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from bank import (  # noqa: F401 - bank is a fixture
    FAST,
    Teller,
    bank,
    bank_db,
    check_bank,
    converged,
    direct,
    journal_size,
    ledger_ids,
    off_the_ledger,
    outage,
    query,
)
from databases import with_dbname
from defaults import ORDER
from fleet import wait_until
from psycopg.conninfo import conninfo_to_dict

from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet


def test_bank_without_replication_keeps_every_transfer(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, conflict_delta_columns="accounts.balance") as db, Teller(db) as teller:
        outage(healthy_fleet, db, teller, plain)
        seen = teller.count()
        wait_until(lambda: teller.count() >= seen + 20, timeout=30,
                   message="transfers on the primary again")
    check_bank(teller, plain)
    # Railway never saw the primary's transfers: each of its updates was a conflict,
    # settled by delta and kept with both versions.
    rows = query(plain["supabase"], "SELECT resolution, backup_version IS NOT NULL, "
                 "primary_version IS NOT NULL FROM agent_factory_conflicts")
    assert rows and all(r == ("delta", True, True) for r in rows)


@pytest.mark.parametrize("bank", [True], indirect=True)
@pytest.mark.parametrize(("backlog", "hang"), [(False, False), (True, False), (False, True)],
                         ids=["crash", "crash-with-backlog", "hang"])
def test_bank_replicated_outage_keeps_every_transfer_and_converges(
        healthy_fleet: Fleet, bank: dict[str, str], backlog: bool, hang: bool) -> None:
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, conflict_delta_columns=("accounts.balance",)) as db:
        with Teller(db) as teller:
            outage(healthy_fleet, db, teller, plain, backlog=backlog, hang=hang)
        # Checked while the application still runs, as it would in production.
        check_bank(teller, plain)
        converged(plain, healthy_fleet)


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_two_backups_serving_at_once_keep_every_transfer_and_converge(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """Two instances fail over to different backups (railway, neon) and move money
    between the same accounts on both during one outage: both journals come back,
    each other's changes met as conflicts and settled by delta, and all three
    providers end with the primary's rows."""
    plain = direct(healthy_fleet, bank)
    server = healthy_fleet["supabase"].server
    with bank_db(bank, conflict_delta_columns="accounts.balance") as a, \
            bank_db(bank, conflict_delta_columns="accounts.balance",
                    order=["supabase", "neon", "railway"]) as b, \
            Teller(a) as ta, Teller(b) as tb:
        wait_until(lambda: ta.count() >= 30 and tb.count() >= 30, timeout=30,
                   message="transfers on the primary")
        server.kill()
        wait_until(lambda: journal_size(plain["railway"]) >= 60
                   and journal_size(plain["neon"]) >= 60, timeout=60,
                   message="transfers journaled on railway and on neon")
        server.restart()
        # Each instance writes on its backup until it has seen the primary back: one may
        # journal a transfer after the other emptied both journals, so wait for both to
        # serve the primary before the journals must stay empty.
        wait_until(lambda: all(db.get_provider_stats()["supabase"]["role"] == "primary"
                               and db.serving_provider == "supabase" for db in (a, b)),
                   timeout=60, message="both instances back on the primary")
        wait_until(lambda: journal_size(plain["railway"]) == 0
                   and journal_size(plain["neon"]) == 0, timeout=60,
                   message="both journals drained")
        seen = ta.count() + tb.count()
        wait_until(lambda: ta.count() + tb.count() >= seen + 20, timeout=30,
                   message="transfers on the primary again")
    for teller in (ta, tb):
        check_bank(teller, plain)
    converged(plain, healthy_fleet)


def test_without_delta_columns_conflicts_are_reported_never_silent(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    plain = direct(healthy_fleet, bank)
    with bank_db(bank) as db, Teller(db) as teller:
        outage(healthy_fleet, db, teller, plain)
        wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=30,
                   message="journal drained")
        stats = db.failback_status()
        assert db.get_provider_stats()["railway"]["failback_conflicts"] > 0
    assert stats["conflicts"]["railway"] > 0
    rows = query(plain["supabase"], "SELECT count(*), count(*) FILTER (WHERE "
                 "backup_version IS NOT NULL AND primary_version IS NOT NULL) "
                 "FROM agent_factory_conflicts WHERE resolution = 'backup_wins'")
    assert rows[0][0] > 0 and rows[0][0] == rows[0][1]
    assert set(teller.acked) <= ledger_ids(plain["supabase"])


def test_bank_with_the_primary_behind_a_transaction_mode_pooler(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    """The drain's settings, lock and writes hold per transaction: PgBouncer may switch
    server connections between them."""
    plain = direct(healthy_fleet, bank)
    dbname = conninfo_to_dict(bank["supabase"])["dbname"]
    urls = {"supabase": {"url": with_dbname(pooled_primary.url, dbname), "pooler": True},
            "railway": bank["railway"]}
    with bank_db(urls, order=["supabase", "railway"],
                 conflict_delta_columns="accounts.balance") as db, Teller(db) as teller:
        outage(healthy_fleet, db, teller, plain)
    check_bank(teller, plain)


#: The witness's quiet time of the teller processes.
QUIET = 3.0

TELLER = """
import json, sys, uuid
from pathlib import Path
from agent_factory.core.database_manager import DatabaseManager
import psycopg
from agent_factory.errors import AgentFactoryError, OutcomeUnknownError
urls, order, fast, stop, seed = (json.loads(sys.argv[1]), json.loads(sys.argv[2]),
                                 json.loads(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
acked, failed, unknown, totals, backup_acks = [], [], [], [], 0
with DatabaseManager(urls, order=order, conflict_delta_columns="accounts.balance",
                     **fast) as db:
    db.register_table("accounts")
    db.register_table("ledger")
    k = 0
    while not stop.exists():
        k += 1
        src, dst = (k * 7 + seed) % 10 + 1, (k * 3 + seed + 1) % 10 + 1
        if src == dst:
            continue
        tid, amount = str(uuid.uuid4()), k % 13 + 1
        try:
            with db.transaction() as conn:
                for acct, delta in sorted(((src, -amount), (dst, amount))):
                    conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                 (delta, acct))
                conn.execute("INSERT INTO ledger VALUES (%s, %s, %s, %s)", (tid, src, dst, amount))
            acked.append(tid)
            backup_acks += db.serving_provider != "supabase"
        except OutcomeUnknownError:
            unknown.append(tid)
        except (AgentFactoryError, psycopg.Error):
            # A SQL error (a deadlock with a backup's replication apply during the
            # failback window) reaches the application unchanged: nothing committed.
            failed.append(tid)
        if k % 10 == 0:
            try:
                total = int(db.execute_query("SELECT sum(balance) FROM accounts",
                                             fetch_mode="one", read_only=True)[0])
                totals.append((db.serving_provider, total))
            except AgentFactoryError:
                pass
print(json.dumps({"acked": acked, "failed": failed, "unknown": unknown, "totals": totals,
                  "backup_acks": backup_acks}))
"""


@pytest.mark.parametrize("bank", [True], indirect=True)
@pytest.mark.parametrize("fault", ["crash", "hang", "partition"])
def test_three_processes_keep_every_transfer(
        healthy_fleet: Fleet, bank: dict[str, str], tmp_path: Any, fault: str) -> None:
    """Three teller processes; the primary crashes, hangs, or stays up while the
    third process is cut off from it (split brain: that one must not write on a
    backup). Every acknowledged transfer on the primary once, every total the
    primary served exact, every provider converged."""
    plain = direct(healthy_fleet, bank)
    stop = tmp_path / "stop"
    server = healthy_fleet["supabase"].server
    with FaultProxy(server.host, server.port) as cut:
        urls = [dict(bank) for _ in range(3)]
        urls[2]["supabase"] = bank["supabase"].replace(
            str(healthy_fleet["supabase"].proxy.port), str(cut.port))
        procs = [subprocess.Popen(
            [sys.executable, "-c", TELLER, json.dumps(urls[n]), json.dumps(ORDER),
             json.dumps({**FAST, "witness_quiet": QUIET}), str(stop), str(n)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(3)]
        try:
            def ledger() -> int:
                return int(query(plain["supabase"], "SELECT count(*) FROM ledger")[0][0])
            wait_until(lambda: ledger() >= 150, timeout=60, message="three tellers at work")
            if fault == "partition":
                cut.set_mode("refuse")
                # The other two go on on the primary, well past the witness's quiet time.
                seen, started = ledger(), time.monotonic()
                wait_until(lambda: ledger() >= seen + 300
                           and time.monotonic() - started > 3 * QUIET,
                           timeout=90, message="the others on the primary during the cut")
                assert journal_size(plain["railway"]) == 0, "a write reached railway"
                cut.set_mode("pass")
            else:
                server.kill() if fault == "crash" else server.hang()
                wait_until(lambda: journal_size(plain["railway"]) >= 90, timeout=60,
                           message="transfers journaled on railway")
                server.restart() if fault == "crash" else server.resume()
            seen = ledger()
            wait_until(lambda: ledger() >= seen + 150 and journal_size(plain["railway"]) == 0,
                       timeout=60, message="transfers on the primary again, journal drained")
        finally:
            stop.touch()
            outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out) for out, _ in outs]
    # A teller whose own return came last may have journaled a transfer on railway
    # after another drained it, then exited: the next instance to start drains it.
    with bank_db(bank, conflict_delta_columns="accounts.balance"):
        wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=30,
                   message="drained by an instance started after the tellers")
    on_primary = ledger_ids(plain["supabase"])
    primary_totals = []
    for r in results:
        assert set(r["acked"]) <= on_primary
        assert not set(r["failed"]) & on_primary
        # Reads served by the primary are exact; a backup that still holds undrained
        # writes while it applies the primary's stream again (the failback window of an
        # instance that has not seen the primary answer yet) can mix both histories:
        # docs/failback.md says so. A teller slow to start (or to return) may have read
        # no total while it served the primary: the tellers' totals are judged together.
        on = {p: [t for q, t in r["totals"] if q == p] for p in ("supabase", "railway")}
        assert set(on["supabase"]) <= {10 * 1000}, on
        primary_totals += on["supabase"]
    assert primary_totals, "no teller read a total on the primary"
    assert off_the_ledger(plain["supabase"]) == []
    if fault == "partition":
        assert not any(r["backup_acks"] for r in results), "a transfer acknowledged on a backup"
        assert results[2]["failed"], "the cut-off process was never refused"
    converged(plain, healthy_fleet)

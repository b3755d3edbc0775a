"""Failback's edge cases with the primary behind a transaction-mode PgBouncer.

PgBouncer may hand each transaction a different server connection: nothing the
drain, the fence or the journal relies on may live in a session. The bank through
a crash behind the pooler is in test_bank.py; here deletes and updates, serial
keys with replication, a drain that keeps failing, and a busy pool.
"""

from __future__ import annotations

from typing import Any

import pytest
from bank import (  # noqa: F401 - bank is a fixture
    bank,
    bank_db,
    direct,
    journal_size,
    query,
    query_none,
)
from databases import with_dbname
from fleet import until_accepted, wait_until
from psycopg.conninfo import conninfo_to_dict

from agent_factory.errors import ProviderUnavailableError
from agent_factory.testing.fleet import Fleet


def behind_pooler(bank: dict[str, str], pooled_primary: Any) -> dict[str, Any]:
    """The bank's providers with the primary reached through PgBouncer."""
    dbname = conninfo_to_dict(bank["supabase"])["dbname"]
    return {**bank, "supabase": {"url": with_dbname(pooled_primary.url, dbname),
                                 "pooler": True}}


def back_on_the_primary(db: Any) -> bool:
    return db.serving_provider == "supabase" or bool(
        db.execute_query("SELECT 1")) and db.serving_provider == "supabase"


def test_deletes_and_updates_on_a_backup_come_back_behind_a_pooler(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    plain = direct(healthy_fleet, bank)
    with bank_db(behind_pooler(bank, pooled_primary)) as db:
        healthy_fleet["supabase"].server.kill()
        db.execute_query("SELECT 1")  # a read finds the primary gone (retried on railway)
        until_accepted(lambda: db.execute_query(
            "DELETE FROM accounts WHERE id = 10", fetch_mode="none"))
        with db.transaction() as conn:
            conn.execute("UPDATE accounts SET balance = 7 WHERE id = 9")
            conn.execute("UPDATE accounts SET balance = 8 WHERE id = 8")
        assert db.serving_provider == "railway"
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], "SELECT id, balance FROM accounts "
                                 "WHERE id >= 8 ORDER BY id") == [(8, 8), (9, 7)], timeout=60,
                   message="the delete and the updates on the primary")
        wait_until(lambda: back_on_the_primary(db), timeout=60, message="back on the primary")
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_conflicts") == [(0,)]
    assert journal_size(plain["railway"]) == 0


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_serial_keys_through_an_outage_behind_a_pooler(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    """The backups' sequences are moved ahead of the primary's, read through the pooler."""
    plain = direct(healthy_fleet, bank)
    insert = "INSERT INTO events (note) VALUES (%s)"
    with bank_db(behind_pooler(bank, pooled_primary)) as db:
        db.register_table("events")
        for _ in range(30):
            db.execute_query(insert, ("primary",), fetch_mode="none")
        wait_until(lambda: query(plain["railway"], "SELECT coalesce(pg_sequence_last_value("
                                 "'events_id_seq'), 0)")[0][0] >= 30, timeout=30,
                   message="railway's sequence moved ahead of the primary's")
        healthy_fleet["supabase"].server.kill()
        db.execute_query("SELECT 1")
        for _ in range(10):
            until_accepted(lambda: db.execute_query(insert, ("outage",), fetch_mode="none"))
        assert db.serving_provider == "railway"
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], "SELECT count(*) FROM events") == [(40,)],
                   timeout=60, message="the outage rows on the primary")
        wait_until(lambda: back_on_the_primary(db), timeout=60, message="back on the primary")
        db.execute_query(insert, ("after",), fetch_mode="none")
    want = query(plain["supabase"], "SELECT id, note FROM events ORDER BY id")
    assert len(want) == 41 and len({r[0] for r in want}) == 41
    for backup in ("railway", "neon"):
        wait_until(lambda b=backup: query(plain[b], "SELECT id, note FROM events ORDER BY id")
                   == want, timeout=30, message=f"{backup} converged")


def test_a_failing_drain_behind_a_pooler_lets_the_primary_back_and_says_why(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    """A change the primary cannot take stays pending with its cause reported; the
    other changes go through and the primary takes writes again."""
    plain = direct(healthy_fleet, bank)
    query_none(plain["railway"], "CREATE TABLE only_here (id int PRIMARY KEY)")
    with bank_db(behind_pooler(bank, pooled_primary)) as db:
        healthy_fleet["supabase"].server.kill()
        db.execute_query("SELECT 1")
        with db.transaction() as conn:  # marks the session: the trigger can be put on it
            conn.execute("SELECT 1")
        query_none(plain["railway"], "CREATE TRIGGER agent_factory_journal AFTER INSERT OR "
                   "UPDATE OR DELETE ON only_here FOR EACH ROW EXECUTE FUNCTION "
                   "agent_factory_journal_row()")
        with db.transaction() as conn:
            conn.execute("INSERT INTO only_here VALUES (1)")
        db.execute_query("UPDATE accounts SET balance = 5 WHERE id = 3", fetch_mode="none")
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 3")
                   == [(5,)], timeout=60, message="the other change on the primary")
        wait_until(lambda: back_on_the_primary(db), timeout=60, message="back on the primary")
        db.execute_query("UPDATE accounts SET balance = 6 WHERE id = 3", fetch_mode="none")
        assert db.serving_provider == "supabase"
        wait_until(lambda: "lacks" in (db.failback_status()["backups"]["railway"]["last_error"]
                                       or ""), timeout=30, message="the stuck change reported")
        assert db.failback_status()["backups"]["railway"]["pending"] == 1
    assert journal_size(plain["railway"]) == 1
    assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 3") == [(6,)]


def test_a_busy_pooled_primary_does_not_move_a_write(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    """Back-pressure behind the pooler is no outage: the write fails on the primary,
    nothing is written on a backup, the primary stays healthy."""
    plain = direct(healthy_fleet, bank)
    with bank_db(behind_pooler(bank, pooled_primary), pool_min_size=1, pool_max_size=1,
                 checkout_timeout=0.5) as db:
        with db.transaction() as held:  # the primary's only pooled connection
            held.execute("SELECT 1")
            with pytest.raises(ProviderUnavailableError, match="does not move to a backup"):
                db.execute_query("UPDATE accounts SET balance = 1 WHERE id = 1",
                                 fetch_mode="none")
        assert db.get_provider_stats()["supabase"]["healthy"] is True
        db.execute_query("UPDATE accounts SET balance = 2 WHERE id = 1", fetch_mode="none")
        assert db.serving_provider == "supabase"
    assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 1") == [(2,)]
    for backup in ("railway", "neon"):
        assert query(plain[backup], "SELECT balance FROM accounts WHERE id = 1") == [(1000,)]
        assert journal_size(plain[backup]) == 0

"""Failback's edge cases with the primary behind a transaction-mode PgBouncer.

PgBouncer may hand each transaction a different server connection: nothing the
drain, the fence or the journal relies on may live in a session. The bank through
a crash behind the pooler is in test_bank.py; here deletes and updates, serial
keys with replication, and a busy pool (a drain that keeps failing behind the
pooler is in test_drain.py).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from bank import (  # noqa: F401 - bank is a fixture
    back_on_the_primary,
    bank,
    bank_db,
    behind_pooler,
    direct,
    journal_size,
    query,
)
from databases import with_port
from fleet import until_accepted, wait_until

from agent_factory.continuity.journal import _LOCK_SPACE
from agent_factory.errors import ProviderUnavailableError
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet


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


def test_reads_in_the_failback_window_reach_the_primary_behind_a_pooler(
        healthy_fleet: Fleet, bank: dict[str, str], pooled_primary: Any) -> None:
    """The primary answers through PgBouncer again while another instance drains railway:
    reads go to the primary, writes still to railway until the drain is done."""
    plain = direct(healthy_fleet, bank)
    urls = behind_pooler(bank, pooled_primary)
    port = healthy_fleet["supabase"].server.port
    with FaultProxy(pooled_primary.host, pooled_primary.port) as cut, \
            psycopg.connect(plain["supabase"], autocommit=True) as drainer:
        urls["supabase"]["url"] = with_port(urls["supabase"]["url"], cut.port)
        cut.set_mode("refuse")
        # Another instance's drain of railway, as far as this one can tell.
        drainer.execute("SELECT pg_advisory_lock(%s, hashtext('railway'))", (_LOCK_SPACE,))
        with bank_db(urls) as db:
            until_accepted(lambda: db.execute_query(
                "UPDATE accounts SET balance = 7 WHERE id = 9", fetch_mode="none"))
            assert db.serving_provider == "railway"
            cut.set_mode("pass")
            wait_until(lambda: db.execute_query("SELECT inet_server_port()",
                                                fetch_mode="one")[0] == port,
                       timeout=30, message="a read answered by the primary through the pooler")
            assert db.get_provider_stats()["supabase"]["role"] == "returning"
            db.execute_query("UPDATE accounts SET balance = 8 WHERE id = 8", fetch_mode="none")
            assert db.serving_provider == "railway"
            assert query(plain["railway"], "SELECT balance FROM accounts WHERE id = 8") == [(8,)]
            assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 9") != [(7,)]
            drainer.execute("SELECT pg_advisory_unlock(%s, hashtext('railway'))", (_LOCK_SPACE,))
            wait_until(lambda: back_on_the_primary(db), timeout=60, message="back on the primary")
            assert db.get_provider_stats()["supabase"]["role"] == "primary"
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id IN (8, 9) "
                 "ORDER BY id") == [(8, 8), (9, 7)]
    assert journal_size(plain["railway"]) == 0

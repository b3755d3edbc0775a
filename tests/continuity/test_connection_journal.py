"""db.connection() is a write path like the others: journaled on a backup, fenced.

A write through a connection lent while the manager stands on railway reaches
the primary after failback (also behind a transaction-mode PgBouncer, where
each statement carries the journal setting itself, and with ``dict_row`` as
the manager's row factory: the failback reads its own rows as tuples). An
instance cut off from a live primary is refused a connection, and so is its
SQLAlchemy engine, instead of forking history on the backup.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from bank import bank, bank_db, direct, journal_size, query  # noqa: F401 - bank is a fixture
from databases import with_dbname, with_port
from fleet import wait_until
from observers import provider_of
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from test_failback import FAST as FAILBACK_FAST
from test_failback import ORDER
from test_failback_replication import direct as direct_urls
from test_failback_replication import replicated  # noqa: F401 - fixture

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import AgentFactoryError, SplitBrainRefusedError
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet

BALANCES = "SELECT id, balance FROM accounts WHERE id IN (1, 2, 10) ORDER BY id"


def port_of(conn: Any) -> int:
    row = conn.execute("SELECT inet_server_port() AS port").fetchone()
    return int(row["port"] if isinstance(row, dict) else row[0])


def test_a_write_through_connection_on_a_backup_reaches_the_primary_after_failback(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:  # noqa: F811
    plain = direct(healthy_fleet, bank)
    tid = str(uuid.uuid4())
    with bank_db(bank, row_factory=dict_row) as db:
        healthy_fleet["supabase"].server.kill()
        with db.connection() as conn:  # the dead primary at checkout: railway
            assert provider_of(healthy_fleet, port_of(conn)) == "railway"
            conn.execute("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
            conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 2")
            conn.execute("INSERT INTO ledger VALUES (%s, 1, 2, 5)", (tid,))
            conn.execute("DELETE FROM accounts WHERE id = 10")
        assert journal_size(plain["railway"]) >= 4
        # The same pooled connection, back in the pool, serves the manager's calls.
        assert db.execute_query("SELECT 1 AS one") == [{"one": 1}]
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], BALANCES) == [(1, 995), (2, 1005)]
                   and query(plain["supabase"], "SELECT count(*) FROM ledger WHERE id = %s",
                             (tid,)) == [(1,)],
                   timeout=60, message="the connection's writes on the primary")
        wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=30,
                   message="railway's journal drained")
        assert db.failback_status()["conflicts"]["railway"] == 0
        # The journal may be empty a moment before this instance's own return.
        wait_until(lambda: db.get_provider_stats()["supabase"]["healthy"], timeout=30,
                   message="the primary back for this instance")
        with db.connection() as conn:  # the primary again, not journaled there
            assert provider_of(healthy_fleet, port_of(conn)) == "supabase"
            conn.execute("UPDATE accounts SET balance = 1000 WHERE id = 3")
        assert journal_size(plain["supabase"]) == 0


def test_a_connection_on_a_backup_behind_a_transaction_mode_pooler_is_journaled(
        healthy_fleet: Fleet, bank: dict[str, str], pgbouncer_binary: str) -> None:  # noqa: F811
    """Session settings do not outlive a transaction behind PgBouncer: every statement
    sent through the lent connection carries the journal setting in its own transaction."""
    from pooler import PgBouncer

    plain = direct(healthy_fleet, bank)
    bouncer = PgBouncer(healthy_fleet["railway"].server, pgbouncer_binary)
    try:
        bouncer.start()
        dbname = conninfo_to_dict(bank["railway"])["dbname"]
        urls: dict[str, Any] = {"supabase": bank["supabase"], "railway": {
            "url": with_dbname(bouncer.url, str(dbname)), "pooler": True}}
        with bank_db(urls, order=["supabase", "railway"]) as db:
            healthy_fleet["supabase"].server.kill()
            with db.connection() as conn:
                assert provider_of(healthy_fleet, port_of(conn)) == "railway"
                conn.execute("UPDATE accounts SET balance = 3 WHERE id = 3")
                with conn.transaction():
                    conn.execute("UPDATE accounts SET balance = 4 WHERE id = 4")
                    conn.execute("UPDATE accounts SET balance = 5 WHERE id = 5")
                with conn.cursor() as cur:
                    cur.executemany("UPDATE accounts SET balance = %s WHERE id = %s",
                                    [(6, 6), (7, 7)])
            assert journal_size(plain["railway"]) == 5
            healthy_fleet["supabase"].server.restart()
            wait_until(lambda: query(plain["supabase"], "SELECT balance FROM accounts "
                                     "WHERE id BETWEEN 3 AND 7 ORDER BY id")
                       == [(3,), (4,), (5,), (6,), (7,)],
                       timeout=60, message="the pooled connection's writes on the primary")
    finally:
        bouncer.close()


def test_a_partitioned_instance_is_refused_a_connection_and_an_engine_connection(
        healthy_fleet: Fleet, replicated: dict[str, str]) -> None:  # noqa: F811
    """Instance A reaches the primary and beats its heartbeat; instance B is cut off
    from it by a proxy. B's connection() and B's SQLAlchemy engine are refused, never
    lent on railway while the primary lives; once the cut heals B is on the primary."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from agent_factory.integrations.sqlalchemy import create_engine

    plain = direct_urls(healthy_fleet, replicated)
    primary = healthy_fleet["supabase"]
    with FaultProxy(primary.server.host, primary.server.port) as cut:
        b_urls = dict(replicated)
        b_urls["supabase"] = with_port(replicated["supabase"], cut.port)
        with DatabaseManager(replicated, order=ORDER, **FAILBACK_FAST) as a, \
                DatabaseManager(b_urls, order=ORDER, **FAILBACK_FAST) as b:
            a.execute_query("SELECT 1")
            with b.connection() as conn:
                assert provider_of(healthy_fleet, port_of(conn)) == "supabase"
            cut.set_mode("refuse")

            def refused() -> bool:
                try:
                    with b.connection() as conn:
                        where = provider_of(healthy_fleet, port_of(conn))
                        assert where == "supabase", f"lent on {where} while the primary lives"
                        return False
                except SplitBrainRefusedError:
                    return True
                except AgentFactoryError:
                    return False  # the cut is being noticed
            wait_until(refused, timeout=30, interval=0.1, message="B's connection() refused")
            # Many times the witness's quiet time: still refused, never lent on a backup.
            deadline = time.monotonic() + 3 * b.settings.witness_quiet
            while time.monotonic() < deadline:
                assert refused()
            engine = create_engine(b)
            try:
                with pytest.raises(sqlalchemy.exc.OperationalError) as info:
                    engine.connect()
                assert isinstance(info.value.orig, SplitBrainRefusedError)
            finally:
                engine.dispose()
            assert a.serving_provider == "supabase"
            cut.set_mode("pass")
            wait_until(lambda: not refused(), timeout=30, interval=0.1,
                       message="B lent a connection of the primary again")
    assert query(plain["railway"], "SELECT count(*) FROM agent_factory_journal") == [(0,)]

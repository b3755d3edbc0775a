"""The bank the failback tests run, and their helpers on real servers.

A bank moves money between ten accounts (debit, credit and a ledger row in
one transaction): after failback every balance must equal 1000 + credits -
debits of the primary's own ledger, and no acknowledged transfer may be
missing. `bank` is the fixture (replicated when parametrized with True).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases, with_dbname, with_port
from defaults import ORDER
from fleet import wait_until
from psycopg.conninfo import conninfo_to_dict

from agent_factory.continuity.replication import setup_replication, teardown_replication
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.settings import Settings
from agent_factory.errors import (
    AgentFactoryError,
    OutcomeUnknownError,
)
from agent_factory.schema import apply_migrations
from agent_factory.testing.fleet import Fleet

FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 10.0,
        "recovery_probes": 2, "drain_interval": 0.5}


BANK = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL,
                       updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE ledger (id uuid PRIMARY KEY, src int NOT NULL, dst int NOT NULL,
                     amount int NOT NULL);
CREATE TABLE events (id bigserial PRIMARY KEY, note text NOT NULL);
INSERT INTO accounts SELECT g, 1000, '2026-01-01 00:00+00' FROM generate_series(1, 10) AS g;
"""


ACCOUNTS = 10


def direct(fleet: Fleet, urls: dict[str, str]) -> dict[str, str]:
    return {m.name: with_port(urls[m.name], m.server.port) for m in fleet}


def behind_pooler(bank: dict[str, str], pooled_primary: Any) -> dict[str, Any]:
    """The bank's providers with the primary reached through PgBouncer."""
    dbname = conninfo_to_dict(bank["supabase"])["dbname"]
    return {**bank, "supabase": {"url": with_dbname(pooled_primary.url, dbname),
                                 "pooler": True}}


def back_on_the_primary(db: Any) -> bool:
    return db.serving_provider == "supabase" or bool(
        db.execute_query("SELECT 1")) and db.serving_provider == "supabase"


def query(url: str, sql: str, params: Any = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def bank(healthy_fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Databases with the schema and the bank on every provider (replicated if asked)."""
    replicate = getattr(request, "param", False)
    urls = create_databases(healthy_fleet, "bank")
    plain = direct(healthy_fleet, urls)
    for url in plain.values():
        apply_migrations(url, embedding_dim=8)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(BANK)
    settings = Settings.build(plain, order=ORDER)
    if replicate:
        report = setup_replication(settings, tables=("accounts", "ledger", "events"))
        assert not report.errors, report.errors
        for backup in ("railway", "neon"):
            wait_until(lambda b=backup: query(plain[b], "SELECT count(*) FROM pg_stat_subscription "
                                              "WHERE pid IS NOT NULL")[0][0] > 0,
                       timeout=30, message=f"{backup} subscribed")
    yield urls
    healthy_fleet.heal()
    if replicate:
        teardown_replication(settings)
    drop_databases(healthy_fleet, urls)


class Teller:
    """Transfers between the accounts from two threads; remembers every outcome."""

    def __init__(self, db: DatabaseManager) -> None:
        self.db = db
        self.acked: list[str] = []
        self.unknown: list[str] = []
        self.failed: list[str] = []
        self.last_error = ""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(2)]

    def __enter__(self) -> Teller:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def count(self) -> int:
        return len(self.acked)

    def _run(self, n: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            src, dst = (k * 7 + n) % ACCOUNTS + 1, (k * 3 + n + 1) % ACCOUNTS + 1
            if src == dst:
                continue
            tid, amount = str(uuid.uuid4()), k % 13 + 1
            try:
                with self.db.transaction() as conn:
                    # One lock order for both threads: no deadlock.
                    for acct, delta in sorted(((src, -amount), (dst, amount))):
                        conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s",
                                     (delta, acct))
                    conn.execute("INSERT INTO ledger VALUES (%s, %s, %s, %s)",
                                 (tid, src, dst, amount))
                self.acked.append(tid)
            except OutcomeUnknownError as exc:
                self.unknown.append(tid)
                self.last_error = repr(exc)
            except (AgentFactoryError, psycopg.Error) as exc:
                self.failed.append(tid)
                self.last_error = repr(exc)
                self._stop.wait(0.05)

    def state(self) -> str:
        """What the tellers did so far, for a failure's message."""
        alive = sum(t.is_alive() for t in self._threads)
        return (f"acked {len(self.acked)}, failed {len(self.failed)}, unknown "
                f"{len(self.unknown)}, threads alive {alive}, last error {self.last_error}")


def off_the_ledger(url: str) -> list[tuple[int, int, int]]:
    """Accounts whose balance is not 1000 + credits - debits of this database's ledger."""
    rows = query(url, """
        SELECT a.id, a.balance, 1000 + coalesce(c.s, 0) - coalesce(d.s, 0)
        FROM accounts a
        LEFT JOIN (SELECT dst, sum(amount) AS s FROM ledger GROUP BY dst) c ON c.dst = a.id
        LEFT JOIN (SELECT src, sum(amount) AS s FROM ledger GROUP BY src) d ON d.src = a.id""")
    return [r for r in rows if r[1] != r[2]]


def ledger_ids(url: str) -> set[str]:
    return {str(r[0]) for r in query(url, "SELECT id FROM ledger")}


def journal_size(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM agent_factory_journal")[0][0])


def outage(fleet: Fleet, db: DatabaseManager, teller: Teller, plain: dict[str, str], *,
           backlog: bool = False, hang: bool = False) -> None:
    """Transfers on the primary, (a replication backlog,) a crash, transfers on railway,
    the primary back; returns once failback has emptied railway's journal."""
    wait_until(lambda: teller.count() >= 30, timeout=30, message="transfers on the primary")
    if backlog:
        for backup in ("railway", "neon"):
            query_none(plain[backup], f"ALTER SUBSCRIPTION agent_factory_{backup} DISABLE")
        seen = teller.count()
        wait_until(lambda: teller.count() >= seen + 30, timeout=30, message="unreplicated")
    server = fleet["supabase"].server
    server.hang() if hang else server.kill()
    try:
        wait_until(lambda: journal_size(plain["railway"]) >= 60, timeout=60,
                   message="transfers journaled on railway")
    except AssertionError as exc:
        stats = {n: (s["healthy"], s["last_error"]) for n, s in db.get_provider_stats().items()}
        raise AssertionError(f"{exc}: tellers {teller.state()}; providers {stats}") from None
    if backlog:
        for backup in ("railway", "neon"):
            query_none(plain[backup], f"ALTER SUBSCRIPTION agent_factory_{backup} ENABLE")
    server.resume() if hang else server.restart()
    wait_until(lambda: db.get_provider_stats()["supabase"]["role"] == "primary"
               and db.serving_provider == "supabase", timeout=60, message="back on the primary")


def check_bank(teller: Teller, plain: dict[str, str]) -> None:
    primary = plain["supabase"]
    # 60 s: behind PgBouncer a restarted server is retried only after server_login_retry.
    wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=60, message="journal drained")
    on_primary = ledger_ids(primary)
    assert set(teller.acked) <= on_primary, len(set(teller.acked) - on_primary)
    assert not set(teller.failed) & on_primary
    assert off_the_ledger(primary) == []


def converged(plain: dict[str, str], fleet: Fleet | None = None) -> None:
    def same() -> bool:
        want = [query(plain["supabase"], "SELECT id, balance FROM accounts ORDER BY id"),
                sorted(ledger_ids(plain["supabase"]))]
        return all([query(plain[b], "SELECT id, balance FROM accounts ORDER BY id"),
                    sorted(ledger_ids(plain[b]))] == want for b in ("railway", "neon"))
    try:
        wait_until(same, timeout=60, message="every provider holds the primary's rows")
    except AssertionError:
        detail: dict[str, Any] = {
            b: (query(plain[b], "SELECT id, balance FROM accounts ORDER BY id"),
                len(ledger_ids(plain[b])),
                query(plain[b], "SELECT subname, pid, latest_end_lsn::text "
                      "FROM pg_stat_subscription") if b != "supabase" else None,
                query(plain[b], "SELECT apply_error_count, sync_error_count "
                      "FROM pg_stat_subscription_stats") if b != "supabase" else None)
            for b in ("supabase", "railway", "neon")}
        # Which writes made the rows that differ (xmin), and what the drain settled.
        detail["xmin"] = {b: query(plain[b], "SELECT id, balance, xmin::text FROM accounts "
                                   "ORDER BY id") for b in ("railway", "neon")}
        detail["conflicts"] = query(plain["supabase"], "SELECT row_key, before, backup_version, "
                                    "primary_version, resolved_version, source_xid "
                                    "FROM agent_factory_conflicts ORDER BY detected_at")
        detail["marks"] = query(plain["supabase"], "SELECT * FROM agent_factory_drained")
        # Whether a backup's subscription is enabled and its launcher and worker alive.
        detail["workers"] = {b: (query(plain[b], "SELECT subname, subenabled FROM pg_subscription"),
                                 query(plain[b], "SELECT backend_type, pid, wait_event FROM "
                                       "pg_stat_activity WHERE backend_type LIKE 'logical%'"))
                             for b in ("railway", "neon")}
        logs = {b: fleet[b].server.log_path.read_text(errors="replace").splitlines()[-40:]
                for b in ("railway", "neon")} if fleet is not None else {}
        raise AssertionError(f"not converged: {detail}; backup logs: {logs}") from None
    for b in ("railway", "neon"):
        # Running again within 30 s (a worker restarts wal_retrieve_retry_interval
        # after an error, so one look at a moment could catch it between two).
        wait_until(lambda b=b: query(plain[b], "SELECT count(*) FROM pg_stat_subscription "
                                     "WHERE pid IS NOT NULL")[0][0] > 0,
                   timeout=30, message=f"{b}'s replication running")


def bank_db(urls: dict[str, Any], **options: Any) -> DatabaseManager:
    db = DatabaseManager(urls, **{"order": ORDER, **FAST, **options})
    db.register_table("accounts")
    db.register_table("ledger")
    return db


def apply_worker_in_transaction(url: str) -> bool:
    """The backup's apply worker holds a transaction id: it is inside a streamed transaction."""
    return bool(query(url, "SELECT count(*) FROM pg_stat_subscription s JOIN pg_stat_activity a "
                      "ON a.pid = s.pid WHERE a.backend_xid IS NOT NULL")[0][0])


def apply_worker_pid(url: str) -> int | None:
    rows = query(url, "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL")
    return int(rows[0][0]) if rows else None


def journaled(url: str, *statements: str) -> None:
    """One transaction on a backup as the managers write there while failed over."""
    with psycopg.connect(url) as conn:
        conn.execute("SELECT set_config('agent_factory.journal', 'on', true)")
        for statement in statements:
            conn.execute(statement)


def query_none(url: str, sql: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)

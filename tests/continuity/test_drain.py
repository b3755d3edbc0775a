"""The drain's edge cases on real servers: what it must write, what it must not hold.

Outage changes that net to nothing on the primary, a delete that loses its
conflict, two drainers of one backup, a long primary transaction, a slow
link, a primary hung mid-stream, a backup busy applying a long transaction,
a table the primary lacks.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from bank import (  # noqa: F401 - bank is a fixture
    Teller,
    apply_worker_in_transaction,
    apply_worker_pid,
    back_on_the_primary,
    bank,
    bank_db,
    behind_pooler,
    check_bank,
    converged,
    direct,
    journal_size,
    journaled,
    off_the_ledger,
    query,
    query_none,
)
from databases import with_port
from fleet import until_accepted, wait_until
from psycopg import sql

from agent_factory.continuity import drain, journal
from agent_factory.continuity.merge import ConflictPolicy
from agent_factory.errors import (
    SplitBrainRefusedError,
)
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet


def same_tables(plain: dict[str, str], ddl: str, *journaled: str) -> None:
    """``ddl`` on the primary and on railway, and railway's journal on ``journaled``."""
    for name in ("supabase", "railway"):
        query_none(plain[name], ddl)
    with psycopg.connect(plain["railway"]) as conn:
        for table in journaled:
            journal.install(conn, table)


def drain_railway(plain: dict[str, str], policy: ConflictPolicy | None = None
                  ) -> drain.DrainReport:
    """Railway's journal drained into the primary to the end, as the CLI does."""
    with psycopg.connect(plain["supabase"]) as target, \
            psycopg.connect(plain["railway"]) as source:
        journal.prepare_session(target)
        journal.prepare_session(source)
        return drain.drain_all(source, target, "railway", policy or ConflictPolicy())


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_a_drain_that_changes_nothing_on_the_primary_still_converges_the_backup(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """Railway's own outage writes net to nothing on the primary, while the
    primary's last transfer reached railway between two of them (the primary
    back, or resumed after a hang, while instances still write on railway).
    Railway's row must still end as the primary's: the drain writes it."""
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, conflict_delta_columns="accounts.balance", drain_interval=3600) as db:
        query_none(plain["railway"], "ALTER SUBSCRIPTION agent_factory_railway DISABLE")
        query_none(plain["supabase"], "UPDATE accounts SET balance = balance + 100 WHERE id = 1")
        journaled(plain["railway"], "UPDATE accounts SET balance = balance - 5 WHERE id = 1",
                  "UPDATE accounts SET balance = balance + 5 WHERE id = 2")
        query_none(plain["railway"], "ALTER SUBSCRIPTION agent_factory_railway ENABLE")
        # The primary's update overwrites railway's row (its change stays in the journal).
        wait_until(lambda: query(plain["railway"], "SELECT balance FROM accounts WHERE id = 1")
                   == [(1100,)], timeout=30, message="the primary's update on railway")
        journaled(plain["railway"], "UPDATE accounts SET balance = balance + 5 WHERE id = 1",
                  "UPDATE accounts SET balance = balance - 5 WHERE id = 2")
        assert journal_size(plain["railway"]) == 4
        assert db.failback_now() == 4
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id <= 2 "
                 "ORDER BY id") == [(1, 1100), (2, 1000)]
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_conflicts") == [(2,)]
    converged(plain, healthy_fleet)


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_a_delete_on_a_backup_that_loses_its_conflict_comes_back_to_that_backup(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """primary_wins: railway deleted an account the primary had updated meanwhile
    (its update had not reached railway). The primary keeps its row, and railway
    must get it back: replication cannot (an update of a row railway lacks is
    skipped there)."""
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, conflict_policy="primary_wins", drain_interval=3600) as db:
        query_none(plain["railway"], "ALTER SUBSCRIPTION agent_factory_railway DISABLE")
        query_none(plain["supabase"], "UPDATE accounts SET balance = 500 WHERE id = 9")
        journaled(plain["railway"], "DELETE FROM accounts WHERE id = 9")
        query_none(plain["railway"], "ALTER SUBSCRIPTION agent_factory_railway ENABLE")
        # The drainer thread's first look (at start) may come after the delete on a
        # loaded machine and drain it itself: either way it is drained once.
        db.failback_now()
        assert journal_size(plain["railway"]) == 0
    assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 9") == [(500,)]
    assert query(plain["supabase"], "SELECT op, resolution FROM agent_factory_conflicts") == [
        ("DELETE", "primary_wins")]
    converged(plain, healthy_fleet)


def test_deletes_and_updates_on_a_backup_come_back(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    plain = direct(healthy_fleet, bank)
    with bank_db(bank) as db:
        healthy_fleet["supabase"].server.kill()
        db.execute_query("DELETE FROM accounts WHERE id = 10", fetch_mode="none",
                         idempotent=True)
        db.execute_query("UPDATE accounts SET balance = 7 WHERE id = 9", fetch_mode="none",
                         idempotent=True)
        assert db.serving_provider == "railway"
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: query(plain["supabase"], "SELECT id, balance FROM accounts "
                                 "WHERE id >= 9 ORDER BY id") == [(9, 7)], timeout=30,
                   message="the delete and the update on the primary")
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_conflicts") == [(0,)]


#: Railway's outage: three transfers (source, destination, amount), each one
#: source transaction of two delta updates and a ledger row.
TRANSFERS = [(1, 2, 5), (2, 3, 7), (3, 1, 11)]


@pytest.mark.parametrize("pruned", [False, True], ids=["prune-after", "prune-beside"])
def test_two_drainers_never_apply_one_transaction_twice(
        healthy_fleet: Fleet, bank: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        pruned: bool) -> None:
    """Drainer A has applied railway's transactions on the primary and not yet
    pruned them from railway's journal; drainer B reads them there, then A prunes
    (the interleaving three teller processes met in CI). B must find A's marks
    and skip them: applied twice, the deltas would move the balances twice, off
    the ledger. The marks go later, with a drain that holds the lock and knows
    their entries gone. ``pruned``: the drainers prune on a second connection
    while the primary applies (A's prune then waits before A's commit there)."""
    plain = direct(healthy_fleet, bank)
    with psycopg.connect(plain["railway"]) as conn:
        journal.install(conn, "accounts")
        journal.install(conn, "ledger")
    want = dict.fromkeys(range(1, 11), 1000)
    for src, dst, amount in TRANSFERS:
        journaled(plain["railway"],
                  f"UPDATE accounts SET balance = balance - {amount} WHERE id = {src}",
                  f"UPDATE accounts SET balance = balance + {amount} WHERE id = {dst}",
                  f"INSERT INTO ledger VALUES (gen_random_uuid(), {src}, {dst}, {amount})")
        want[src] -= amount
        want[dst] += amount
    policy = ConflictPolicy(delta_columns={"accounts": frozenset({"balance"})})
    reports: dict[str, drain.DrainReport] = {}

    def run(name: str) -> None:
        with psycopg.connect(plain["supabase"]) as target, \
                psycopg.connect(plain["railway"]) as source:
            journal.prepare_session(target)
            journal.prepare_session(source)
            with psycopg.connect(plain["railway"]) as pruner:
                reports[name] = drain.drain_all(source, target, "railway", policy,
                                                pruner=pruner if pruned else None)

    def balances() -> dict[int, int]:
        return dict(query(plain["supabase"], "SELECT id, balance FROM accounts"))

    def marks() -> int:
        return int(query(plain["supabase"], "SELECT count(*) FROM agent_factory_drained "
                         "WHERE provider = 'railway'")[0][0])

    with psycopg.connect(plain["railway"]) as blocker:
        # Holds the journal's rows: A's prune waits after A's commit on the primary.
        blocker.execute(f"SELECT seq FROM {journal.JOURNAL} FOR UPDATE")
        pid = blocker.info.backend_pid
        a = threading.Thread(target=run, args=("a",), daemon=True)
        a.start()
        wait_until(lambda: query(plain["railway"], "SELECT count(*) FROM pg_stat_activity "
                                 "WHERE %s = ANY(pg_blocking_pids(pid))", (pid,)) == [(1,)]
                   and balances() == want,
                   timeout=30, message="A applied, its prune waiting")
        assert marks() == len(TRANSFERS)
        # No lock can hold B between its read of the journal and its look at the
        # marks (back to back on the primary): its read is wrapped instead.
        real_read = drain._read
        let_go: list[bool] = []

        def read_then_let_a_prune(*args: Any) -> Any:
            got = real_read(*args)
            if threading.current_thread() is not a and not let_go:
                let_go.append(True)
                blocker.rollback()
                a.join(timeout=30)
                assert not a.is_alive(), "A's prune did not finish"
            return got

        monkeypatch.setattr(drain, "_read", read_then_let_a_prune)
        run("b")
    assert let_go and "a" in reports, "the drainers did not interleave"
    assert (reports["a"].transactions, reports["a"].changes) == (len(TRANSFERS), 9)
    assert reports["b"].changes == 0, "B applied A's transactions again"
    assert balances() == want
    assert off_the_ledger(plain["supabase"]) == []
    assert query(plain["supabase"], "SELECT count(*) FROM ledger") == [(len(TRANSFERS),)]
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_conflicts") == [(0,)]
    assert journal_size(plain["railway"]) == 0
    # A could not drop its marks (B held the lock); B, which pruned those
    # transactions too (gone already), dropped them holding the lock.
    assert marks() == 0
    run("c")
    assert reports["c"].changes == 0 and marks() == 0
    assert balances() == want


def test_a_drain_stops_after_a_batch_that_staged_less_than_it_may(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """Batches of two journal entries over three transactions of one change: the
    second batch stages one entry, so it is the last (no empty batch after it),
    and every change is applied."""
    plain = direct(healthy_fleet, bank)
    with psycopg.connect(plain["railway"]) as conn:
        journal.install(conn, "accounts")
    for account in (1, 2, 3):
        journaled(plain["railway"],
                  f"UPDATE accounts SET balance = balance + 1 WHERE id = {account}")
    with psycopg.connect(plain["supabase"]) as target, \
            psycopg.connect(plain["railway"]) as source:
        journal.prepare_session(target)
        journal.prepare_session(source)
        reports = list(drain.drain(source, target, "railway", ConflictPolicy(), batch=2))
    assert [r.changes for r in reports] == [2, 1]
    assert journal_size(plain["railway"]) == 0
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id <= 3 "
                 "ORDER BY id") == [(1, 1001), (2, 1001), (3, 1001)]
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_drained") == [(0,)]


def test_the_batch_read_does_not_loop_over_a_journal_analyzed_while_empty(
        healthy_fleet: Fleet, bank: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal is empty most of its life: an ANALYZE that saw it so (autovacuum's,
    after a prune) leaves the planner taking the next outage's entries for one row.
    The batch read must still read them in one pass -- a nested loop scanned the
    journal once per source transaction (64 s for 20,000 changes in bench.journal)."""
    plain = direct(healthy_fleet, bank)
    with psycopg.connect(plain["railway"]) as conn:
        journal.install(conn, "accounts")

    def transfers(n: int) -> None:
        with psycopg.connect(plain["railway"]) as conn:
            for _ in range(n):
                conn.execute("SELECT set_config('agent_factory.journal', 'on', true)")
                conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 2")
                conn.commit()

    policy = ConflictPolicy(delta_columns={"accounts": frozenset({"balance"})})
    transfers(300)
    assert drain_railway(plain, policy).changes == 600
    query_none(plain["railway"], "ANALYZE agent_factory_journal")  # empty, its pages kept
    assert query(plain["railway"], "SELECT relpages > 0, reltuples FROM pg_class "
                 "WHERE relname = 'agent_factory_journal'") == [(True, 0.0)]
    transfers(300)
    plans: list[str] = []
    real_stage = drain.staged.stage

    def stage(source: psycopg.Connection[Any], target: psycopg.Connection[Any],
              read: Any, params: tuple[Any, ...]) -> int:
        plans.append("\n".join(r[0] for r in source.execute(
            sql.SQL("EXPLAIN ") + read, params)))
        return real_stage(source, target, read, params)

    monkeypatch.setattr(drain.staged, "stage", stage)
    assert (drain_railway(plain, policy).changes, journal_size(plain["railway"])) == (600, 0)
    assert plans and not [p for p in plans if "Nested Loop" in p], plans
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id <= 2 "
                 "ORDER BY id") == [(1, 400), (2, 1600)]


def test_tables_with_a_foreign_key_drain_parents_first_and_delete_children_first(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """An application failed over to railway deletes a parent with its children
    (children first, as the foreign key makes it), then creates a parent and moves
    a child to it. In the batch the children table changes first; the drain must
    still write the new parent before the child that points at it, and delete the
    children before their parent -- else every attempt fails on the foreign key
    and the changes stay pending for good."""
    plain = direct(healthy_fleet, bank)
    same_tables(plain, "CREATE TABLE parents (id int PRIMARY KEY, name text); "
                "CREATE TABLE children (id int PRIMARY KEY, "
                "parent int NOT NULL REFERENCES parents, note text); "
                "INSERT INTO parents VALUES (1, 'a'), (2, 'b'); "
                "INSERT INTO children VALUES (10, 1, 'x'), (11, 2, 'y')",
                "parents", "children")
    journaled(plain["railway"], "DELETE FROM children WHERE parent = 1",
              "DELETE FROM parents WHERE id = 1")
    journaled(plain["railway"], "INSERT INTO parents VALUES (3, 'c')",
              "UPDATE children SET parent = 3 WHERE id = 11")
    report = drain_railway(plain)
    assert (report.changes, report.conflicts, journal_size(plain["railway"])) == (4, 0, 0)
    assert query(plain["supabase"], "SELECT id, name FROM parents ORDER BY id") == [
        (2, "b"), (3, "c")]
    assert query(plain["supabase"], "SELECT id, parent, note FROM children ORDER BY id") == [
        (11, 3, "y")]


def test_identity_keys_and_generated_columns_drain(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """A table keyed by ``GENERATED ALWAYS AS IDENTITY`` with a stored generated
    column, as PostgreSQL recommends today: inserts, updates and a delete on
    railway reach the primary, which computes the generated column itself."""
    plain = direct(healthy_fleet, bank)
    same_tables(plain, "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY "
                "PRIMARY KEY, price int NOT NULL, qty int NOT NULL, "
                "total int GENERATED ALWAYS AS (price * qty) STORED)", "items")
    query_none(plain["supabase"], "INSERT INTO items (price, qty) VALUES (1, 1), (2, 2)")
    query_none(plain["railway"], "INSERT INTO items (id, price, qty) OVERRIDING SYSTEM VALUE "
               "VALUES (1, 1, 1), (2, 2, 2)")
    query_none(plain["railway"], "SELECT setval(pg_get_serial_sequence('items', 'id'), 100)")
    journaled(plain["railway"], "INSERT INTO items (price, qty) VALUES (3, 3), (4, 4)",
              "UPDATE items SET qty = 10 WHERE id = 1", "DELETE FROM items WHERE id = 2")
    report = drain_railway(plain)
    assert (report.changes, report.conflicts, journal_size(plain["railway"])) == (4, 0, 0)
    assert query(plain["supabase"], "SELECT id, price, qty, total FROM items ORDER BY id") == [
        (1, 1, 10, 10), (101, 3, 3, 9), (102, 4, 4, 16)]
    # The primary's identity moved past the ids railway handed out.
    assert query(plain["supabase"], "INSERT INTO items (price, qty) VALUES (5, 5) "
                 "RETURNING id > 102") == [(True,)]


TYPES = """
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE DOMAIN positive AS int CHECK (VALUE > 0);
CREATE TYPE pair AS (a int, b text);
CREATE TABLE "Odd Items" (
    "Key" text PRIMARY KEY, f float8, n numeric, ts timestamptz, t timestamp, d date,
    iv interval, b bytea, ints int[], texts text[], j json, jb jsonb, m mood, p positive,
    c pair, r int4range, ip inet, tv tsvector, pt point, bits varbit, v vector(3),
    big text)
"""


def test_rows_of_every_common_column_type_drain_exactly(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """Inserts, updates and deletes on railway of a table with a quoted name and
    columns of many types (special floats, bytes, arrays, json with odd spacing,
    enum, domain, composite, range, geometry, vectors, a 1 MB text, a column
    named like an alias the drain's statements use) reach the primary value for
    value, and a later outage's update of those rows applies cleanly (its before
    image matches what the primary got)."""
    plain = direct(healthy_fleet, bank)
    same_tables(plain, TYPES, '"Odd Items"')
    row = ("'{k}', {f}, 12345678901234567890.000000000001, "
           "'2026-12-03 10:00:00.123456+05:30', '2026-12-03 10:00', '2026-12-03', "
           "'1 day 02:03:04.5', decode('00ff10', 'hex'), ARRAY[1, NULL, 3], "
           "ARRAY['a,b', NULL, 'q\"uote', ''], '{{ \"z\": 1,  \"a\" : [1, 2.50] }}', "
           "'{{\"x\": 1.0}}', 'busy', 7, ROW(1, 'x y'), '[1,5)', '10.0.0.1/8', "
           "'a fat cat', '(1.5,2)', B'1011', '[1,2.5,-3]', repeat('e', 500000) || 'é'")
    rows = {"one": "'NaN'", "two": "'-Infinity'", "three": "1e-310", "four": "-0.0"}
    journaled(plain["railway"], *[
        f'INSERT INTO "Odd Items" VALUES ({row.format(k=k, f=f)})' for k, f in rows.items()])
    journaled(plain["railway"], "UPDATE \"Odd Items\" SET f = f * 2, ints = ints || 4, "
              "jb = jb || '{\"y\": null}' WHERE \"Key\" IN ('one', 'three')",
              "DELETE FROM \"Odd Items\" WHERE \"Key\" = 'four'")

    def rows_of(url: str) -> list[Any]:
        return query(url, 'SELECT o::text FROM "Odd Items" o ORDER BY "Key"')

    report = drain_railway(plain)
    assert (report.changes, report.conflicts, journal_size(plain["railway"])) == (7, 0, 0)
    assert len(rows_of(plain["supabase"])) == 3
    # A json column comes back as jsonb keeps it (keys sorted, spaces dropped):
    # the images are jsonb. Every other value is the same, to the byte.
    assert query(plain["supabase"], 'SELECT DISTINCT j::text FROM "Odd Items"') == [
        ('{"a": [1, 2.50], "z": 1}',)]
    query_none(plain["railway"], 'UPDATE "Odd Items" SET j = j::jsonb::json')
    assert rows_of(plain["supabase"]) == rows_of(plain["railway"])
    # The next outage changes these rows again: their images match the primary's.
    journaled(plain["railway"], "UPDATE \"Odd Items\" SET m = 'calm'")
    report = drain_railway(plain)
    assert (report.changes, report.conflicts) == (3, 0)
    assert rows_of(plain["supabase"]) == rows_of(plain["railway"])


@pytest.mark.parametrize("table", ["app.items", '"My App"."Items"', '"Items"'])
def test_tables_of_any_schema_and_name_drain(
        healthy_fleet: Fleet, bank: dict[str, str], table: str) -> None:
    """A table outside ``public``, in a schema whose name needs quotes, or with a
    name that does (the trigger records each part quoted where needed)."""
    plain = direct(healthy_fleet, bank)
    same_tables(plain, 'CREATE SCHEMA app; CREATE SCHEMA "My App"; '
                f"CREATE TABLE {table} (id int PRIMARY KEY, v text); "
                f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')", table)
    journaled(plain["railway"], f"INSERT INTO {table} VALUES (3, 'c')",
              f"UPDATE {table} SET v = 'z' WHERE id = 1", f"DELETE FROM {table} WHERE id = 2")
    report = drain_railway(plain)
    assert (report.changes, report.stuck, journal_size(plain["railway"])) == (3, 0, 0)
    assert query(plain["supabase"], f"SELECT id, v FROM {table} ORDER BY id") == [
        (1, "z"), (3, "c")]


def test_table_names_are_read_as_postgresql_reads_them() -> None:
    assert journal.name_parts("items") == ["items"]
    assert journal.name_parts("App.Items") == ["app", "items"]
    assert journal.name_parts('"My App"."It""ems.x"') == ["My App", 'It"ems.x']
    assert journal.name_parts('public."Items"') == ["public", "Items"]


def test_a_batch_whose_final_rows_collide_on_a_unique_key_drains_step_by_step(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """On railway: two slots swap their unique position by way of a third value,
    a user is deleted and a new one takes its unique email, and an unrelated row
    changes. Written at once, the final rows collide (PostgreSQL checks a unique
    key at each row); replayed one change at a time, as railway went through
    them, they do not. Every change reaches the primary, none is a conflict."""
    plain = direct(healthy_fleet, bank)
    same_tables(plain, "CREATE TABLE slots (id int PRIMARY KEY, pos int UNIQUE, note text); "
                "INSERT INTO slots VALUES (1, 1, 'a'), (2, 2, 'b'), (3, 3, 'c'); "
                "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE); "
                "INSERT INTO users VALUES (1, 'x@example.org')", "slots", "users")
    journaled(plain["railway"], "UPDATE slots SET pos = -1 WHERE id = 1",
              "UPDATE slots SET pos = 1 WHERE id = 2", "UPDATE slots SET pos = 2 WHERE id = 1")
    journaled(plain["railway"], "DELETE FROM users WHERE id = 1",
              "INSERT INTO users VALUES (2, 'x@example.org')")
    journaled(plain["railway"], "UPDATE slots SET note = 'z' WHERE id = 3")
    report = drain_railway(plain)
    assert (report.changes, report.conflicts, journal_size(plain["railway"])) == (6, 0, 0)
    for table in ("slots", "users"):
        assert query(plain["supabase"], f"SELECT * FROM {table} ORDER BY id") == \
            query(plain["railway"], f"SELECT * FROM {table} ORDER BY id")
    assert query(plain["supabase"], "SELECT id, pos, note FROM slots ORDER BY id") == [
        (1, 2, "a"), (2, 1, "b"), (3, 3, "z")]


def test_a_batch_that_fails_on_the_primary_keeps_its_entries_and_leaves_no_prune_running(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """The batch's prune runs beside the primary's work (a second connection to
    railway); the primary then refuses the batch (a row held past the lock
    timeout). The error reaches the caller, the prune is rolled back -- every
    entry stays in the journal -- and no prune thread outlives the drain. Once
    the row is free the same entries drain."""
    plain = direct(healthy_fleet, bank)
    with psycopg.connect(plain["railway"]) as conn:
        journal.install(conn, "accounts")
    journaled(plain["railway"], "UPDATE accounts SET balance = balance - 3 WHERE id = 1",
              "UPDATE accounts SET balance = balance + 3 WHERE id = 2")
    policy = ConflictPolicy(delta_columns={"accounts": frozenset({"balance"})})

    def run() -> drain.DrainReport:
        with psycopg.connect(plain["supabase"]) as target, \
                psycopg.connect(plain["railway"]) as source, \
                psycopg.connect(plain["railway"]) as pruner:
            journal.prepare_session(target)
            journal.prepare_session(source)
            return drain.drain_all(source, target, "railway", policy, lock_timeout=0.3,
                                   pruner=pruner)

    with psycopg.connect(plain["supabase"]) as holder:
        holder.execute("SELECT * FROM accounts WHERE id = 2 FOR UPDATE")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            run()
    assert not [t for t in threading.enumerate() if t.name == "agent-factory-prune"]
    assert journal_size(plain["railway"]) == 2
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id <= 2 "
                 "ORDER BY id") == [(1, 1000), (2, 1000)]
    report = drain_railway(plain)
    assert (report.changes, report.transactions) == (2, 1)
    assert journal_size(plain["railway"]) == 0
    # Its entries pruned, the drain dropped their marks before it returned.
    assert query(plain["supabase"], "SELECT count(*) FROM agent_factory_drained") == [(0,)]
    assert query(plain["supabase"], "SELECT id, balance FROM accounts WHERE id <= 2 "
                 "ORDER BY id") == [(1, 997), (2, 1003)]


def test_a_drain_beside_a_long_primary_transaction_holds_nothing_and_lets_the_primary_back(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """The primary comes back with an operator's transaction holding account 5
    for a long time. The drain must not wait behind it holding the accounts
    before it (every live writer of those would queue behind the drain), nor
    leave waiting backends behind; the primary takes writes again within
    failback_max_wait, and the held change is drained once the lock goes."""
    plain = direct(healthy_fleet, bank)
    link = healthy_fleet["supabase"].proxy
    with bank_db(bank, conflict_delta_columns="accounts.balance",
                 failback_max_wait=6.0) as db:
        with Teller(db) as teller:
            wait_until(lambda: teller.count() >= 30, timeout=30,
                       message="transfers on the primary")
            link.set_mode("refuse")
            wait_until(lambda: journal_size(plain["railway"]) >= 60, timeout=60,
                       message="transfers journaled on railway")
        with psycopg.connect(plain["supabase"]) as operator:
            operator.execute("SELECT * FROM accounts WHERE id = 5 FOR UPDATE")
            link.set_mode("pass")
            port = healthy_fleet["supabase"].server.port

            def write_on_primary() -> bool:
                # An account the drain would have locked before account 5.
                row = db.execute_query("UPDATE accounts SET balance = balance + 0 WHERE id = 1 "
                                       "RETURNING inet_server_port()", fetch_mode="one",
                                       idempotent=True)
                return row is not None and row[0] == port

            wait_until(write_on_primary, timeout=40, message="the primary takes writes again")
            waiting = query(plain["supabase"], "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE OF t%'")
            assert waiting == [(0,)], "drain backends left waiting on the operator's lock"
            assert journal_size(plain["railway"]) > 0
        # The operator ends the transaction: the rest drains.
        wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=60,
                   message="journal drained once the lock went")
    check_bank(teller, plain)


def test_a_drain_over_a_slow_link_finishes(healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """A batch whose statements take longer than the drain's stall bound to cross a
    slow link (300 kB/s each way) is progress, not a hang: it must not be abandoned
    (and retried, and abandoned again, for ever)."""
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, drain_interval=3600) as db:
        db.register_table("events")
        journaled(plain["railway"], "INSERT INTO events (note) SELECT repeat('x', 300) "
                  "FROM generate_series(1, 4000)")
        link = healthy_fleet["supabase"].proxy
        link.set_rate(300_000)
        try:
            moved = db.failback_now()
        finally:
            link.set_rate(None)
        assert moved == 4000, db.failback_status()["backups"]["railway"]
    assert query(plain["supabase"], "SELECT count(*) FROM events") == [(4000,)]


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_a_primary_hung_mid_stream_does_not_hold_the_backups_rows(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """The primary hangs while railway applies its big transaction: the apply worker
    keeps that transaction open, and its row lock on account 1, until
    wal_receiver_timeout (60 s). Once the heartbeat is quiet the watcher ends it,
    so a write of account 1 on railway goes through in seconds, not a minute."""
    plain = direct(healthy_fleet, bank)
    with bank_db(bank, conflict_delta_columns="accounts.balance") as db:
        db.execute_query("SELECT 1")
        wait_until(lambda: db._witness.sights["railway"].subscribed is True or bool(
            db._witness.look("railway")), timeout=30, message="railway's subscription seen")
        with psycopg.connect(plain["supabase"], autocommit=True) as conn, conn.transaction():
            conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
            conn.execute("INSERT INTO events (note) SELECT repeat('x', 200) "
                         "FROM generate_series(1, 400000)")
            conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 1")
        wait_until(lambda: apply_worker_in_transaction(plain["railway"]), timeout=30,
                   interval=0.005, message="railway applying the big transaction")
        healthy_fleet["supabase"].server.hang()
        assert apply_worker_in_transaction(plain["railway"]), "applied before the hang: retry"
        wait_until(lambda: db.execute_query("SELECT 1") and db.serving_provider == "railway",
                   timeout=30, message="reads served by railway")
        started = time.monotonic()

        def transfer() -> None:
            with db.transaction() as conn:
                conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 1")

        until_accepted(transfer, timeout=90)
        waited = time.monotonic() - started
        assert db.serving_provider == "railway"
        # witness_quiet (3 s) + slack for a shared machine; 60 s without the release
        assert waited < 20, f"the write waited {waited:.1f}s for the apply worker's lock"
        healthy_fleet["supabase"].server.resume()
        wait_until(lambda: journal_size(plain["railway"]) == 0, timeout=60,
                   message="journal drained")
        assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 1") == [(1005,)]
        converged(plain, healthy_fleet)


@pytest.mark.parametrize("bank", [True], indirect=True)
def test_a_cut_off_instance_stays_fenced_while_a_backup_applies_a_long_transaction(
        healthy_fleet: Fleet, bank: dict[str, str]) -> None:
    """Instance B is cut off from a live primary while railway applies one long
    transaction of it: the heartbeats queue behind it in the stream, so the
    heartbeat stands still on railway for longer than witness_quiet. The
    stream itself shows the primary alive: B's writes stay refused, and the
    apply worker (receiving, not stuck) is left alone."""
    plain = direct(healthy_fleet, bank)
    # A slow backup: each replicated event costs railway a millisecond.
    query_none(plain["railway"], """
        CREATE FUNCTION slow_apply() RETURNS trigger LANGUAGE plpgsql
            AS $$BEGIN PERFORM pg_sleep(0.001); RETURN NEW; END$$;
        CREATE TRIGGER slow_apply BEFORE INSERT ON events FOR EACH ROW
            EXECUTE FUNCTION slow_apply();
        ALTER TABLE events ENABLE REPLICA TRIGGER slow_apply""")
    primary = healthy_fleet["supabase"]
    with FaultProxy(primary.server.host, primary.server.port) as cut:
        b_urls = dict(bank)
        b_urls["supabase"] = with_port(bank["supabase"], cut.port)
        with bank_db(bank) as a, bank_db(b_urls) as b:
            assert a.execute_query("SELECT 1") and b.execute_query("SELECT 1")
            wait_until(lambda: b._witness.sights["railway"].subscribed is True or bool(
                b._witness.look("railway")), timeout=30, message="railway's subscription seen")
            query_none(plain["supabase"], "INSERT INTO events (note) "
                       "SELECT 'x' FROM generate_series(1, 12000)")
            wait_until(lambda: apply_worker_in_transaction(plain["railway"]), timeout=30,
                       interval=0.01, message="railway applying the long transaction")
            worker = apply_worker_pid(plain["railway"])
            cut.set_mode("refuse")
            wait_until(lambda: b.execute_query("SELECT 1") and b.serving_provider == "railway",
                       timeout=30, message="B's reads served by railway")
            started, refused = time.monotonic(), 0
            quiet = b.settings.witness_quiet
            while time.monotonic() - started < quiet + 3:
                assert apply_worker_in_transaction(plain["railway"]), \
                    "railway applied the transaction too soon for this test: slow it more"
                try:
                    b.execute_query("UPDATE accounts SET balance = balance + 1 WHERE id = 1",
                                    fetch_mode="none")
                except SplitBrainRefusedError:
                    pass
                else:
                    sight = b._witness.sights["railway"]
                    stream = query(plain["railway"], "SELECT received_lsn::text, "
                                   "last_msg_receipt_time FROM pg_stat_subscription")
                    raise AssertionError(
                        f"B wrote on railway {time.monotonic() - started:.1f}s after the cut; "
                        f"B saw {sight.value} quiet {sight.quiet_for(time.monotonic()):.1f}s; "
                        f"railway's stream: {stream}")
                refused += 1
                time.sleep(0.05)
            assert refused > 20
            assert apply_worker_pid(plain["railway"]) == worker, "the apply worker was ended"
            assert a.serving_provider == "supabase"
            cut.set_mode("pass")
            wait_until(lambda: b.execute_query("SELECT 1") and b.serving_provider == "supabase",
                       timeout=30, message="B back on the primary")
    assert journal_size(plain["railway"]) == 0
    converged(plain, healthy_fleet)


@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "behind-pgbouncer"])
def test_changes_to_a_table_the_primary_lacks_stay_pending_without_holding_it_back(
        healthy_fleet: Fleet, bank: dict[str, str], pooled: bool,
        request: pytest.FixtureRequest) -> None:
    """A table dropped on the primary (or never deployed there): its changes stay in the
    journal with an ERROR, the others go through, and the primary takes writes again
    (also with the primary behind a transaction-mode PgBouncer)."""
    plain = direct(healthy_fleet, bank)
    urls = behind_pooler(bank, request.getfixturevalue("pooled_primary")) if pooled else bank
    query_none(plain["railway"], "CREATE TABLE only_here (id int PRIMARY KEY)")
    with bank_db(urls) as db:
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
        wait_until(lambda: back_on_the_primary(db), timeout=60, message="primary back")
        db.execute_query("UPDATE accounts SET balance = 6 WHERE id = 3", fetch_mode="none")
        assert db.serving_provider == "supabase"
        wait_until(lambda: "lacks" in (db.failback_status()["backups"]["railway"]["last_error"]
                                       or ""), timeout=30, message="the stuck change reported")
        assert db.failback_status()["backups"]["railway"]["pending"] == 1
    assert journal_size(plain["railway"]) == 1
    assert query(plain["supabase"], "SELECT balance FROM accounts WHERE id = 3") == [(6,)]

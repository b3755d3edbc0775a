"""Replication + failback together: the chaos test that counts, and the RPO bound."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from databases import replicated, with_port  # noqa: F401 - replicated is a fixture
from fleet import until_accepted, wait_until
from test_failback import FAST, ORDER, Writer, ids_on

from agent_factory.continuity.replication import (
    idle_subscriptions,
    wake_launcher,
)
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import AllProvidersUnavailableError
from agent_factory.memory import PostgresMemoryStorage, Session
from agent_factory.testing.fleet import Fleet


def direct(fleet: Fleet, urls: dict[str, str]) -> dict[str, str]:
    return {m.name: with_port(urls[m.name], m.server.port) for m in fleet}


def test_crash_failover_failback_with_replication_loses_nothing(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    plain = direct(healthy_fleet, replicated)
    with DatabaseManager(replicated, order=ORDER, monitor_interval=0.2, **FAST) as db:
        with Writer(db) as writer:
            wait_until(lambda: len(writer.acked) > 100, timeout=30, message="writes on the primary")
            wait_until(lambda: "railway" in db.providers["supabase"].health.replication,
                       timeout=30, message="replication lag measured")
            healthy_fleet["supabase"].server.kill()
            wait_until(lambda: db.serving_provider == "railway", timeout=30, message="failover")
            mark = len(writer.acked)
            wait_until(lambda: len(writer.acked) > mark + 200, timeout=30,
                       message="writes on the backup")
            healthy_fleet["supabase"].server.restart()
            wait_until(lambda: db.serving_provider == "supabase", timeout=30, message="failback")
            mark = len(writer.acked)
            wait_until(lambda: len(writer.acked) > mark + 100, timeout=30,
                       message="writes after failback")
        # Checked while the application still runs, as it would in production.
        assert writer.errors == []
        acked = set(writer.acked)
        on_primary = ids_on(plain["supabase"])
        assert len(on_primary) == len(set(on_primary))
        assert acked <= set(on_primary), f"{len(acked - set(on_primary))} acknowledged writes lost"
        # Every provider converges: railway through replication (after failback) and its
        # own writes, neon through replication and the failback's copy of railway's rows.
        for name in ("railway", "neon"):
            try:
                wait_until(lambda name=name: acked <= set(ids_on(plain[name])), timeout=30,
                           message=f"{name} converged")
            except AssertionError:
                missing = acked - set(ids_on(plain[name]))
                order = {i: n for n, i in enumerate(writer.acked)}
                idx = sorted(order[i] for i in missing)
                workers = query(plain[name], "SELECT backend_type, pid, wait_event FROM "
                                "pg_stat_activity WHERE backend_type LIKE 'logical%'")
                raise AssertionError(f"{name}: {len(missing)} missing, indexes {idx[:5]}.."
                                     f"{idx[-5:]} of {len(writer.acked)}; outage mark {mark}; "
                                     f"idle subscriptions {idle_subscriptions_on(plain[name])}, "
                                     f"replication processes {workers}") from None
            rows = ids_on(plain[name])
            assert len(rows) == len(set(rows))


def test_writes_refuse_a_backup_beyond_the_replication_lag_bound(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    plain = direct(healthy_fleet, replicated)
    # neon stops replicating: its lag is unknown from now on.
    with psycopg.connect(plain["neon"], autocommit=True) as conn:
        conn.execute("ALTER SUBSCRIPTION agent_factory_neon DISABLE")
    with DatabaseManager(replicated, order=["supabase", "neon"], monitor_interval=0.2,
                         max_replication_lag=5.0, **FAST) as db:
        wait_until(lambda: db.get_provider_stats()["railway"]["replication_lag_s"] is not None,
                   timeout=30, message="lag measured")
        assert db.get_provider_stats()["neon"]["stale"] is True
        healthy_fleet["supabase"].server.kill()
        with pytest.raises(AllProvidersUnavailableError, match="stale: replication lag"):
            db.execute_query(
                "INSERT INTO session_memories (session_id, memory_type, content) "
                "VALUES ('x', 'log', '{}')", fetch_mode="none",
            )
        # Reads may still go to the stale backup.
        assert db.execute_query("SELECT 1") == [(1,)]
        assert db.serving_provider == "neon"


def test_a_streaming_backup_that_stopped_applying_turns_stale_in_seconds(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    """Lag in seconds from WAL positions: PostgreSQL's replay_lag is NULL for subscribers.

    neon stays connected but its apply worker waits on a lock, so it falls
    behind while it still streams; its measured lag grows past the bound,
    writes refuse it, and it is fresh again once it catches up.
    """
    plain = direct(healthy_fleet, replicated)
    insert = ("INSERT INTO session_memories (session_id, memory_type, content) "
              "VALUES ('x', 'log', '{}')")
    with DatabaseManager(replicated, order=["supabase", "neon"], monitor_interval=0.2,
                         max_replication_lag=1.0, **FAST) as db:
        def neon() -> dict[str, object]:
            return dict(db.get_provider_stats()["neon"])

        db.execute_query(insert, fetch_mode="none")
        def lag_now() -> float:
            seconds = neon()["replication_lag_s"]
            return 9e9 if seconds is None else float(seconds)  # type: ignore[arg-type]

        wait_until(lambda: lag_now() < 0.5, timeout=30, message="neon caught up")
        assert neon()["stale"] is False
        blocker = psycopg.connect(plain["neon"])
        try:
            blocker.execute("LOCK TABLE session_memories IN ACCESS EXCLUSIVE MODE")
            db.execute_query(insert, fetch_mode="none")
            wait_until(lambda: neon()["stale"] is True, timeout=30, message="neon stale")
            lag = neon()["replication_lag_s"]
            assert isinstance(lag, float) and lag > 1.0
            with psycopg.connect(plain["supabase"], autocommit=True) as conn:
                rows = conn.execute("SELECT state FROM pg_stat_replication "
                                    "WHERE application_name = 'agent_factory_neon'").fetchall()
            # Connected: only its lag says stale. (Once seen in 'startup' rather than
            # 'streaming' under a loaded CI run: a reconnect of the apply worker.)
            assert rows and {r[0] for r in rows} <= {"streaming", "catchup", "startup"}, rows
        finally:
            blocker.close()
        wait_until(lambda: neon()["stale"] is False, timeout=30, message="neon fresh again")
        assert lag_now() < 1.0


def test_failback_rows_reach_every_backup_by_replication_which_keeps_flowing(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    """The drained outage row reaches a lagging backup after what the primary owed it.

    Failback replays the backup's journal on the primary without a replication
    origin, so replication carries it to every backup in WAL order (after the
    owed row); the backup that wrote it gives it up first, so its own
    subscription does not stop on a duplicate key.
    """
    import uuid

    plain = direct(healthy_fleet, replicated)
    insert = ("INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, "
              "content) VALUES (%s, 'chaos', 'x', 'log', %s, '{}'::jsonb)")
    with DatabaseManager(replicated, order=ORDER, monitor_interval=0.2, **FAST) as db:
        wait_until(lambda: db.providers["supabase"].health.subscribers >= {"railway", "neon"},
                   timeout=30, message="subscribers seen by the primary's probe")
        with psycopg.connect(plain["neon"], autocommit=True) as conn:
            conn.execute("ALTER SUBSCRIPTION agent_factory_neon DISABLE")
            # Its apply worker stops when it next looks (CI: it applied the owed
            # row below first): wait until it is gone.
            wait_until(lambda: conn.execute(
                "SELECT pid FROM pg_stat_subscription WHERE subname = 'agent_factory_neon'"
            ).fetchall() in ([], [(None,)]), timeout=30, message="neon's apply worker stopped")
        owed = str(uuid.uuid4())
        with psycopg.connect(plain["supabase"], autocommit=True) as conn:
            conn.execute(insert, (owed, "owed"))
        wait_until(lambda: owed in ids_on(plain["railway"]), timeout=30,
                   message="the row on railway by replication")
        healthy_fleet["supabase"].server.kill()
        outage = str(uuid.uuid4())
        # Keyed by its uuid, so safe to retry: the crash's close may reach a
        # pooled connection just after the statement went out on it (the
        # proxy forwards it a moment later), which would make a plain write's
        # outcome unknown.
        until_accepted(lambda: db.execute_query(insert, (outage, "outage"), fetch_mode="none",
                                                idempotent=True))
        assert db.serving_provider == "railway"
        healthy_fleet["supabase"].server.restart()
        wait_until(lambda: db.serving_provider == "supabase" or db.execute_query("SELECT 1")
                   and db.serving_provider == "supabase", timeout=30, message="failback")
        assert outage in ids_on(plain["supabase"])
        assert not {owed, outage} & set(ids_on(plain["neon"]))
        wait_until(lambda: outage in ids_on(plain["railway"]), timeout=30,
                   message="the outage row back on railway by replication")
        with psycopg.connect(plain["neon"], autocommit=True) as conn:
            conn.execute("ALTER SUBSCRIPTION agent_factory_neon ENABLE")
        wait_until(lambda: {owed, outage} <= set(ids_on(plain["neon"])), timeout=30,
                   message="the owed and the outage row reaching neon by replication")
        later = str(uuid.uuid4())
        db.execute_query(insert, (later, "later"), fetch_mode="none")
        for backup in ("neon", "railway"):
            wait_until(lambda b=backup: later in ids_on(plain[b]), timeout=30,
                       message=f"replication to {backup} still flowing")
            rows = ids_on(plain[backup])
            assert len(rows) == len(set(rows))


def test_a_memory_save_retried_on_a_backup_meets_its_first_try_everywhere(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    """A session saved on the primary but not yet replicated (a backlog), saved again
    on railway after the crash: the rows keep one key everywhere, so the drain finds
    the first try's messages (no conflict for them) and no subscription stops on a
    duplicate key (with server-side random ids both did: the drain failed on the
    natural key, and railway's subscription on the primary's backlogged insert)."""
    plain = direct(healthy_fleet, replicated)
    backups = ("railway", "neon")
    with DatabaseManager(replicated, order=ORDER, monitor_interval=0.2, **FAST) as db:
        store = PostgresMemoryStorage(db)
        wait_until(lambda: db.providers["supabase"].health.subscribers >= set(backups),
                   timeout=30, message="subscribers seen by the primary's probe")
        for b in backups:
            query_none(plain[b], f"ALTER SUBSCRIPTION agent_factory_{b} DISABLE")
        session = Session(session_id="retried", user_id="u", storage=store)
        session.add_user_message("hello")
        session.save()
        healthy_fleet["supabase"].server.kill()
        session.add_assistant_message("hi")
        until_accepted(session.save)
        assert db.serving_provider == "railway"
        for b in backups:
            query_none(plain[b], f"ALTER SUBSCRIPTION agent_factory_{b} ENABLE")
        healthy_fleet["supabase"].server.restart()

        def rows(url: str) -> list[tuple[Any, ...]]:
            return query(url, "SELECT id::text, message_id, content->>'content' "
                         "FROM session_memories WHERE session_id = 'retried' ORDER BY id")

        def converged() -> bool:
            want = rows(plain["supabase"])
            return len(want) == 3 and all(rows(plain[b]) == want for b in backups) and (
                query(plain["railway"], "SELECT count(*) FROM agent_factory_journal")[0][0] == 0)

        wait_until(converged, timeout=60, message="one row per message on every provider")
        assert PostgresMemoryStorage(db).load_session("retried") is not None
    for b in backups:
        assert query(plain[b], "SELECT count(*) FROM pg_stat_subscription "
                     "WHERE pid IS NOT NULL")[0][0] == 1, f"{b}'s replication stopped"
        assert query(plain[b], "SELECT apply_error_count FROM pg_stat_subscription_stats"
                     ) == [(0,)], b
    messages = query(plain["supabase"], "SELECT count(*) FROM agent_factory_conflicts "
                     "WHERE backup_version->>'memory_type' LIKE 'message%'")
    assert messages == [(0,)]


def query(url: str, text: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(text).fetchall()


def query_none(url: str, text: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(text)


def test_an_enabled_subscription_without_a_worker_is_seen_and_its_launcher_woken(
    healthy_fleet: Fleet, replicated: dict[str, str]
) -> None:
    """`idle_subscriptions` lists an enabled subscription whose worker is not running
    (here: its publisher is down, so each restart fails) and never one that runs or
    is disabled; waking the launcher changes nothing else."""
    plain = direct(healthy_fleet, replicated)
    with psycopg.connect(plain["railway"], autocommit=True) as conn:
        wait_until(lambda: idle_subscriptions(conn) == [], timeout=30,
                   message="railway's worker running")
        healthy_fleet["supabase"].server.kill()
        try:
            wait_until(lambda: idle_subscriptions(conn) == ["agent_factory_railway"],
                       timeout=30, message="railway's worker gone with its publisher")
            wake_launcher(conn, "agent_factory_railway")
            conn.execute("ALTER SUBSCRIPTION agent_factory_railway DISABLE")
            assert idle_subscriptions(conn) == []
            conn.execute("ALTER SUBSCRIPTION agent_factory_railway ENABLE")
        finally:
            healthy_fleet["supabase"].server.restart()
        wait_until(lambda: idle_subscriptions(conn) == [], timeout=30,
                   message="railway's worker running again")


def idle_subscriptions_on(url: str) -> list[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return idle_subscriptions(conn)

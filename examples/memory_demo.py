"""Conversation memory on three PostgreSQL providers, with a crash of the primary.

    python examples/memory_demo.py

Starts three embedded PostgreSQL servers named like the spec's providers
(supabase, railway, neon), deploys the schema on each, points the environment
at them, and runs the spec's "Using with Memory Storage" example as written.
Then it kills the primary (SIGKILL) and shows a session being saved and
loaded back on the backup that took over. Needs the 'embedded' extra
(PostgreSQL 16 with pgvector from the pgserver wheel) or PG_BIN.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from agent_factory.memory import (
    ContextManager,
    InMemoryStorage,
    PostgresMemoryStorage,
    Session,
    SQLiteStorage,
)
from agent_factory.schema import apply_migrations
from agent_factory.testing.embedded import EmbeddedPostgres
from agent_factory.testing.fleet import PROVIDERS, Fleet, start_fleet


def deploy_schema(url: str, embedding_dim: int = 1536) -> None:
    """What `agent-factory-db schema deploy` does on one provider."""
    apply_migrations(url, embedding_dim=embedding_dim)


def local_storages() -> None:
    print("== Local storages (no server) ==")
    with tempfile.TemporaryDirectory() as tmp:
        for storage in (InMemoryStorage(), SQLiteStorage(Path(tmp) / "sessions.db")):
            session = Session(user_id="alice", storage=storage)
            session.add_system_message("You are a helpful assistant.")
            session.add_user_message("My name is Alice.")
            session.add_assistant_message("Nice to meet you, Alice!")
            session.save()
            loaded = Session.load(session.session_id, storage=storage)
            assert loaded == session
            print(f"  {type(storage).__name__}: saved and reloaded {len(loaded)} messages")
        window = ContextManager(max_tokens=25).fit_to_window(session.history)
        print(f"  ContextManager(max_tokens=25) keeps: {[m.content for m in window]}")


def use_environment(fleet: Fleet) -> None:
    """Configure DatabaseManager() the way a deployment's .env would."""
    os.environ.update({
        "DATABASE_PROVIDER": "supabase",
        "DATABASE_FAILOVER_ENABLED": "true",
        "DATABASE_FAILOVER_ORDER": ",".join(PROVIDERS),
        "SUPABASE_DB_URL": fleet["supabase"].url,
        "RAILWAY_DB_URL": fleet["railway"].url,
        "NEON_DB_URL": fleet["neon"].url,
        "DATABASE_HANG_TIMEOUT": "1",
    })


def spec_example() -> PostgresMemoryStorage:
    print("\n== The spec's example: PostgresMemoryStorage with failover ==")
    # Uses multi-provider with automatic failover
    storage = PostgresMemoryStorage()

    # Create and save session
    session = Session(user_id="alice", storage=storage)
    session.add_user_message("Hello")
    session.save()  # Saves to primary or failover provider

    # Load session later (works even if provider changed)
    loaded = storage.load_session(session.session_id)

    assert loaded == session
    print(f"  saved and loaded {session.session_id} on {storage.db.serving_provider!r}: "
          f"{[m.content for m in loaded.history]}")
    return storage


def crash_primary(storage: PostgresMemoryStorage, primary: EmbeddedPostgres) -> None:
    print("\n== Crash of the primary ==")
    primary.kill()
    print("  supabase killed (SIGKILL)")
    session = Session(user_id="bob", storage=storage)
    session.add_system_message("You answer in one word.")
    session.add_user_message("Is the primary down?")
    session.add_assistant_message("Yes.", {"tokens": 1})
    session.save()
    saved_on = storage.db.serving_provider
    loaded = storage.load_session(session.session_id)
    print(f"  saved {len(session)} messages on {saved_on!r}, "
          f"loaded them back from {storage.db.serving_provider!r}: exact={loaded == session}")
    health = storage.db.health_check_all(max_age=0)
    print(f"  health: {health}")


def main() -> None:
    # Show the manager's failover warnings; keep the pool's reconnect chatter out.
    logging.basicConfig(level=logging.WARNING, format="  [log] %(message)s", stream=sys.stdout)
    logging.getLogger("psycopg").setLevel(logging.ERROR)
    local_storages()
    print("\nstarting three PostgreSQL servers...")
    with start_fleet(PROVIDERS, proxy=False) as fleet:
        for member in fleet:
            deploy_schema(member.url)
        use_environment(fleet)
        storage = spec_example()
        try:
            crash_primary(storage, fleet["supabase"].server)
        finally:
            storage.close()


if __name__ == "__main__":
    main()

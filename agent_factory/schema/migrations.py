"""Versioned schema migrations: load, render, checksum, plan and apply.

Migrations are plain SQL files named ``NNNN_name.sql``, shipped in
``agent_factory/schema/migrations`` and applied in version order, each in its
own transaction, and recorded in ``schema_migrations`` (version, name,
checksum, applied_at). ``{{EMBEDDING_DIM}}`` in a file is replaced by the
configured vector dimension before the checksum is taken, so a provider
deployed with another dimension shows up as drift rather than as a silent
mismatch. Applying twice changes nothing; a migration whose checksum no
longer matches the recorded one stops the deploy before anything runs.

Loading, rendering and planning do no I/O and live in `agent_factory.schema.plan`
(re-exported here); `read_applied` and `apply_migrations` talk to one database,
never with failover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from ..errors import (
    ConfigurationError,
    ExtensionUnavailableError,
    MigrationDriftError,
    MigrationError,
    ProviderUnavailableError,
)
from .plan import (
    DEFAULT_EMBEDDING_DIM,
    MAX_EMBEDDING_DIM,
    MIGRATIONS_TABLE,
    AppliedMigration,
    Migration,
    Plan,
    check_embedding_dim,
    describe_db_error,
    load_migrations,
    plan_migrations,
    render_script,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "MAX_EMBEDDING_DIM",
    "MIGRATIONS_TABLE",
    "AppliedMigration",
    "Migration",
    "Plan",
    "apply_migrations",
    "check_embedding_dim",
    "describe_db_error",
    "load_migrations",
    "plan_migrations",
    "read_applied",
    "render_script",
]

# One key for every deployer of this schema: concurrent deploys take turns.
_LOCK_KEY = 0x6166_5F73_6368_656D
_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


# -- I/O: one database, no failover --------------------------------------------


def read_applied(conn: psycopg.Connection[Any]) -> tuple[AppliedMigration, ...]:
    """The rows of ``schema_migrations`` (none when the table does not exist)."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
    if not exists or not exists[0]:
        return ()
    rows = conn.execute(
        f"SELECT version, name, checksum, applied_at FROM {MIGRATIONS_TABLE} ORDER BY version"
    ).fetchall()
    return tuple(AppliedMigration(*row) for row in rows)


def apply_migrations(
    target: str | psycopg.Connection[Any],
    *,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    directory: str | Path | None = None,
    provider: str = "database",
    on_applied: Callable[[AppliedMigration], None] | None = None,
) -> list[AppliedMigration]:
    """Apply the pending migrations to one database; return the ones applied now.

    ``target`` is a libpq connection string or an open connection that is not
    inside a transaction (it is left open). Each migration runs in its own
    transaction. Raises `MigrationDriftError` (nothing applied) when recorded
    migrations differ from the shipped ones, `ExtensionUnavailableError` when
    the server lacks pgvector, `MigrationError` when a migration fails (it is
    rolled back; the ones before it stay applied) and
    `ProviderUnavailableError` when the database cannot be reached.
    """
    dim = check_embedding_dim(embedding_dim)
    migrations = load_migrations(directory)
    with _connection(target, provider) as conn:
        try:
            with conn.transaction():
                applied = read_applied(conn)
            plan = plan_migrations(migrations, applied, dim)
            if plan.conflicts:
                raise MigrationDriftError(provider, plan.conflicts, plan.drift_message(provider))
            check_extensions(conn, plan.pending, provider)
            if plan.pending:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    conn.execute(_CREATE_TABLE)
        except psycopg.Error as exc:
            raise _unavailable_or(exc, conn, provider, MigrationError(
                provider, "(bookkeeping)", describe_db_error(exc))) from exc
        done: list[AppliedMigration] = []
        for migration in plan.pending:
            record = _apply_one(conn, migration, dim, provider)
            if record is not None:
                done.append(record)
                if on_applied is not None:
                    on_applied(record)
        return done


def check_extensions(
    conn: psycopg.Connection[Any], migrations: Iterable[Migration], provider: str
) -> None:
    """Raise `ExtensionUnavailableError` if the server lacks an extension they create."""
    needed = {ext: m for m in migrations for ext in m.extensions}
    if not needed:
        return
    with conn.transaction():
        rows = conn.execute(
            "SELECT name FROM pg_available_extensions WHERE name = ANY(%s)", (list(needed),)
        ).fetchall()
    missing = sorted(set(needed) - {row[0] for row in rows})
    if missing:
        ext = missing[0]
        raise ExtensionUnavailableError(
            provider, ext, _missing_extension_message(provider, ext, needed[ext].label,
                                                      conn.info.server_version)
        )


def _missing_extension_message(provider: str, ext: str, label: str, server_version: int) -> str:
    major = server_version // 10000
    head = (
        f"provider {provider!r}: extension {ext!r} (needed by migration {label}) is not "
        f"available on its PostgreSQL {major} server; nothing was applied."
    )
    if ext != "vector":
        return f"{head} Install the {ext} extension on the server, then deploy again."
    return (
        f"{head} pgvector must be installed on the server itself. On Supabase and Neon it "
        "ships with every database and this deploy enables it with CREATE EXTENSION vector "
        "(on Supabase also under Database > Extensions), so this server is probably self-"
        "hosted or another provider: install pgvector for PostgreSQL "
        f"{major} (Debian/Ubuntu: apt install postgresql-{major}-pgvector; RHEL/Fedora: "
        f"dnf install pgvector_{major}; macOS: brew install pgvector; Docker: the "
        "pgvector/pgvector image; or build it from https://github.com/pgvector/pgvector), "
        "or on Railway deploy the pgvector PostgreSQL template, then run the deploy again."
    )


def _apply_one(
    conn: psycopg.Connection[Any], migration: Migration, dim: int, provider: str
) -> AppliedMigration | None:
    sql = migration.render(dim)
    checksum = migration.checksum(dim)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            row = conn.execute(
                f"SELECT checksum FROM {MIGRATIONS_TABLE} WHERE version = %s",
                (migration.version,),
            ).fetchone()
            if row is not None:  # another deployer got here first
                if row[0] == checksum:
                    return None
                raise MigrationDriftError(
                    provider, (migration.label,),
                    f"provider {provider!r}: {migration.label} was applied concurrently with "
                    "another checksum; nothing more was applied",
                )
            # No parameters: the simple query protocol runs every statement of the file.
            conn.execute(sql)
            applied = conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, name, checksum) VALUES (%s, %s, %s) "
                "RETURNING version, name, checksum, applied_at",
                (migration.version, migration.name, checksum),
            ).fetchone()
    except psycopg.Error as exc:
        failed = MigrationError(provider, migration.label, describe_db_error(exc, sql))
        raise _unavailable_or(exc, conn, provider, failed, migration.label) from exc
    assert applied is not None
    return AppliedMigration(*applied)


def _unavailable_or(
    exc: psycopg.Error,
    conn: psycopg.Connection[Any],
    provider: str,
    otherwise: Exception,
    label: str | None = None,
) -> Exception:
    """A lost connection is `ProviderUnavailableError`; anything else ``otherwise``."""
    if not conn.broken and not conn.closed:
        return otherwise
    during = f" while applying {label} (its outcome is unknown)" if label else ""
    return ProviderUnavailableError(
        provider,
        f"connection lost{during}: {describe_db_error(exc)}; run the deploy again, applied "
        "migrations are skipped",
    )


@contextmanager
def _connection(
    target: str | psycopg.Connection[Any], provider: str
) -> Iterator[psycopg.Connection[Any]]:
    if not isinstance(target, str):
        if target.info.transaction_status != pq.TransactionStatus.IDLE:
            raise ConfigurationError(
                "apply_migrations needs a connection outside a transaction: commit or roll "
                "back first (or pass a connection string)"
            )
        yield target
        return
    try:
        conn = psycopg.connect(target, autocommit=True)
    except psycopg.Error as exc:
        raise ProviderUnavailableError(provider, describe_db_error(exc)) from None
    with conn:
        yield conn

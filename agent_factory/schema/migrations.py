"""Versioned schema migrations: load, render, checksum, plan and apply.

Migrations are plain SQL files named ``NNNN_name.sql``, shipped in
``agent_factory/schema/migrations`` and applied in version order, each in its
own transaction, and recorded in ``schema_migrations`` (version, name,
checksum, applied_at). ``{{EMBEDDING_DIM}}`` in a file is replaced by the
configured vector dimension before the checksum is taken, so a provider
deployed with another dimension shows up as drift rather than as a silent
mismatch. Applying twice changes nothing; a migration whose checksum no
longer matches the recorded one stops the deploy before anything runs.

Loading, rendering and planning do no I/O; `read_applied` and
`apply_migrations` talk to one database, never with failover.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # pragma: no cover
    from importlib.abc import Traversable

from ..errors import (
    ConfigurationError,
    ExtensionUnavailableError,
    MigrationDriftError,
    MigrationError,
    ProviderUnavailableError,
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

DEFAULT_EMBEDDING_DIM = 1536
# pgvector's HNSW index (0003_knowledge_atoms) accepts at most 2000 dimensions.
MAX_EMBEDDING_DIM = 2000
MIGRATIONS_TABLE = "schema_migrations"

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9][a-z0-9_]*)\.sql")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_CREATE_EXTENSION = re.compile(
    r'\bCREATE\s+EXTENSION\s+(?:IF\s+NOT\s+EXISTS\s+)?"?([A-Za-z0-9_-]+)"?', re.IGNORECASE
)
# One key for every deployer of this schema: concurrent deploys take turns.
_LOCK_KEY = 0x6166_5F73_6368_656D
_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version integer PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    """One SQL file: ``version`` and ``name`` come from ``NNNN_name.sql``."""

    version: int
    name: str
    template: str = field(repr=False)

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def extensions(self) -> tuple[str, ...]:
        """Extensions the migration creates, which the server must have available."""
        return tuple(dict.fromkeys(m.lower() for m in _CREATE_EXTENSION.findall(self.template)))

    def render(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> str:
        """The SQL to run, placeholders replaced, line endings normalised."""
        values = {"EMBEDDING_DIM": str(check_embedding_dim(embedding_dim))}

        def substitute(match: re.Match[str]) -> str:
            key = match.group(1)
            if key not in values:
                raise ConfigurationError(
                    f"migration {self.label} uses unknown placeholder {{{{{key}}}}}; "
                    f"known: {', '.join('{{' + k + '}}' for k in values)}"
                )
            return values[key]

        return _PLACEHOLDER.sub(substitute, self.template.replace("\r\n", "\n"))

    def checksum(self, embedding_dim: int = DEFAULT_EMBEDDING_DIM) -> str:
        return hashlib.sha256(self.render(embedding_dim).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AppliedMigration:
    """A row of ``schema_migrations``."""

    version: int
    name: str
    checksum: str
    applied_at: datetime

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class Plan:
    """What a deploy would do on one database, computed without I/O.

    ``drifted`` pairs a shipped migration with the differing record of it;
    ``unknown`` holds records of migrations this package does not ship (a
    newer version of it deployed there, or a file removed).
    """

    pending: tuple[Migration, ...]
    drifted: tuple[tuple[Migration, AppliedMigration], ...] = ()
    unknown: tuple[AppliedMigration, ...] = ()

    @property
    def conflicts(self) -> tuple[str, ...]:
        return tuple(m.label for m, _ in self.drifted) + tuple(a.label for a in self.unknown)

    @property
    def up_to_date(self) -> bool:
        return not self.pending and not self.conflicts

    def drift_message(self, provider: str) -> str:
        lines = [f"provider {provider!r}: schema_migrations does not match the shipped migrations"]
        for migration, record in self.drifted:
            if record.name != migration.name:
                lines.append(
                    f"  version {migration.version:04d} was applied as {record.label} but is "
                    f"shipped as {migration.label}"
                )
            else:
                lines.append(
                    f"  {migration.label}: applied with checksum {record.checksum[:12]}, the "
                    "shipped file renders to a different one (the file was edited after it "
                    "was applied, or --embedding-dim / DATABASE_EMBEDDING_DIM differs from "
                    "the value used then)"
                )
        for record in self.unknown:
            lines.append(f"  {record.label}: applied there but not shipped in this version")
        lines.append(
            "  Nothing was applied. Never edit an applied migration: add a new one. If the "
            "dimension differs, pass the one the provider was deployed with."
        )
        return "\n".join(lines)


def check_embedding_dim(value: object, setting: str = "embedding_dim") -> int:
    """The dimension as an int, or `ConfigurationError` naming ``setting``."""
    try:
        dim = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        dim = 0
    if isinstance(value, bool) or not 1 <= dim <= MAX_EMBEDDING_DIM:
        raise ConfigurationError(
            f"{setting}={value!r} is not a valid embedding dimension: use an integer from 1 to "
            f"{MAX_EMBEDDING_DIM} (pgvector's HNSW index limit) matching your embedding model, "
            f"e.g. 1536; default {DEFAULT_EMBEDDING_DIM}"
        )
    return dim


def load_migrations(directory: str | Path | None = None) -> tuple[Migration, ...]:
    """The migrations in ``directory`` (default: the ones shipped), in version order."""
    if directory is None:
        root: Traversable = resources.files("agent_factory.schema").joinpath("migrations")
    else:
        root = Path(directory)
        if not root.is_dir():
            raise ConfigurationError(f"migrations directory {str(directory)!r} is not a directory")
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.fullmatch(entry.name)
        if match is None:
            raise ConfigurationError(
                f"migration file {entry.name!r} must be named NNNN_name.sql (four digits, "
                "then lowercase letters, digits and underscores)"
            )
        version = int(match.group(1))
        if version in found:
            raise ConfigurationError(
                f"migration files {found[version].label}.sql and {entry.name} share version "
                f"{version:04d}; give each file its own number"
            )
        found[version] = Migration(version, match.group(2), entry.read_text(encoding="utf-8"))
    if not found:
        raise ConfigurationError(f"no NNNN_name.sql migration files in {str(root)!r}")
    return tuple(found[v] for v in sorted(found))


def plan_migrations(
    migrations: Sequence[Migration],
    applied: Iterable[AppliedMigration],
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
) -> Plan:
    """Compare shipped migrations with the records of one database."""
    records = {a.version: a for a in applied}
    pending: list[Migration] = []
    drifted: list[tuple[Migration, AppliedMigration]] = []
    for migration in migrations:
        record = records.pop(migration.version, None)
        if record is None:
            pending.append(migration)
        elif record.name != migration.name or record.checksum != migration.checksum(
            embedding_dim
        ):
            drifted.append((migration, record))
    unknown = tuple(records[v] for v in sorted(records))
    return Plan(tuple(pending), tuple(drifted), unknown)


def render_script(
    migrations: Sequence[Migration], embedding_dim: int = DEFAULT_EMBEDDING_DIM
) -> str:
    """All migrations as one SQL text, for ``--dry-run``."""
    parts = [
        f"-- agent-factory schema: {len(migrations)} migration(s), embedding dimension "
        f"{embedding_dim}; each runs in its own transaction and is recorded in "
        f"{MIGRATIONS_TABLE}"
    ]
    for migration in migrations:
        parts.append(
            f"-- ---- {migration.label} (checksum {migration.checksum(embedding_dim)[:12]})\n"
            f"{migration.render(embedding_dim).rstrip()}"
        )
    return "\n\n".join(parts) + "\n"


def describe_db_error(exc: psycopg.Error, sql: str | None = None) -> str:
    """The server's message with its SQLSTATE, line in ``sql``, detail and hint."""
    diag = exc.diag
    text = diag.message_primary or str(exc).strip() or type(exc).__name__
    if diag.sqlstate:
        text += f" (SQLSTATE {diag.sqlstate})"
    if sql is not None and diag.statement_position and diag.statement_position.isdigit():
        line = sql.encode("utf-8")[: int(diag.statement_position) - 1].count(b"\n") + 1
        text += f" at line {line}"
    for label, value in (("DETAIL", diag.message_detail), ("HINT", diag.message_hint)):
        if value:
            text += f"; {label}: {value}"
    return text


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

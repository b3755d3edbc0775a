"""The migrations themselves, without I/O: load, render, checksum and plan.

Migrations are plain SQL files named ``NNNN_name.sql``, shipped in
``agent_factory/schema/migrations``. ``{{EMBEDDING_DIM}}`` in a file is
replaced by the configured vector dimension before the checksum is taken.
`plan_migrations` compares them with the records of one database; applying
them is `agent_factory.schema.migrations`, which re-exports every name here.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

import psycopg

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:  # pragma: no cover
    from importlib.abc import Traversable

from ..errors import ConfigurationError

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "MAX_EMBEDDING_DIM",
    "MIGRATIONS_TABLE",
    "AppliedMigration",
    "Migration",
    "Plan",
    "check_embedding_dim",
    "describe_db_error",
    "load_migrations",
    "plan_migrations",
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

"""The exceptions of agent-factory.

Every error the package raises on its own derives from `AgentFactoryError`.
Errors about reaching a database also derive from `psycopg.OperationalError`,
so handlers written for psycopg keep working. SQL errors raised by a server
(syntax, constraint, permission...) are *not* wrapped: they propagate with
their own psycopg type, carrying the provider's name in ``exc.provider``.

    AgentFactoryError
    ├── ConfigurationError (also ValueError)    bad or missing settings
    │   └── NoProvidersConfiguredError           nothing to connect to
    ├── ManagerClosedError                       used after close_all()
    ├── ProviderError (also OperationalError)    a provider could not serve
    │   ├── ProviderUnavailableError             the statement never ran there
    │   │   └── SplitBrainRefusedError           a backup write while the primary may live
    │   ├── HangTimeoutError                     no answer within the deadline
    │   └── OutcomeUnknownError                  a write was sent, its fate unknown
    ├── AllProvidersUnavailableError (also OperationalError)  every candidate failed
    ├── SchemaError                              a schema command failed on a provider
    │   ├── MigrationError                       a migration failed and was rolled back
    │   ├── MigrationDriftError                  an applied migration no longer matches
    │   ├── ExtensionUnavailableError            the server lacks a required extension
    │   └── CopyError                            a data copy cannot proceed
    ├── ReplicationError                         a replication step failed on a provider
    │   └── ReplicationPrerequisiteError         it cannot replicate as configured
    ├── BindRefusedError (also ValueError)       the dashboard would listen beyond loopback
    ├── EmbeddedPostgresError (also RuntimeError)  an embedded test server failed
    │   └── PostgresNotFoundError                no usable PostgreSQL binaries
    ├── MissingDependencyError (also ImportError)  an optional package is missing
    ├── MemoryStorageError                       a storage backend failed a request
    └── InvalidMemoryError (also ValueError)     a record the schema cannot hold

Messages name the provider and never contain a password.
"""

from __future__ import annotations

from collections.abc import Mapping

import psycopg

__all__ = [
    "AgentFactoryError",
    "AllProvidersUnavailableError",
    "BindRefusedError",
    "ConfigurationError",
    "CopyError",
    "EmbeddedPostgresError",
    "ExtensionUnavailableError",
    "HangTimeoutError",
    "InvalidMemoryError",
    "ManagerClosedError",
    "MemoryStorageError",
    "MigrationDriftError",
    "MigrationError",
    "MissingDependencyError",
    "NoProvidersConfiguredError",
    "OutcomeUnknownError",
    "PostgresNotFoundError",
    "ProviderError",
    "ProviderUnavailableError",
    "ReplicationError",
    "ReplicationPrerequisiteError",
    "SchemaError",
    "SplitBrainRefusedError",
]


class AgentFactoryError(Exception):
    """Root of every exception raised by agent-factory itself."""

    __module__ = "agent_factory.errors"


class ConfigurationError(AgentFactoryError, ValueError):
    """A setting is missing or invalid; the message names it and how to fix it."""

    __module__ = "agent_factory.errors"


class NoProvidersConfiguredError(ConfigurationError):
    """No database provider has usable credentials."""

    __module__ = "agent_factory.errors"


class ManagerClosedError(AgentFactoryError, psycopg.InterfaceError):
    """The manager was closed; create a new one to run more queries."""

    __module__ = "agent_factory.errors"


class ProviderError(AgentFactoryError, psycopg.OperationalError):
    """A provider could not serve a statement.

    ``provider`` is the provider's name and ``reason`` a short text without
    secrets.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"provider {provider!r} unavailable: {reason}")
        self.provider = provider
        self.reason = reason


class ProviderUnavailableError(ProviderError):
    """The statement never reached this provider (connect or checkout failed)."""

    __module__ = "agent_factory.errors"


class SplitBrainRefusedError(ProviderUnavailableError):
    """A write refused on a backup: the primary's heartbeat still reaches it.

    This instance lost the primary, but other instances may still write there
    (a network partition): writing on the backup would fork the data. Nothing
    was sent; retry later. Reads are served meanwhile.
    """


class HangTimeoutError(ProviderError):
    """The provider stopped answering and the call was abandoned at its deadline."""

    __module__ = "agent_factory.errors"


class OutcomeUnknownError(ProviderError):
    """A write reached the provider but its connection failed before the answer.

    The write may or may not have committed there. It was not retried
    anywhere else, so it was applied at most once. Check and, if needed,
    retry it yourself, or pass ``idempotent=True`` for statements that are
    safe to run twice.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(
            provider,
            reason,
            f"outcome unknown on provider {provider!r}: the statement was sent but the "
            f"connection failed before it was acknowledged ({reason}); it may or may not "
            "have committed there and was not retried elsewhere",
        )


class AllProvidersUnavailableError(AgentFactoryError, psycopg.OperationalError):
    """Every provider that could serve the statement failed.

    ``reasons`` maps each provider tried or skipped to why it was not used.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, reasons: Mapping[str, str]) -> None:
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        super().__init__(f"All database providers failed ({detail})")
        self.reasons = dict(reasons)


# -- schema deploy, verify and copy (agent_factory.schema) ---------------------


class SchemaError(AgentFactoryError):
    """A schema deploy, verify or copy failed on one provider, named in ``provider``."""

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(message)
        self.provider = provider


class MigrationError(SchemaError):
    """A migration failed on a provider; its transaction was rolled back.

    ``migration`` is the migration's label (``0003_knowledge_atoms``) and
    ``reason`` the database's message.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, migration: str, reason: str) -> None:
        super().__init__(
            provider,
            f"provider {provider!r}: migration {migration} failed and was rolled back: {reason}",
        )
        self.migration = migration
        self.reason = reason


class MigrationDriftError(SchemaError):
    """Migrations recorded on a provider differ from the shipped ones.

    ``migrations`` lists the labels concerned. Nothing was applied.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, migrations: tuple[str, ...], message: str) -> None:
        super().__init__(provider, message)
        self.migrations = migrations


class ExtensionUnavailableError(SchemaError):
    """A required extension (pgvector) is not installed on the provider's server."""

    __module__ = "agent_factory.errors"

    def __init__(self, provider: str, extension: str, message: str) -> None:
        super().__init__(provider, message)
        self.extension = extension


class CopyError(SchemaError):
    """Copying data between two providers cannot proceed (schemas differ, table missing)."""

    __module__ = "agent_factory.errors"




# -- memory storage (agent_factory.memory) ------------------------------------


class MissingDependencyError(AgentFactoryError, ImportError):
    """An optional package a feature needs is not installed; the message says what to install."""

    __module__ = "agent_factory.errors"


class MemoryStorageError(AgentFactoryError):
    """A memory storage backend failed or refused a request (e.g. the Supabase REST API).

    ``code`` is the backend's error code when it gave one (a SQLSTATE for
    PostgREST errors), else None.
    """

    __module__ = "agent_factory.errors"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidMemoryError(AgentFactoryError, ValueError):
    """A message role, memory type or record that the memory schema cannot hold."""

    __module__ = "agent_factory.errors"




class ReplicationError(AgentFactoryError):
    """A replication step failed on ``provider``; the message never holds a password."""

    def __init__(self, provider: str, message: str) -> None:
        super().__init__(message)
        self.provider = provider


class ReplicationPrerequisiteError(ReplicationError):
    """The provider cannot replicate as configured (wal_level, privileges, tables)."""


class BindRefusedError(AgentFactoryError, ValueError):
    """The dashboard would listen beyond loopback without a token."""


class EmbeddedPostgresError(AgentFactoryError, RuntimeError):
    """An embedded server could not be set up, started or stopped."""


class PostgresNotFoundError(EmbeddedPostgresError):
    """No usable PostgreSQL binaries; the message says how to install them."""

"""agent-factory: PostgreSQL that keeps working when a provider goes down.

The public API is what ``__all__`` names; everything else is internal and
may move. Names are imported on first use, so ``import agent_factory`` loads
nothing else: no driver, no pool, no thread, no optional dependency.

The package's layers, bottom up (each imports only those below it):
``errors`` and ``engine`` (settings, routing, health, watchdog, providers),
``schema``, ``continuity`` (replication, failback), ``core`` (the managers),
``memory``, ``observability`` (metrics, dashboard), ``integrations``, ``cli``;
``testing`` (embedded servers, fault proxy) stands apart.
"""

from __future__ import annotations

import importlib
from typing import Any

_ERRORS = (
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
)

__all__ = [
    "AgentFactoryError",
    "AllProvidersUnavailableError",
    "AsyncDatabaseManager",
    "AtomMatch",
    "BindRefusedError",
    "ConfigurationError",
    "CopyError",
    "DatabaseManager",
    "EmbeddedPostgresError",
    "ExtensionUnavailableError",
    "HangTimeoutError",
    "InMemoryStorage",
    "InvalidMemoryError",
    "KnowledgeAtom",
    "KnowledgeStore",
    "Listener",
    "ManagerClosedError",
    "MemoryStorage",
    "MemoryStorageError",
    "Message",
    "MessageHistory",
    "MigrationDriftError",
    "MigrationError",
    "MissingDependencyError",
    "NoProvidersConfiguredError",
    "OutcomeUnknownError",
    "PostgresMemoryStorage",
    "PostgresNotFoundError",
    "ProviderError",
    "ProviderSettings",
    "ProviderUnavailableError",
    "ReplicationError",
    "ReplicationPrerequisiteError",
    "SQLiteStorage",
    "SchemaError",
    "Session",
    "Settings",
    "SupabaseMemoryStorage",
    "settings_from_env",
]

_LAZY = {
    **dict.fromkeys(_ERRORS, "errors"),
    "AsyncDatabaseManager": "core.async_database_manager",
    "DatabaseManager": "core.database_manager",
    "Listener": "engine.events",
    "ProviderSettings": "engine.settings",
    "Settings": "engine.settings",
    "settings_from_env": "engine.environment",
    **dict.fromkeys(
        ("AtomMatch", "InMemoryStorage", "KnowledgeAtom", "KnowledgeStore", "MemoryStorage",
         "Message", "MessageHistory", "PostgresMemoryStorage", "SQLiteStorage", "Session",
         "SupabaseMemoryStorage"),
        "memory",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

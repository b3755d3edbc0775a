"""agent-factory: PostgreSQL that keeps working when a provider goes down.

The public API is what ``__all__`` names; everything else is internal and
may move. Names are imported on first use, so ``import agent_factory`` loads
nothing else: no driver, no pool, no thread, no optional dependency.
``__version__`` (the installed distribution's, read on first use) is the
one other name.

The package's layers, bottom up (each imports only those below it):
``errors`` and ``engine`` (settings, routing, health, watchdog, providers),
``schema``, ``continuity`` (replication, failback), ``core`` (the managers),
``memory``, ``observability`` (metrics, dashboard), ``integrations``, ``cli``;
``testing`` (embedded servers, fault proxy) stands apart.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# A library's records reach the application's handlers, or no one: never
# Python's last-resort stderr handler (the logging HOWTO's convention).
logging.getLogger(__name__).addHandler(logging.NullHandler())

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
    "SplitBrainRefusedError",
    "SupabaseMemoryStorage",
    "settings_from_env",
]

#: Where each public name lives; the other names of ``__all__`` are the
#: errors of `errors` (tests/test_exported_members.py checks both lists).
_LAZY = {
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
    if name == "__version__":
        globals()[name] = version = _version()
        return version
    module = _LAZY.get(name, "errors" if name in __all__ else None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def _version() -> str:
    """The installed distribution's version; a source tree that was never installed has none."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agent-factory")
    except PackageNotFoundError:
        return "0+unknown"


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"__version__"})

"""The public API is exactly what agent_factory.__all__ names, and each name resolves."""

from __future__ import annotations

import subprocess
import sys

import agent_factory
from agent_factory import errors

PUBLIC = [
    "AgentFactoryError", "AllProvidersUnavailableError", "AsyncDatabaseManager", "AtomMatch",
    "BindRefusedError", "ConfigurationError", "CopyError", "DatabaseManager",
    "EmbeddedPostgresError", "ExtensionUnavailableError", "HangTimeoutError", "InMemoryStorage",
    "InvalidMemoryError", "KnowledgeAtom", "KnowledgeStore", "Listener", "ManagerClosedError",
    "MemoryStorage", "MemoryStorageError", "Message", "MessageHistory", "MigrationDriftError",
    "MigrationError", "MissingDependencyError", "NoProvidersConfiguredError",
    "OutcomeUnknownError", "PostgresMemoryStorage", "PostgresNotFoundError", "ProviderError",
    "ProviderSettings", "ProviderUnavailableError", "ReplicationError",
    "ReplicationPrerequisiteError", "SQLiteStorage", "SchemaError", "Session", "Settings",
    "SplitBrainRefusedError",
    "SupabaseMemoryStorage", "settings_from_env",
]


def test_the_exported_names_are_pinned() -> None:
    assert sorted(agent_factory.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(agent_factory, name) is not None, name
        assert name in dir(agent_factory)


def test_every_public_exception_is_in_the_one_tree() -> None:
    exceptions = [n for n in PUBLIC if isinstance(getattr(agent_factory, n), type)
                  and issubclass(getattr(agent_factory, n), BaseException)]
    for name in exceptions:
        cls = getattr(agent_factory, name)
        assert cls.__module__ == "agent_factory.errors", name
        assert issubclass(cls, errors.AgentFactoryError), name
        assert name in (errors.__doc__ or ""), f"{name} missing from the tree in errors.py"
    assert sorted(exceptions) == sorted(errors.__all__)


def test_importing_the_package_opens_nothing() -> None:
    code = (
        "import sys, threading, agent_factory\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "loaded = {m for m in sys.modules if m.startswith('agent_factory.')}\n"
        "assert not loaded and 'psycopg' not in sys.modules, loaded\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr

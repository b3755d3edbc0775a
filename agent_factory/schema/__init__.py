"""The database schema: versioned migrations, catalog verification, data copy.

    from agent_factory.schema import apply_migrations
    apply_migrations(conninfo_or_connection, embedding_dim=1536)

`apply_migrations` deploys the shipped migrations to one database;
`read_catalog` / `diff_catalogs` compare providers; `copy_tables` copies the
managed tables between two. The command line lives in
`agent_factory.cli.schema_command` (``agent-factory-db schema ...`` and
``scripts/deploy_multi_provider_schema.py``).
"""

from .catalog import Catalog, Difference, diff_catalogs, format_differences, read_catalog
from .copy import MANAGED_TABLES, TableReport, copy_tables
from .migrations import (
    DEFAULT_EMBEDDING_DIM,
    AppliedMigration,
    Migration,
    Plan,
    apply_migrations,
    check_embedding_dim,
    load_migrations,
    plan_migrations,
    read_applied,
    render_script,
)

__all__ = [
    "DEFAULT_EMBEDDING_DIM",
    "MANAGED_TABLES",
    "AppliedMigration",
    "Catalog",
    "Difference",
    "Migration",
    "Plan",
    "TableReport",
    "apply_migrations",
    "check_embedding_dim",
    "copy_tables",
    "diff_catalogs",
    "format_differences",
    "load_migrations",
    "plan_migrations",
    "read_applied",
    "read_catalog",
    "render_script",
]

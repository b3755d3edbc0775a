"""The schema logic without I/O: loading, rendering, planning, catalog diffs, exit codes."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import agent_factory.schema as schema
from agent_factory.cli.schema_command import add_schema_commands, exit_code
from agent_factory.errors import (
    ConfigurationError,
    CopyError,
    ExtensionUnavailableError,
    MigrationDriftError,
    MigrationError,
    ProviderUnavailableError,
    SchemaError,
)
from agent_factory.schema import (
    AppliedMigration,
    Catalog,
    Migration,
    check_embedding_dim,
    diff_catalogs,
    format_differences,
    load_migrations,
    plan_migrations,
)
from agent_factory.schema.catalog import build_catalog

NOW = datetime(2025, 12, 12, tzinfo=timezone.utc)


def test_public_names_exist() -> None:
    assert all(hasattr(schema, name) for name in schema.__all__)


def test_shipped_migrations_load_in_order_and_render_the_dimension() -> None:
    migrations = load_migrations()
    assert [m.label for m in migrations] == [
        "0001_extensions", "0002_session_memories", "0003_knowledge_atoms",
        "0004_failback_journal"]
    assert migrations[0].extensions == ("vector",)
    atoms = migrations[2]
    assert "embedding vector(1536)" in atoms.render()
    assert "embedding vector(384)" in atoms.render(384)
    assert atoms.checksum(384) != atoms.checksum(1536)
    assert migrations[1].checksum(384) == migrations[1].checksum(1536)  # no placeholder there


def test_line_endings_do_not_change_the_checksum() -> None:
    unix = Migration(1, "a", "SELECT 1;\nSELECT 2;\n")
    windows = Migration(1, "a", "SELECT 1;\r\nSELECT 2;\r\n")
    assert unix.checksum() == windows.checksum()


def test_unknown_placeholder_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigurationError, match=r"0007_x uses unknown placeholder \{\{TABLE\}\}"):
        Migration(7, "x", "CREATE TABLE {{TABLE}} ()").render()


@pytest.mark.parametrize("value", ["0", "2001", "abc", "", "1.5", True, -3])
def test_bad_embedding_dimensions_name_the_setting(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"--embedding-dim=.* integer from 1 to 2000"):
        check_embedding_dim(value, "--embedding-dim")


def test_good_embedding_dimensions() -> None:
    assert check_embedding_dim(" 768 ") == 768
    assert check_embedding_dim(2000) == 2000


def test_loader_rejects_bad_names_duplicates_and_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("ignored")
    with pytest.raises(ConfigurationError, match="no NNNN_name.sql migration files"):
        load_migrations(tmp_path)
    (tmp_path / "1_bad.sql").write_text("")
    with pytest.raises(ConfigurationError, match=r"'1_bad.sql' must be named NNNN_name.sql"):
        load_migrations(tmp_path)
    (tmp_path / "1_bad.sql").unlink()
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(ConfigurationError, match="share version 0001"):
        load_migrations(tmp_path)
    (tmp_path / "0001_b.sql").unlink()
    (tmp_path / "0010_c.sql").write_text("SELECT 3;")
    (tmp_path / "0002_b.sql").write_text("SELECT 2;")
    assert [m.version for m in load_migrations(str(tmp_path))] == [1, 2, 10]


def applied(migration: Migration, dim: int = 1536, **changes: Any) -> AppliedMigration:
    fields = {"version": migration.version, "name": migration.name,
              "checksum": migration.checksum(dim), "applied_at": NOW, **changes}
    return AppliedMigration(**fields)


def test_plan_finds_pending_drifted_renamed_and_unknown_migrations() -> None:
    one, two, three = (Migration(v, f"m{v}", f"SELECT {v}; -- {{{{EMBEDDING_DIM}}}}")
                       for v in (1, 2, 3))
    assert plan_migrations([one, two], []).pending == (one, two)
    done = plan_migrations([one, two], [applied(one), applied(two)])
    assert done.up_to_date and not done.pending

    plan = plan_migrations(
        [one, two, three],
        [applied(one, dim=768), applied(two, name="renamed"),
         AppliedMigration(9, "future", "x", NOW)],
    )
    assert plan.pending == (three,)
    assert plan.conflicts == ("0001_m1", "0002_m2", "0009_future")
    text = plan.drift_message("neon")
    assert "provider 'neon'" in text
    assert "0001_m1: applied with checksum" in text and "--embedding-dim" in text
    assert "version 0002 was applied as 0002_renamed but is shipped as 0002_m2" in text
    assert "0009_future: applied there but not shipped" in text
    assert plan_migrations([one], [applied(one, dim=768)], 768).up_to_date


def test_diff_groups_providers_by_value_and_hides_children_of_missing_tables() -> None:
    full = {("table", "t"): "table", ("column", "t.a"): "int NOT NULL",
            ("index", "t.i"): "CREATE INDEX i ON t USING btree (a)"}
    nullable = {**full, ("column", "t.a"): "int (nullable)"}
    assert diff_catalogs({"a": Catalog(full), "b": Catalog(dict(full))}) == []
    diffs = diff_catalogs({"a": Catalog(full), "b": Catalog(full), "c": Catalog(nullable)})
    assert [(d.kind, d.name) for d in diffs] == [("column", "t.a")]
    assert format_differences(diffs) == (
        "1 difference between providers:\n"
        "  column t.a\n"
        "    a, b: int NOT NULL\n"
        "    c:    int (nullable)"
    )
    # A missing table is one difference, not one per column and index...
    diffs = diff_catalogs({"a": Catalog(full), "b": Catalog({})})
    assert [(d.kind, d.name) for d in diffs] == [("table", "t")]
    # ...unless the providers that have it disagree about them.
    diffs = diff_catalogs({"a": Catalog(full), "b": Catalog({}), "c": Catalog(nullable)})
    assert [(d.kind, d.name) for d in diffs] == [("table", "t"), ("column", "t.a")]
    assert format_differences([]) == "No differences."


def test_build_catalog_describes_objects_without_the_schema_name() -> None:
    rows: dict[str, list[tuple[Any, ...]]] = {
        "extensions": [("plpgsql", "1.0")],
        "tables": [("t", "r")],
        "columns": [("t", "id", "uuid", True, "gen_random_uuid()", "", ""),
                    ("t", "n", "integer", False, None, "d", "")],
        "constraints": [("t", "t_pkey", "PRIMARY KEY (id)")],
        "indexes": [("t", "t_pkey", "CREATE UNIQUE INDEX t_pkey ON app.t USING btree (id)")],
        "triggers": [("t", "touch", "CREATE TRIGGER touch BEFORE UPDATE ON app.t FOR EACH ROW "
                                    "EXECUTE FUNCTION app.f()")],
        "functions": [("f()", "trigger", "0123456789abcdef")],
    }
    got = build_catalog(rows, schema="app", required_extensions=["vector"])
    assert got.objects == {
        ("extension", "vector"): "(missing)",
        ("table", "t"): "table",
        ("column", "t.id"): "uuid NOT NULL DEFAULT gen_random_uuid()",
        ("column", "t.n"): "integer (nullable) IDENTITY BY DEFAULT",
        ("constraint", "t.t_pkey"): "PRIMARY KEY (id)",
        ("index", "t.t_pkey"): "CREATE UNIQUE INDEX t_pkey ON t USING btree (id)",
        ("trigger", "t.touch"): "CREATE TRIGGER touch BEFORE UPDATE ON t FOR EACH ROW "
                                "EXECUTE FUNCTION f()",
        ("function", "f()"): "returns trigger, body md5 0123456789ab",
    }


def test_exit_codes_follow_the_error_kind() -> None:
    assert exit_code(MigrationError("p", "0001_x", "boom")) == 1
    assert exit_code(MigrationDriftError("p", ("0001_x",), "drift")) == 1
    assert exit_code(CopyError("p", "differs")) == 1
    assert exit_code(ExtensionUnavailableError("p", "vector", "install it")) == 3
    assert exit_code(ProviderUnavailableError("p", "refused")) == 3
    assert exit_code(ConfigurationError("bad")) == 2
    assert isinstance(MigrationError("p", "m", "r"), SchemaError)


def test_add_schema_commands_plugs_into_another_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser(prog="agent-factory-db")
    add_schema_commands(parser.add_subparsers(required=True))
    args = parser.parse_args(["schema", "deploy", "--dry-run", "--embedding-dim", "12"])
    assert args.command(args) == 0
    assert "embedding vector(12)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["schema", "copy", "--from", "a", "--to", "b", "--table", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err

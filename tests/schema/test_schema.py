"""The schema commands against the real fleet: deploy, verify, drift, outages, failures.

Every test runs in databases of its own (tests/databases.py). The script runs as a
subprocess with a clean environment and a temporary working directory, so no
``.env`` is read; quicker checks call ``main(argv, environ=...)`` in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from databases import create_databases, drop_databases

from agent_factory.cli.schema_command import main
from agent_factory.schema import apply_migrations, load_migrations, read_applied
from agent_factory.testing.fleet import Fleet

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "deploy_multi_provider_schema.py"
SHIPPED = ROOT / "agent_factory" / "schema" / "migrations"


def provider_env(urls: Mapping[str, str], **extra: str) -> dict[str, str]:
    env = {f"{name.upper()}_DB_URL": url for name, url in urls.items()}
    env["DATABASE_FAILOVER_ORDER"] = ",".join(urls)
    env.update(extra)
    return env


def assert_no_secret(fleet: Fleet, *texts: str) -> None:
    for member in fleet:
        for text in texts:
            assert member.server.password not in text, f"{member.name}'s password printed"


def run_script(fleet: Fleet, cwd: Path, env: Mapping[str, str], *args: str
               ) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), **env}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=clean,
                          capture_output=True, text=True, timeout=60)
    assert_no_secret(fleet, done.stdout, done.stderr)
    return done


def run_main(fleet: Fleet, capsys: pytest.CaptureFixture[str], env: Mapping[str, str],
             *args: str) -> tuple[int, str, str]:
    code = main(list(args), environ=env)
    out, err = capsys.readouterr()
    assert_no_secret(fleet, out, err)
    return code, out, err


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def deployed(fleet: Fleet) -> Iterator[dict[str, str]]:
    """Three databases holding the shipped schema (default dimension)."""
    fleet.heal()
    urls = create_databases(fleet, "schema")
    for name, url in urls.items():
        apply_migrations(url, provider=name)
    yield urls
    fleet.heal()
    drop_databases(fleet, urls)


@pytest.fixture
def fresh(healthy_fleet: Fleet) -> Iterator[dict[str, str]]:
    urls = create_databases(healthy_fleet, "schema_fresh")
    yield urls
    healthy_fleet.heal()
    drop_databases(healthy_fleet, urls)


def test_deploy_all_then_verify_then_deploy_again_changes_nothing(
    healthy_fleet: Fleet, fresh: dict[str, str], tmp_path: Path
) -> None:
    env = provider_env(fresh)
    first = run_script(healthy_fleet, tmp_path, env, "--all")
    assert first.returncode == 0, first.stderr
    for name in fresh:
        assert f"{name}: applied 0003_knowledge_atoms" in first.stdout
    verified = run_script(healthy_fleet, tmp_path, env, "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK: 3 provider(s) match" in verified.stdout

    before = {name: query(url, "SELECT * FROM schema_migrations ORDER BY version")
              for name, url in fresh.items()}
    assert [row[:2] for row in before["neon"]] == [
        (1, "extensions"), (2, "session_memories"), (3, "knowledge_atoms"), (4, "failback_journal")]
    again = run_script(healthy_fleet, tmp_path, env, "--all", "--verify")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already up to date, nothing changed") == 3
    after = {name: query(url, "SELECT * FROM schema_migrations ORDER BY version")
             for name, url in fresh.items()}
    assert after == before  # same rows, same applied_at


def test_dry_run_prints_rendered_sql_without_any_provider(tmp_path: Path, fleet: Fleet) -> None:
    done = run_script(fleet, tmp_path, {"DATABASE_EMBEDDING_DIM": "768"}, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "embedding vector(768)" in done.stdout
    assert "{{" not in done.stdout
    assert "CREATE EXTENSION IF NOT EXISTS vector" in done.stdout
    assert "nothing was sent" in done.stderr
    flag = run_script(fleet, tmp_path, {"DATABASE_EMBEDDING_DIM": "768"},
                      "--dry-run", "--embedding-dim", "384")
    assert "embedding vector(384)" in flag.stdout  # the flag wins over the variable


def test_column_and_index_drift_is_reported_with_provider_table_and_column(
    healthy_fleet: Fleet, deployed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env = provider_env(deployed)
    query(deployed["railway"], "ALTER TABLE knowledge_atoms ALTER COLUMN title DROP NOT NULL")
    query(deployed["neon"], "DROP INDEX knowledge_atoms_type_idx")
    try:
        code, out, err = run_main(healthy_fleet, capsys, env, "verify")
        assert code == 1, out + err
        assert "column knowledge_atoms.title" in out
        assert "supabase, neon: text NOT NULL" in out
        assert "railway:        text (nullable)" in out
        assert "index knowledge_atoms.knowledge_atoms_type_idx" in out
        assert "neon:" in out and "(missing)" in out
        assert "DRIFT" in out
    finally:
        query(deployed["railway"], "ALTER TABLE knowledge_atoms ALTER COLUMN title SET NOT NULL")
        query(deployed["neon"],
              "CREATE INDEX knowledge_atoms_type_idx ON knowledge_atoms (atom_type)")
    assert run_main(healthy_fleet, capsys, env, "verify")[0] == 0


def test_verify_flags_a_provider_missing_migrations(
    healthy_fleet: Fleet, deployed: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    empty = create_databases(healthy_fleet, "schema_empty")
    try:
        env = provider_env({"supabase": deployed["supabase"], "neon": empty["neon"]})
        code, out, _ = run_main(healthy_fleet, capsys, env, "verify")
        assert code == 1
        assert "neon: 4 migration(s) not applied" in out
        assert "table knowledge_atoms" in out
        code, out, _ = run_main(healthy_fleet, capsys, env, "status")
        assert code == 1
        assert "extension vector: available, not installed yet" in out
        assert "pending: 0001_extensions, 0002_session_memories, 0003_knowledge_atoms" in out
    finally:
        drop_databases(healthy_fleet, empty)


def test_killed_provider_makes_verify_exit_3(
    healthy_fleet: Fleet, deployed: dict[str, str], tmp_path: Path
) -> None:
    env = provider_env(deployed)
    healthy_fleet["railway"].server.kill()
    try:
        done = run_script(healthy_fleet, tmp_path, env, "--verify")
        assert done.returncode == 3, done.stdout + done.stderr
        assert "railway" in done.stdout and "UNREACHABLE" in done.stdout
        assert "provider 'railway' unavailable" in done.stderr
        status = run_script(healthy_fleet, tmp_path, env, "status")
        assert status.returncode == 3
        deploy = run_script(healthy_fleet, tmp_path, env, "--all")
        assert deploy.returncode == 3
        assert "supabase: already up to date" in deploy.stdout  # the others still deployed
        assert "deploy failed on railway" in deploy.stderr
    finally:
        healthy_fleet.heal()


def test_hung_provider_makes_verify_exit_3_within_its_timeout(
    healthy_fleet: Fleet, deployed: dict[str, str], tmp_path: Path
) -> None:
    healthy_fleet["neon"].server.hang()
    started = time.monotonic()
    done = run_script(healthy_fleet, tmp_path, provider_env(deployed), "verify", "--timeout", "2")
    assert time.monotonic() - started < 8
    assert done.returncode == 3, done.stdout + done.stderr
    assert "provider 'neon' unavailable: no answer within 2s" in done.stderr


def test_failing_migration_rolls_back_and_names_provider_migration_and_message(
    healthy_fleet: Fleet, deployed: dict[str, str], tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(SHIPPED, migrations)
    (migrations / "0005_broken.sql").write_text(
        "CREATE TABLE broken_partial (id integer);\n"
        "INSERT INTO broken_partial VALUES (1);\n"
        "SELECT no_such_function_xyz(42);\n"
    )
    done = run_script(healthy_fleet, tmp_path, provider_env(deployed), "--provider", "neon",
                      "--migrations-dir", str(migrations))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "provider 'neon': migration 0005_broken failed and was rolled back" in done.stderr
    assert "function no_such_function_xyz(integer) does not exist" in done.stderr
    assert "(SQLSTATE 42883) at line 3" in done.stderr
    assert query(deployed["neon"], "SELECT to_regclass('broken_partial')") == [(None,)]
    assert query(deployed["neon"], "SELECT max(version) FROM schema_migrations") == [(4,)]


def test_edited_migration_or_other_dimension_is_drift_and_applies_nothing(
    healthy_fleet: Fleet, deployed: dict[str, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrations = tmp_path / "migrations"
    shutil.copytree(SHIPPED, migrations)
    edited = migrations / "0002_session_memories.sql"
    edited.write_text(edited.read_text() + "\n-- edited after it was applied\n")
    (migrations / "0005_more.sql").write_text("CREATE TABLE more_stuff (id integer);\n")
    env = provider_env({"supabase": deployed["supabase"]})
    code, _, err = run_main(healthy_fleet, capsys, env, "deploy", "--provider", "supabase",
                            "--migrations-dir", str(migrations))
    assert code == 1
    assert "provider 'supabase': schema_migrations does not match" in err
    assert "0002_session_memories: applied with checksum" in err
    assert query(deployed["supabase"], "SELECT to_regclass('more_stuff')") == [(None,)]

    code, _, err = run_main(healthy_fleet, capsys, env, "deploy", "--all",
                            "--embedding-dim", "768")
    assert code == 1
    assert "0003_knowledge_atoms: applied with checksum" in err
    assert "--embedding-dim / DATABASE_EMBEDDING_DIM differs" in err


def test_configuration_and_argument_errors_exit_2_and_say_how_to_fix(
    fleet: Fleet, deployed: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    nothing = run_script(fleet, tmp_path, {}, "--verify")
    assert nothing.returncode == 2
    assert "No database providers configured" in nothing.stderr

    env = provider_env(deployed)
    code, _, err = run_main(fleet, capsys, {**env, "DATABASE_FAILOVER_ENABLED": "maybe"},
                            "verify")
    assert code == 2 and "DATABASE_FAILOVER_ENABLED='maybe' is not a boolean" in err
    code, _, err = run_main(fleet, capsys, env, "deploy", "--provider", "railwya")
    assert code == 2
    assert "--provider 'railwya' is not a configured provider; configured: supabase, " \
           "railway, neon" in err
    code, _, err = run_main(fleet, capsys, {**env, "DATABASE_EMBEDDING_DIM": "big"}, "verify")
    assert code == 2 and "DATABASE_EMBEDDING_DIM='big' is not a valid embedding dimension" in err
    code, _, err = run_main(fleet, capsys, env, "deploy", "--all", "--migrations-dir",
                            str(tmp_path / "nowhere"))
    assert code == 2 and "is not a directory" in err
    code, _, err = run_main(fleet, capsys, env, "copy", "--from", "neon", "--to", "neon")
    assert code == 2 and "--from and --to both name 'neon'" in err
    code, _, err = run_main(fleet, capsys, env)
    assert code == 2 and "choose --provider NAME, --all, --verify or --dry-run" in err
    bad_url = run_script(fleet, tmp_path, {"NEON_DB_URL": "postgresql://u:s3cret-pw@:x/db"},
                         "--provider", "neon")
    assert bad_url.returncode == 2
    assert "NEON_DB_URL" in bad_url.stderr and "s3cret-pw" not in bad_url.stderr
    with pytest.raises(SystemExit) as exc:
        main(["--all", "--provider", "neon"], environ=env)
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_wrong_password_is_unreachable_and_never_printed(
    fleet: Fleet, deployed: dict[str, str], tmp_path: Path
) -> None:
    url = deployed["neon"].replace(fleet["neon"].server.password, "Wr0ng-Passw0rd")
    done = run_script(fleet, tmp_path, {"NEON_DB_URL": url}, "--provider", "neon")
    assert done.returncode == 3
    assert "password authentication failed" in done.stderr
    assert "Wr0ng-Passw0rd" not in done.stdout + done.stderr


def test_apply_migrations_accepts_an_open_connection_and_returns_what_it_applied(
    healthy_fleet: Fleet, fresh: dict[str, str]
) -> None:
    with psycopg.connect(fresh["supabase"]) as conn:
        applied = apply_migrations(conn, embedding_dim=8, provider="supabase")
        assert [a.label for a in applied] == [m.label for m in load_migrations()]
        assert apply_migrations(conn, embedding_dim=8) == []
        assert read_applied(conn) == tuple(applied)
        conn.rollback()
    assert query(fresh["supabase"], "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                 "WHERE attrelid = 'knowledge_atoms'::regclass AND attname = 'embedding'"
                 ) == [("vector(8)",)]


def test_concurrent_deploys_apply_each_migration_once(
    healthy_fleet: Fleet, fresh: dict[str, str]
) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: apply_migrations(fresh["railway"]), range(3)))
    assert sorted(a.label for done in results for a in done) == [
        m.label for m in load_migrations()]
    assert query(fresh["railway"], "SELECT count(*) FROM schema_migrations") == [(4,)]

"""A server without pgvector gets a clear error saying how to enable it, and stays untouched."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agent_factory.errors import ExtensionUnavailableError
from agent_factory.schema import apply_migrations
from agent_factory.testing.embedded import EmbeddedPostgres, pgvector_available

PG15_BIN = Path("/usr/lib/postgresql/15/bin")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "deploy_multi_provider_schema.py"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedPostgres]:
    if not (PG15_BIN / "postgres").is_file():
        pytest.skip(f"no PostgreSQL 15 binaries in {PG15_BIN} (Debian's postgresql-15 package)")
    if pgvector_available(PG15_BIN):
        pytest.skip(f"pgvector is installed for {PG15_BIN}: cannot test the no-pgvector error")
    with EmbeddedPostgres("nopgv", bin_dir=PG15_BIN) as pg:
        pg.start(60)
        yield pg


def test_deploy_to_a_server_without_pgvector_says_how_to_enable_it(
    server: EmbeddedPostgres, tmp_path: Path
) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "NEON_DB_URL": server.url}
    done = subprocess.run([sys.executable, str(SCRIPT), "--provider", "neon"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr  # lacks pgvector: unavailable
    err = done.stderr
    assert "provider 'neon': extension 'vector' (needed by migration 0001_extensions) is " \
           "not available on its PostgreSQL 15 server" in err
    assert "apt install postgresql-15-pgvector" in err
    assert "On Supabase and Neon it ships with every database" in err
    assert "CREATE EXTENSION vector" in err
    assert server.password not in done.stdout + err
    with psycopg.connect(server.url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)


def test_apply_migrations_raises_extension_unavailable(server: EmbeddedPostgres) -> None:
    with pytest.raises(ExtensionUnavailableError) as exc:
        apply_migrations(server.url, provider="selfhosted")
    assert exc.value.provider == "selfhosted"
    assert exc.value.extension == "vector"

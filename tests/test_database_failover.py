"""The spec's test names, against real servers and a controlled environment.

Every test builds its environment itself (``monkeypatch``), runs in an empty
working directory (no ``.env``) and never depends on the developer's shell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import ManagerClosedError, NoProvidersConfiguredError
from agent_factory.testing.fleet import Fleet

DB_VARS = (
    "DATABASE_PROVIDER",
    "DATABASE_FAILOVER_ENABLED",
    "DATABASE_FAILOVER_ORDER",
    "SUPABASE_URL",
    "SUPABASE_DB_HOST",
    "SUPABASE_DB_PASSWORD",
    "SUPABASE_DB_PORT",
    "SUPABASE_DB_USER",
    "SUPABASE_DB_NAME",
    "SUPABASE_DB_URL",
    "RAILWAY_DB_URL",
    "NEON_DB_URL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    for var in list(os.environ):
        if var in DB_VARS or var.startswith("DATABASE_") or var.endswith("_DB_URL"):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fleet_env(healthy_fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    sup = healthy_fleet["supabase"]
    monkeypatch.setenv("SUPABASE_DB_HOST", "127.0.0.1")
    monkeypatch.setenv("SUPABASE_DB_PORT", str(sup.proxy.port))
    monkeypatch.setenv("SUPABASE_DB_PASSWORD", sup.server.password)
    monkeypatch.setenv("RAILWAY_DB_URL", healthy_fleet["railway"].url)
    monkeypatch.setenv("NEON_DB_URL", healthy_fleet["neon"].url)
    yield healthy_fleet


def server_port(db: DatabaseManager) -> int:
    row = db.execute_query("SELECT inet_server_port()", fetch_mode="one")
    assert row is not None
    return int(row[0])


class TestDatabaseFailover:
    def test_imports_work(self) -> None:
        from agent_factory.core.database_manager import DatabaseManager, DatabaseProvider

        assert DatabaseManager and DatabaseProvider

    def test_manager_initialization_with_env_vars(self, fleet_env: Fleet) -> None:
        with DatabaseManager() as db:
            assert db.primary_provider == "supabase"
            assert db.failover_enabled is True
            assert db.failover_order == ["supabase", "railway", "neon"]
            assert set(db.providers) == {"supabase", "railway", "neon"}
            assert server_port(db) == fleet_env["supabase"].server.port

    def test_manager_custom_provider_selection(
        self, fleet_env: Fleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("DATABASE_PROVIDER", "neon")
        with DatabaseManager() as db:
            assert db.primary_provider == "neon"
            assert server_port(db) == fleet_env["neon"].server.port

    def test_failover_disabled(self, fleet_env: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("DATABASE_FAILOVER_ENABLED", "false")
        with DatabaseManager() as db:
            assert db.failover_enabled is False
            fleet_env["supabase"].server.kill()
            with pytest.raises(Exception, match="All database providers failed") as info:
                db.execute_query("SELECT 1")
            assert list(info.value.reasons) == ["supabase"]  # type: ignore[attr-defined]

    def test_set_provider_validates_availability(self, fleet_env: Fleet) -> None:
        with DatabaseManager() as db:
            with pytest.raises(ValueError, match="not configured"):
                db.set_provider("nonexistent")
            db.set_provider("railway")
            assert db.primary_provider == "railway"
            assert server_port(db) == fleet_env["railway"].server.port

    def test_provider_stats_structure(self, fleet_env: Fleet) -> None:
        with DatabaseManager() as db:
            db.execute_query("SELECT 1")
            stats = db.get_provider_stats()
            assert set(stats) == {"supabase", "railway", "neon"}
            for info in stats.values():
                for key in ("healthy", "connection_string_host", "pool_active", "pool_size",
                            "pool_idle", "pool_waiting", "last_error", "consecutive_failures",
                            "last_latency_ms", "role"):
                    assert key in info
                assert info["connection_string_host"] == "127.0.0.1"
            assert stats["supabase"]["role"] == "primary"
            assert stats["supabase"]["pool_active"] is True

    def test_context_manager_protocol(self, fleet_env: Fleet) -> None:
        with DatabaseManager() as db:
            assert db.execute_query("SELECT 1") == [(1,)]
        assert db.closed
        with pytest.raises(ManagerClosedError, match="closed"):
            db.execute_query("SELECT 1")
        with pytest.raises(ManagerClosedError), db:
            pass

    def test_health_check_and_all(self, fleet_env: Fleet) -> None:
        with DatabaseManager() as db:
            assert db.health_check() is True
            assert db.health_check("nowhere") is False
            fleet_env["neon"].server.kill()
            health = db.health_check_all(max_age=0)
            assert health == {"supabase": True, "railway": True, "neon": False}


class TestProviderConfiguration:
    def test_no_providers_configured_raises_error(self) -> None:
        with pytest.raises(NoProvidersConfiguredError, match="No database providers configured"):
            DatabaseManager()
        with pytest.raises(ValueError):
            DatabaseManager()

    def test_incomplete_supabase_credentials_skipped(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("SUPABASE_DB_HOST", "db.example.supabase.co")
        monkeypatch.setenv("SUPABASE_DB_PASSWORD", "")
        with pytest.raises(NoProvidersConfiguredError):
            DatabaseManager()

    def test_railway_placeholder_password_skipped(
        self, fleet_env: Fleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv(
            "RAILWAY_DB_URL",
            "postgresql://postgres:your_railway_password_here@containers.railway.app:5432/railway",
        )
        with DatabaseManager() as db:
            assert "railway" not in db.providers
            assert db.failover_order == ["supabase", "neon"]

    def test_neon_only_configuration(
        self, healthy_fleet: Fleet, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NEON_DB_URL", healthy_fleet["neon"].url)
        with DatabaseManager() as db:
            assert list(db.providers) == ["neon"]
            assert db.primary_provider == "neon"
            assert server_port(db) == healthy_fleet["neon"].server.port

    def test_dotenv_in_working_directory_is_read(
        self, healthy_fleet: Fleet, tmp_path: os.PathLike[str]
    ) -> None:
        with open(os.path.join(tmp_path, ".env"), "w") as fh:
            fh.write(f"NEON_DB_URL={healthy_fleet['neon'].url}\n")
        with DatabaseManager() as db:
            assert list(db.providers) == ["neon"]
            assert db.execute_query("SELECT 1") == [(1,)]


def test_import_does_no_work(tmp_path: os.PathLike[str]) -> None:
    with open(os.path.join(tmp_path, ".env"), "w") as fh:
        fh.write("AF_IMPORT_SENTINEL=loaded\n")
    code = (
        "import logging, os, threading\n"
        "import agent_factory, agent_factory.core.database_manager, agent_factory.errors\n"
        "import agent_factory.testing.embedded, agent_factory.testing.faultproxy\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        "assert not logging.getLogger().handlers\n"
        "assert 'AF_IMPORT_SENTINEL' not in os.environ\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=60)

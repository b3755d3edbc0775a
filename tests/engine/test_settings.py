"""Settings parsing: the spec's variables, defaults, placeholders and errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent_factory.engine.environment import read_dotenv, settings_from_env
from agent_factory.engine.settings import Settings, is_placeholder
from agent_factory.errors import ConfigurationError, NoProvidersConfiguredError

RAILWAY = "postgresql://postgres:pw@railway.example.com:5432/railway"
NEON = "postgresql://neon_user:npw@ep-x.neon.tech/neondb?sslmode=require"


def from_env(env: dict[str, str]) -> Settings:
    return settings_from_env(env, dotenv=None)


def test_defaults_match_the_spec() -> None:
    s = from_env({"SUPABASE_DB_HOST": "db.ref.supabase.co", "SUPABASE_DB_PASSWORD": "pw"})
    assert s.primary == "supabase"
    assert s.failover_enabled is True
    assert s.failover_order == ("supabase",)
    sup = s.providers["supabase"]
    assert (sup.host, sup.port, sup.params["user"], sup.params["dbname"]) == (
        "db.ref.supabase.co",
        "5432",
        "postgres",
        "postgres",
    )
    assert sup.params["sslmode"] == "require"


def test_supabase_needs_no_supabase_url_and_honours_optional_parts() -> None:
    s = from_env(
        {
            "SUPABASE_DB_HOST": "127.0.0.1",
            "SUPABASE_DB_PASSWORD": "p@ss w:rd/?#",
            "SUPABASE_DB_PORT": "6543",
            "SUPABASE_DB_USER": "postgres.ref",
            "SUPABASE_DB_NAME": "app",
        }
    )
    sup = s.providers["supabase"]
    assert sup.port == "6543" and sup.params["user"] == "postgres.ref"
    assert sup.params["dbname"] == "app"
    # Special characters survive: the conninfo quotes them instead of URL-mangling.
    from psycopg.conninfo import conninfo_to_dict

    assert conninfo_to_dict(sup.conninfo())["password"] == "p@ss w:rd/?#"
    assert "sslmode" not in sup.params  # loopback


def test_supabase_full_url_variable() -> None:
    s = from_env({"SUPABASE_DB_URL": "postgresql://u:p@db.x.supabase.co:5432/postgres"})
    assert s.providers["supabase"].host == "db.x.supabase.co"


def test_order_is_stripped_and_unconfigured_names_skipped(caplog: pytest.LogCaptureFixture) -> None:
    env = {"RAILWAY_DB_URL": RAILWAY, "NEON_DB_URL": NEON}
    env["DATABASE_FAILOVER_ORDER"] = " neon , supabase,railway "
    with caplog.at_level(logging.WARNING):
        s = from_env(env)
    assert s.failover_order == ("neon", "railway")
    assert "supabase" in caplog.text and "DATABASE_FAILOVER_ORDER" in caplog.text
    # Default primary (supabase) is not configured: first configured in order.
    assert s.primary == "neon"


def test_any_provider_name_from_the_order() -> None:
    s = from_env(
        {"DATABASE_FAILOVER_ORDER": "local,neon", "LOCAL_DB_URL": "postgresql://u:p@127.0.0.1/db"}
    )
    assert list(s.providers) == ["local"]
    assert s.primary == "local"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("false", False),
     ("0", False), ("No", False), (" off ", False)],
)
def test_failover_enabled_values(value: str, expected: bool) -> None:
    s = from_env({"NEON_DB_URL": NEON, "DATABASE_FAILOVER_ENABLED": value})
    assert s.failover_enabled is expected


def test_failover_enabled_rejects_garbage() -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_FAILOVER_ENABLED='maybe'"):
        from_env({"NEON_DB_URL": NEON, "DATABASE_FAILOVER_ENABLED": "maybe"})


def test_no_providers_error_names_the_variables() -> None:
    with pytest.raises(NoProvidersConfiguredError) as info:
        from_env({})
    text = str(info.value)
    assert "No database providers configured" in text
    for var in ("SUPABASE_DB_HOST", "RAILWAY_DB_URL", "NEON_DB_URL"):
        assert var in text
    assert isinstance(info.value, ValueError)  # original callers catch ValueError


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:your_railway_password_here@host:5432/railway",
        "postgresql://postgres:[password]@containers-us-west-xxx.railway.app:5432/railway",
        "postgresql://[user]:[password]@[host].neon.tech/[dbname]?sslmode=require",
        "postgresql://postgres:<password>@host/db",
        "  ",
    ],
)
def test_placeholder_urls_mean_not_configured(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent_factory"):
        s = from_env({"RAILWAY_DB_URL": url, "NEON_DB_URL": NEON})
    assert list(s.providers) == ["neon"]
    if url.strip():
        assert "RAILWAY_DB_URL" in caplog.text


def test_placeholder_supabase_password_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="agent_factory"):
        s = from_env(
            {"SUPABASE_DB_HOST": "db.x.supabase.co", "SUPABASE_DB_PASSWORD": "your_password_here",
             "NEON_DB_URL": NEON}
        )
    assert "supabase" not in s.providers
    assert "SUPABASE_DB_PASSWORD" in caplog.text


def test_explicit_primary_without_credentials_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_PROVIDER='railway'"):
        from_env({"NEON_DB_URL": NEON, "DATABASE_PROVIDER": "railway"})


def test_bad_url_error_names_setting_not_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        from_env({"NEON_DB_URL": "postgresql://u:hunter2@host:notaport/db"})
    assert "NEON_DB_URL" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_numeric_settings_from_env_and_errors() -> None:
    s = from_env({"NEON_DB_URL": NEON, "DATABASE_HANG_TIMEOUT": "1.5",
                  "DATABASE_POOL_MAX_SIZE": "4", "DATABASE_POOL_MIN_SIZE": "0"})
    assert s.hang_timeout == 1.5 and s.pool_max_size == 4 and s.pool_min_size == 0
    with pytest.raises(ConfigurationError, match="DATABASE_HANG_TIMEOUT='soon'"):
        from_env({"NEON_DB_URL": NEON, "DATABASE_HANG_TIMEOUT": "soon"})
    with pytest.raises(ConfigurationError, match="hang_timeout must be > 0"):
        from_env({"NEON_DB_URL": NEON, "DATABASE_HANG_TIMEOUT": "0"})
    with pytest.raises(ConfigurationError, match="pool sizes"):
        from_env({"NEON_DB_URL": NEON, "DATABASE_POOL_MIN_SIZE": "5",
                  "DATABASE_POOL_MAX_SIZE": "2"})


def test_build_validates_names_order_and_options() -> None:
    s = Settings.build({"a": NEON, "b": RAILWAY}, order=["b", "a"])
    assert s.primary == "b"
    with pytest.raises(ConfigurationError, match="unconfigured providers"):
        Settings.build({"a": NEON}, order=["a", "zzz"])
    with pytest.raises(ConfigurationError, match="unknown option"):
        Settings.build({"a": NEON}, hang_timout=1.0)
    with pytest.raises(ConfigurationError, match="provider name"):
        Settings.build({"Bad-Name": NEON})


def test_repr_and_describe_hide_password() -> None:
    s = from_env({"NEON_DB_URL": "postgresql://u:sup3rsecret@h.neon.tech/db"})
    p = s.providers["neon"]
    assert "sup3rsecret" not in repr(p)
    assert "sup3rsecret" not in repr(s)
    assert p.describe() == "u@h.neon.tech:5432/db"


def test_sslmode_in_url_wins() -> None:
    s = from_env({"NEON_DB_URL": "postgresql://u:p@h.neon.tech/db?sslmode=verify-full"})
    assert s.providers["neon"].params["sslmode"] == "verify-full"


def test_remote_hosts_get_tls_and_every_connection_keepalives() -> None:
    s = from_env({"NEON_DB_URL": "postgresql://u:p@h.neon.tech/db",
                  "RAILWAY_DB_URL": "postgresql://u:p@127.0.0.1:5433/db"})
    remote, local = s.providers["neon"].params, s.providers["railway"].params
    assert remote["sslmode"] == "require" and "sslmode" not in local
    for params in (remote, local):
        assert params["keepalives"] == "1" and int(params["tcp_user_timeout"]) > 0


def test_dotenv_never_overrides_environment(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# comment\nexport NEON_DB_URL='postgresql://u:p@from-file/db'\n"
        'RAILWAY_DB_URL="postgresql://u:p@railway-file/db"\nDATABASE_PROVIDER=railway # inline\n'
    )
    assert read_dotenv(env_file)["DATABASE_PROVIDER"] == "railway"
    s = settings_from_env({"NEON_DB_URL": "postgresql://u:p@from-env/db"}, dotenv=env_file)
    assert s.providers["neon"].host == "from-env"
    assert s.providers["railway"].host == "railway-file"
    assert s.primary == "railway"
    assert read_dotenv(tmp_path / "missing") == {}


def test_is_placeholder() -> None:
    assert is_placeholder("") and is_placeholder("your_password_here")
    assert is_placeholder("[password]") and is_placeholder("<password>")
    assert not is_placeholder("correct horse battery staple")

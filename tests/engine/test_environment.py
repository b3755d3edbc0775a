"""The one loader: `.env` by python-dotenv's rules, the environment over it, DATABASE_URL."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent_factory.engine.environment import load_environment, read_dotenv, settings_from_env
from agent_factory.errors import ConfigurationError, NoProvidersConfiguredError

HEROKU = "postgres://app:s3cret@ec2-1-2-3-4.compute-1.amazonaws.com:5432/d8f"


def dotenv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return path


def test_quoted_values_keep_hashes_and_drop_the_inline_comment(tmp_path: Path) -> None:
    values = read_dotenv(dotenv(tmp_path, (
        'SUPABASE_DB_PASSWORD="p#w" # prod\n'
        "SINGLE='a b # c'\n"
        "PLAIN=value # note\n"
        "HASH_IN_WORD=pa#ss\n"
        'ESCAPED="line\\nbreak \\"q\\""\n'
        "EMPTY=\n"
        "KEY_ONLY\n"
    )))
    assert values["SUPABASE_DB_PASSWORD"] == "p#w"
    assert values["SINGLE"] == "a b # c"
    assert values["PLAIN"] == "value"
    assert values["HASH_IN_WORD"] == "pa#ss"
    assert values["ESCAPED"] == 'line\nbreak "q"'
    assert values["EMPTY"] == ""
    assert "KEY_ONLY" not in values  # no '=': sets nothing, as python-dotenv's None means


def test_export_prefix_multiline_and_no_expansion(tmp_path: Path) -> None:
    values = read_dotenv(dotenv(tmp_path, (
        "export NEON_DB_URL=postgresql://u:p@neon.example/db\n"
        "  export   RAILWAY_DB_PORT=6543\n"
        "USER_NAME=app\n"
        "PASSWORD=\"pa${USER_NAME}ss\"\n"
        'MULTI="first\nsecond"\n'
    )))
    assert values["NEON_DB_URL"] == "postgresql://u:p@neon.example/db"
    assert values["RAILWAY_DB_PORT"] == "6543"
    # A password may contain "${": python-dotenv would expand it even in single quotes.
    assert values["PASSWORD"] == "pa${USER_NAME}ss"
    assert values["MULTI"] == "first\nsecond"


def test_the_password_line_of_the_issue_reaches_the_provider(tmp_path: Path) -> None:
    path = dotenv(tmp_path, (
        "SUPABASE_DB_HOST=db.ref.supabase.co\n"
        'SUPABASE_DB_PASSWORD="p#w" # prod\n'
    ))
    settings = settings_from_env({}, dotenv=path)
    assert settings.providers["supabase"].password == "p#w"
    assert "p#w" not in repr(settings)


def test_real_variables_win_over_the_file(tmp_path: Path) -> None:
    path = dotenv(tmp_path, (
        "NEON_DB_URL=postgresql://u:p@from-file/db\n"
        "RAILWAY_DB_URL=postgresql://u:p@railway-file/db\n"
        "DATABASE_HANG_TIMEOUT=9\n"
    ))
    env = {"NEON_DB_URL": "postgresql://u:p@from-env/db", "DATABASE_HANG_TIMEOUT": "4"}
    merged = load_environment(env, dotenv=path)
    assert merged["NEON_DB_URL"] == "postgresql://u:p@from-env/db"
    assert merged["RAILWAY_DB_URL"] == "postgresql://u:p@railway-file/db"
    settings = settings_from_env(env, dotenv=path)
    assert settings.providers["neon"].host == "from-env"
    assert settings.providers["railway"].host == "railway-file"
    assert settings.hang_timeout == 4.0
    # An empty real variable still wins: it is how a deployment switches a line off.
    assert load_environment({"NEON_DB_URL": ""}, dotenv=path)["NEON_DB_URL"] == ""


def test_the_default_environment_is_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dotenv(tmp_path, "AF_TEST_FROM_FILE=file\nAF_TEST_BOTH=file\n")
    monkeypatch.setenv("AF_TEST_BOTH", "env")
    env = load_environment()
    assert (env["AF_TEST_FROM_FILE"], env["AF_TEST_BOTH"]) == ("file", "env")
    assert "AF_TEST_FROM_FILE" not in load_environment(dotenv=None)


def test_missing_file_or_directory_is_empty(tmp_path: Path) -> None:
    assert read_dotenv(tmp_path / "missing") == {}
    assert read_dotenv(tmp_path) == {}


def test_database_url_is_one_provider_when_nothing_else_is_set() -> None:
    settings = settings_from_env({"DATABASE_URL": HEROKU, "DEFAULT_DB_WEIGHT": "2"},
                                 dotenv=None)
    assert list(settings.providers) == ["default"]
    assert settings.primary == "default" and settings.failover_order == ("default",)
    provider = settings.providers["default"]
    assert (provider.host, provider.port, provider.password) == (
        "ec2-1-2-3-4.compute-1.amazonaws.com", "5432", "s3cret")
    assert provider.params["sslmode"] == "require"
    assert provider.options == {"weight": 2}


def test_database_provider_names_the_database_url_provider(tmp_path: Path) -> None:
    path = dotenv(tmp_path, f"DATABASE_URL={HEROKU}\nDATABASE_PROVIDER=railway\n")
    settings = settings_from_env({}, dotenv=path)
    assert list(settings.providers) == ["railway"] and settings.primary == "railway"


def test_provider_variables_take_precedence_over_database_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="agent_factory"):
        settings = settings_from_env(
            {"DATABASE_URL": HEROKU, "NEON_DB_URL": "postgresql://u:p@neon.example/db"},
            dotenv=None)
    assert list(settings.providers) == ["neon"]
    assert "DATABASE_URL ignored" in caplog.text
    assert "s3cret" not in caplog.text


def test_database_url_errors_name_the_variable_not_the_password() -> None:
    with pytest.raises(ConfigurationError, match="DATABASE_URL has no host") as info:
        settings_from_env({"DATABASE_URL": "postgresql://u:hunter22@/db"}, dotenv=None)
    assert "hunter22" not in str(info.value)
    with pytest.raises(ConfigurationError, match="DATABASE_PROVIDER"):
        settings_from_env({"DATABASE_URL": HEROKU, "DATABASE_PROVIDER": "My-DB"}, dotenv=None)
    with pytest.raises(NoProvidersConfiguredError, match="DATABASE_URL alone"):
        settings_from_env({"DATABASE_URL": "postgresql://user:[password]@host/db"},
                          dotenv=None)

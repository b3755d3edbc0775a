"""Reading `Settings` from environment variables and a ``.env`` file.

The spec's variables (``DATABASE_PROVIDER``, ``DATABASE_FAILOVER_ENABLED``,
``DATABASE_FAILOVER_ORDER``, ``SUPABASE_DB_HOST`` + ``SUPABASE_DB_PASSWORD``,
``RAILWAY_DB_URL``, ``NEON_DB_URL``, ``<NAME>_DB_URL``), the numeric
``DATABASE_*`` settings and per-provider ``<NAME>_DB_<OPTION>`` overrides;
``DATABASE_URL`` stands for one provider when none of those is set.

`load_environment` is the one loader: the manager, the memory storages and
the CLI all read their variables through it. A ``.env`` file is parsed by
python-dotenv (quotes, ``export``, inline comments, escapes) and never
overrides a real variable. docs/configuration.md lists every variable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from ..errors import ConfigurationError, NoProvidersConfiguredError
from .settings import (
    NO_PROVIDERS,
    PROVIDER_OPTIONS,
    ProviderSettings,
    Settings,
    check_name,
    connection_params,
    is_placeholder,
    with_defaults,
)

logger = logging.getLogger("agent_factory.core.database_manager")

DEFAULT_PRIMARY = "supabase"
DEFAULT_ORDER = ("supabase", "railway", "neon")
#: The name of the one provider ``DATABASE_URL`` describes, unless ``DATABASE_PROVIDER`` names it.
DATABASE_URL_PROVIDER = "default"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}

# Manager-wide settings read from the environment: variable -> (field, type).
ENV_OPTIONS: dict[str, tuple[str, type]] = {
    "DATABASE_POOL_MIN_SIZE": ("pool_min_size", int),
    "DATABASE_POOL_MAX_SIZE": ("pool_max_size", int),
    "DATABASE_CHECKOUT_TIMEOUT": ("checkout_timeout", float),
    "DATABASE_CONNECT_TIMEOUT": ("connect_timeout", float),
    "DATABASE_SERVERLESS_CONNECT_TIMEOUT": ("serverless_connect_timeout", float),
    "DATABASE_HANG_TIMEOUT": ("hang_timeout", float),
    "DATABASE_PROBE_INTERVAL": ("probe_interval", float),
    "DATABASE_RECOVERY_PROBES": ("recovery_probes", int),
    "DATABASE_MONITOR_INTERVAL": ("monitor_interval", float),
    "DATABASE_FAILURE_THRESHOLD": ("failure_threshold", int),
    "DATABASE_FAILURE_WINDOW": ("failure_window", float),
    "DATABASE_HEALTH_TTL": ("health_ttl", float),
    "DATABASE_FAILOVER_LOG_INTERVAL": ("failover_log_interval", float),
    "DATABASE_READ_ROUTING": ("read_routing", str),
    "DATABASE_READ_YOUR_WRITES": ("read_your_writes", float),
    "DATABASE_FAILBACK_RECONCILE": ("failback_reconcile", bool),
    "DATABASE_RECONCILE_TABLES": ("reconcile_tables", tuple),
    "DATABASE_RECONCILE_MARGIN": ("reconcile_margin", float),
    "DATABASE_WRITE_PAUSE_TIMEOUT": ("write_pause_timeout", float),
    "DATABASE_MAX_REPLICATION_LAG": ("max_replication_lag", float),
    "DATABASE_CONFLICT_POLICY": ("conflict_policy", str),
    "DATABASE_CONFLICT_DELTA_COLUMNS": ("conflict_delta_columns", tuple),
    "DATABASE_DRAIN_INTERVAL": ("drain_interval", float),
    "DATABASE_FAILBACK_MAX_WAIT": ("failback_max_wait", float),
    "DATABASE_SPLIT_BRAIN_FENCE": ("split_brain_fence", bool),
    "DATABASE_WITNESS_QUIET": ("witness_quiet", float),
    "DATABASE_HEDGED_READS": ("hedged_reads", str),
    "DATABASE_HEDGE_AFTER_MIN": ("hedge_after_min", float),
    "DATABASE_HEDGE_BUDGET": ("hedge_budget", float),
    "DATABASE_HEDGE_MAX_LAG": ("hedge_max_lag", float),
}


def load_environment(
    environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
) -> dict[str, str]:
    """The variables to configure from: ``environ`` (default ``os.environ``) over ``dotenv``.

    ``dotenv`` is a ``.env`` file (relative paths from the working directory;
    None reads no file). A missing file is empty; a real variable always wins
    over the file's line of the same name.
    """
    env = read_dotenv(Path(dotenv)) if dotenv else {}
    env.update(os.environ if environ is None else environ)
    return env


def settings_from_env(
    environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
) -> Settings:
    """Settings from environment variables, with a ``.env`` file as fallback."""
    env = load_environment(environ, dotenv=dotenv)
    enabled = parse_bool("DATABASE_FAILOVER_ENABLED", env.get("DATABASE_FAILOVER_ENABLED", "true"))
    order_raw = env.get("DATABASE_FAILOVER_ORDER", "")
    order = tuple(n.strip().lower() for n in order_raw.split(",") if n.strip()) or DEFAULT_ORDER
    for n in order:
        check_name(n, "DATABASE_FAILOVER_ORDER")
    explicit_primary = env.get("DATABASE_PROVIDER", "").strip().lower()
    providers: dict[str, ProviderSettings] = {}
    for name in dict.fromkeys((*order, *DEFAULT_ORDER, explicit_primary or DEFAULT_PRIMARY)):
        found = _provider_from_env(name, env)
        if found is not None:
            providers[name] = found
    if not providers:
        fallback = _database_url_provider(explicit_primary or DATABASE_URL_PROVIDER, env)
        if fallback is None:
            raise NoProvidersConfiguredError(NO_PROVIDERS)
        providers[fallback.name] = fallback
        order = (fallback.name,)
        explicit_primary = fallback.name
    elif env.get("DATABASE_URL", "").strip():
        logger.info("DATABASE_URL ignored: providers are configured by their own variables")
    missing = [n for n in order if n not in providers]
    if missing and order_raw.strip():
        logger.warning(
            "DATABASE_FAILOVER_ORDER names providers without credentials, skipped: %s",
            ", ".join(missing),
        )
    order = tuple(n for n in order if n in providers)
    return Settings(
        providers=providers,
        primary=_primary(explicit_primary, providers, order),
        failover_order=order,
        failover_enabled=enabled,
        **_options(env),
    )


def _primary(explicit: str, providers: Mapping[str, object], order: tuple[str, ...]) -> str:
    if explicit:
        if explicit not in providers:
            raise ConfigurationError(
                f"DATABASE_PROVIDER={explicit!r} has no credentials; configured "
                f"providers: {', '.join(providers)}. Set its variables or change "
                "DATABASE_PROVIDER."
            )
        return explicit
    if DEFAULT_PRIMARY in providers:
        return DEFAULT_PRIMARY
    primary = (order or tuple(providers))[0]
    logger.warning("default primary %r not configured; using %r", DEFAULT_PRIMARY, primary)
    return primary


def _options(env: Mapping[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for var, (attr, kind) in ENV_OPTIONS.items():
        if env.get(var, "").strip():
            options[attr] = parse_value(var, env[var], kind)
    return options


def _provider_options(prefix: str, env: Mapping[str, str]) -> dict[str, Any]:
    return {
        key: parse_value(f"{prefix}_DB_{key.upper()}", env[f"{prefix}_DB_{key.upper()}"], kind)
        for key, kind in PROVIDER_OPTIONS.items()
        if env.get(f"{prefix}_DB_{key.upper()}", "").strip()
    }


def _database_url_provider(name: str, env: Mapping[str, str]) -> ProviderSettings | None:
    """The one provider of ``DATABASE_URL`` (Heroku's and Railway's convention), if set."""
    url = env.get("DATABASE_URL", "")
    if not url.strip():
        return None
    if is_placeholder(url):
        logger.info("DATABASE_URL holds a placeholder; not used")
        return None
    check_name(name, "DATABASE_PROVIDER")
    prefix = name.upper()
    params = connection_params(url, "DATABASE_URL")
    return _with_options(name, params, _provider_options(prefix, env), prefix)


def _provider_from_env(name: str, env: Mapping[str, str]) -> ProviderSettings | None:
    prefix = name.upper()
    options = _provider_options(prefix, env)
    url_var = f"{prefix}_DB_URL"
    url = env.get(url_var, "")
    if url.strip():
        if is_placeholder(url):
            logger.info("%s holds a placeholder; provider %r not configured", url_var, name)
            return None
        return _with_options(name, connection_params(url, url_var), options, prefix)
    if name != "supabase":
        return None
    host = env.get("SUPABASE_DB_HOST", "")
    password = env.get("SUPABASE_DB_PASSWORD", "")
    if not host.strip() and not password.strip():
        return None
    for var, value in (("SUPABASE_DB_HOST", host), ("SUPABASE_DB_PASSWORD", password)):
        if is_placeholder(value):
            logger.info("%s is empty or a placeholder; provider 'supabase' not configured", var)
            return None
    params = {
        "host": host.strip(),
        "port": env.get("SUPABASE_DB_PORT", "").strip() or "5432",
        "user": env.get("SUPABASE_DB_USER", "").strip() or "postgres",
        "password": password,
        "dbname": env.get("SUPABASE_DB_NAME", "").strip() or "postgres",
    }
    parse_value("SUPABASE_DB_PORT", params["port"], int)
    return _with_options(name, with_defaults(params), options, prefix)


def _with_options(
    name: str, params: dict[str, str], options: dict[str, Any], prefix: str
) -> ProviderSettings:
    try:
        return ProviderSettings(name, params, options)
    except ConfigurationError as exc:
        # Name the variables, not the constructor's argument.
        raise ConfigurationError(f"{exc} (set by {prefix}_DB_* variables)") from None


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={value!r} is not a boolean; use one of true/false, 1/0, yes/no, on/off"
    )


def parse_value(name: str, value: str, kind: type) -> Any:
    if kind is bool:
        return parse_bool(name, value)
    if kind is str:
        return value.strip().lower()
    if kind is tuple:
        return tuple(part.strip() for part in value.split(",") if part.strip())
    try:
        return kind(value.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number of seconds"
        raise ConfigurationError(f"{name}={value!r} is not {what}") from None


def read_dotenv(path: Path) -> dict[str, str]:
    """The variables a ``.env`` file sets; a missing file is empty.

    python-dotenv's rules, not ours: ``KEY="p#w" # note`` is ``p#w``; a
    line with a key and no ``=`` sets nothing. ``${VAR}`` stays as written:
    python-dotenv would expand it even inside single quotes, with no way to
    escape it, and a password may well contain ``${``.
    """
    if not path.is_file():
        return {}
    values = dotenv_values(path, interpolate=False, encoding="utf-8")
    return {key: value for key, value in values.items() if value is not None}

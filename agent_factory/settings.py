"""Settings, parsed and validated once, frozen afterwards.

`Settings.from_env()` is the only place that reads the environment (and a
``.env`` file, which never overrides a real variable). Everything below this
layer receives a `Settings` value. Every error names the setting, says what is
wrong and how to fix it, and never echoes a password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import conninfo as pg_conninfo

from .errors import ConfigurationError, NoProvidersConfiguredError

logger = logging.getLogger("agent_factory.core.database_manager")

DEFAULT_PRIMARY = "supabase"
DEFAULT_ORDER = ("supabase", "railway", "neon")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_PLACEHOLDER = re.compile(
    r"your[_-][a-z_-]*[_-]here|\[[a-z _-]+\]|<[a-z _-]+>|^changeme$|^x{3,}$", re.IGNORECASE
)
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def is_placeholder(value: str) -> bool:
    """True for empty values and the template text people forget to replace."""
    return not value.strip() or bool(_PLACEHOLDER.search(value))


@dataclass(frozen=True)
class ProviderSettings:
    """One provider: a name and libpq connection parameters.

    The parameters hold the password, so they are kept out of ``repr``;
    use `describe()` for anything shown to a person.
    """

    name: str
    params: Mapping[str, str] = field(repr=False)
    serverless: bool = False

    @property
    def host(self) -> str:
        return self.params.get("host") or self.params.get("hostaddr") or "localhost"

    @property
    def port(self) -> str:
        return self.params.get("port") or "5432"

    @property
    def password(self) -> str:
        return self.params.get("password", "")

    def conninfo(self, **overrides: Any) -> str:
        """The libpq connection string (contains the password: never log it)."""
        return pg_conninfo.make_conninfo("", **{**self.params, **overrides})

    def describe(self) -> str:
        """``user@host:port/dbname``, safe to show."""
        user = self.params.get("user", "")
        db = self.params.get("dbname", "")
        return f"{user}@{self.host}:{self.port}/{db}"

    def __repr__(self) -> str:
        return f"ProviderSettings(name={self.name!r}, target={self.describe()!r})"


@dataclass(frozen=True)
class Settings:
    """Everything a `DatabaseManager` needs, validated.

    Times are float seconds. ``hang_timeout`` bounds how long a provider may
    stay silent (no answer to queries nor to a liveness probe) before calls
    on it are abandoned; ``connect_timeout`` bounds opening a connection;
    ``checkout_timeout`` bounds waiting for a free pooled connection of a
    healthy provider.
    """

    providers: Mapping[str, ProviderSettings]
    primary: str
    failover_order: tuple[str, ...]
    failover_enabled: bool = True
    pool_min_size: int = 1
    pool_max_size: int = 10
    checkout_timeout: float = 5.0
    connect_timeout: float = 2.0
    hang_timeout: float = 2.0
    probe_interval: float = 0.5
    recovery_probes: int = 2
    health_ttl: float = 60.0
    failover_log_interval: float = 10.0

    def __post_init__(self) -> None:
        if not self.providers:
            raise NoProvidersConfiguredError(_NO_PROVIDERS)
        if self.primary not in self.providers:
            raise ConfigurationError(
                f"primary provider {self.primary!r} is not configured; "
                f"configured: {', '.join(self.providers)}"
            )
        for name in ("checkout_timeout", "connect_timeout", "hang_timeout", "probe_interval"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.health_ttl < 0 or self.failover_log_interval < 0:
            raise ConfigurationError("health_ttl and failover_log_interval must be >= 0")
        if self.recovery_probes < 1:
            raise ConfigurationError(f"recovery_probes must be >= 1, got {self.recovery_probes}")
        if not 0 <= self.pool_min_size <= self.pool_max_size or self.pool_max_size < 1:
            raise ConfigurationError(
                "pool sizes must satisfy 0 <= pool_min_size <= pool_max_size and "
                f"pool_max_size >= 1, got {self.pool_min_size}/{self.pool_max_size}"
            )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls,
        providers: Mapping[str, str],
        *,
        order: list[str] | tuple[str, ...] | None = None,
        primary: str | None = None,
        **options: Any,
    ) -> Settings:
        """Settings from provider URLs given in code (no environment read)."""
        parsed = {}
        for name, url in providers.items():
            _check_name(name, "providers")
            parsed[name] = ProviderSettings(name, connection_params(url, f"providers[{name!r}]"))
        names = list(parsed)
        order_t = tuple(order) if order is not None else tuple(names)
        unknown = [n for n in order_t if n not in parsed]
        if unknown:
            raise ConfigurationError(
                f"order names unconfigured providers {unknown}; configured: {', '.join(names)}"
            )
        chosen = primary if primary is not None else (order_t[0] if order_t else names[0])
        _check_options(options)
        return cls(providers=parsed, primary=chosen, failover_order=order_t, **options)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, dotenv: str | Path | None = ".env"
    ) -> Settings:
        """Settings from environment variables, with a ``.env`` file as fallback."""
        env = dict(read_dotenv(Path(dotenv))) if dotenv else {}
        env.update(os.environ if environ is None else environ)
        return _from_mapping(env)


_NO_PROVIDERS = (
    "No database providers configured. Set at least one of SUPABASE_DB_HOST + "
    "SUPABASE_DB_PASSWORD (or SUPABASE_DB_URL), RAILWAY_DB_URL, NEON_DB_URL, or "
    "<NAME>_DB_URL for a provider NAME listed in DATABASE_FAILOVER_ORDER; "
    "values must not be empty or placeholders."
)

# Numeric settings read from the environment: variable -> (field, type).
ENV_OPTIONS: dict[str, tuple[str, type]] = {
    "DATABASE_POOL_MIN_SIZE": ("pool_min_size", int),
    "DATABASE_POOL_MAX_SIZE": ("pool_max_size", int),
    "DATABASE_CHECKOUT_TIMEOUT": ("checkout_timeout", float),
    "DATABASE_CONNECT_TIMEOUT": ("connect_timeout", float),
    "DATABASE_HANG_TIMEOUT": ("hang_timeout", float),
    "DATABASE_PROBE_INTERVAL": ("probe_interval", float),
    "DATABASE_RECOVERY_PROBES": ("recovery_probes", int),
    "DATABASE_HEALTH_TTL": ("health_ttl", float),
    "DATABASE_FAILOVER_LOG_INTERVAL": ("failover_log_interval", float),
}


def _from_mapping(env: Mapping[str, str]) -> Settings:
    enabled = parse_bool("DATABASE_FAILOVER_ENABLED", env.get("DATABASE_FAILOVER_ENABLED", "true"))
    order_raw = env.get("DATABASE_FAILOVER_ORDER", "")
    order = tuple(n.strip().lower() for n in order_raw.split(",") if n.strip()) or DEFAULT_ORDER
    for n in order:
        _check_name(n, "DATABASE_FAILOVER_ORDER")
    explicit_primary = env.get("DATABASE_PROVIDER", "").strip().lower()
    providers: dict[str, ProviderSettings] = {}
    for name in dict.fromkeys((*order, *DEFAULT_ORDER, explicit_primary or DEFAULT_PRIMARY)):
        found = _provider_from_env(name, env)
        if found is not None:
            providers[name] = found
    if not providers:
        raise NoProvidersConfiguredError(_NO_PROVIDERS)
    missing = [n for n in order if n not in providers]
    if missing and order_raw.strip():
        logger.warning(
            "DATABASE_FAILOVER_ORDER names providers without credentials, skipped: %s",
            ", ".join(missing),
        )
    order = tuple(n for n in order if n in providers)
    if explicit_primary:
        if explicit_primary not in providers:
            raise ConfigurationError(
                f"DATABASE_PROVIDER={explicit_primary!r} has no credentials; configured "
                f"providers: {', '.join(providers)}. Set its variables or change "
                "DATABASE_PROVIDER."
            )
        primary = explicit_primary
    elif DEFAULT_PRIMARY in providers:
        primary = DEFAULT_PRIMARY
    else:
        primary = (order or tuple(providers))[0]
        logger.warning("default primary %r not configured; using %r", DEFAULT_PRIMARY, primary)
    options: dict[str, Any] = {}
    for var, (attr, kind) in ENV_OPTIONS.items():
        if env.get(var, "").strip():
            options[attr] = parse_number(var, env[var], kind)
    return Settings(
        providers=providers,
        primary=primary,
        failover_order=order,
        failover_enabled=enabled,
        **options,
    )


def _provider_from_env(name: str, env: Mapping[str, str]) -> ProviderSettings | None:
    prefix = name.upper()
    url_var = f"{prefix}_DB_URL"
    url = env.get(url_var, "")
    serverless = parse_bool(f"{prefix}_DB_SERVERLESS", env.get(f"{prefix}_DB_SERVERLESS", "false"))
    if url.strip():
        if is_placeholder(url):
            logger.info("%s holds a placeholder; provider %r not configured", url_var, name)
            return None
        return ProviderSettings(name, connection_params(url, url_var), serverless)
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
    parse_number("SUPABASE_DB_PORT", params["port"], int)
    return ProviderSettings(name, with_defaults(params), serverless)


def connection_params(url: str, setting: str) -> dict[str, str]:
    """Parse a URL or key=value string into libpq parameters with our defaults."""
    try:
        raw = pg_conninfo.conninfo_to_dict(url.strip())
    except Exception:
        # The text may hold a password: name the setting, never echo the value.
        raise ConfigurationError(
            f"{setting} is not a valid PostgreSQL URL; expected "
            "postgresql://user:password@host:port/dbname (percent-encode special "
            "characters in the password)"
        ) from None
    params = {k: str(v) for k, v in raw.items() if v is not None}
    if not params.get("host") and not params.get("hostaddr"):
        raise ConfigurationError(f"{setting} has no host; expected postgresql://user:pw@host/db")
    if not all(p.strip().isdigit() for p in params.get("port", "5432").split(",")):
        raise ConfigurationError(f"{setting} has a port that is not a number")
    return with_defaults(params)


def with_defaults(params: dict[str, str]) -> dict[str, str]:
    """Add the defaults we want on every connection unless the URL sets them."""
    out = dict(params)
    if "sslmode" not in out and not _is_loopback(out.get("host", "")):
        out["sslmode"] = "require"
    out.setdefault("application_name", "agent-factory")
    # Keepalives and tcp_user_timeout notice a dead peer on idle pooled
    # connections and on blackholed sends, where no RST ever arrives.
    out.setdefault("keepalives", "1")
    out.setdefault("keepalives_idle", "10")
    out.setdefault("keepalives_interval", "3")
    out.setdefault("keepalives_count", "3")
    out.setdefault("tcp_user_timeout", "10000")
    return out


def _is_loopback(host: str) -> bool:
    first = host.split(",")[0].strip()
    if not first or first.startswith("/") or first == "localhost":
        return True
    try:
        return ipaddress.ip_address(first).is_loopback
    except ValueError:
        return False


def parse_bool(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigurationError(
        f"{name}={value!r} is not a boolean; use one of true/false, 1/0, yes/no, on/off"
    )


def parse_number(name: str, value: str, kind: type) -> Any:
    try:
        return kind(value.strip())
    except ValueError:
        what = "an integer" if kind is int else "a number of seconds"
        raise ConfigurationError(f"{name}={value!r} is not {what}") from None


def _check_name(name: str, setting: str) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"{setting}: provider name {name!r} must be lowercase letters, digits and "
            "underscores, starting with a letter"
        )


def _check_options(options: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(Settings)} - {
        "providers",
        "primary",
        "failover_order",
    }
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )


def read_dotenv(path: Path) -> dict[str, str]:
    """Read KEY=VALUE lines from a ``.env`` file; a missing file is empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key.strip()] = value
    return out

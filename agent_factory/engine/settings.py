"""Settings, parsed and validated once, frozen afterwards.

`environment.settings_from_env()` is the only place that reads the
environment; everything below this layer receives a `Settings` value. Every
error names the setting, says what is wrong and how to fix it, and never
echoes a password.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg import conninfo as pg_conninfo

from ..errors import ConfigurationError, NoProvidersConfiguredError
from .hedge import HEDGE_MODES

NO_PROVIDERS = (
    "No database providers configured. Set at least one of SUPABASE_DB_HOST + "
    "SUPABASE_DB_PASSWORD (or SUPABASE_DB_URL), RAILWAY_DB_URL, NEON_DB_URL, or "
    "<NAME>_DB_URL for a provider NAME listed in DATABASE_FAILOVER_ORDER (or "
    "DATABASE_URL alone for one provider without failover); values must not be "
    "empty or placeholders."
)
READ_ROUTING = ("primary", "nearest", "round_robin", "least_busy")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PLACEHOLDER = re.compile(
    r"your[_-][a-z_-]*[_-]here|\[[a-z _-]+\]|<[a-z _-]+>|^changeme$|^x{3,}$", re.IGNORECASE
)

#: Settings a single provider may override, with their types.
PROVIDER_OPTIONS: dict[str, type] = {
    "pool_min_size": int,
    "pool_max_size": int,
    "checkout_timeout": float,
    "connect_timeout": float,
    "hang_timeout": float,
    "weight": int,
    "serverless": bool,
    "prepare": bool,
    "pooler": bool,
}
#: Provider options only code can give (no environment variable holds a function).
CODE_OPTIONS = ("configure",)


@dataclass(frozen=True)
class ProviderSettings:
    """One provider: a name, libpq connection parameters and its own options.

    The parameters hold the password, so they are kept out of ``repr``;
    use `describe()` for anything shown to a person. ``options`` override
    the manager-wide settings for this provider (see `PROVIDER_OPTIONS`).
    """

    name: str
    params: Mapping[str, str] = field(repr=False)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, value in self.options.items():
            kind = PROVIDER_OPTIONS.get(key)
            where = f"providers[{self.name!r}][{key!r}]"
            if key in CODE_OPTIONS:
                check_callable(value, where)
                continue
            if kind is None:
                raise ConfigurationError(
                    f"{where}: unknown provider option; valid: "
                    f"{', '.join((*PROVIDER_OPTIONS, *CODE_OPTIONS))}"
                )
            if kind is bool and not isinstance(value, bool):
                raise ConfigurationError(f"{where} must be true or false, got {value!r}")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is not bool and not numeric:
                raise ConfigurationError(f"{where} must be a number, got {value!r}")
            if kind is int and value != int(value):
                raise ConfigurationError(f"{where} must be a whole number, got {value!r}")
            if kind is not bool and value <= 0 and key != "pool_min_size":
                raise ConfigurationError(f"{where} must be > 0, got {value!r}")

    @property
    def host(self) -> str:
        return self.params.get("host") or self.params.get("hostaddr") or "localhost"

    @property
    def port(self) -> str:
        return self.params.get("port") or "5432"

    @property
    def password(self) -> str:
        return self.params.get("password", "")

    @property
    def serverless(self) -> bool:
        """Neon (and anything marked so) may sleep: waking is not an outage."""
        default = self.host.endswith(".neon.tech")
        return bool(self.options.get("serverless", default))

    @property
    def pooler(self) -> bool:
        """Reached through a connection pooler (PgBouncer, Supavisor), not a server directly.

        Recognised by Supabase's pooler host or port 6543; declare any other
        with the ``pooler`` option (``<NAME>_DB_POOLER=true``). Behind a pooler
        the backend pid of a session says nothing, and the pooler answering is
        no proof that the database behind it is alive.
        """
        default = self.port == "6543" or "pooler.supabase.com" in self.host
        return bool(self.options.get("pooler", default))

    @property
    def prepare(self) -> bool:
        """Prepared statements break behind a transaction-mode pooler."""
        return bool(self.options.get("prepare", not self.pooler))

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
class Tuning:
    """The effective settings of one provider (manager-wide, then its own)."""

    pool_min_size: int
    pool_max_size: int
    checkout_timeout: float
    connect_timeout: float
    hang_timeout: float
    weight: int
    serverless: bool
    prepare: bool
    pooler: bool
    probe_interval: float
    recovery_probes: int
    monitor_interval: float
    health_ttl: float
    failure_threshold: int
    failure_window: float
    #: Run on each new pooled connection (the provider's own, else the manager's).
    configure: Callable[[Any], Any] | None = None
    #: The connections' row factory (None: psycopg's tuples).
    row_factory: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Settings:
    """Everything a `DatabaseManager` needs, validated.

    Times are float seconds. ``hang_timeout`` bounds how long a provider may
    stay silent (no answer to queries nor to a liveness probe) before calls
    on it are abandoned; ``connect_timeout`` bounds opening a connection
    (``serverless_connect_timeout`` for providers that sleep);
    ``checkout_timeout`` bounds waiting for a free pooled connection of a
    healthy provider. ``failure_threshold`` failures within
    ``failure_window`` open a provider's breaker (1: down at once).
    """

    providers: Mapping[str, ProviderSettings]
    primary: str
    failover_order: tuple[str, ...]
    failover_enabled: bool = True
    pool_min_size: int = 1
    pool_max_size: int = 10
    checkout_timeout: float = 5.0
    connect_timeout: float = 2.0
    serverless_connect_timeout: float = 10.0
    hang_timeout: float = 2.0
    probe_interval: float = 0.5
    recovery_probes: int = 2
    monitor_interval: float = 5.0
    failure_threshold: int = 1
    failure_window: float = 30.0
    health_ttl: float = 60.0
    failover_log_interval: float = 10.0
    read_routing: str = "primary"
    read_your_writes: float = 2.0
    failback_reconcile: bool = True
    reconcile_tables: tuple[str, ...] = ("session_memories", "knowledge_atoms")
    reconcile_margin: float = 120.0
    write_pause_timeout: float = 10.0
    max_replication_lag: float | None = None
    #: How a drain settles a change the primary also changed (continuity/merge.py).
    conflict_policy: str = "backup_wins"
    #: ``table.column`` counters that conflicts merge by the backup's difference.
    conflict_delta_columns: tuple[str, ...] = ()
    #: ``conflict_policy="callback"``: called in this process with each conflict.
    conflict_resolver: Callable[[Any], Any] | None = None
    #: Seconds between checks of the backups' journals (drained when not empty).
    drain_interval: float = 5.0
    #: A returning primary waits at most this long for failing drains before it
    #: takes writes anyway (alarm raised; the pending changes are drained later).
    failback_max_wait: float = 60.0
    #: Refuse writes on a backup while the primary's heartbeat still reaches it.
    split_brain_fence: bool = True
    #: Seconds the heartbeat must stand still on a backup before it takes writes.
    witness_quiet: float = 3.0
    #: Called with each new pooled connection before it serves (psycopg_pool's
    #: ``configure``); a provider's ``configure`` option replaces it for that provider.
    configure: Callable[[Any], Any] | None = None
    #: The row factory of the pooled connections (psycopg's ``row_factory``).
    row_factory: Callable[[Any], Any] | None = None
    #: Hedged reads (docs/failover.md): "auto" sends a slow read to a backup as well
    #: only when the backup's replication lag is measured and within
    #: ``hedge_max_lag``; "on" also to backups without replication (their own
    #: data); "off" never.
    hedged_reads: str = "auto"
    #: The least silence before a read is hedged (more on a slow provider).
    hedge_after_min: float = 0.1
    #: Hedges as a share of the reads while the primary is not suspect.
    hedge_budget: float = 0.05
    #: A hedge goes to a backup at most this many seconds behind (and within
    #: ``max_replication_lag`` when that is set).
    hedge_max_lag: float = 1.0

    def __post_init__(self) -> None:
        if not self.providers:
            raise NoProvidersConfiguredError(NO_PROVIDERS)
        if self.primary not in self.providers:
            raise ConfigurationError(
                f"primary provider {self.primary!r} is not configured; "
                f"configured: {', '.join(self.providers)}"
            )
        for name in ("checkout_timeout", "connect_timeout", "hang_timeout", "probe_interval",
                     "serverless_connect_timeout", "failure_window", "write_pause_timeout",
                     "drain_interval", "witness_quiet"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for name in ("health_ttl", "failover_log_interval", "monitor_interval",
                     "read_your_writes", "reconcile_margin", "failback_max_wait"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("recovery_probes", "failure_threshold"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.conflict_policy not in CONFLICT_POLICIES:
            raise ConfigurationError(
                f"conflict_policy={self.conflict_policy!r} is not one of "
                f"{', '.join(CONFLICT_POLICIES)} (DATABASE_CONFLICT_POLICY)"
            )
        if self.conflict_policy == "callback" and self.conflict_resolver is None:
            raise ConfigurationError(
                "conflict_policy='callback' needs conflict_resolver=a function of the "
                "conflict (it runs in this process only; other instances and the CLI use "
                "DATABASE_CONFLICT_POLICY)"
            )
        if isinstance(self.conflict_delta_columns, str):
            object.__setattr__(self, "conflict_delta_columns",
                               tuple(self.conflict_delta_columns.split(",")))
        parse_delta_columns(self.conflict_delta_columns)
        for name in ("configure", "row_factory"):
            if getattr(self, name) is not None:
                check_callable(getattr(self, name), name)
        lag = self.max_replication_lag
        if lag is not None and not lag > 0:
            raise ConfigurationError(f"max_replication_lag must be > 0 seconds or unset, got {lag}")
        self._check_hedging()
        if self.read_routing not in READ_ROUTING:
            raise ConfigurationError(
                f"read_routing={self.read_routing!r} is not one of {', '.join(READ_ROUTING)}"
            )
        for name in self.providers:
            t = self.tuning(name)
            if not 0 <= t.pool_min_size <= t.pool_max_size or t.pool_max_size < 1:
                raise ConfigurationError(
                    f"pool sizes of provider {name!r} must satisfy 0 <= pool_min_size <= "
                    f"pool_max_size and pool_max_size >= 1, got "
                    f"{t.pool_min_size}/{t.pool_max_size}"
                )

    def _check_hedging(self) -> None:
        if self.hedged_reads not in HEDGE_MODES:
            raise ConfigurationError(
                f"hedged_reads={self.hedged_reads!r} is not one of {', '.join(HEDGE_MODES)} "
                "(DATABASE_HEDGED_READS)"
            )
        for name in ("hedge_after_min", "hedge_max_lag"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.hedge_budget <= 1:
            raise ConfigurationError(
                f"hedge_budget must be a share of the reads between 0 and 1 (0.05: 5 %), "
                f"got {self.hedge_budget}"
            )

    def hedge_lag_bound(self) -> float:
        """How far behind a backup may be to take a hedge (seconds)."""
        bound = self.max_replication_lag
        return self.hedge_max_lag if bound is None else min(bound, self.hedge_max_lag)

    def tuning(self, name: str) -> Tuning:
        """The effective settings of provider ``name``."""
        p = self.providers[name]
        o = p.options
        connect = self.serverless_connect_timeout if p.serverless else self.connect_timeout
        return Tuning(
            pool_min_size=int(o.get("pool_min_size", self.pool_min_size)),
            pool_max_size=int(o.get("pool_max_size", self.pool_max_size)),
            checkout_timeout=float(o.get("checkout_timeout", self.checkout_timeout)),
            connect_timeout=float(o.get("connect_timeout", connect)),
            hang_timeout=float(o.get("hang_timeout", self.hang_timeout)),
            weight=int(o.get("weight", 1)),
            serverless=p.serverless,
            prepare=p.prepare,
            pooler=p.pooler,
            probe_interval=self.probe_interval,
            recovery_probes=self.recovery_probes,
            monitor_interval=self.monitor_interval,
            health_ttl=self.health_ttl,
            failure_threshold=self.failure_threshold,
            failure_window=self.failure_window,
            configure=o.get("configure", self.configure),
            row_factory=self.row_factory,
        )

    def replace(self, **changes: Any) -> Settings:
        check_options(changes, allow_structure=True)
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(
        cls,
        providers: Mapping[str, str | Mapping[str, Any]],
        *,
        order: list[str] | tuple[str, ...] | None = None,
        primary: str | None = None,
        **options: Any,
    ) -> Settings:
        """Settings from providers given in code (no environment read).

        Each provider is a URL, or a mapping with ``url`` and provider
        options, e.g. ``{"url": ..., "serverless": True, "weight": 2}``.
        """
        parsed = {name: provider_settings(name, spec) for name, spec in providers.items()}
        names = list(parsed)
        order_t = tuple(order) if order is not None else tuple(names)
        unknown = [n for n in order_t if n not in parsed]
        if unknown:
            raise ConfigurationError(
                f"order names unconfigured providers {unknown}; configured: {', '.join(names)}"
            )
        chosen = primary if primary is not None else (order_t[0] if order_t else names[0])
        check_options(options)
        return cls(providers=parsed, primary=chosen, failover_order=order_t, **options)


def check_callable(value: Any, where: str) -> None:
    """Refuse a ``configure`` or ``row_factory`` that is not a function."""
    if callable(value):
        return
    if where.endswith("row_factory"):
        want = "a psycopg row factory such as psycopg.rows.dict_row"
    else:
        want = "a function of the new connection, e.g. def configure(conn): ..."
    raise ConfigurationError(f"{where} must be {want}; got a {type(value).__name__}")


def check_row_factory(row_factory: Any) -> None:
    """A call's ``row_factory`` argument must be a function (a `TypeError` names it)."""
    if not callable(row_factory):
        raise TypeError("row_factory must be a psycopg row factory such as "
                        f"psycopg.rows.dict_row; got a {type(row_factory).__name__}")


def is_placeholder(value: str) -> bool:
    """True for empty values and the template text people forget to replace."""
    return not value.strip() or bool(_PLACEHOLDER.search(value))


def provider_settings(name: str, spec: str | Mapping[str, Any]) -> ProviderSettings:
    """A provider from a URL or a ``{"url": ..., option: value}`` mapping."""
    check_name(name, "providers")
    where = f"providers[{name!r}]"
    if isinstance(spec, str):
        return ProviderSettings(name, connection_params(spec, where))
    options = dict(spec)
    url = options.pop("url", None)
    if not isinstance(url, str):
        raise ConfigurationError(f"{where} needs a 'url' (a PostgreSQL connection URL)")
    return ProviderSettings(name, connection_params(url, where), options)


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


def check_name(name: str, setting: str) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"{setting}: provider name {name!r} must be lowercase letters, digits and "
            "underscores, starting with a letter"
        )


def check_options(options: Mapping[str, Any], *, allow_structure: bool = False) -> None:
    """Refuse unknown keyword options, naming the valid ones."""
    known = {f.name for f in dataclasses.fields(Settings)}
    if not allow_structure:
        known -= {"providers", "primary", "failover_order"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )


CONFLICT_POLICIES = ("backup_wins", "primary_wins", "callback")


def parse_delta_columns(items: Sequence[str]) -> dict[str, frozenset[str]]:
    """``("accounts.balance", "stock.count")`` -> ``{"accounts": {"balance"}, ...}``."""
    found: dict[str, set[str]] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        table, dot, column = item.rpartition(".")
        if not dot or not table or not column:
            raise ConfigurationError(
                f"conflict delta column {item!r} must be written table.column "
                "(DATABASE_CONFLICT_DELTA_COLUMNS=accounts.balance,...)"
            )
        found.setdefault(table, set()).add(column)
    return {t: frozenset(c) for t, c in found.items()}

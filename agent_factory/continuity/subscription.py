"""The parts of replication that do no I/O: names, SQL, status and reports.

One publication on the primary, one subscription per backup named after it
(``agent_factory_<backup>``); what a backup's status says is wrong; whether
the primary's rows are copied when a subscription is created. The queries
that use these live in `agent_factory.continuity.replication`, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote

from psycopg import conninfo as pg_conninfo
from psycopg import sql

from ..engine.settings import ProviderSettings, Settings, connection_params
from ..errors import AgentFactoryError, ConfigurationError

__all__ = [
    "COPY_DATA_MODES", "MIN_CONNECT_TIMEOUT", "PUBLICATION", "BackupStatus", "ReplicationReport",
    "backup_providers", "create_subscription_sql", "decide_copy_data", "publisher_conninfo",
    "qualified", "scrub", "subscription_name",
]

PUBLICATION = "agent_factory"
COPY_DATA_MODES = ("auto", "yes", "no")
MIN_CONNECT_TIMEOUT = 10  # whole seconds: libpq's unit; serverless providers wake slowly


def subscription_name(backup: str) -> str:
    """``agent_factory_<backup>``: the subscription, its slot and its application_name."""
    return f"{PUBLICATION}_{backup}"


def backup_providers(settings: Settings) -> list[ProviderSettings]:
    """Every configured provider but the primary, in failover order."""
    names = dict.fromkeys((*settings.failover_order, *settings.providers))
    found = [settings.providers[n] for n in names if n != settings.primary]
    if not found:
        raise ConfigurationError(
            f"only the primary {settings.primary!r} is configured: replication needs a "
            "backup provider (set RAILWAY_DB_URL, NEON_DB_URL or <NAME>_DB_URL)")
    return found


def publisher_conninfo(primary: ProviderSettings, backup: str,
                       publisher_url: str | None = None) -> tuple[str, str]:
    """The conninfo a backup's subscription uses to reach the primary, and its password.

    ``application_name`` is forced to the subscription's name: libpq lets the
    conninfo's value win over the one the subscriber would set.
    """
    params = dict(primary.params) if publisher_url is None else connection_params(
        publisher_url, "--publisher-url")
    params["application_name"] = subscription_name(backup)
    params.setdefault("connect_timeout", str(MIN_CONNECT_TIMEOUT))
    return pg_conninfo.make_conninfo("", **params), params.get("password", "")


def decide_copy_data(mode: str, backup_has_rows: bool) -> bool:
    """``auto`` copies the existing rows only into empty tables."""
    if mode not in COPY_DATA_MODES:
        raise ConfigurationError(f"copy_data must be one of {', '.join(COPY_DATA_MODES)}, "
                                 f"got {mode!r}")
    return mode == "yes" or (mode == "auto" and not backup_has_rows)


def create_subscription_sql(name: str, conninfo: str, copy_data: bool) -> sql.Composed:
    """CREATE SUBSCRIPTION takes no bind parameters: the conninfo is a quoted literal."""
    return sql.SQL(
        "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (origin = none, "
        "copy_data = {})"
    ).format(sql.Identifier(name), sql.Literal(conninfo), sql.Identifier(PUBLICATION),
             sql.SQL("true" if copy_data else "false"))


def scrub(text: str, password: str) -> str:
    """``text`` without the password, plain or percent-encoded."""
    for secret in (password, quote(password, safe="")):
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass
class BackupStatus:
    """The replication of one backup, as seen from the backup and from the primary.

    ``lag_bytes`` is how far the backup's received (or, disconnected, its
    slot's confirmed) position is behind the primary's WAL; ``lag_seconds``
    how old the primary's WAL at that position is: 0 when caught up, a lower
    bound when ``lag_at_least`` (still behind after the status command
    watched it for a while). Both are None when unknown. ``error`` says why
    something could not be read, ``last_error`` why the subscription is not
    applying.
    """

    provider: str
    subscription: str
    present: bool = False
    enabled: bool = False
    worker_pid: int | None = None
    sender_state: str | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    lag_at_least: bool = False
    apply_errors: int = 0
    sync_errors: int = 0
    tables_syncing: int = 0
    last_error: str | None = None
    backup_reachable: bool = True
    primary_reachable: bool = True
    error: str | None = None

    @property
    def streaming(self) -> bool:
        return (self.present and self.enabled and self.worker_pid is not None
                and self.sender_state in ("streaming", "catchup"))

    @property
    def reachable(self) -> bool:
        return self.backup_reachable and self.primary_reachable

    def problem(self) -> str | None:
        """Why the backup does not stream, in a few words; None when it does."""
        errors = f"{self.apply_errors} apply / {self.sync_errors} sync error(s)"
        return next((why for failed, why in (
            (not self.backup_reachable, "backup unreachable"),
            (not self.present, "no subscription"),
            (not self.enabled, f"disabled after {errors}"),
            (not self.primary_reachable, "primary unreachable"),
            (self.worker_pid is None, f"apply worker not running ({errors})"),
            (not self.streaming, f"primary's WAL sender {self.sender_state or 'not connected'}"),
        ) if failed), None)


@dataclass
class ReplicationReport:
    """What setup or teardown did: per backup an action, or the error that stopped it.

    ``notes`` say what is left for the user to do.
    """

    publication: str = "not reached"  # created, extended, unchanged, dropped, absent
    tables: tuple[str, ...] = ()
    actions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, AgentFactoryError] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def qualified(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split(".", 1))

"""What a connection that serves the caller's statements gets, besides the pool's own work.

`ConnectionSetup` runs the user's ``configure`` (psycopg_pool's callback) on
each new pooled connection and judges its failures; `lend` and `give_back`
prepare a connection handed out whole (``db.connection()``, the SQLAlchemy
engine) for the backup's journal and put it back as the pool expects it.

The library's own connections (health probes, the monitor connection, the
witness, the failback's drains) are not pooled and get neither ``configure``
nor the manager's ``row_factory``: they read rows as tuples, and a user's
``configure`` that fails must not make a healthy provider look down.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import psycopg
from psycopg import pq
from psycopg.abc import Params, Query
from psycopg.rows import Row, RowFactory, tuple_row

from ..errors import ConfigurationError
from .health import ProviderHealth
from .policy import Kind, classify
from .settings import Settings, Tuning

__all__ = [
    "JOURNAL_LOCAL", "AsyncJournaledCursor", "ConnectionSetup", "JournaledCursor", "give_back",
    "check_configure", "journal_switch", "lend", "prepare_direct", "setup_for", "still_current",
]

logger = logging.getLogger("agent_factory.core.database_manager")

_IDLE = pq.TransactionStatus.IDLE
#: Marks one transaction's writes for the backup's journal (pooler-safe).
JOURNAL_LOCAL = "SELECT set_config('agent_factory.journal', 'on', true)"
#: Marks a whole session's writes for the backup's journal (a direct connection).
JOURNAL_SESSION = "SET agent_factory.journal = on"


def send(conn: psycopg.Connection[Any], query: Any, params: Any,
         row_factory: RowFactory[Any] | None) -> psycopg.Cursor[Any]:
    """``conn.execute``, with this call's row factory if it has one."""
    if row_factory is None:
        return conn.execute(query, params)
    return conn.cursor(row_factory=row_factory).execute(query, params)


def pool_kwargs(t: Tuning) -> dict[str, Any]:
    """The pooled connections' arguments (both shells)."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if not t.prepare:
        kwargs["prepare_threshold"] = None
    if t.row_factory is not None:
        kwargs["row_factory"] = t.row_factory
    return kwargs


class ConnectionSetup:
    """One provider's ``configure``, run on each new pooled connection, and its last failure.

    An exception from ``configure`` on a connection that is still sound is a
    configuration error, not an outage: the connection is closed (the pool
    tries again later, with psycopg_pool's backoff), the provider is not
    marked down (its server answered), and callers waiting for a connection
    get a `ConfigurationError` naming ``configure`` until a new connection
    passes it. If the connection itself broke meanwhile (the server went
    away, the watchdog shut a hung call), it counts as a failed connect.
    """

    def __init__(self, name: str, configure: Callable[[Any], Any],
                 health: ProviderHealth) -> None:
        self.name = name
        self.configure = configure
        self._health = weakref.ref(health)
        self.error: str | None = None
        self._exc: BaseException | None = None

    def hook(self, current: Callable[[], bool]) -> Callable[[psycopg.Connection[Any]], None]:
        """The sync pool's ``configure=``; ``current`` says whether its pool still serves."""
        def configure(conn: psycopg.Connection[Any]) -> None:
            try:
                result = self.configure(conn)
                if inspect.isawaitable(result):
                    if isinstance(result, Coroutine):
                        result.close()
                    raise TypeError("configure returned an awaitable: a DatabaseManager does "
                                    "not await it; pass a plain function, or use "
                                    "AsyncDatabaseManager")
                self._left_idle(conn)
            except Exception as exc:
                self._failed(conn, exc, current)
                conn.close()
                raise
            self._passed(current)
        return configure

    def async_hook(
        self, current: Callable[[], bool]
    ) -> Callable[[psycopg.AsyncConnection[Any]], Coroutine[Any, Any, None]]:
        """The async pool's ``configure=``: a plain function or a coroutine function."""
        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            try:
                result = self.configure(conn)
                if inspect.isawaitable(result):
                    await result
                self._left_idle(conn)
            except Exception as exc:
                self._failed(conn, exc, current)
                await conn.close()
                raise
            self._passed(current)
        return configure

    def check(self) -> None:
        """Raise `ConfigurationError` while the last new connection failed ``configure``."""
        if self.error is not None:
            raise ConfigurationError(
                f"configure failed on a new connection to provider {self.name!r} "
                f"({self.error}); the connection was discarded and the provider is not "
                "marked down. Fix the configure function given to the manager (or the "
                "provider's 'configure' option): it runs on every new pooled connection"
            ) from self._exc

    def _left_idle(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
        # psycopg_pool checks this too, but after us: judged here, it is one failure.
        if conn.pgconn.transaction_status != _IDLE:
            raise psycopg.ProgrammingError(
                "configure left the connection inside a transaction: commit it, or run "
                "autocommit statements (the pooled connections are autocommit)")

    def _failed(self, conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
                exc: Exception, current: Callable[[], bool]) -> None:
        health = self._health()
        if health is None or not current():
            return  # a connect of a pool replaced since says nothing now
        if conn.broken or conn.closed or (
                isinstance(exc, psycopg.Error) and classify(exc) is Kind.UNAVAILABLE):
            health.connect_failed(exc)
            return
        error = f"{type(exc).__name__}: {str(exc).strip()}"
        if self.error is None:
            logger.error("provider %r: configure failed on a new connection (%s); it is "
                         "discarded and calls waiting for a connection fail until one passes",
                         self.name, error,
                         extra={"event": "configure_failed", "provider": self.name})
        self.error, self._exc = error, exc

    def _passed(self, current: Callable[[], bool]) -> None:
        if current() and self.error is not None:
            logger.info("provider %r: configure passes again", self.name,
                        extra={"event": "configure_passed", "provider": self.name})
            self.error, self._exc = None, None


def setup_for(name: str, configure: Callable[[Any], Any] | None,
              health: ProviderHealth) -> ConnectionSetup | None:
    """The provider's `ConnectionSetup`, or None without ``configure``."""
    return None if configure is None else ConnectionSetup(name, configure, health)


def still_current(provider: Any) -> Callable[[], bool]:
    """Whether the pool ``provider`` has now is the one it had at this call (held weakly:
    a pool's workers must not keep a forgotten provider alive)."""
    ref, generation = weakref.ref(provider), provider._generation

    def current() -> bool:
        p = ref()
        return p is not None and p._generation == generation
    return current


def check_configure(settings: Settings, *, asynchronous: bool) -> None:
    """Refuse, before anything starts, a coroutine function as a sync manager's
    ``configure``: it would never be awaited."""
    if asynchronous:
        return
    for name in settings.providers:
        if inspect.iscoroutinefunction(settings.tuning(name).configure):
            raise ConfigurationError(
                f"configure of provider {name!r} is a coroutine function, which a "
                "DatabaseManager would never await: pass a plain function, or use "
                "AsyncDatabaseManager")


class JournaledCursor(psycopg.Cursor[Row]):
    """Each statement carries the journal setting (a connection on a backup behind a
    transaction-mode pooler, where a session setting does not outlive a transaction).

    In autocommit mode a statement runs in its own transaction, after
    `JOURNAL_LOCAL`; inside a transaction `JOURNAL_LOCAL` runs first again.
    """

    def execute(self, query: Any, params: Params | None = None, *,
                prepare: bool | None = None, binary: bool | None = None) -> JournaledCursor[Row]:
        conn = self.connection
        if conn.autocommit and conn.pgconn.transaction_status == _IDLE:
            with conn.transaction():
                super().execute(JOURNAL_LOCAL)
                return super().execute(query, params, prepare=prepare, binary=binary)
        super().execute(JOURNAL_LOCAL)
        return super().execute(query, params, prepare=prepare, binary=binary)

    def executemany(self, query: Query, params_seq: Iterable[Params], *,
                    returning: bool = False) -> None:
        conn = self.connection
        if conn.autocommit and conn.pgconn.transaction_status == _IDLE:
            with conn.transaction():
                super().execute(JOURNAL_LOCAL)
                super().executemany(query, params_seq, returning=returning)
            return
        super().execute(JOURNAL_LOCAL)
        super().executemany(query, params_seq, returning=returning)


class AsyncJournaledCursor(psycopg.AsyncCursor[Row]):
    """`JournaledCursor` for asyncio."""

    async def execute(
            self, query: Any, params: Params | None = None, *,
            prepare: bool | None = None, binary: bool | None = None
    ) -> AsyncJournaledCursor[Row]:
        conn = self.connection
        if conn.autocommit and conn.pgconn.transaction_status == _IDLE:
            async with conn.transaction():
                await super().execute(JOURNAL_LOCAL)
                return await super().execute(query, params, prepare=prepare, binary=binary)
        await super().execute(JOURNAL_LOCAL)
        return await super().execute(query, params, prepare=prepare, binary=binary)

    async def executemany(self, query: Query, params_seq: Iterable[Params], *,
                          returning: bool = False) -> None:
        conn = self.connection
        if conn.autocommit and conn.pgconn.transaction_status == _IDLE:
            async with conn.transaction():
                await super().execute(JOURNAL_LOCAL)
                await super().executemany(query, params_seq, returning=returning)
            return
        await super().execute(JOURNAL_LOCAL)
        await super().executemany(query, params_seq, returning=returning)


def lend(conn: Any, journal: bool | None, pooler: bool) -> str | None:
    """Prepare a pooled connection handed out whole; the statement to run on it first.

    ``journal``: it stands in for the primary (True), it is the primary
    (False), or the journal is off (None). On a backup the session carries the
    journal setting, or behind a pooler each statement does (`JournaledCursor`).
    """
    if journal and pooler:
        conn.lent_cursor_factory = conn.cursor_factory
        conn.cursor_factory = (AsyncJournaledCursor if isinstance(conn, psycopg.AsyncConnection)
                               else JournaledCursor)
        return None
    return journal_switch(conn, journal)


def journal_switch(conn: Any, journal: bool | None) -> str | None:
    """The statement that puts ``conn``'s session in the wanted journal state, if any.

    ``conn.journal_on`` is what the session carries: True, False, or None
    (unknown, after a lent connection came back from a backup).
    """
    if journal is None or journal == conn.journal_on:
        return None
    conn.journal_on = journal
    return f"SET agent_factory.journal = {'on' if journal else 'off'}"


def give_back(conn: Any, row_factory: Callable[[Any], Any] | None, *, lent: bool) -> None:
    """Before a pinned connection goes back to its pool: what the block may have changed.

    Its row and cursor factories are the pool's again. A connection ``lent``
    whole on a backup may have had its session reset by the caller (``RESET
    ALL``, ``DISCARD ALL``), so its journal state is marked unknown: the next
    write through it sets the state it needs (no round trip now).
    """
    conn.row_factory = row_factory or tuple_row
    if conn.cursor_factory in (JournaledCursor, AsyncJournaledCursor):
        conn.cursor_factory = conn.lent_cursor_factory
    elif lent and conn.journal_on:
        conn.journal_on = None


def prepare_direct(conn: psycopg.Connection[Any], pooler: bool) -> None:
    """A connection of its own (not pooled by the manager) that stands in for the
    primary for its whole life: every write it makes is journaled."""
    if pooler:
        conn.cursor_factory = JournaledCursor
        return
    autocommit = conn.autocommit
    conn.autocommit = True
    conn.execute(JOURNAL_SESSION)
    conn.autocommit = autocommit

"""Events a listener can observe: failover, return to primary, health changes.

Subclass `Listener` and override what you need; every method does nothing by
default. Listeners run on the thread that caused the event, so keep them
short. A listener that raises is logged and never breaks a query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

logger = logging.getLogger("agent_factory.core.database_manager")


class Listener:
    """Receives manager events; all methods are no-ops by default."""

    def on_failover(self, from_provider: str, to_provider: str, reason: str | None) -> None:
        """Queries moved from one provider to another (not the primary)."""

    def on_return_to_primary(self, primary: str, from_provider: str) -> None:
        """Queries are served by the primary again."""

    def on_health_change(self, provider: str, healthy: bool, reason: str | None) -> None:
        """A provider went down or came back up."""

    def on_reconcile(self, primary: str, source: str, rows: int) -> None:
        """Failback brought ``rows`` written on ``source`` back to the primary."""

    def on_conflicts(self, primary: str, source: str, conflicts: int) -> None:
        """A drain of ``source`` met ``conflicts`` rows the primary had changed too.

        Each was settled by the conflict policy; both versions are kept in the
        primary's ``agent_factory_conflicts`` table.
        """

    def on_query_error(self, provider: str, error: BaseException) -> None:
        """A statement failed on a provider with a SQL error."""

    def on_query(self, provider: str, seconds: float, outcome: str) -> None:
        """One attempt of a statement on a provider finished.

        ``outcome`` is ``"ok"``, ``"sql_error"``, ``"unavailable"`` (moved on
        to the next provider) or ``"outcome_unknown"``. Called on the hot
        path, and only for listeners that override it: keep it cheap.
        """


class Dispatcher:
    """Calls every listener, isolating their failures."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners: tuple[Listener, ...] = ()
        #: Listeners that override `Listener.on_query`, checked per statement.
        self.query_listeners: tuple[Listener, ...] = ()
        for listener in listeners:
            self.add(listener)

    def add(self, listener: Listener) -> None:
        self._listeners = (*self._listeners, listener)
        if type(listener).on_query is not Listener.on_query:
            self.query_listeners = (*self.query_listeners, listener)

    def remove(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)
        self.query_listeners = tuple(x for x in self.query_listeners if x is not listener)

    def query_error(self, provider: str, error: BaseException) -> None:
        self.emit(lambda li: li.on_query_error(provider, error))

    def query_done(self, provider: str, seconds: float, outcome: str) -> None:
        for listener in self.query_listeners:
            try:
                listener.on_query(provider, seconds, outcome)
            except Exception:
                logger.exception("listener %r failed", listener)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, call: Callable[[Listener], object]) -> None:
        for listener in self._listeners:
            try:
                call(listener)
            except Exception:
                logger.exception("listener %r failed", listener)

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

    def on_query_error(self, provider: str, error: BaseException) -> None:
        """A statement failed on a provider (SQL error or unavailability)."""


class Dispatcher:
    """Calls every listener, isolating their failures."""

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self._listeners: tuple[Listener, ...] = tuple(listeners)

    def add(self, listener: Listener) -> None:
        self._listeners = (*self._listeners, listener)

    def remove(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def emit(self, call: Callable[[Listener], object]) -> None:
        for listener in self._listeners:
            try:
                call(listener)
            except Exception:
                logger.exception("listener %r failed", listener)

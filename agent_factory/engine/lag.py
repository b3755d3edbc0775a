"""Replication lag of a publisher's subscribers, read at each probe of the publisher.

No I/O: the health's probe hands over what it read (each subscriber's
received position, the publisher's WAL position), and `LagMonitor` turns it
into seconds on the WAL clock (see `walclock`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .walclock import WalClock

__all__ = ["SUBSCRIPTION_PREFIX", "Lag", "LagMonitor"]

#: Our subscriptions (and their application_name) are ``agent_factory_<backup>``.
SUBSCRIPTION_PREFIX = "agent_factory_"


class Lag(NamedTuple):
    """A subscriber's replication lag, as its publisher saw it at ``measured_at``.

    ``bytes``: how far its received (applied) position is behind the publisher's WAL;
    ``seconds``: how old the publisher's WAL at that position is (see walclock).
    """

    bytes: int | None
    seconds: float
    measured_at: float


class LagMonitor:
    """The last lag of each subscriber, and every subscriber ever seen.

    Subscribers reconnect a while after a publisher's restart, so one that is
    missing from a probe is still remembered in ``subscribers``.
    """

    def __init__(self) -> None:
        self.replication: dict[str, Lag] = {}
        self.subscribers: set[str] = set()
        self._clock = WalClock()

    def record(self, subscribers: list[list[Any]], position: int | None, now: float) -> None:
        """Each subscriber's lag, read on the WAL clock at its received position.

        A logical subscriber applies each change as it receives it, so its
        ``write_lsn`` is what it has applied (a transaction it is stuck in
        included, not committed). Not ``replay_lsn`` or ``replay_lag``: they
        also wait for the subscriber's own asynchronous flush and its next
        status message (up to ``wal_receiver_status_interval``, 10 s), so an
        idle, caught-up subscriber would look seconds behind; and replay_lag
        is NULL most of the time and keeps its last value while a subscriber
        is stuck. One that has not reported a position yet has no known lag
        (left out: writes to it count as stale).
        """
        clock = self._clock
        if position is not None:
            clock.record(now, position)
        lags = {}
        for app, received in subscribers:
            name = app.removeprefix(SUBSCRIPTION_PREFIX)
            self.subscribers.add(name)
            if received is None or position is None:
                continue
            seconds = clock.lag(received)
            if seconds is not None:
                lags[name] = Lag(max(0, position - received), seconds, now)
        self.replication = lags

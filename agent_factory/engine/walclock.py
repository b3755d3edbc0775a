"""Replication lag in seconds from WAL positions, the way the walsender measures it.

PostgreSQL's `pg_stat_replication.replay_lag` is NULL for a logical
subscriber most of the time (also under a steady write load), so it cannot
bound how much a backup would miss. Like the walsender's own lag tracker,
`WalClock` keeps samples of the primary's WAL position over time (one per
health probe) and reads a subscriber's lag as the age of the primary's WAL at
the position the subscriber has applied: the time the primary was there,
interpolated between the two samples around it. No I/O.
"""

from __future__ import annotations

import bisect
import collections

# Samples older than this are dropped: a subscriber further behind is
# reported as at least this much behind.
KEEP_SECONDS = 900.0
MAX_SAMPLES = 4096


class WalClock:
    """(time, WAL position) samples of one primary, oldest first."""

    def __init__(self, keep: float = KEEP_SECONDS, max_samples: int = MAX_SAMPLES) -> None:
        self._keep = keep
        self._times: collections.deque[float] = collections.deque(maxlen=max_samples)
        self._positions: collections.deque[int] = collections.deque(maxlen=max_samples)

    def record(self, t: float, position: int) -> None:
        """The primary's WAL was at ``position`` (bytes) at time ``t``."""
        if self._positions and position < self._positions[-1]:
            # The WAL went backwards: another server (restored, replaced).
            self._times.clear()
            self._positions.clear()
        self._times.append(t)
        self._positions.append(position)
        while self._times and self._times[0] < t - self._keep and len(self._times) > 2:
            self._times.popleft()
            self._positions.popleft()

    def lag(self, replayed: int) -> float | None:
        """Seconds between the latest sample and when the primary's WAL was at ``replayed``.

        0 when the subscriber has replayed everything up to the latest sample;
        for a subscriber behind every sample, the age of the oldest one (a
        lower bound). None before any sample.
        """
        if not self._positions:
            return None
        now = self._times[-1]
        after = bisect.bisect_right(self._positions, replayed)
        if after == len(self._positions):
            return 0.0
        if after == 0:
            return now - self._times[0]
        t0, p0 = self._times[after - 1], self._positions[after - 1]
        t1, p1 = self._times[after], self._positions[after]
        # The WAL stood at p0 until t0 at least and reached p1 by t1.
        at = t0 + (t1 - t0) * (replayed - p0) / (p1 - p0)
        return max(0.0, now - at)

    def __len__(self) -> int:
        return len(self._positions)

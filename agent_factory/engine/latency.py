"""A provider's measured round trip: a moving average and a p99 over recent probes."""

from __future__ import annotations

import collections
import math

__all__ = ["Latency"]


class Latency:
    """The last ``keep`` probe round trips (seconds); no I/O."""

    def __init__(self, keep: int = 200) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=keep)
        #: Exponential moving average (weight 0.2 to the newest); None before any.
        self.ewma: float | None = None
        #: `p99()` as of the last sample: read on every hedgeable read, computed per probe.
        self.recent_p99: float | None = None

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        ewma = self.ewma
        self.ewma = seconds if ewma is None else 0.8 * ewma + 0.2 * seconds
        self.recent_p99 = self.p99()

    def p99(self) -> float | None:
        ordered = sorted(self._samples)
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

"""A connector's recent throughput: events per second over the last few whole seconds."""

from __future__ import annotations

import time
from collections import deque

#: Rates are averaged over this many seconds.
RATE_WINDOW_S = 10


class RateMeter:
    """Counts events in per-second buckets (monotonic clock) and answers their recent rate; over
    less than the window right after ``restart``, so a fresh connector does not read low."""

    def __init__(self, window_s: int = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._buckets: deque[list[int]] = deque()
        self._started = time.monotonic()

    def restart(self) -> None:
        """Measure the rate from now (the connector started)."""
        self._started = time.monotonic()

    def count(self) -> None:
        """One event, now."""
        second = int(time.monotonic())
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
            return
        buckets.append([second, 1])
        while buckets[0][0] <= second - self.window_s:
            buckets.popleft()

    def per_s(self) -> float:
        """Events per second over the last ``window_s`` seconds (or since the start, if shorter)."""
        now = time.monotonic()
        second = int(now)
        recent = sum(count for start, count in self._buckets if start > second - self.window_s)
        return recent / min(float(self.window_s), max(now - self._started, 1e-3))

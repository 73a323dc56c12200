"""Throughput over a sliding window: what ``pervade status`` and the metrics call claims per second."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: Seconds of history a rate is computed over: long enough to smooth the bursts of a worker finishing a
#: run of batches at once, short enough to show a slowdown within half a minute.
RATE_WINDOW_S = 30


class RateMeter:
    """Events per second over the last ``window_s`` seconds, kept in one-second buckets: O(1) to record,
    O(window) to read, whatever the event rate."""

    def __init__(self, window_s: int = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1")
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._buckets: deque[list[int]] = deque()  # [second, count], oldest first
        self.total = 0

    def add(self, count: int) -> None:
        second = int(self._clock())
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([second, count])
            self._forget_before(second - self.window_s)
        self.total += count

    def rate(self) -> float:
        """Events per second over the window (over the meter's lifetime while it is younger than that)."""
        now = self._clock()
        self._forget_before(int(now) - self.window_s)
        span = min(float(self.window_s), now - self._started)
        return sum(count for _, count in self._buckets) / max(span, 1.0)

    def _forget_before(self, second: int) -> None:
        while self._buckets and self._buckets[0][0] <= second:
            self._buckets.popleft()


class ComputePace:
    """Claims per second of a worker's own compute: the claims of its results over the time its runs took
    (the batches of one run share their start and finish; the run's time is counted once). How fast its
    device is, whatever share of the work it was given: a starved worker's throughput is low, its pace is not."""

    def __init__(self) -> None:
        self.claims = 0
        self.seconds = 0.0
        self._last_run: tuple[float, float] | None = None

    def add(self, claims: int, started_at: float, finished_at: float) -> None:
        """A result of ``claims`` claims, of the run that started and finished then; one without a duration
        says nothing of the pace and is left out."""
        if finished_at <= started_at:
            return
        run = (started_at, finished_at)
        if run != self._last_run:
            self._last_run = run
            self.seconds += finished_at - started_at
        self.claims += claims

    def per_second(self) -> float | None:
        """Claims per second of compute; None until a run with a duration was seen."""
        return self.claims / self.seconds if self.seconds > 0 else None

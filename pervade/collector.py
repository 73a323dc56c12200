"""The garbage collector as the pipeline's long-running processes set it (broker, sink, ``pervade produce``)."""

from __future__ import annotations

import gc

#: Allocations between two collections of the young generation (Python's default is 700).
YOUNG_THRESHOLD = 50_000


def collect_garbage_rarely(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """These processes allocate a few dozen objects per message (a decoded batch, its claims or verdicts) and
    free them by reference counting: their data holds no cycles. At the collector's default threshold (700
    allocations) they collected thousands of times a second, each time walking what they keep (the broker's
    peers and rows in flight, a sink's buffered rows, every module loaded): in the sink at batch size 32 that
    walk showed as two thirds of the time spent decoding deliveries. What a process holds once started is
    frozen out of the collector's walks, and the young generation is collected every ``young_threshold``
    allocations instead: cycles, if any, are still found.

    For a process's entry point only (a command, once what it starts with is loaded): a library call (the
    producer's API in a user's script) leaves the user's collector alone. Garbage made while starting is
    collected first, not frozen for the process's life."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)

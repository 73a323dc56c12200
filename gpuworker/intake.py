"""What a worker holds between the broker and the device: the queue of orders, and how much it asks for.

The producer's batch size is the user's choice (1 claim or 512), the device's best batch is the hardware's.
The worker bridges the two: it asks the broker for enough batches to hold a few runs' worth of claims
(``CreditWindow``; a run is a device pass, or 256 claims if that is more), and the compute loop takes a run
of queued batches of the same context and template at once (``WorkQueue.take_run``: the run skips batches
of other templates, which keep their places; a producer sends the claims it read a template at a time, so
they seldom interleave) and scores them as one, cut into micro-batches for the device. One large batch is
never held back, and many small ones never cost a forward pass each.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

#: Largest window in batches: what one worker may hold at once however small the batches are.
MAX_WINDOW_BATCHES = 4096
#: Largest credit one Pull may grant (the protocol's bound).
MAX_PULL_CREDIT = 1024
#: Fewest claims a run aims at, however small the device's pass: a run costs some Python per call, and
#: the engine cuts it into passes anyway.
MIN_RUN_CLAIMS = 256
#: Runs' worth of claims a worker holds: one computing, one behind it. Four made the runs of interleaved
#: templates fuller (RQ2, docs/benchmarks.md), but a worker holding that much starved late joiners: a new
#: worker found the queue empty (test_slurm, test_chaos). There is no work stealing yet.
WINDOW_RUNS = 2

Item = TypeVar("Item")


class WorkQueue(Generic[Item]):
    """Orders in arrival order. ``size_of`` gives an order's claims (0 for a LoadContext)."""

    def __init__(self, size_of: Callable[[Item], int]) -> None:
        self._items: deque[Item] = deque()
        self._size_of = size_of
        self._arrived = asyncio.Event()

    def put(self, item: Item) -> None:
        self._items.append(item)
        self._arrived.set()

    async def get(self, timeout_s: float) -> Item | None:
        """The oldest order, waiting up to ``timeout_s`` for one; None if none came."""
        if not self._items:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout_s)
            except TimeoutError:
                return None
        return self._items.popleft() if self._items else None

    def take_run(
        self, belongs: Callable[[Item], bool], barrier: Callable[[Item], bool], claims_limit: int, claims_so_far: int
    ) -> list[Item]:
        """Queued orders that ``belongs`` to the run being built, oldest first, until the run would pass
        ``claims_limit`` claims. Orders that do not belong are skipped and keep their places; the scan stops
        at a ``barrier`` (a LoadContext: no batch behind it is taken before it)."""
        taken: list[Item] = []
        kept: list[Item] = []
        while self._items and not barrier(self._items[0]):
            item = self._items.popleft()
            if not belongs(item):
                kept.append(item)
                continue
            size = self._size_of(item)
            if claims_so_far + size > claims_limit:
                kept.append(item)
                break
            taken.append(item)
            claims_so_far += size
        self._items.extendleft(reversed(kept))
        return taken

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items)

    def drain(self) -> list[Item]:
        taken = list(self._items)
        self._items.clear()
        return taken

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class CreditWindow:
    """How many batches to ask the broker for, so the worker holds about ``WINDOW_RUNS`` runs of
    ``run_claims`` claims whatever the producer's batch size, and never fewer than ``min_batches`` batches.
    Counted in the producer's batches: a slice of many (``pervade.protocol.Batch``) uses a credit for each.

    ``outstanding`` is credit granted and not yet used by an Assign; the broker forgets it when the worker
    reconnects (``reset``)."""

    min_batches: int
    #: Claims the compute loop puts in one run (the worker sets it from its device's pass).
    run_claims: int = MIN_RUN_CLAIMS
    outstanding: int = 0
    #: Mean claims per batch seen so far (None until a batch arrives).
    claims_per_batch: float | None = None
    _seen: int = field(default=0, repr=False)

    @property
    def claims_wanted(self) -> int:
        return WINDOW_RUNS * self.run_claims

    def reset(self) -> None:
        self.outstanding = 0

    def arrived(self, claims: int, batches: int = 1) -> None:
        """An Assign of ``claims`` claims in ``batches`` producer batches (a slice holds many) used a credit per
        batch, as the broker counts it (never below zero: it charges no more than it was granted)."""
        self.outstanding = max(0, self.outstanding - batches)
        self._seen += 1
        mean, size = self.claims_per_batch, claims / batches
        self.claims_per_batch = size if mean is None else mean + (size - mean) / min(self._seen, 64)

    @property
    def batches_wanted(self) -> int:
        if self.claims_per_batch is None:
            return self.min_batches
        batches = math.ceil(self.claims_wanted / max(self.claims_per_batch, 1.0))
        return max(self.min_batches, min(MAX_WINDOW_BATCHES, batches))

    def top_up(self, held: int) -> int:
        """Credit to grant now, given ``held`` batches queued or computing: none until the shortfall is an
        eighth of the window (so that tiny batches do not cost a Pull each), then all of it."""
        wanted = self.batches_wanted
        shortfall = wanted - held - self.outstanding
        if shortfall < max(1, wanted // 8):
            return 0
        grant = min(shortfall, MAX_PULL_CREDIT)
        self.outstanding += grant
        return grant

"""The producer's send window: how much may be in flight without the broker's acknowledgement.

Two bounds, both in force: batches (``max_batches``) and pairs (``max_pairs``). Pairs are what the broker and
the network carry, so they bound the memory a producer holds for resends whatever the batch size; batches
bound the broker's per-batch bookkeeping. A window counted in batches alone made the batch size a speed knob:
16 batches in flight is 8,192 pairs at batch size 512 but 16 at batch size 1, one round trip per 16 claims.
A batch larger than ``max_pairs`` on its own is let through when nothing else is in flight, so any batch size
can be sent.
"""

from __future__ import annotations

import asyncio

from pervade.errors import ConfigError

#: Batches a producer keeps in flight without an acknowledgement, by default.
DEFAULT_MAX_UNACKED = 4096
#: Pairs (claim x template) a producer keeps in flight without an acknowledgement, by default.
DEFAULT_MAX_UNACKED_PAIRS = 16_384


class SendWindow:
    """Counts what is in flight; ``acquire`` waits for room, ``try_acquire`` takes it only if free now."""

    def __init__(self, max_batches: int = DEFAULT_MAX_UNACKED, max_pairs: int = DEFAULT_MAX_UNACKED_PAIRS) -> None:
        if max_batches < 1:
            raise ConfigError("max_unacked must be at least 1")
        if max_pairs < 1:
            raise ConfigError("max_unacked_pairs must be at least 1")
        self.max_batches = max_batches
        self.max_pairs = max_pairs
        self.batches = 0
        self.pairs = 0
        self._room = asyncio.Event()
        self._room.set()

    def fits(self, pairs: int) -> bool:
        if self.batches == 0:
            return True  # one batch always goes, however large
        return self.batches < self.max_batches and self.pairs + pairs <= self.max_pairs

    def try_acquire(self, pairs: int) -> bool:
        """Take room for a batch of ``pairs`` if there is some now."""
        if not self.fits(pairs):
            return False
        self.batches += 1
        self.pairs += pairs
        return True

    async def acquire(self, pairs: int) -> None:
        """Wait until a batch of ``pairs`` fits, and take its room."""
        while not self.try_acquire(pairs):
            self._room.clear()
            await self._room.wait()

    def release(self, pairs: int) -> None:
        """A batch of ``pairs`` was answered."""
        self.batches = max(0, self.batches - 1)
        self.pairs = max(0, self.pairs - pairs)
        self._room.set()

    def clear(self) -> None:
        """Nothing is in flight any more (the broker refused what it could not name)."""
        self.batches = self.pairs = 0
        self._room.set()

"""The broker's orders as the worker holds them: a context to load, or a batch to score, each tagged with the
connection it came on (work from an older connection is stale: the broker requeued it)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from pervade.gpuworker.engine import EncodedClaims
from pervade.protocol import Assign, Batch, LoadContext, member_spans


@dataclass
class LoadOrder:
    """Load a context (and evict the ones the broker names). Queued in order with the batches: no batch behind
    it is scored before it."""

    load: LoadContext
    generation: int

    @property
    def claims(self) -> int:
        return 0

    @property
    def batches(self) -> int:
        """What it counts for in the credit window: an order, like a batch."""
        return 1


@dataclass
class BatchWork:
    """A batch to score. A batch for a resident context is tokenized as soon as it arrives, on the tokenizer
    thread (``encoding``), while the device computes."""

    assign: Assign
    generation: int
    #: The batch's tokens, once the encode loop has them (None inside: tokenize it alone).
    encoding: asyncio.Future[EncodedClaims | None] | None = None

    @property
    def batch(self) -> Batch:
        return self.assign.batch

    @property
    def batch_id(self) -> str:
        return self.assign.batch.batch_id

    @property
    def context_id(self) -> str:
        return self.assign.batch.context.context_id

    @property
    def claims(self) -> int:
        return len(self.assign.batch.claims)

    @property
    def texts(self) -> list[str]:
        return [claim.text for claim in self.assign.batch.claims]

    @property
    def batches(self) -> int:
        """The producer's batches it holds: a slice's members, or 1."""
        return len(self.assign.batch.members) or 1

    def spans(self) -> list[tuple[int, int]]:
        """Each producer batch's claims, as (start, end) offsets: a slice's members in order, or the whole."""
        return member_spans(self.assign.batch.members) or [(0, self.claims)]

    def same_run(self, first: BatchWork) -> bool:
        """Whether this batch may be tokenized and scored in one call with ``first``: same context and template."""
        return self.batch.template == first.batch.template and self.context_id == first.context_id


Order = LoadOrder | BatchWork


@dataclass
class InHand:
    """The orders the compute loop is working on, and since when (leaving judges whether they fit the grace)."""

    orders: list[Order] = field(default_factory=list)
    since: float = 0.0


def batch_ids(orders: list[Order]) -> list[str]:
    """The batch ids among ``orders`` (a load order has none)."""
    return [order.batch_id for order in orders if isinstance(order, BatchWork)]

"""What the broker knows about its peers, batches and jobs. Plain records; the broker's verbs mutate them."""

from __future__ import annotations

import enum
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from pervade.context import ContextSpec
from pervade.protocol import Batch, BatchResult, DeviceInfo


class BatchStatus(enum.Enum):
    QUEUED = "queued"  # waiting in its context's queue
    ASSIGNED = "assigned"  # sent to a worker, no answer yet
    COMPLETED = "completed"  # verdicts in hand, not yet with a sink
    DELIVERED = "delivered"  # sent to a sink, not yet durable
    WRITTEN = "written"  # a sink acknowledged it durably written
    FAILED = "failed"  # gave up after repeated failures


@dataclass
class BatchRecord:
    batch: Batch
    status: BatchStatus = BatchStatus.QUEUED
    attempts: int = 0
    worker: bytes | None = None
    sink: bytes | None = None
    result: BatchResult | None = None
    error: str = ""

    @property
    def context_id(self) -> str:
        return self.batch.context.context_id


@dataclass
class WorkerRecord:
    identity: bytes
    worker_id: str
    host: str
    device: DeviceInfo
    #: How many contexts fit on the worker at once.
    max_contexts: int = 1
    #: Contexts the worker holds or is loading, least recently told to load first.
    contexts: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: Contexts this worker failed to load; never offered to it again.
    refused: set[str] = field(default_factory=set)
    credit: int = 0
    in_flight: set[str] = field(default_factory=set)
    batches_done: int = 0
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class SinkRecord:
    identity: bytes
    sink_id: str
    unacked: set[str] = field(default_factory=set)


@dataclass
class JobRecord:
    job_id: str
    producer: bytes
    total_batches: int | None = None
    total_pairs: int = 0
    written: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    done_reported: bool = False

    @property
    def complete(self) -> bool:
        return self.total_batches is not None and self.written + self.failed >= self.total_batches


@dataclass
class ContextQueues:
    """Queued batches per context, and the spec that names each context."""

    queues: dict[str, deque[str]] = field(default_factory=dict)
    specs: dict[str, ContextSpec] = field(default_factory=dict)

    def push(self, batch: Batch, front: bool = False) -> None:
        context_id = batch.context.context_id
        self.specs.setdefault(context_id, batch.context)
        queue = self.queues.setdefault(context_id, deque())
        if front:
            queue.appendleft(batch.batch_id)
        else:
            queue.append(batch.batch_id)

    def pop(self, context_id: str) -> str:
        return self.queues[context_id].popleft()

    def drain(self, context_id: str) -> list[str]:
        queue = self.queues.get(context_id, deque())
        drained = list(queue)
        queue.clear()
        return drained

    def pending(self) -> dict[str, int]:
        return {c: len(q) for c, q in self.queues.items() if q}

    def total(self) -> int:
        return sum(len(q) for q in self.queues.values())

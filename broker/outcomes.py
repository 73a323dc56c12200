"""What happens to a batch once a worker had it, in one place: requeued (not its fault), retried or failed
(its fault, up to ``max_attempts``), or complete. Either outcome, verdicts or failure, goes on to a sink
(``broker/sinks.py``)."""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from pervade.broker.sinks import Sinks
from pervade.broker.state import BrokerState
from pervade.broker.store import StoredBatch
from pervade.protocol import BatchResult

log = structlog.get_logger("broker")


class Outcomes:
    def __init__(self, state: BrokerState, sinks: Sinks) -> None:
        self.state = state
        self.sinks = sinks

    def requeue(self, row: StoredBatch, counted_as: str = "requeues") -> None:
        """Back to the front of its queue, no attempt charged: the worker left, died waiting behind another
        batch, could not load the context, or handed it back (``counted_as="released"``), none of which is
        the batch's fault."""
        self.state.store.requeue(row, count_attempt=False)
        self.state.counters[counted_as] += 1

    def retry_or_fail(self, row: StoredBatch, error: str) -> None:
        """The attempt failed: requeue the batch, or give up on it after ``max_attempts``."""
        if row.attempts >= self.state.config.max_attempts:
            self.fail(row, error)
        else:
            self.state.store.requeue(row, count_attempt=True)
            self.state.counters["requeues"] += 1

    def fail(self, row: StoredBatch, error: str) -> None:
        """Give up on a batch: its failure goes to a sink to be recorded, like a result."""
        error = f"{error} (attempts: {row.attempts})"
        self.state.store.fail(row, error)
        self.state.given_to.pop(row.batch_id, None)
        self.state.counters["batches_failed"] += 1
        log.error("batch_given_up", batch_id=row.batch_id, error=error)
        self.sinks.deliver(row.batch_id)

    def fail_all(self, batch_ids: Iterable[str], error: str) -> None:
        """Give up on queued batches nothing can run (their job aborted, their context loads nowhere)."""
        for batch_id in batch_ids:
            row = self.state.store.get(batch_id)
            if row is not None:
                self.fail(row, error)

    def complete(self, row: StoredBatch, result: BatchResult, by: bytes) -> None:
        """Keep the first result of a batch, from whichever worker (``by``): a late reply from a worker the
        batch was taken from is as good as any. Then it goes to a sink."""
        state = self.state
        if row.worker != by:
            state.counters["late_results_accepted"] += 1
            holder = state.workers.get(row.worker or b"")
            if holder is not None:
                holder.in_flight.pop(row.batch_id, None)  # its own answer will be a duplicate
        row = state.store.complete(row, result)
        state.given_to.pop(row.batch_id, None)
        state.load_deaths.pop(row.context_id, None)  # the context works: earlier load deaths were bad luck
        claims = len(result.verdicts)
        state.throughput.add(claims)
        state.counters["claims_completed"] += claims
        worker = state.workers.get(by)
        if worker is not None:
            worker.batches_done += 1
            worker.claims.add(claims)
        self.sinks.deliver_row(row, result)

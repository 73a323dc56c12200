"""A worker's result checked against its batch before it counts: one that answers another batch is refused
(its batch requeued), one timed by a clock set wrong is moved onto the broker's clock, and each is stamped with
the name of the key that sent it."""

from __future__ import annotations

import time

import msgspec
import structlog

from pervade.broker.constants import MAX_CLOCK_AHEAD_S, MAX_RESULT_AGE_S
from pervade.broker.outcomes import Outcomes
from pervade.broker.records import WorkerRecord
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, StoredBatch
from pervade.protocol import Batch, BatchResult

log = structlog.get_logger("broker")


def plausible_time(at: float) -> bool:
    """Whether a peer's timestamp can be true on the broker's clock (see MAX_CLOCK_AHEAD_S)."""
    now = time.time()
    return now - MAX_RESULT_AGE_S <= at <= now + MAX_CLOCK_AHEAD_S


class Results:
    def __init__(self, state: BrokerState, outcomes: Outcomes) -> None:
        self.state = state
        self.outcomes = outcomes

    def mismatch(self, row: StoredBatch, batch: Batch, result: BatchResult) -> str | None:
        """Why ``result`` cannot be the answer to the stored batch (``row``, ``batch``), or None when it can.
        With keys, only a key the batch was assigned to may answer it (a worker key cannot answer batches it
        never got)."""
        sender = self.state.sender
        if sender is not None and sender.public not in self.state.given_to.get(row.batch_id, ()):
            return f"result for {row.batch_id!r} from the key {sender}, which it was never assigned to"
        if (result.job_id, result.context_id, result.template_id) != (batch.job_id, row.context_id, batch.template_id):
            return f"result for {row.batch_id!r} names another job, context or template"
        if [v.claim_id for v in result.verdicts] != [c.claim_id for c in batch.claims]:
            return f"result for {row.batch_id!r} does not answer exactly the batch's claims"
        return None

    def refuse(self, identity: bytes, batch_id: str, reason: str) -> None:
        """A result the broker cannot take: the batch must not stay assigned to a worker that believes it
        answered. Requeued (or failed after its attempts); the caller tells the worker why."""
        worker = self.state.workers.get(identity)
        if worker is not None:
            worker.in_flight.pop(batch_id, None)  # it believes it answered: it will not answer again
        row = self.state.store.get(batch_id)
        if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != identity:
            return
        self.state.counters["results_refused"] += 1
        log.error("result_refused", batch_id=row.batch_id, worker_id=worker.name if worker else None, reason=reason)
        self.outcomes.retry_or_fail(row, f"its result was refused: {reason}")

    def stamped(self, result: BatchResult) -> BatchResult:
        """The result naming the key that sent it (its name, from the connection's authentication), whatever
        the worker wrote there: an operator traces every row to a key, and discards a compromised one's."""
        sender = self.state.sender
        key_name = sender.name if sender is not None else ""
        return result if result.worker_key == key_name else msgspec.structs.replace(result, worker_key=key_name)

    def on_broker_clock(self, result: BatchResult, worker: WorkerRecord | None) -> BatchResult:
        """A result timed by a clock set wrong is kept, its times moved onto the broker's clock (its
        duration kept), and the skew noted once per worker, so the output's timeline stays true."""
        if plausible_time(result.finished_at) and result.started_at <= result.finished_at:
            return result
        now = time.time()
        duration = result.finished_at - result.started_at
        duration = duration if 0 <= duration <= MAX_RESULT_AGE_S else 0.0
        self.state.counters["clock_skew_corrected"] += 1
        if worker is None or not worker.clock_skewed:
            log.warning(
                "worker_clock_skewed", worker_id=result.worker_id, skew_s=round(now - result.finished_at, 1),
                hint="the worker's clock is wrong: its results are kept, timed on the broker's clock",
            )  # fmt: skip
            if worker is not None:
                worker.clock_skewed = True
        return msgspec.structs.replace(result, started_at=now - duration, finished_at=now)

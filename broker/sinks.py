"""A sink's verbs, and the delivery of batch outcomes to sinks: register, take a batch's verdicts or
failure (``Deliver``, ``DeliverFailure``), acknowledge it durably written (``SinkAck``), and hear that nothing
more is coming (``RollNow``), so it need not wait for its idle roll.

A batch with an outcome goes to a sink round robin; until the sink acknowledges it the broker keeps it and
delivers it again if the sink leaves. Acknowledged batches count towards their job, which is reported done
(``broker/job_reports.py``) once every batch is written.
"""

from __future__ import annotations

import structlog

from pervade.broker.constants import DELIVER_PER_TURN, MAX_JOB_ERRORS, REGISTER_AGAIN, ROLL_NOW_MIN_INTERVAL_S
from pervade.broker.job_reports import JobReports
from pervade.broker.outbox import Outbox
from pervade.broker.records import SinkRecord
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, JobRecord, StoredBatch
from pervade.protocol import (
    BatchFailure,
    BatchResult,
    Deliver,
    DeliverFailure,
    Disconnect,
    RollNow,
    SinkAck,
    SinkReady,
)

log = structlog.get_logger("broker")


class Sinks:
    def __init__(self, state: BrokerState, outbox: Outbox, reports: JobReports) -> None:
        self.state = state
        self.outbox = outbox
        self.reports = reports
        self._next_sink = 0

    def on_sink_ready(self, identity: bytes, message: SinkReady) -> None:
        sinks = self.state.sinks
        key = self.state.sender  # a name is a key's own, as for workers
        stale = [s for s in sinks.values() if s.name == message.sink_id and s.key == key or s.identity == identity]
        for old in stale:
            self.drop_sink(old, "registered again")
        sinks[identity] = SinkRecord(
            identity=identity, name=message.sink_id, instance=message.instance, key=self.state.sender
        )
        log.info("sink_joined", sink_id=message.sink_id)
        jobs = self.state.jobs
        finished = [job for job in jobs.values() if job.done_reported]
        if finished and len(finished) == len(jobs):  # it may have missed the last job_done
            self.reports.report_if_complete(finished[-1], again=True, to_producer=False)

    def drop_sink(self, sink: SinkRecord, reason: str) -> None:
        """Forget a sink; what it had not acknowledged is delivered again (to it or another sink)."""
        store = self.state.store
        self.state.sinks.pop(sink.identity, None)
        for batch_id in sorted(sink.unacked):
            row = store.get(batch_id)
            if row is not None and row.status is BatchStatus.DELIVERED and row.sink == sink.identity:
                store.undeliver(row)
                self.state.counters["redeliveries"] += 1
        log.info("sink_left", sink_id=sink.name, reason=reason, unacked=len(sink.unacked))
        sink.unacked.clear()

    def deliver_held(self) -> None:
        """Deliver outcomes held back (no sink, a failed send, a sink that left)."""
        for batch_id in self.state.store.done_ids(DELIVER_PER_TURN):
            self.deliver(batch_id)

    def deliver(self, batch_id: str, result: BatchResult | None = None) -> None:
        """Hand a done batch (verdicts or failure) to a sink, round robin; without sinks it waits.
        ``result``: the verdicts just stored, if at hand (saves reading them back)."""
        if not self.state.sinks:
            return
        row = self.state.store.get(batch_id)
        if row is not None:
            self.deliver_row(row, result)

    def deliver_row(self, row: StoredBatch, result: BatchResult | None = None) -> None:
        """``deliver``, with the batch's row at hand (as it is now: only an outcome not yet with a sink goes)."""
        if not self.state.sinks or row.status is not BatchStatus.DONE:
            return
        batch_id = row.batch_id
        sinks = list(self.state.sinks.values())
        sink = sinks[self._next_sink % len(sinks)]
        self._next_sink += 1
        message = self.delivery_for(row, result)
        self.state.store.deliver(row, sink.identity)
        if sink.key is not None:
            self.state.delivered_to.setdefault(batch_id, set()).add(sink.key.public)
        sink.unacked.add(batch_id)
        sink.delivered_jobs.add(row.job_id)
        sink.awaiting_roll = True
        self.outbox.post(sink.identity, message, on_fail=lambda: self.undeliver(batch_id, sink))

    def roll_now_if_nothing_more(self, now: float) -> None:
        """Tell each sink delivered to since it was last told (``RollNow``) to make what it holds durable now,
        when nothing more is on its way: no batch is queued, running or waiting for a sink, and every job of
        what it was delivered is ended. A job still being submitted may bring more: its sink waits for its
        idle roll rather than close a file per batch. At most one hint per sink every
        ``ROLL_NOW_MIN_INTERVAL_S``. Called once per turn: a few counter reads unless some sink waits."""
        counts = self.state.store.status_counts
        if counts[BatchStatus.QUEUED] or counts[BatchStatus.ASSIGNED] or counts[BatchStatus.DONE]:
            return
        jobs = self.state.jobs
        for sink in self.state.sinks.values():
            if not sink.awaiting_roll or now - sink.told_to_roll_at < ROLL_NOW_MIN_INTERVAL_S:
                continue
            if all(job_id not in jobs or jobs[job_id].ended for job_id in sink.delivered_jobs):
                sink.awaiting_roll, sink.told_to_roll_at = False, now
                self.outbox.post(sink.identity, RollNow(), on_fail=lambda sink=sink: self._roll_not_told(sink))

    @staticmethod
    def _roll_not_told(sink: SinkRecord) -> None:
        """A ``RollNow`` that could not be sent (the sink not keeping up): told again at the next chance."""
        sink.awaiting_roll, sink.told_to_roll_at = True, float("-inf")

    def delivery_for(self, row: StoredBatch, result: BatchResult | None = None) -> Deliver | DeliverFailure:
        store = self.state.store
        redelivery = row.deliveries > 0
        if row.error is None:
            members = store.batch(row.batch_id).members if row.members else []  # a slice: whose rows are whose
            return Deliver(result=result or store.result(row.batch_id), redelivery=redelivery, members=members)
        batch = store.batch(row.batch_id)
        failure = BatchFailure(
            batch_id=row.batch_id, job_id=row.job_id, context_id=row.context_id, model=batch.context.model,
            template_id=batch.template_id, claim_ids=[c.claim_id for c in batch.claims], error=row.error,
            attempts=row.attempts,
        )  # fmt: skip
        return DeliverFailure(failure=failure, redelivery=redelivery)

    def undeliver(self, batch_id: str, sink: SinkRecord) -> None:
        store = self.state.store
        row = store.get(batch_id)
        if row is not None and row.status is BatchStatus.DELIVERED and row.sink == sink.identity:
            store.undeliver(row)
            sink.unacked.discard(batch_id)

    def on_sink_ack(self, identity: bytes, message: SinkAck) -> None:
        """Durable in a sink's output. Accepted from any sink, even one the broker has since forgotten:
        the rows are on disk either way. With keys, only from a sink key the batch was delivered to: a
        batch delivered to none since the broker started is delivered again, and acknowledged then."""
        store, sender = self.state.store, self.state.sender
        touched: dict[str, JobRecord] = {}
        for batch_id in message.batch_ids:
            row = store.get(batch_id)
            if row is None or row.status not in (BatchStatus.DELIVERED, BatchStatus.DONE):
                if row is None or row.status is not BatchStatus.WRITTEN:
                    log.warning("unexpected_sink_ack", batch_id=batch_id, status=row and row.status.value)
                continue
            if sender is not None and sender.public not in self.state.delivered_to.get(batch_id, ()):
                self.state.counters["sink_acks_refused"] += 1
                log.warning("sink_ack_refused", batch_id=batch_id, key=str(sender), reason="not delivered to this key")
                continue
            self.state.delivered_to.pop(batch_id, None)
            holder = self.state.sinks.get(row.sink or b"")
            if holder is not None:
                holder.unacked.discard(batch_id)
                if not holder.unacked:  # all it was delivered is durable: those jobs no longer concern it
                    holder.delivered_jobs.clear()
            store.written(row)
            job = self.state.jobs[row.job_id]
            if row.root is None:
                count_written(job, row)
            else:
                count_part_written(job, row, store.settle_part(row))
            touched[job.job_id] = job
        for job in touched.values():
            store.save_job(job)
            self.reports.report_if_complete(job)
        if identity not in self.state.sinks:
            self.outbox.post(identity, Disconnect(reason=REGISTER_AGAIN))


def count_part_written(job: JobRecord, part: StoredBatch, root: StoredBatch) -> None:
    """Count a part of a split batch a sink wrote: its pairs at once, and its root (the producer's batch, what
    the job counts in batches) once every part is written, failed if any part failed."""
    if part.failed:
        job.pairs_failed += part.pairs
    else:
        job.pairs_written += part.pairs
    if root.status is not BatchStatus.WRITTEN:
        return
    if root.failed:
        job.failed += 1
        if len(job.errors) < MAX_JOB_ERRORS:
            job.errors.append(f"{root.batch_id} (split): {root.error}")
    else:
        job.written += 1


def count_written(job: JobRecord, row: StoredBatch) -> None:
    """Count a batch a sink wrote towards its job: its verdicts, or its failure (with the error)."""
    if row.failed:
        job.failed += 1
        job.pairs_failed += row.pairs
        if len(job.errors) < MAX_JOB_ERRORS:
            job.errors.append(f"{row.batch_id}: {row.error}")
    else:
        job.written += row.weight  # a slice: the producer batches it holds
        job.pairs_written += row.pairs

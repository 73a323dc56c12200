"""A producer's verbs: register, submit batches, declare a context's model files, end or abort its job.

Where a claim's way through the broker begins: ``on_submit`` stores the batch in its context's queue
(``broker/scheduler.py`` hands it to a worker) and answers Accepted once that is committed.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from pervade.broker.job_reports import JobReports
from pervade.broker.outbox import Outbox
from pervade.broker.outcomes import Outcomes
from pervade.broker.records import ProducerRecord
from pervade.broker.results import plausible_time
from pervade.broker.state import BrokerState
from pervade.broker.store import JobRecord, same_content
from pervade.errors import ConfigError, ProtocolError
from pervade.protocol import (
    PART_MARK,
    AbortJob,
    Accepted,
    Batch,
    DeclareContext,
    EndJob,
    JobEnded,
    ProducerReady,
    Rejected,
    Submit,
    part_of,
)

log = structlog.get_logger("broker")


class Producers:
    def __init__(self, state: BrokerState, outbox: Outbox, outcomes: Outcomes, reports: JobReports) -> None:
        self.state = state
        self.outbox = outbox
        self.outcomes = outcomes
        self.reports = reports

    def on_producer_ready(self, identity: bytes, message: ProducerReady) -> None:
        self.state.producers[identity] = ProducerRecord(
            identity=identity, name=message.producer_id, key=self.state.sender
        )

    def on_submit(self, identity: bytes, message: Submit) -> None:
        state, store = self.state, self.state.store
        batch = message.batch
        if batch.members:  # refused before its job is opened: a job of such batches alone would stay open
            self.refuse_submission(identity, batch, "a producer's batch cannot name members: slices are the broker's")
            return
        # The sink reads a part's id as claims of another batch (sinks/coverage.py): the form is the broker's.
        if PART_MARK in batch.batch_id and part_of(batch.batch_id) is not None:
            reason = f"batch id {batch.batch_id} has the form of a split batch's part (ROOT~START-STOP), the broker's"
            self.refuse_submission(identity, batch, reason + ": rename the batch")
            return
        job = state.job(batch.job_id, identity)
        known = store.submitted(batch.batch_id)
        if known is not None:
            if known.is_slice:
                reason = (
                    f"batch id {batch.batch_id} is the broker's name for a slice of other batches: rename the batch"
                )
                self.refuse_submission(identity, batch, reason)
                return
            if known.content is not None and not same_content(known.content, batch):
                reason = (
                    f"batch id {batch.batch_id} was submitted before with other claims or another template: "
                    "a changed sweep needs a new job id"
                )
                self.refuse_submission(identity, batch, reason)
                return
            # A resend (the producer restarted, or lost our answer): acknowledged, never queued twice.
            state.counters["duplicate_submissions"] += 1
            self.outbox.post(identity, Accepted(batch_id=batch.batch_id, duplicate=True))
            return
        if job.ended:
            why = f"aborted ({job.aborted})" if job.aborted else "ended"
            reason = (
                f"job {batch.job_id} has {why} and does not hold this batch (a sweep that changed under the same "
                "job id?)"
            )
            self.refuse_submission(identity, batch, reason)
            return
        context_id = batch.context.context_id  # a hash: computed once
        if (rejection := self.unrunnable(batch, context_id)) is not None:
            self.outbox.post(identity, Rejected(batch_id=batch.batch_id, reason=rejection))
            return
        if context_id not in state.specs:
            state.specs[context_id] = batch.context
            store.save_context(batch.context)
        if not plausible_time(batch.submitted_at):
            state.counters["clock_skew_corrected"] += 1
            log.warning(
                "producer_clock_skewed", batch_id=batch.batch_id, skew_s=round(time.time() - batch.submitted_at)
            )
            batch = msgspec.structs.replace(batch, submitted_at=time.time())
        store.add(batch, context_id, state.config.slice_claims)
        state.drained_sent = False  # new work: the run is not over
        job.add(batch.batch_id, len(batch.claims))
        store.save_job(job)
        self.outbox.post(identity, Accepted(batch_id=batch.batch_id))

    def unrunnable(self, batch: Batch, context_id: str) -> str | None:
        """Why no worker could run the batch's context (``context_id``: undeclared files, or every worker
        failed to load it), or None."""
        if batch.context.files is not None and batch.context.files not in self.state.manifests:
            return f"the manifest of context {context_id} was not declared (declare_context first)"
        failure = self.state.failed_contexts.get(context_id)
        if failure is not None:
            return f"no worker can load this context: {failure}"
        return None

    def refuse_submission(self, identity: bytes, batch: Batch, reason: str) -> None:
        self.state.counters["conflicting_submissions"] += 1
        log.error("submission_refused", batch_id=batch.batch_id, reason=reason)
        self.outbox.post(identity, Rejected(batch_id=batch.batch_id, reason=reason))

    def on_declare_context(self, identity: bytes, message: DeclareContext) -> None:
        """Keep a context's manifest, so workers told to load it know its files, and note a context new to the
        broker: its batches follow, and idle workers may start loading it now (``Scheduler.prewarm``).
        Idempotent."""
        manifest = message.manifest
        if message.context.files != manifest.digest:
            raise ProtocolError("declare_context: the manifest's digest is not the context's files")
        if manifest.digest not in self.state.manifests:
            try:
                manifest.validate()
            except ConfigError as exc:
                raise ProtocolError(f"declare_context: {exc}") from None
            self.state.manifests[manifest.digest] = manifest
            self.state.store.save_manifest(manifest)
            log.info(
                "context_declared",
                context_id=message.context.context_id,
                files=len(manifest.files),
                bytes=manifest.total_bytes,
            )
        context_id = message.context.context_id
        if context_id not in self.state.specs:
            self.state.specs[context_id] = message.context
            self.state.store.save_context(message.context)
            self.state.declared.add(context_id)

    def on_end_job(self, identity: bytes, message: EndJob) -> None:
        """End the job if the broker holds exactly the batches the producer counted; otherwise say what it
        holds (an error: state was lost or replaced, or a job id reused) and keep the job open for the
        producer's resubmission. Every EndJob is answered: a re-run or a reconnected producer asks again."""
        job = self.state.job(message.job_id, identity)
        held = job.holds()
        agreed = (held.batches, held.pairs) == (message.batches, message.pairs) and (
            not message.digest or job.digest is None or message.digest == held.digest
        )
        self.outbox.post(identity, job_ended(job, agreed))
        if not agreed:
            self.state.counters["jobs_found_incomplete"] += 1
            log.error(
                "end_job_count_differs", job_id=job.job_id, producer_batches=message.batches,
                broker_batches=held.batches,
                producer_pairs=message.pairs, broker_pairs=held.pairs, same_ids=message.digest == held.digest,
                hint="the broker lost batches (damaged or replaced state), or the job id was reused: resubmitted",
            )  # fmt: skip
            return
        if not job.ended:
            job.ended = True
            self.state.store.save_job(job)
        self.reports.report_if_complete(job, again=True)

    def on_abort_job(self, identity: bytes, message: AbortJob) -> None:
        """The producer cannot finish the job: end it with what is here, record its queued batches failed,
        so it completes (with errors) and nobody waits for it."""
        job = self.state.job(message.job_id, identity)
        if not job.ended:
            job.ended, job.aborted = True, message.reason
            self.state.counters["jobs_aborted"] += 1
            log.error("job_aborted", job_id=job.job_id, reason=message.reason, batches=job.batches)
            queued = self.state.store.queued_ids_of_job(job.job_id)
            self.outcomes.fail_all(queued, f"job aborted by its producer: {message.reason}")
            self.state.store.save_job(job)
        self.outbox.post(identity, job_ended(job, agreed=True))
        self.reports.report_if_complete(job, again=True)


def job_ended(job: JobRecord, agreed: bool) -> JobEnded:
    """The answer to an EndJob or AbortJob: what the broker holds of the job."""
    held = job.holds()
    return JobEnded(job_id=job.job_id, batches=held.batches, pairs=held.pairs, digest=held.digest, agreed=agreed)

"""The last step of a claim's way: once every batch of an ended job is written (or failed and recorded),
``JobDone`` goes to the job's producers and to the sinks (those run with ``--until-done`` wait for it)."""

from __future__ import annotations

import structlog

from pervade.broker.constants import MAX_JOB_ERRORS
from pervade.broker.outbox import Outbox
from pervade.broker.state import BrokerState
from pervade.broker.store import JobRecord
from pervade.protocol import JobDone

log = structlog.get_logger("broker")


class JobReports:
    def __init__(self, state: BrokerState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox

    def report_if_complete(self, job: JobRecord, again: bool = False, to_producer: bool = True) -> None:
        """Report a complete job: the first time to its producers and the sinks (and record that it was);
        ``again`` to producers that ask again; ``to_producer=False`` to the sinks only (one that joined late)."""
        if not job.complete or (job.done_reported and not again):
            return
        first = not job.done_reported
        if first:
            job.done_reported = True
            self.state.store.save_job(job)
            log.info("job_done", job_id=job.job_id, written=job.written, failed=job.failed)
        done = self.job_done(job)
        if to_producer:
            for producer in sorted(job.producers & self.state.producers.keys()):
                self.outbox.post(producer, done)
        if first or not to_producer:
            for sink in self.state.sinks.values():  # sinks run with --until-done wait for this
                self.outbox.post(sink.identity, done)

    def job_done(self, job: JobRecord) -> JobDone:
        errors = ([f"job aborted by its producer: {job.aborted}"] if job.aborted else []) + job.errors
        return JobDone(
            job_id=job.job_id,
            batches=job.batches,
            pairs=job.pairs,
            failed_batches=job.failed,
            errors=errors[:MAX_JOB_ERRORS],
            open_jobs=sum(not j.done_reported for j in self.state.jobs.values()),
            batches_written=job.written,
            pairs_written=job.pairs_written,
            pairs_failed=job.pairs_failed,
        )

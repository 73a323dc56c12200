"""A worker's verbs: register, ask for work (credit), report a context loaded or failed, answer a batch
(``Completed``, ``BatchFailed``), hand batches back (``Release``); and what the broker does when a worker
leaves or dies.

The third step of a claim's way: the result of a batch the scheduler assigned comes back here, is checked
against its batch (``broker/results.py``), and becomes the batch's outcome (``broker/outcomes.py``).
"""

from __future__ import annotations

import structlog

from pervade.broker.constants import REGISTER_AGAIN
from pervade.broker.files import Files
from pervade.broker.outbox import Outbox
from pervade.broker.outcomes import Outcomes
from pervade.broker.records import WorkerRecord
from pervade.broker.results import Results
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus
from pervade.errors import ProtocolError
from pervade.protocol import (
    BatchFailed,
    BatchResult,
    Completed,
    ContextFailed,
    ContextLoaded,
    Disconnect,
    PeerKeys,
    Pull,
    Release,
    WorkerReady,
)
from pervade.rates import ComputePace

log = structlog.get_logger("broker")


class Workers:
    def __init__(self, state: BrokerState, outbox: Outbox, outcomes: Outcomes, results: Results, files: Files) -> None:
        self.state = state
        self.outbox = outbox
        self.outcomes = outcomes
        self.results = results
        self.files = files

    # --- joining and leaving ---------------------------------------------------------------------

    def on_worker_ready(self, identity: bytes, message: WorkerReady) -> None:
        # The same worker on a new connection (it lost us, or we restarted): its old record goes, and
        # what it held is requeued at once rather than after a heartbeat timeout. Another live process
        # under the same name was refused before this (broker/router.py): two would replace each other's
        # registration for ever.
        workers = self.state.workers
        key = self.state.sender  # a name is a key's own: another key's worker of that name is another worker
        stale = [w for w in workers.values() if w.name == message.worker_id and w.key == key or w.identity == identity]
        for old in stale:
            self.drop_worker(old, "registered again", count_attempts=False)
        worker = WorkerRecord(
            identity=identity,
            name=message.worker_id,
            instance=message.instance,
            host=message.host,
            device=message.device,
            max_contexts=message.max_contexts,
            file_endpoint=message.file_endpoint,
            key=self.state.sender,
        )
        worker.contexts.update(dict.fromkeys(message.contexts))
        worker.loaded.update(message.contexts)
        workers[identity] = worker
        self.state.maybe_idle.add(identity)
        self.state.failed_contexts.clear()  # new capacity: contexts that failed elsewhere may load here
        self.files.joined(identity, message.file_endpoint, message.files)
        if self.state.worker_keys is not None:  # whom its file service should admit
            self.outbox.post(identity, PeerKeys(keys=sorted(self.state.worker_keys)))
        log.info(
            "worker_joined", worker_id=message.worker_id, host=message.host, device=message.device.describe(),
            contexts=message.contexts, key=str(worker.key) if worker.key else None,
        )  # fmt: skip

    def vouch_for(self, worker_keys: frozenset[str]) -> None:
        """The admitted worker keys changed: every worker's file service hears whom to admit now."""
        self.state.worker_keys = worker_keys
        message = PeerKeys(keys=sorted(worker_keys))
        for identity in self.state.workers:
            self.outbox.post(identity, message)

    def drop_worker(self, worker: WorkerRecord, reason: str, count_attempts: bool) -> None:
        """Forget a worker and requeue what it held. When it died (``count_attempts``), the death counts
        as a failed attempt for the batch in hand only, and only if its model had loaded: a batch that kills
        every worker it touches must not be retried forever, but the batches merely waiting behind it, or
        behind a model load, did nothing wrong. A death during a load counts against the context."""
        store = self.state.store
        self.state.workers.pop(worker.identity, None)
        self.state.passed_over.discard(worker.identity)
        self.files.left(worker.identity)
        in_hand = next(iter(worker.in_flight), None)
        requeued = 0
        for batch_id in reversed(worker.in_flight):  # each goes to the front: keep their order
            row = store.get(batch_id)
            if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != worker.identity:
                continue
            requeued += 1
            if count_attempts and batch_id == in_hand and row.context_id in worker.loaded:
                self.outcomes.retry_or_fail(row, f"worker {worker.name} {reason} while running it")
            else:
                self.outcomes.requeue(row)
        worker.in_flight.clear()
        if count_attempts and not worker.leaving:  # preempted while loading is not the model's fault
            for context_id in set(worker.contexts) - worker.loaded:
                self.note_load_death(context_id, worker.name)
        log.info(
            "worker_left", worker_id=worker.name, reason=reason, requeued=requeued, batches_done=worker.batches_done
        )

    def on_release(self, identity: bytes, message: Release) -> None:
        store = self.state.store
        worker = self.state.workers[identity]
        for batch_id in message.batch_ids:
            worker.in_flight.pop(batch_id, None)  # it will not run it, whoever holds the batch now
            row = store.get(batch_id)
            if row is not None and row.status is BatchStatus.ASSIGNED and row.worker == identity:
                self.outcomes.requeue(row, counted_as="released")
        if message.leaving and not worker.leaving:
            worker.leaving, worker.credit = True, 0
            self.files.leaving(identity)
            log.info("worker_leaving", worker_id=worker.name, released=len(message.batch_ids))

    # --- contexts --------------------------------------------------------------------------------

    def on_pull(self, identity: bytes, message: Pull) -> None:
        worker = self.state.workers[identity]
        if not worker.leaving:
            worker.credit += message.credit
            self.state.maybe_idle.add(identity)

    def on_context_loaded(self, identity: bytes, message: ContextLoaded) -> None:
        worker = self.state.workers[identity]
        worker.loaded.add(message.context_id)
        self.state.maybe_idle.add(identity)
        self.state.counters["context_loads"] += 1
        log.info(
            "context_loaded", worker_id=worker.name, context_id=message.context_id, seconds=round(message.seconds, 3)
        )

    def on_context_failed(self, identity: bytes, message: ContextFailed) -> None:
        state = self.state
        worker = state.workers[identity]
        context_id = message.context_id
        worker.contexts.pop(context_id, None)
        worker.loaded.discard(context_id)
        worker.refused.add(context_id)
        state.counters["context_load_failures"] += 1
        log.error("context_failed", worker_id=worker.name, context_id=context_id, error=message.error)
        spec = state.specs.get(context_id)
        if spec is not None and spec.files is not None:
            self.files.abandoned(identity, spec.files)
        for batch_id in list(worker.in_flight):
            row = state.store.get(batch_id)
            if row is None or row.context_id != context_id:
                continue
            # The worker drops them all, copied elsewhere or not, and will never answer them: their credit
            # comes back, what each assignment used.
            worker.credit += worker.in_flight.pop(batch_id, 1)
            if row.status is BatchStatus.ASSIGNED and row.worker == identity:
                # Not the batch's fault, and never tried: no attempt is charged. A context that loads nowhere
                # fails its batches below, once every worker has refused it.
                self.outcomes.requeue(row)
        if all(context_id in w.refused for w in state.workers.values()):
            self.fail_context(context_id, message.error)

    def note_load_death(self, context_id: str, worker_name: str) -> None:
        """A worker died while loading this context. After ``max_attempts`` such deaths with no batch of
        the context completed in between (a model that kills whoever loads it), the context fails."""
        load_deaths = self.state.load_deaths
        deaths = load_deaths[context_id] = load_deaths.get(context_id, 0) + 1
        log.warning("worker_died_loading", context_id=context_id, worker_id=worker_name, deaths=deaths)
        if deaths >= self.state.config.max_attempts:
            del load_deaths[context_id]
            self.fail_context(context_id, f"{deaths} workers died while loading it")

    def fail_context(self, context_id: str, error: str) -> None:
        """No live worker can load this context: fail its queued batches rather than loop forever,
        and refuse new ones until another worker joins."""
        self.state.failed_contexts[context_id] = error
        queued = self.state.store.queued_ids(context_id)
        self.outcomes.fail_all(queued, f"no worker could load context {context_id}: {error}")

    # --- results ---------------------------------------------------------------------------------

    def on_completed(self, identity: bytes, message: Completed) -> None:
        """Accept the first result of a batch, from whichever worker: a late reply from a worker declared
        dead is as good as any. Every later one is a duplicate execution, suppressed."""
        result = message.result
        worker = self.state.workers.get(identity)
        if worker is not None:
            self.state.take_off_window(worker, result.batch_id)
        store = self.state.store
        row = store.get(result.batch_id)
        if row is None:
            raise ProtocolError(f"result for unknown batch {result.batch_id!r}")
        if row.status not in (BatchStatus.QUEUED, BatchStatus.ASSIGNED):
            # Expected after every copy (``Scheduler.speculate``): counted, and logged only at debug. At info, the
            # paper's replay at batch size 1 logged 20,000 of them in its last seconds, the broker's busiest. Told
            # by its row alone: the claims of a batch done and not yet written are on disk, not worth a read.
            self.state.counters["duplicate_results"] += 1
            log.debug("duplicate_result_suppressed", batch_id=result.batch_id, worker_id=result.worker_id)
            if len(result.verdicts) == row.pairs:  # computed all the same: it tells the pace
                note_pace(worker, row.context_id, result)
        elif (problem := self.results.mismatch(row, store.batch(row.batch_id), result)) is not None:
            self.results.refuse(identity, row.batch_id, problem)
            raise ProtocolError(problem)
        else:
            note_pace(worker, row.context_id, result)
            result = self.results.stamped(self.results.on_broker_clock(result, worker))
            self.outcomes.complete(row, result, by=identity)
        if worker is None:
            self.outbox.post(identity, Disconnect(reason=REGISTER_AGAIN))

    def on_batch_failed(self, identity: bytes, message: BatchFailed) -> None:
        worker = self.state.workers[identity]
        self.state.take_off_window(worker, message.batch_id)  # whatever became of the batch
        row = self.state.store.get(message.batch_id)
        if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != identity:
            log.info("stale_batch_failed_ignored", batch_id=message.batch_id, worker_id=worker.name)
            return
        log.warning("batch_failed", batch_id=message.batch_id, worker_id=worker.name, error=message.error)
        self.outcomes.scoring_failed(row, message.error)


def note_pace(worker: WorkerRecord | None, context_id: str, result: BatchResult) -> None:
    """A result that answers its batch (checked, or a duplicate with the batch's count of claims): its claims
    and run time count towards the worker's pace on the context (``ComputePace``). A result for an unknown
    batch, or one that does not answer its batch, is left out. A worker may misreport its times: that only
    changes which copies it makes or is given at the end of a queue (``Scheduler.speculate``), never a result."""
    if worker is not None:
        worker.paces.setdefault(context_id, ComputePace()).add(len(result.verdicts), result.started_at,
                                                               result.finished_at)  # fmt: skip

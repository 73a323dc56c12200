"""Scheduling: queued batches matched with worker credit, by affinity (the policy is ``broker/policy.py``).

The second step of a claim's way: a batch ``on_submit`` queued is assigned here to a worker that holds its
context, or a worker is told to load the context first (``tell_to_load``); the worker answers with
``Completed`` (``broker/workers.py``).
"""

from __future__ import annotations

from collections import Counter

import structlog

from pervade.broker.outbox import Outbox
from pervade.broker.policy import choose_context
from pervade.broker.records import WorkerRecord
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, StoredBatch
from pervade.protocol import Assign, Batch, LoadContext

log = structlog.get_logger("broker")


class Scheduler:
    def __init__(self, state: BrokerState, outbox: Outbox) -> None:
        self.state = state
        self.outbox = outbox
        self._turn = 0  # where dispatch starts among the workers

    def hosts(self) -> Counter[str]:
        """How many workers hold (or are loading) each context."""
        return Counter(context_id for worker in self.state.workers.values() for context_id in worker.contexts)

    def dispatch(self) -> None:
        """Match queued batches with worker credit, by affinity (see broker/policy.py), one batch per worker
        in turn, starting each call one worker further along. Workers ask for deep windows when batches are
        small (gpuworker/intake.py): filling the first worker's window before the next would leave the
        others idle on a short queue, and batches trickling in one at a time would all go to one worker."""
        store, workers = self.state.store, self.state.workers
        if not store.queued or not workers:
            return
        hosts = self.hosts()
        free_hosts = Counter(
            c for w in workers.values() if w.credit > 0 and not w.leaving for c in w.contexts
        )  # a stale count only delays a move by one turn
        ready = [w for w in self._workers_in_turn() if w.credit > 0 and not w.leaving]
        while ready and store.queued:
            served = []
            for worker in ready:
                choice = choose_context(
                    held=worker.contexts,
                    pending=store.queued,
                    hosts=hosts,
                    refused=worker.refused,
                    rebalance_backlog=self.state.config.rebalance_backlog,
                    free_hosts=free_hosts,
                )
                if choice is None:
                    continue
                if choice.load:
                    hosts.subtract(self.tell_to_load(worker, choice.context_id))
                    hosts[choice.context_id] += 1
                front = store.next_queued_batch(choice.context_id)
                if front is None:  # the policy only chooses contexts with queued batches
                    continue
                self.assign(worker, *front)
                if worker.credit > 0 and not worker.leaving:
                    served.append(worker)
                if not store.queued:
                    break
            ready = served

    def _workers_in_turn(self) -> list[WorkerRecord]:
        """The workers, starting one further along at each call (round robin across calls)."""
        workers = list(self.state.workers.values())
        self._turn = (self._turn + 1) % len(workers)
        return workers[self._turn :] + workers[: self._turn]

    def tell_to_load(self, worker: WorkerRecord, context_id: str) -> list[str]:
        """Send LoadContext (evicting the oldest contexts if the worker is full); returns the evicted."""
        evict = list(worker.contexts)[: max(0, len(worker.contexts) + 1 - worker.max_contexts)]
        spec = self.state.specs[context_id]
        manifest = self.state.manifests.get(spec.files) if spec.files is not None else None
        self.outbox.post(worker.identity, LoadContext(context=spec, manifest=manifest, evict=evict))
        for evicted in evict:
            worker.contexts.pop(evicted, None)
            worker.loaded.discard(evicted)
        worker.contexts[context_id] = None
        log.info("told_to_load", worker_id=worker.name, context_id=context_id, evict=evict)
        return evict

    def assign(self, worker: WorkerRecord, row: StoredBatch, batch: Batch) -> None:
        """Send a batch to a worker; if the send fails the batch goes back to the front of its queue and
        the worker keeps its credit (it never saw the batch)."""
        store = self.state.store
        store.assign(row, worker.identity)
        if worker.key is not None:
            self.state.given_to.setdefault(row.batch_id, set()).add(worker.key.public)
        worker.credit -= 1
        worker.in_flight[row.batch_id] = None
        self.outbox.post(worker.identity, Assign(batch=batch), on_fail=lambda: self.unassign(row.batch_id, worker))

    def unassign(self, batch_id: str, worker: WorkerRecord) -> None:
        store = self.state.store
        row = store.get(batch_id)
        if row is not None and row.status is BatchStatus.ASSIGNED and row.worker == worker.identity:
            store.requeue(row, count_attempt=False)
            worker.in_flight.pop(batch_id, None)
            worker.credit += 1

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
        self.assign_queued()
        self.speculate()

    def assign_queued(self) -> None:
        """``dispatch``'s first part: the queued batches, by affinity."""
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

    def speculate(self) -> None:
        """The queue of a context ran dry while its workers finish at different speeds: a worker with nothing
        left to do takes a copy of batches another worker holds (the last of its window first, which it would
        run last): half of what that worker holds, and at least one, so even the last batch a slow GPU is
        computing is copied once (MapReduce's backup tasks). Whichever result comes first counts, the other
        is a duplicate and is dropped (``Workers.on_completed``), so the copy costs only otherwise idle time. A
        slow GPU's window (two runs of claims, or one batch of 512 it computes for seconds) no longer sets the
        end of a job. A worker still loading the context is copied from too: a replacement for a preempted GPU
        takes its window while it loads for minutes.
        The worker with the most batches not yet copied is copied from first; only at the end of a queue (a
        tail), so the scan of in-flight batches costs nothing while there is work to hand out. That scan is
        made once per context and call, then kept up to date as copies are taken: scanned again for each idle
        worker, it took 0.8 s of the broker's time when 93 A10s fell idle beside 93 TITAN X Pascals holding
        512 batches each (the paper's replay at batch size 1)."""
        store, workers = self.state.store, self.state.workers
        candidates, self.state.maybe_idle = self.state.maybe_idle, set()
        idle = [workers[i] for i in candidates if i in workers]
        scanned: dict[str, dict[bytes, list[str]]] = {}  # per context: each holder's uncopied batches, last first
        for worker in (w for w in idle if w.credit > 0 and not w.leaving and not w.in_flight and w.loaded):
            for context_id in worker.loaded:
                if store.queued.get(context_id, 0) or worker.credit <= 0:
                    continue
                uncopied = scanned.get(context_id)
                if uncopied is None:
                    uncopied = scanned[context_id] = self.uncopied(context_id)
                holders = [identity for identity in uncopied if identity != worker.identity]
                if not holders:
                    continue
                busiest = workers[max(holders, key=lambda identity: len(uncopied[identity]))]
                tail = uncopied[busiest.identity]
                taken = tail[: min(worker.credit, max(1, len(tail) // 2))]
                if len(taken) < len(tail):
                    uncopied[busiest.identity] = tail[len(taken) :]
                else:
                    del uncopied[busiest.identity]
                for batch_id in taken:
                    found = store.get_with_batch(batch_id)
                    if found is None or found[1] is None:
                        continue
                    row, batch = found
                    if row.status is not BatchStatus.ASSIGNED or row.worker != busiest.identity:
                        continue
                    if row.context_id != context_id:
                        continue
                    self.state.speculated[batch_id] = busiest.identity
                    self.state.counters["speculative_assignments"] += 1
                    self.assign(worker, row, batch, copy_of=busiest)

    def uncopied(self, context_id: str) -> dict[bytes, list[str]]:
        """The batches each worker holding (or loading) ``context_id`` has in flight and nobody has a copy of,
        the last of its window first; workers with none are left out."""
        speculated = self.state.speculated
        return {
            w.identity: batches
            for w in self.state.workers.values()
            if context_id in w.contexts  # loading counts too
            and (batches := [b for b in reversed(w.in_flight) if b not in speculated])
        }

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

    def assign(
        self, worker: WorkerRecord, row: StoredBatch, batch: Batch, copy_of: WorkerRecord | None = None
    ) -> None:
        """Send a batch to a worker; if the send fails the batch goes back to the front of its queue (a copy:
        back to ``copy_of``, which still holds it) and the worker keeps its credit (it never saw the batch).
        A copy is not an attempt."""
        store = self.state.store
        store.assign(row, worker.identity, count_attempt=copy_of is None)
        if worker.key is not None:
            self.state.given_to.setdefault(row.batch_id, set()).add(worker.key.public)
        worker.credit -= 1
        worker.in_flight[row.batch_id] = None
        self.outbox.post(
            worker.identity, Assign(batch=batch), on_fail=lambda: self.unassign(row.batch_id, worker, copy_of)
        )

    def unassign(self, batch_id: str, worker: WorkerRecord, copy_of: WorkerRecord | None = None) -> None:
        store = self.state.store
        row = store.get(batch_id)
        if row is not None and row.status is BatchStatus.ASSIGNED and row.worker == worker.identity:
            if copy_of is not None and copy_of.identity in self.state.workers:
                store.assign(row, copy_of.identity, count_attempt=False)  # the original holder still has it
            else:
                store.requeue(row, count_attempt=copy_of is not None)  # nothing charged: nothing to uncount
            worker.in_flight.pop(batch_id, None)
            worker.credit += 1

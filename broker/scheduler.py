"""Scheduling: queued batches matched with worker credit, by affinity (the policy is ``broker/policy.py``).

The second step of a claim's way: a batch ``on_submit`` queued is assigned here to a worker that holds its
context, or a worker is told to load the context first (``tell_to_load``); the worker answers with
``Completed`` (``broker/workers.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import structlog

from pervade.broker.constants import COPY_SPEED_RATIO
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
        """Match queued batches with worker credit, by affinity (see broker/policy.py), a fair share per
        worker in turn (one batch, when the queue is shorter than the workers ready), starting each call one
        worker further along. Workers ask for deep windows when batches are small (gpuworker/intake.py):
        filling the first worker's window before the next would leave the others idle on a short queue, and
        batches trickling in one at a time would all go to one worker."""
        self.assign_queued()
        self.prewarm()
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
                # Its share of the queue at once: the policy's choice holds until the queue runs short, and
                # asked again for every batch it was a third of the dispatch at one claim a batch.
                # In producer batches, as credit and the queue count them (a slice counts its members).
                share = max(1, store.queued.get(choice.context_id, 0) // len(ready))
                while share > 0 and worker.credit > 0:
                    front = store.next_queued_batch(choice.context_id)
                    if front is None:  # the policy only chooses contexts with queued batches
                        break
                    row, batch = front
                    if row.weight > min(share, worker.credit):  # a slice: its share and credit's worth of it
                        row, batch = store.carve(row, batch, max(1, min(share, worker.credit)))
                    self.assign(worker, row, batch)
                    share -= row.weight
                if worker.credit > 0 and not worker.leaving:
                    served.append(worker)
                if not store.queued:
                    break
            ready = served

    def prewarm(self) -> None:
        """``dispatch``'s second part: a context a producer declared (``DeclareContext``, sent before its first
        batch) is loaded now by the workers holding no context, which its first batch would tell to load it
        anyway (``choose_context``). The load then overlaps what the producer does before that batch (reading
        its claims, a first trip of thousands of batches) instead of following it. Only workers holding
        nothing, and only while nothing is queued: no context is evicted, and no worker taken from queued
        work, for work not yet queued; a context declared but never used costs otherwise idle workers a load.
        Once per context new to the broker."""
        declared, self.state.declared = self.state.declared, set()
        if not declared or not self.state.workers or self.state.store.queued:
            return
        hosts = self.hosts()
        for context_id in declared:
            if hosts[context_id] or context_id in self.state.failed_contexts:
                continue
            for worker in self.state.workers.values():
                if not worker.contexts and not worker.leaving and context_id not in worker.refused:
                    self.tell_to_load(worker, context_id)

    def speculate(self) -> None:
        """The queue of a context ran dry while its workers finish at different speeds: a worker with nothing
        left to do takes a copy of batches another worker holds (the last of its window first, which it would
        run last): half of what that worker holds, and at least one, so even the last batch a slow GPU is
        computing is copied once (MapReduce's backup tasks). Whichever result comes first counts, the others
        are duplicates and are dropped (``Workers.on_completed``), so a copy costs only otherwise idle time. A
        slow GPU's window (two runs of claims, or one batch of 512 it computes for seconds) no longer sets the
        end of a job. A worker still loading the context is copied from too: a replacement for a preempted GPU
        takes its window while it loads for minutes.

        Speeds decide who copies what (``WorkerRecord.pace``: claims per second of a worker's own compute on
        the context). The fastest idle workers choose first, and the worker with the most batches not yet
        copied is copied from first (by any idle worker: a fast holder may have stalled). Once every batch in
        flight has a copy, a worker ``COPY_SPEED_RATIO`` times faster than the holder of a copy, or than one not
        timed yet, copies it again (``_may_copy_again``), and idle workers that found nothing are looked at
        again after the next copy. Copied once at most, a TITAN X Pascal's window was copied by another TITAN X
        falling idle, and the job waited on the two while A10s stood idle: a 30,000-claim replay at 186 GPUs and
        batch size 32 took 10.7 to 13.2 s, against 10.6 to 10.7 with these rules (ideal 10.4;
        docs/benchmarks.md).

        Only at the end of a queue (a tail), so the scan of in-flight batches costs nothing while there is work
        to hand out. That scan is made once per context and call, then kept up to date as copies are taken:
        scanned again for each idle worker, it took 0.8 s of the broker's time when 93 A10s fell idle beside 93
        TITAN X Pascals holding 512 batches each."""
        state = self.state
        candidates, state.maybe_idle = state.maybe_idle, set()
        idle = [
            w for i in candidates
            if (w := state.workers.get(i)) is not None and w.credit > 0 and not w.leaving and not w.in_flight and w.loaded
        ]  # fmt: skip
        idle.sort(key=_fastest_first)  # the fastest choose first: the slow take what is left
        tails = _Tails(self)
        copies = 0
        for worker in idle:
            taken = self.copy_for(worker, tails)
            if not taken:
                state.passed_over.add(worker.identity)
            copies += taken
        if copies:  # what they found nothing in may now hold a copy a faster one should take again
            state.maybe_idle |= state.passed_over
            state.passed_over = set()

    def copy_for(self, worker: WorkerRecord, tails: _Tails) -> int:
        """Give an idle ``worker`` copies of what others hold, in each of its contexts whose queue is dry;
        returns how many."""
        store = self.state.store
        copies = 0
        for context_id in worker.loaded:
            if store.queued.get(context_id, 0) or worker.credit <= 0:
                continue
            found = tails.take(worker, context_id)
            if found is None:
                continue
            holder, taken = found
            for batch_id in taken:
                if worker.credit <= 0:  # a slice uses a credit per batch it holds
                    break
                found_batch = store.get_with_batch(batch_id)
                if found_batch is None or found_batch[1] is None:
                    continue
                row, batch = found_batch
                if row.status is not BatchStatus.ASSIGNED or row.worker != holder.identity:
                    continue
                if row.context_id != context_id:
                    continue
                self.state.speculated.setdefault(batch_id, []).append(holder.identity)
                self.state.counters["speculative_assignments"] += 1
                self.assign(worker, row, batch, copy_of=holder)
                copies += 1
        return copies

    def uncopied(self, context_id: str) -> dict[bytes, list[str]]:
        """The batches each worker holding (or loading) ``context_id`` has in flight and nobody has a copy of,
        the last of its window first; workers with none are left out."""
        speculated = self.state.speculated
        return {
            w.identity: batches for w in self._holders(context_id)
            if (batches := [b for b in reversed(w.in_flight) if b not in speculated])
        }  # fmt: skip

    def copies_held(self, context_id: str) -> dict[bytes, list[str]]:
        """The copies each worker holding ``context_id`` has in flight and is the latest holder of (copied to
        it, and not copied again from it), the last of its window first; workers with none are left out."""
        speculated = self.state.speculated
        return {
            w.identity: batches for w in self._holders(context_id)
            if (batches := [b for b in reversed(w.in_flight) if (e := speculated.get(b)) and w.identity not in e])
        }  # fmt: skip

    def _holders(self, context_id: str) -> list[WorkerRecord]:
        """The workers holding (or loading) ``context_id``. Their windows are scanned with the test inline
        (``uncopied``, ``copies_held``): with a function called for each batch, a scan of 186 windows of 512
        batches took 4.9 ms instead of 3.0, at every turn of the end of a job."""
        return [w for w in self.state.workers.values() if context_id in w.contexts]

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
        A copy is not an attempt. A credit is a producer batch: a slice uses one for each batch it holds, up
        to what the worker granted (its window, in ``gpuworker/intake.py``, counts the same way)."""
        store = self.state.store
        store.assign(row, worker.identity, count_attempt=copy_of is None)
        if worker.key is not None:
            self.state.given_to.setdefault(row.batch_id, set()).add(worker.key.public)
        charged = min(worker.credit, row.weight)
        worker.credit -= charged
        worker.in_flight[row.batch_id] = charged
        self.outbox.post(
            worker.identity,
            Assign(batch=batch),
            on_fail=lambda: self.unassign(row.batch_id, worker, copy_of, charged),
        )

    def unassign(
        self, batch_id: str, worker: WorkerRecord, copy_of: WorkerRecord | None = None, charged: int = 1
    ) -> None:
        """An ``Assign`` that could not be sent: the worker never saw the batch, so it leaves the worker's
        window and its credit comes back (even if the batch was copied elsewhere meanwhile), and the batch
        goes back to the holder it was copied from, else to the front of its queue."""
        worker.credit += worker.in_flight.pop(batch_id, charged)
        store = self.state.store
        row = store.get(batch_id)
        if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != worker.identity:
            return
        earlier = self.state.speculated.get(batch_id)
        if copy_of is not None and copy_of.identity in self.state.workers:
            store.assign(row, copy_of.identity, count_attempt=False)  # the holder copied from still has it
            if earlier and earlier[-1] == copy_of.identity:  # and may be copied from again
                earlier.pop()
                if not earlier:
                    del self.state.speculated[batch_id]
        else:
            store.requeue(row, count_attempt=copy_of is not None)  # nothing charged: nothing to uncount
            self.state.speculated.pop(batch_id, None)  # queued again: copyable as any other


class _Tails:
    """What the idle workers of one ``Scheduler.speculate`` call may copy, per context: each holder's batches
    in flight without a copy (``uncopied``), and, once there are none, each holder's copies
    (``copies_held``); scanned once per context and call, and kept up to date as copies are taken."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._uncopied: dict[str, dict[bytes, list[str]]] = {}
        self._copies: dict[str, dict[bytes, list[str]]] = {}
        self._paces: dict[tuple[bytes, str], float | None] = {}

    def take(self, worker: WorkerRecord, context_id: str) -> tuple[WorkerRecord, list[str]] | None:
        """The holder ``worker`` copies from, and the batches it takes (half of that holder's tail, at least
        one, within its credit); None when there is nothing worth copying."""
        uncopied = self._scan(self._uncopied, context_id, self._scheduler.uncopied)
        holders = [i for i in uncopied if i != worker.identity]
        if not holders:
            pace = worker.pace(context_id)
            uncopied = self._scan(self._copies, context_id, self._scheduler.copies_held)
            holders = [i for i in uncopied if i != worker.identity and _may_copy_again(pace, self._pace(i, context_id))]
        if not holders:
            return None
        busiest = max(holders, key=lambda identity: len(uncopied[identity]))
        tail = uncopied[busiest]
        taken = tail[: min(worker.credit, max(1, len(tail) // 2))]
        if len(taken) < len(tail):
            uncopied[busiest] = tail[len(taken) :]
        else:
            del uncopied[busiest]
        return self._scheduler.state.workers[busiest], taken

    def _scan(
        self, cache: dict[str, dict[bytes, list[str]]], context_id: str, scan: Callable[[str], dict[bytes, list[str]]]
    ) -> dict[bytes, list[str]]:
        found = cache.get(context_id)
        if found is None:
            found = cache[context_id] = scan(context_id)
        return found

    def _pace(self, identity: bytes, context_id: str) -> float | None:
        key = (identity, context_id)
        if key not in self._paces:
            self._paces[key] = self._scheduler.state.workers[identity].pace(context_id)
        return self._paces[key]


def _fastest_first(worker: WorkerRecord) -> tuple[bool, float]:
    """Sorts workers fastest first (by their best pace on any context), those not timed yet last."""
    paces = [pace for context_id in worker.loaded if (pace := worker.pace(context_id)) is not None]
    return (not paces, -max(paces, default=0.0))


def _may_copy_again(pace: float | None, holder_pace: float | None) -> bool:
    """Whether a worker of ``pace`` copies again what a holder of ``holder_pace`` holds as a copy (claims per
    second of compute on the context): when it is ``COPY_SPEED_RATIO`` times faster, or when the holder has not
    finished a batch of the context yet (a TITAN X that copied a batch as the pool started, whose speed nobody
    knows for its first 8 s); never for a worker not timed itself."""
    return pace is not None and (holder_pace is None or pace >= COPY_SPEED_RATIO * holder_pace)

"""What happens to a batch once a worker had it, in one place: requeued (not its fault), split, retried or
failed (its fault), or complete. Either outcome, verdicts or failure, goes on to a sink (``broker/sinks.py``).

A batch of several claims a worker could not score (``BatchFailed``) is split in two halves, queued as
batches of their own (its *parts*), rather than retried whole: one claim the model cannot take (longer than its context, say) fails
alone after ``max_attempts``, and every other claim of its batch gets its verdict. A batch of 512 claims with
one such claim costs about 1,000 claims of recomputation (each halving recomputes the half that failed) and
nine failed attempts, instead of 511 lost verdicts. A part's id is its root's with the claims it holds
(``ROOT~START-STOP``), so it names the same claims after a broker restart."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import structlog

from pervade.broker.sinks import Sinks
from pervade.broker.state import BrokerState
from pervade.broker.store import StoredBatch
from pervade.protocol import BatchResult, part_id, part_of

log = structlog.get_logger("broker")

#: The protocol's longest batch id.
MAX_ID_LENGTH = 256


class Outcomes:
    def __init__(self, state: BrokerState, sinks: Sinks) -> None:
        self.state = state
        self.sinks = sinks

    def requeue(self, row: StoredBatch, counted_as: str = "requeues") -> None:
        """Back to the front of its queue, no attempt charged: the worker left, died waiting behind another
        batch, could not load the context, or handed it back (``counted_as="released"``), none of which is
        the batch's fault. A copy goes back to the worker it was copied from instead (``hand_back``)."""
        if self.hand_back(row):
            return
        self.state.store.requeue(row, count_attempt=False)
        self.state.counters[counted_as] += 1

    def hand_back(self, row: StoredBatch) -> bool:
        """The latest holder of a copied batch will not answer it (it died, left, failed it or answered it
        wrongly): give it back to the last earlier holder still running it, with no attempt charged, rather
        than requeue (or fail) a batch a live worker is computing. False when there is none."""
        earlier = self.state.speculated.get(row.batch_id)
        while earlier:
            holder = self.state.workers.get(earlier.pop())
            if holder is not None and row.batch_id in holder.in_flight and row.context_id in holder.contexts:
                self.state.store.assign(row, holder.identity, count_attempt=False)
                if not earlier:
                    del self.state.speculated[row.batch_id]
                return True
        self.state.speculated.pop(row.batch_id, None)
        return False

    def forget_copies(self, batch_id: str, answered_by: bytes | None = None) -> None:
        """The batch needs no more answers (done, failed or split): its earlier holders' are not waited for
        (they will be duplicates), so each may fall idle."""
        for identity in self.state.speculated.pop(batch_id, ()):
            holder = self.state.workers.get(identity)
            if holder is not None and identity != answered_by:
                self.state.take_off_window(holder, batch_id)

    def scoring_failed(self, row: StoredBatch, error: str) -> None:
        """The worker could not score the batch (``BatchFailed``): split it if it holds several claims, so
        the claim at fault is found; a single claim is retried, then failed. A copy goes back to the worker
        it was copied from instead, which may yet score it (``hand_back``)."""
        if self.hand_back(row):
            return
        if row.members:
            self.dissolve(row, error)
            return
        if row.pairs > 1 and self.split(row, error):
            return
        self.retry_or_fail(row, error)

    def retry_or_fail(self, row: StoredBatch, error: str) -> None:
        """The attempt failed: requeue the batch, or give up on it after ``max_attempts``. (A worker that
        died running it, or answered it wrongly, says nothing about which claim is at fault: the batch is
        retried whole.) A copy goes back to the worker it was copied from instead, no attempt charged
        (``hand_back``): that worker is running it, and its answer is as good as any."""
        if self.hand_back(row):
            return
        if row.attempts >= self.state.config.max_attempts:
            if row.members:  # the fault is one of its batches': each gets attempts of its own
                self.dissolve(row, error)
            else:
                self.fail(row, error)
        else:
            self.state.store.requeue(row, count_attempt=True)
            self.state.counters["requeues"] += 1

    def split(self, row: StoredBatch, error: str) -> bool:
        """Queue the batch's claims as two parts, at the front, in place of the batch; False when its parts
        could not be named (a root id too long for the protocol to carry another suffix, or a part's id
        already taken by a batch a producer submitted under that name)."""
        store = self.state.store
        batch = store.batch(row.batch_id)
        root_id, start = row.root or row.batch_id, 0
        if row.root is not None and (named := part_of(row.batch_id)) is not None:  # a part: claims start as named
            start = named.start
        half = len(batch.claims) // 2
        pieces = [(start, batch.claims[:half]), (start + half, batch.claims[half:])]
        parts = [
            msgspec.structs.replace(batch, batch_id=part_id(root_id, first, first + len(claims)), claims=claims)
            for first, claims in pieces
        ]
        if any(len(part.batch_id) > MAX_ID_LENGTH or store.taken(part.batch_id) for part in parts):
            return False
        store.split(row, parts)
        self.state.given_to.pop(row.batch_id, None)
        self.forget_copies(row.batch_id)
        self.state.counters["batches_split"] += 1
        log.warning("batch_split", batch_id=row.batch_id, claims=len(batch.claims), error=error,
                    parts=[part.batch_id for part in parts])  # fmt: skip
        return True

    def dissolve(self, row: StoredBatch, error: str) -> list[StoredBatch]:
        """A slice failed: its producer batches are queued again, each as a batch of its own (at the front, no
        attempt charged), so the one at fault fails or splits alone and the others get their verdicts.
        Returns their rows."""
        rows = self.state.store.dissolve(row)
        self.state.given_to.pop(row.batch_id, None)
        self.forget_copies(row.batch_id)
        self.state.counters["slices_dissolved"] += 1
        log.warning("slice_dissolved", batch_id=row.batch_id, batches=len(rows), error=error)
        return rows

    def fail(self, row: StoredBatch, error: str) -> None:
        """Give up on a batch: its failure goes to a sink to be recorded, like a result. A slice is failed
        batch by batch, as the producer's batches it holds (a failure is recorded under a producer's id)."""
        if row.members:
            for member in self.dissolve(row, error):
                self.fail(member, error)
            return
        error = f"{error} (attempts: {row.attempts})"
        self.state.store.fail(row, error)
        self.state.given_to.pop(row.batch_id, None)
        self.forget_copies(row.batch_id)
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
                state.take_off_window(holder, row.batch_id)  # its own answer will be a duplicate
        row = state.store.complete(row, result)
        state.given_to.pop(row.batch_id, None)
        self.forget_copies(row.batch_id, answered_by=by)
        state.load_deaths.pop(row.context_id, None)  # the context works: earlier load deaths were bad luck
        claims = len(result.verdicts)
        state.throughput.add(claims)
        state.counters["claims_completed"] += claims
        worker = state.workers.get(by)
        if worker is not None:
            worker.batches_done += row.weight
            worker.claims.add(claims)
        self.sinks.deliver_row(row, result)

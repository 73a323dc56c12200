"""A random run of the broker's verbs (no sockets): slices (carved to credit, dissolved), poison claims
(split), worker deaths (charged) and re-registrations, late results (also after a carve), speculative copies,
preemption (``Release``), a context failing on a worker, two jobs on two contexts and two templates, the same
sweep from a second producer, an aborted job, sink crashes between writing and acknowledging, resubmissions,
and the broker stopped or killed (its uncommitted turn lost) and restarted on its state. Workers grant credit
with the real ``CreditWindow``. A model sink writes as the real one does (each producer batch of a slice
once, skipping what its output holds) and checks, throughout, that

- no pair is ever written twice (rows and recorded failures together);
- when ``JobDone`` reaches the producer, every pair it submitted is durably written or recorded failed;
- the run finishes: ``JobDone`` arrives (no hang), with totals that add up.

Written by a hostile review of slices; a count or persistence bug put in by hand fails it at once.
``PERVADE_RANDOM_SEEDS`` and ``PERVADE_RANDOM_STEPS`` make it longer (600 seeds of 600 steps passed).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import msgspec
import pytest

from pervade.batchset import BatchSet
from pervade.broker import store as store_module
from pervade.broker.store import BatchStatus
from pervade.gpuworker.intake import CreditWindow
from pervade.protocol import (
    AbortJob,
    Accepted,
    Assign,
    Batch,
    BatchFailed,
    Completed,
    ContextFailed,
    ContextLoaded,
    Deliver,
    DeliverFailure,
    Disconnect,
    EndJob,
    JobDone,
    JobEnded,
    LoadContext,
    Message,
    ProducerReady,
    Pull,
    Rejected,
    Release,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
    member_spans,
)
from tests.test_broker_verbs import CPU, CTX_A, CTX_B, A, Broker, batch, result_for

WANTED = 4  # a model worker's run, in claims (its window holds two)
STEPS = int(os.environ.get("PERVADE_RANDOM_STEPS", "150"))
SEEDS = int(os.environ.get("PERVADE_RANDOM_SEEDS", "40"))


class ModelWorker:
    """A worker's credit as gpuworker/intake.py keeps it (its real CreditWindow), over a small run."""

    def __init__(self, identity: bytes, wanted: int = WANTED) -> None:
        self.identity = identity
        self.window = CreditWindow(min_batches=2, run_claims=wanted)
        self.queue: list[Batch] = []

    @property
    def outstanding(self) -> int:
        return self.window.outstanding

    @outstanding.setter
    def outstanding(self, value: int) -> None:
        self.window.outstanding = value

    def arrived(self, b: Batch) -> None:
        self.window.arrived(len(b.claims), len(b.members) or 1)

    def held(self) -> int:
        return sum(len(b.members) or 1 for b in self.queue)

    def top_up(self) -> int:
        return self.window.top_up(self.held())


class Run:
    def __init__(self, tmp_path, seed: int, abort: bool = False, jobs: int = 1, **config: object) -> None:
        self.abort = abort
        self.jobs = jobs
        self.rng = random.Random(seed)
        self.state_dir = tmp_path / "state"
        self.config = {"slice_claims": 6, "max_attempts": 2, **config}
        self.broker = self._open()
        self.produced: dict[str, Batch] = {}
        self.accepted: set[str] = set()
        self.poison: set[str] = set()
        self.workers = {b"w1": ModelWorker(b"w1", 4), b"w2": ModelWorker(b"w2", 2), b"w3": ModelWorker(b"w3", 9)}
        self.late: list[tuple[bytes, Batch]] = []  # results still to come from work dropped or declared dead
        # The model sink: what is durable in its output (claims written or failed, per pair), its index of
        # batch ids, and the acknowledgements it owes.
        self.done_pairs: Counter[str] = Counter()
        self.index: set[str] = set()
        self.pending_acks: list[str] = []
        self.job_done: list[JobDone] = []
        self.ended = False
        self.errors: list[Message] = []
        self.rejected: list[Rejected] = []
        self.log: list[str] = []
        self.register_all()

    def _open(self) -> Broker:
        broker = Broker(self.state_dir, **self.config)
        broker.store.recover()  # as open_state does
        return broker

    # --- peers --------------------------------------------------------------------------------------

    def register_worker(self, w: ModelWorker) -> None:
        w.queue.clear()
        w.outstanding = 0
        self.broker(w.identity, WorkerReady(worker_id=w.identity.decode(), host="h", pid=1, device=CPU,
                                            contexts=[A], instance="i-" + w.identity.decode(), max_contexts=2))  # fmt: skip
        credit = w.top_up()
        if credit:
            self.broker(w.identity, Pull(credit=credit))

    def register_all(self) -> None:
        self.broker(b"p", ProducerReady(producer_id="p"))
        self.broker(b"p2", ProducerReady(producer_id="p2"))
        self.broker(b"s", SinkReady(sink_id="s", instance="sink-1"))
        for w in self.workers.values():
            self.register_worker(w)

    # --- a turn -------------------------------------------------------------------------------------

    def turn(self) -> None:
        parts = self.broker.parts
        parts.scheduler.dispatch()
        if parts.state.sinks and self.broker.store.status_counts[BatchStatus.DONE]:
            parts.sinks.deliver_held()
        parts.outbox.flush()
        sent, self.broker.sent = self.broker.sent, []
        for peer, message in sent:
            self.receive(peer, message)

    def receive(self, peer: bytes, message: Message) -> None:
        if isinstance(message, LoadContext):
            self.broker(peer, ContextLoaded(context_id=message.context.context_id, seconds=0.0))
        elif isinstance(message, Assign):
            w = self.workers[peer]
            w.queue.append(message.batch)
            w.arrived(message.batch)
        elif isinstance(message, Accepted) and peer == b"p2":
            for batch_id in [message.batch_id, *message.more]:
                self.accepted.add(batch_id)
        elif isinstance(message, Accepted):
            for batch_id in [message.batch_id, *message.more]:
                self.accepted.add(batch_id)
        elif isinstance(message, Rejected):
            self.rejected.append(message)
        elif isinstance(message, Deliver):
            self.sink_write(message)
        elif isinstance(message, DeliverFailure):
            failure = message.failure
            if failure.batch_id not in self.index:
                self.done_pairs.update(failure.claim_ids)
                self.index.add(failure.batch_id)
            self.pending_acks.append(failure.batch_id)
        elif isinstance(message, JobEnded) and peer == b"p":
            assert message.agreed, f"the broker holds other batches than the producer was told: {message}"
        elif isinstance(message, JobDone) and peer in (b"p", b"p2"):
            self.check_job_done(message)
        elif isinstance(message, Disconnect) and peer in self.workers:
            self.register_worker(self.workers[peer])
        elif isinstance(message, Disconnect) and peer == b"s":
            self.broker(b"s", SinkReady(sink_id="s", instance="sink-1"))
        elif isinstance(message, Disconnect) and peer in (b"p", b"p2"):
            self.broker(peer, ProducerReady(producer_id=peer.decode()))
        elif type(message).__name__ == "Error":
            self.errors.append(message)

    def sink_write(self, message: Deliver) -> None:
        result = message.result
        if not message.members:
            if result.batch_id not in self.index:
                self.done_pairs.update(v.claim_id for v in result.verdicts)
                self.index.add(result.batch_id)
        else:
            for member, (start, end) in zip(message.members, member_spans(message.members), strict=True):
                if member.batch_id in self.index:
                    continue
                self.done_pairs.update(v.claim_id for v in result.verdicts[start:end])
                self.index.add(member.batch_id)
        self.pending_acks.append(result.batch_id)
        twice = [c for c, n in self.done_pairs.items() if n > 1]
        assert not twice, f"pairs written twice: {twice}\n" + "\n".join(self.log[-30:])

    def check_job_done(self, message: JobDone) -> None:
        self.job_done.append(message)
        accepted = [b for b in self.produced.values() if b.batch_id in self.accepted and b.job_id == message.job_id]
        submitted = [c.claim_id for b in accepted for c in b.claims]
        missing = [c for c in submitted if self.done_pairs[c] != 1]
        assert not missing, f"JobDone before these pairs were durable: {missing}\n" + "\n".join(self.log[-30:])
        assert message.batches_written + message.failed_batches == message.batches == len(accepted), message
        assert message.pairs_written + message.pairs_failed == message.pairs == len(submitted), message

    # --- actions ------------------------------------------------------------------------------------

    def new_batch(self) -> Batch:
        n = len(self.produced)
        job = self.rng.choice("jjk") if self.jobs == 2 else "j"
        b = batch(job, n, context=CTX_B if job == "k" else CTX_A, claims=self.rng.randint(1, 2))
        if job == "j" and self.rng.random() < 0.3:
            b = msgspec.structs.replace(b, template_id="u", template="{claim} Q:")
        self.produced[b.batch_id] = b
        for claim in b.claims:
            if self.rng.random() < 0.04:
                self.poison.add(claim.claim_id)
        return b

    def submit(self) -> None:
        if self.ended:
            return
        batches = [self.new_batch() for _ in range(self.rng.randint(1, 5))]
        if self.accepted and self.rng.random() < 0.3:  # a resend of one already accepted
            batches.insert(self.rng.randrange(len(batches) + 1), self.produced[self.rng.choice(sorted(self.accepted))])
        self.log.append(f"submit {[b.batch_id for b in batches]}")
        for b in batches:
            self.broker(b"p", Submit(batch=b))
        if self.rng.random() < 0.3:  # the same sweep run twice at once: another producer sends some of them too
            twin = self.rng.sample(batches, self.rng.randint(1, len(batches)))
            self.log.append(f"twin submits {[b.batch_id for b in twin]}")
            for b in twin:
                self.broker(b"p2", Submit(batch=b))

    def answer(self, w: ModelWorker) -> None:
        b = w.queue.pop(0)
        if any(c.claim_id in self.poison for c in b.claims):
            self.log.append(f"{w.identity!r} fails {b.batch_id} {[m.batch_id for m in b.members]}")
            messages: list[Message] = [BatchFailed(batch_id=b.batch_id, error="poison")]
        else:
            self.log.append(f"{w.identity!r} completes {b.batch_id} {[m.batch_id for m in b.members]}")
            messages = [Completed(result=result_for(b, worker_id=w.identity.decode()))]
        credit = w.top_up()
        if credit:
            messages.append(Pull(credit=credit))
        self.broker(w.identity, *messages)

    def die(self, w: ModelWorker, late: bool) -> None:
        """The worker is declared dead (its in-hand batch charged); perhaps its in-hand result still comes."""
        now = time.monotonic()
        for peers in (self.broker.state.workers, self.broker.state.sinks, self.broker.state.producers):
            for record in peers.values():
                record.last_seen = now
        record = self.broker.state.workers.get(w.identity)
        if record is None:
            return
        record.last_seen = now - 3600
        self.log.append(f"{w.identity!r} dies holding {[b.batch_id for b in w.queue]}")
        self.broker.parts.liveness.purge_dead_peers(now)
        in_hand = w.queue[:1]
        self.register_worker(w)
        if late and in_hand and not any(c.claim_id in self.poison for c in in_hand[0].claims):
            self.late.append((w.identity, in_hand[0]))

    def reregister(self, w: ModelWorker) -> None:
        self.log.append(f"{w.identity!r} registers again")
        if w.queue and self.rng.random() < 0.5 and not any(c.claim_id in self.poison for c in w.queue[0].claims):
            self.late.append((w.identity, w.queue[0]))
        self.register_worker(w)

    def context_failed(self, w: ModelWorker) -> None:
        """The worker could not keep the context (out of memory): it drops what it held, then registers anew."""
        self.log.append(f"{w.identity!r} context failed holding {[b.batch_id for b in w.queue]}")
        w.queue[:] = [b for b in w.queue if b.context.context_id != A]  # what it held of that context is dropped
        self.broker(w.identity, ContextFailed(context_id=A, error="out of memory"))
        if self.rng.random() < 0.5:
            self.register_worker(w)
        else:
            credit = w.top_up()
            if credit:
                self.broker(w.identity, Pull(credit=credit))

    def leave(self, w: ModelWorker) -> None:
        """Preempted (SIGTERM): hands back what it has not started, finishes the batch in hand, says goodbye,
        and a new worker of that name joins later."""
        if self.broker.state.workers.get(w.identity) is None:
            return
        unstarted = [b.batch_id for b in w.queue[1:]]
        self.log.append(f"{w.identity!r} leaves, releasing {unstarted}")
        self.broker(w.identity, Release(batch_ids=unstarted, leaving=True))
        del w.queue[1:]
        if w.queue:
            self.answer(w)
        self.broker(w.identity, Disconnect(reason="stopping"))
        self.turn()
        self.register_worker(w)

    def send_late(self) -> None:
        if not self.late:
            return
        identity, b = self.late.pop(self.rng.randrange(len(self.late)))
        self.log.append(f"{identity!r} late result for {b.batch_id} {[m.batch_id for m in b.members]}")
        self.broker(identity, Completed(result=result_for(b, worker_id=identity.decode())))

    def ack(self, everything: bool = False) -> None:
        k = len(self.pending_acks) if everything else self.rng.randint(0, len(self.pending_acks))
        acks, self.pending_acks = self.pending_acks[:k], self.pending_acks[k:]
        if acks:
            self.log.append(f"sink acks {acks}")
            self.broker(b"s", SinkAck(batch_ids=acks))

    def sink_crash(self) -> None:
        """The sink wrote (its output keeps it) but dies before acknowledging; it comes back."""
        self.log.append(f"sink crashes owing {self.pending_acks}")
        self.pending_acks.clear()
        self.broker(b"s", SinkReady(sink_id="s", instance="sink-1"))

    def restart(self) -> None:
        if self.rng.random() < 0.5:  # stopped: its last turn is committed and sent
            self.log.append("broker stops and starts")
            self.turn()
            self.broker.store.close()
        else:  # killed: what its turn changed since the last commit is lost, and nobody was told of it
            self.log.append("broker killed and started")
            self.broker.sent.clear()
            self.broker.store._db.rollback()
            self.broker.store._db.close()
            self.broker.store.release()
        self.broker = self._open()
        self.register_all()
        unanswered = [b for batch_id, b in self.produced.items() if batch_id not in self.accepted]
        if unanswered and not self.ended:  # a producer resends what it was not told was accepted
            self.log.append(f"resubmit {[b.batch_id for b in unanswered]}")
            for b in unanswered:
                self.broker(b"p", Submit(batch=b))
        if self.ended:
            self.end_job()

    def end_job(self) -> None:
        self.ended = True
        for job in ("j", "k")[: self.jobs]:
            held = BatchSet()
            for batch_id in sorted(self.accepted):
                if self.produced[batch_id].job_id == job:
                    held.add(batch_id, len(self.produced[batch_id].claims))
            self.broker(b"p", EndJob(job_id=job, batches=held.batches, pairs=held.pairs, digest=held.digest))

    def step(self) -> None:
        action = self.rng.choice(
            ["submit"] * 4
            + ["answer"] * 6
            + ["ack"] * 2
            + ["die", "reregister", "sink_crash", "restart", "turn", "turn", "ctxfail", "leave"]
        )
        busy = [w for w in self.workers.values() if w.queue]
        if action == "submit":
            self.submit()
        elif action == "answer" and busy:
            for _ in range(self.rng.randint(1, 3)):
                w = self.rng.choice([w for w in self.workers.values() if w.queue] or [None])
                if w is None:
                    break
                self.answer(w)
        elif action == "ack":
            self.ack()
        elif action == "die" and self.rng.random() < 0.5:
            self.die(self.rng.choice(list(self.workers.values())), late=self.rng.random() < 0.5)
        elif action == "reregister" and self.rng.random() < 0.5:
            self.reregister(self.rng.choice(list(self.workers.values())))
        elif action == "sink_crash" and self.rng.random() < 0.5:
            self.sink_crash()
        elif action == "restart" and self.rng.random() < 0.3:
            self.restart()
        elif action == "leave" and self.rng.random() < 0.3:
            self.leave(self.rng.choice(list(self.workers.values())))
        elif action == "ctxfail" and self.rng.random() < 0.3:
            self.context_failed(self.rng.choice(list(self.workers.values())))
        elif action == "turn" and self.late and self.rng.random() < 0.5:
            self.send_late()
        elif action == "turn" and self.abort and not self.ended and self.rng.random() < 0.05:
            self.log.append("producer aborts")
            self.ended = True
            self.broker(b"p", AbortJob(job_id="j", reason="bad input"))
        if action == "restart" or self.rng.random() < 0.6:  # else the next action comes in the same turn
            self.turn()

    def drain(self, turns: int = 400) -> None:
        for _ in range(turns):
            if {d.job_id for d in self.job_done} >= set(("j", "k")[: self.jobs]) & {
                b.job_id for b in self.produced.values()
            }:
                return
            for w in self.workers.values():
                while w.queue:
                    self.answer(w)
            self.ack(everything=True)
            self.turn()
        store = self.broker.store
        workers = {w.name: (w.credit, dict(w.in_flight)) for w in self.broker.state.workers.values()}
        model = {w.identity: (w.outstanding, [b.batch_id for b in w.queue]) for w in self.workers.values()}
        raise AssertionError(
            f"no JobDone after {turns} turns: counts {dict(store.status_counts)}, queued {dict(store.queued)}, "
            f"job {self.broker.state.jobs.get('j')}, broker's workers {workers}, model workers {model}, "
            f"errors {self.errors[-5:]}\n" + "\n".join(self.log[-40:])
        )


@pytest.mark.parametrize("seed", range(SEEDS))
def test_a_random_run_with_slices_writes_every_pair_once_and_finishes(tmp_path, monkeypatch, seed) -> None:
    if seed % 2:
        monkeypatch.setattr(store_module, "QUEUE_READ_AHEAD", 4)  # refills of the queue's head
    run = Run(
        tmp_path,
        seed,
        abort=seed % 4 == 3,
        jobs=1 + seed % 2,
        max_attempts=1 + seed % 3,
        slice_claims=[6, 12, 3][seed % 3],
    )
    for _ in range(STEPS):
        run.step()
    run.turn()
    run.end_job()
    run.turn()
    run.drain()
    submitted = [c.claim_id for b in run.produced.values() if b.batch_id in run.accepted for c in b.claims]
    assert sorted(submitted) == sorted(run.done_pairs), "every pair written or failed, once"
    assert [r for r in run.rejected if "no worker can load" not in r.reason] == [], run.rejected
    run.broker.store.close()

"""The broker's verbs without sockets: its parts built over a real store in tmp_path, messages handed to
its router as frames, and what its outbox sends read back after each turn (dispatch, commit, send)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

import msgspec
import pytest

from pervade.broker.config import BrokerConfig
from pervade.broker.constants import RECEIVE_PER_TURN, REGISTER_AGAIN, ROLL_NOW_MIN_INTERVAL_S
from pervade.broker.parts import BrokerParts, build_parts
from pervade.broker.server import BrokerServer
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, BrokerStore
from pervade.constants import PROTOCOL_HEADER
from pervade.context import ContextSpec
from pervade.keyring import KeyHolder
from pervade.manifest import FileEntry, Manifest
from pervade.protocol import (
    AbortJob,
    Accepted,
    Assign,
    Batch,
    BatchFailed,
    BatchResult,
    Claim,
    Completed,
    ContextFailed,
    ContextLoaded,
    DeclareContext,
    Deliver,
    DeliverFailure,
    DeviceInfo,
    Disconnect,
    EndJob,
    Error,
    Heartbeat,
    JobDone,
    JobEnded,
    LoadContext,
    Member,
    Message,
    ProducerReady,
    ProgressReply,
    ProgressRequest,
    Pull,
    Rejected,
    Release,
    RollNow,
    SinkAck,
    SinkReady,
    StatusReply,
    StatusRequest,
    Submit,
    Verdict,
    WorkerReady,
    bodies,
    decode_body,
    encode,
    encode_group,
    message_count,
)

T0 = time.time()
CTX_A = ContextSpec(model="model-a")
CTX_B = ContextSpec(model="model-b")
A, B = CTX_A.context_id, CTX_B.context_id
CPU = DeviceInfo(kind="cpu", name="cpu")


def batch(job: str, n: int, context: ContextSpec = CTX_A, claims: int = 2) -> Batch:
    return Batch(
        batch_id=f"{job}/{n}", job_id=job, context=context, template_id="t", template="{claim} Answer:",
        claims=[Claim(claim_id=f"{n}-{i}", text=f"claim {i}") for i in range(claims)], submitted_at=T0,
    )  # fmt: skip


def result_for(b: Batch, worker_id: str = "w1", claims: int | None = None) -> BatchResult:
    verdicts = [Verdict(claim_id=c.claim_id, verdict="SUPPORTS", scores=[1, 0, 0]) for c in b.claims]
    return BatchResult(
        batch_id=b.batch_id, job_id=b.job_id, context_id=b.context.context_id, model=b.context.model,
        template_id=b.template_id, worker_id=worker_id, device="cpu", submitted_at=T0, started_at=T0, finished_at=T0,
        verdicts=verdicts[:claims],
    )  # fmt: skip


class Broker:
    """The broker's parts with an outbox that sends into ``self.sent``; sends to ``self.gone`` fail."""

    def __init__(self, state_dir, **config: object) -> None:
        settings = {
            "bind": "tcp://127.0.0.1:*",
            "max_attempts": 2,
            "drain_grace_s": 0.0,
            "state_dir": state_dir,
            "slice_claims": 0,  # each batch on its own, as each test names them; slices have tests of their own
            **config,
        }
        self.store = BrokerStore.open(state_dir)
        self.state = BrokerState(BrokerConfig(**settings), self.store)  # type: ignore[arg-type]
        self.parts: BrokerParts = build_parts(self.state, self._send, endpoint="tcp://127.0.0.1:0")
        self.sent: list[tuple[bytes, Message]] = []
        #: Each ZeroMQ message sent: (peer, how many messages it carried).
        self.groups: list[tuple[bytes, int]] = []
        self.gone: set[bytes] = set()
        self.committed_when_sent: list[bool] = []

    def _send(self, identity: bytes, frames: list[bytes]) -> bool:
        """The outbox's send: the frames of one ZeroMQ message (a group), read back as the peer would."""
        self.committed_when_sent.append(not self.store._db.in_transaction)
        self.groups.append((identity, message_count(frames)))
        if identity in self.gone:
            return False
        self.sent.extend((identity, decode_body(body)) for body in bodies(frames))
        return True

    def __call__(self, identity: bytes, *messages: Message, key: KeyHolder | None = None) -> None:
        """``identity`` sends ``messages``: each goes through the router as frames off the socket would, from
        a connection authenticated with ``key`` (None: a broker without keys)."""
        for message in messages:
            self.parts.router.handle([identity, *encode(message)], key)

    def turn(self) -> list[tuple[bytes, Message]]:
        """One turn of the loop after the messages: dispatch, commit, send; what was sent."""
        self.parts.scheduler.dispatch()
        self.parts.outbox.flush()
        sent, self.sent = self.sent, []
        return sent

    def to(self, identity: bytes) -> list[Message]:
        """One turn; what ``identity`` was sent."""
        return [message for peer, message in self.turn() if peer == identity]

    def status(self, batch_id: str) -> BatchStatus:
        row = self.store.get(batch_id)
        assert row is not None
        return row.status

    def worker(
        self,
        identity: bytes,
        contexts: Sequence[str] = (),
        credit: int = 0,
        max_contexts: int = 1,
        key: KeyHolder | None = None,
    ) -> None:
        self(identity, WorkerReady(worker_id=identity.decode(), host="h", pid=1, device=CPU,
                                   contexts=list(contexts), max_contexts=max_contexts), key=key)  # fmt: skip
        if credit:
            self(identity, Pull(credit=credit), key=key)

    def submit(self, *batches: Batch, producer: bytes = b"p", key: KeyHolder | None = None) -> None:
        self(producer, ProducerReady(producer_id=producer.decode()), *[Submit(batch=b) for b in batches], key=key)


@pytest.fixture
def broker(tmp_path) -> Iterator[Broker]:
    b = Broker(tmp_path / "state")
    yield b
    b.store.close()


def assigned(sent: list[tuple[bytes, Message]]) -> list[tuple[bytes, str]]:
    return [(peer, m.batch.batch_id) for peer, m in sent if isinstance(m, Assign)]


# --- scheduling --------------------------------------------------------------------------------------


def test_a_worker_with_the_context_resident_gets_its_batches(broker) -> None:
    broker.worker(b"wa", contexts=[A], credit=4)
    broker.worker(b"wb", contexts=[B], credit=4)
    broker.submit(batch("j", 0), batch("j", 1))
    sent = broker.turn()
    assert assigned(sent) == [(b"wa", "j/0"), (b"wa", "j/1")]
    assert not [m for _, m in sent if isinstance(m, LoadContext)]
    assert broker.status("j/0") is BatchStatus.ASSIGNED and broker.state.workers[b"wa"].credit == 2


def test_a_worker_is_told_to_load_a_context_no_worker_hosts(broker) -> None:
    broker.worker(b"w", credit=1)
    broker.submit(batch("j", 0))
    assert broker.to(b"w") == [LoadContext(context=CTX_A, evict=[]), Assign(batch=batch("j", 0))]
    assert list(broker.state.workers[b"w"].contexts) == [A]


def declared_context(model: str) -> DeclareContext:
    """A producer's declaration of a context with files (one file of one piece)."""
    manifest = Manifest(files=[FileEntry(path="model.bin", size=1, sha256=b"\x01" * 32, pieces=[b"\x02" * 32])])
    return DeclareContext(context=ContextSpec(model=model, files=manifest.digest), manifest=manifest)


def test_a_batch_resent_naming_a_copy_of_its_model_elsewhere_is_a_resend(tmp_path) -> None:
    """A producer resuming a job on another node names the same model files at another path: the same
    context id, the same batch ids, and what the batches compute is the same. They are resends, not a
    changed sweep (which would fail the job), before and after a restart."""
    here, there = declared_context("/scratch/node1/model"), declared_context("/scratch/node7/model")
    assert here.context.context_id == there.context.context_id
    broker = Broker(tmp_path / "state")
    broker(b"p", ProducerReady(producer_id="p"), here)
    broker.submit(batch("j", 0, context=here.context))
    broker.turn()
    broker.store.close()
    broker = Broker(tmp_path / "state")
    broker(b"q", ProducerReady(producer_id="q"), there)
    broker.submit(batch("j", 0, context=there.context), producer=b"q")
    assert sent_of(broker.turn(), Accepted, b"q") == [Accepted(batch_id="j/0", duplicate=True)]
    broker.store.close()


def test_a_declared_context_is_loaded_by_workers_holding_none_before_its_first_batch(broker) -> None:
    declared = declared_context("model-d")
    broker.worker(b"idle", credit=4)
    broker.worker(b"busy", contexts=[A], credit=4)
    broker(b"p", ProducerReady(producer_id="p"), declared)
    sent = broker.turn()
    # The idle worker starts loading at once, with the files it needs; the one holding another context keeps it.
    assert [(peer, m) for peer, m in sent if isinstance(m, LoadContext)] == [
        (b"idle", LoadContext(context=declared.context, manifest=declared.manifest, evict=[]))
    ]
    assert list(broker.state.workers[b"busy"].contexts) == [A]
    # Declared again (every reconnection), or by another producer: nobody is told twice.
    broker(b"p2", ProducerReady(producer_id="p2"), declared)
    assert not [m for _, m in broker.turn() if isinstance(m, LoadContext)]
    # Its first batch then goes to the worker loading it, once loaded, and is not a second load.
    broker(b"idle", ContextLoaded(context_id=declared.context.context_id, seconds=0.1))
    broker.submit(batch("j", 0, context=declared.context))
    assert broker.to(b"idle") == [Assign(batch=batch("j", 0, context=declared.context))]


def test_a_declared_context_takes_no_worker_while_other_work_is_queued(broker) -> None:
    broker.submit(batch("j", 0))  # queued, and no worker yet
    broker.turn()
    broker.worker(b"new")  # holds nothing, and its credit is still to come: the queued batch is its work
    broker(b"p", declared_context("model-d"))
    assert not [m for _, m in broker.turn() if isinstance(m, LoadContext)]
    broker(b"new", Pull(credit=1))
    assert broker.to(b"new") == [LoadContext(context=CTX_A, evict=[]), Assign(batch=batch("j", 0))]


def test_a_full_worker_evicts_its_oldest_context_to_load_one_nobody_hosts(broker) -> None:
    broker.worker(b"w", contexts=[B], credit=1, max_contexts=1)
    broker.submit(batch("j", 0))
    assert broker.to(b"w")[0] == LoadContext(context=CTX_A, evict=[B])
    assert list(broker.state.workers[b"w"].contexts) == [A] and B not in broker.state.workers[b"w"].loaded


def test_a_worker_gets_no_more_batches_than_its_credit(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=2)
    broker.submit(*[batch("j", n) for n in range(5)])
    assert [b for _, b in assigned(broker.turn())] == ["j/0", "j/1"]
    assert broker.state.queued_total() == 3
    broker(b"w", Pull(credit=1))
    assert [b for _, b in assigned(broker.turn())] == ["j/2"]


def test_batches_go_one_per_worker_in_turn(broker) -> None:
    broker.worker(b"w1", contexts=[A], credit=4)
    broker.worker(b"w2", contexts=[A], credit=4)
    broker.submit(batch("j", 0), batch("j", 1))
    assert sorted(peer for peer, _ in assigned(broker.turn())) == [b"w1", b"w2"]


def test_an_idle_worker_moves_to_a_starving_context_only_past_the_backlog(tmp_path) -> None:
    broker = Broker(tmp_path / "state", rebalance_backlog=3)
    try:
        broker.worker(b"busy", contexts=[A], credit=1)
        broker.worker(b"idle", contexts=[B], credit=4)
        broker.submit(*[batch("j", n) for n in range(3)])  # not starving while busy can take more: idle stays
        assert assigned(broker.turn()) == [(b"busy", "j/0")]
        broker.submit(*[batch("j", n) for n in range(3, 5)])  # 4 queued for one host, which has no credit
        sent = broker.turn()
        assert (b"idle", LoadContext(context=CTX_A, evict=[B])) in sent
        assert [peer for peer, _ in assigned(sent)] == [b"idle"] * 4
    finally:
        broker.store.close()


def test_an_idle_worker_copies_what_a_slow_one_holds_unstarted_and_the_first_result_counts(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"slow", contexts=[A], credit=6)
    broker.submit(*[batch("j", n) for n in range(6)])
    assert len(assigned(broker.turn())) == 6  # the slow worker's window took the whole queue
    broker.worker(b"fast", contexts=[A], credit=4)
    copies = assigned(broker.turn())
    assert copies == [(b"fast", "j/5"), (b"fast", "j/4"), (b"fast", "j/3")]  # half of its window, the last first
    assert broker.state.counters["speculative_assignments"] == 3
    assert broker.store.get("j/5").attempts == 1  # a copy is not an attempt
    assert not assigned(broker.turn())  # copied once at most
    broker(b"fast", Completed(result=result_for(batch("j", 5), worker_id="fast")))
    broker(b"slow", *[Completed(result=result_for(batch("j", n), worker_id="slow")) for n in range(6)])
    delivered = [m.result for peer, m in broker.turn() if isinstance(m, Deliver)]
    assert sorted(r.batch_id for r in delivered) == [f"j/{n}" for n in range(6)]
    assert {r.batch_id: r.worker_id for r in delivered}["j/5"] == "fast"
    assert broker.state.counters["duplicate_results"] == 1 and broker.state.counters["late_results_accepted"] == 2
    # j/4 and j/3 came first from the slow worker: the fast one's copies are no longer waited for (duplicates to come)
    assert not broker.state.workers[b"slow"].in_flight and not broker.state.workers[b"fast"].in_flight


def test_idle_workers_of_one_turn_copy_from_the_busiest_holders_each_batch_once(broker) -> None:
    """Several workers fall idle in one turn: each copies half of what the holder with the most uncopied
    batches holds, as counted after the copies before it, and no batch is copied twice."""
    for n in range(3):
        broker.worker(f"slow{n}".encode(), contexts=[A], credit=4)
    broker.submit(*[batch("j", n) for n in range(12)])
    held = {peer: [] for peer in (b"slow0", b"slow1", b"slow2")}
    for peer, batch_id in assigned(broker.turn()):
        held[peer].append(batch_id)
    for n in range(4):
        broker.worker(f"idle{n}".encode(), contexts=[A], credit=2)
    copies = assigned(broker.turn())
    copied = [batch_id for _, batch_id in copies]
    assert len(copied) == len(set(copied)) == 7  # half of each of the three holders' 4, then half of 2 left
    by_holder = {peer: [b for b in copied if b in ids] for peer, ids in held.items()}
    assert sorted(len(c) for c in by_holder.values()) == [2, 2, 3]
    for peer, ids in held.items():  # each holder is copied from the last of its window first
        assert by_holder[peer] == list(reversed(ids))[: len(by_holder[peer])]


def test_what_a_worker_still_loading_holds_is_copied_to_an_idle_one(broker) -> None:
    """A replacement for a preempted GPU takes its window while it loads for minutes: an idle worker copies it."""
    broker.worker(b"loading", credit=4)  # holds nothing: told to load, and given batches behind the load
    broker.submit(*[batch("j", n) for n in range(4)])
    to_loading = broker.to(b"loading")
    assert isinstance(to_loading[0], LoadContext) and len([m for m in to_loading if isinstance(m, Assign)]) == 4
    broker.worker(b"ready", contexts=[A], credit=4)
    assert assigned(broker.turn()) == [(b"ready", "j/3"), (b"ready", "j/2")]


def with_paces(broker: Broker, seconds_per_batch: dict[bytes, float]) -> None:
    """Register each worker (context A loaded) and have it compute one batch of two claims in the given
    seconds, as its result's times say: the broker learns each one's pace. They are left without credit."""
    for identity in seconds_per_batch:
        broker.worker(identity, contexts=[A], credit=1)
    broker.submit(*[batch("warm-up", n) for n in range(len(seconds_per_batch))])
    for peer, batch_id in assigned(broker.turn()):
        result = result_for(batch("warm-up", int(batch_id.split("/")[1])), worker_id=peer.decode())
        seconds = seconds_per_batch[peer]
        broker(peer, Completed(result=msgspec.structs.replace(result, started_at=T0 - seconds, finished_at=T0)))
    assert broker.state.counters["claims_completed"] == 2 * len(seconds_per_batch)


def test_a_copy_held_by_a_much_slower_worker_is_copied_again_by_a_much_faster_one(broker) -> None:
    """TITAN X Pascals falling idle copy each other's windows; an A10 (ten times faster) falling idle after
    them copies what a TITAN X holds as a copy, where a worker of like pace copies nothing more. The first
    answer counts; the other holders' are no longer waited for."""
    broker(b"s", SinkReady(sink_id="s"))
    with_paces(broker, {b"slow": 1.0, b"slow-copier": 1.0, b"like": 1.0, b"fast": 0.1})
    broker(b"slow", Pull(credit=1))
    broker.submit(batch("j", 0))
    assert assigned(broker.turn()) == [(b"slow", "j/0")]
    broker(b"slow-copier", Pull(credit=1))
    assert assigned(broker.turn()) == [(b"slow-copier", "j/0")]  # a first copy, between equals
    broker(b"like", Pull(credit=1))
    assert assigned(broker.turn()) == []  # every batch has a copy, held by a worker as fast as this one
    broker(b"fast", Pull(credit=1))
    assert assigned(broker.turn()) == [(b"fast", "j/0")]
    assert broker.state.counters["speculative_assignments"] == 2
    assert broker.store.get("j/0").attempts == 1  # copies are not attempts
    broker(b"fast", Completed(result=result_for(batch("j", 0), worker_id="fast")))
    delivered = [m.result for _, m in broker.turn() if isinstance(m, Deliver)]
    assert [(r.batch_id, r.worker_id) for r in delivered if r.job_id == "j"] == [("j/0", "fast")]
    assert not broker.state.workers[b"slow"].in_flight and not broker.state.workers[b"slow-copier"].in_flight
    broker(b"slow", Completed(result=result_for(batch("j", 0), worker_id="slow")))
    broker(b"slow-copier", Completed(result=result_for(batch("j", 0), worker_id="slow-copier")))
    assert broker.state.counters["duplicate_results"] == 2
    assert not [m for _, m in broker.turn() if isinstance(m, Deliver)]


def test_a_slow_idle_worker_still_copies_from_a_fast_holder_which_may_have_stalled(broker) -> None:
    """A fast worker can hang on a batch while its heartbeats go on: its pace is no reason to wait for it."""
    with_paces(broker, {b"fast": 0.1, b"slow": 1.0})
    broker(b"fast", Pull(credit=4))
    broker.submit(*[batch("j", n) for n in range(4)])
    assert len(assigned(broker.turn())) == 4
    broker(b"slow", Pull(credit=4))
    assert assigned(broker.turn()) == [(b"slow", "j/3"), (b"slow", "j/2")]


def test_the_fastest_idle_worker_chooses_first(broker) -> None:
    with_paces(broker, {b"holder": 1.0, b"slow": 1.0, b"fast": 0.1})
    broker(b"holder", Pull(credit=1))
    broker.submit(batch("j", 0))
    assert assigned(broker.turn()) == [(b"holder", "j/0")]
    broker(b"slow", Pull(credit=1))
    broker(b"fast", Pull(credit=1))  # both idle in the same turn: one batch to copy
    assert assigned(broker.turn()) == [(b"fast", "j/0")]


def test_a_pace_comes_only_from_results_that_answer_their_batch(broker) -> None:
    """A result for an unknown batch, or one that does not answer its batch, is refused and says nothing of
    the worker's speed, however short a time it claims."""
    with_paces(broker, {b"w": 1.0})
    assert broker.state.workers[b"w"].pace(A) == pytest.approx(2.0)
    broker(b"w", Pull(credit=1))
    broker.submit(batch("j", 0))
    assert assigned(broker.turn()) == [(b"w", "j/0")]
    for result in (result_for(batch("k", 0)), result_for(batch("j", 0), claims=1)):  # unknown; one verdict short
        broker(b"w", Completed(result=msgspec.structs.replace(result, started_at=T0 - 1e-6, finished_at=T0)))
    assert broker.state.counters["invalid_messages"] == 2
    assert broker.state.workers[b"w"].pace(A) == pytest.approx(2.0)


def test_a_copy_held_by_a_worker_not_timed_yet_is_copied_again_by_a_timed_one(broker) -> None:
    """As a pool starts, a TITAN X may copy a batch before anyone knows its speed: an A10 falling idle later
    copies it again rather than wait on it."""
    with_paces(broker, {b"holder": 1.0, b"fast": 0.1})
    broker(b"holder", Pull(credit=1))
    broker.submit(batch("j", 0))
    assert assigned(broker.turn()) == [(b"holder", "j/0")]
    broker.worker(b"untimed", contexts=[A], credit=1)
    assert assigned(broker.turn()) == [(b"untimed", "j/0")]
    broker.worker(b"untimed-too", contexts=[A], credit=1)
    assert assigned(broker.turn()) == []  # not timed itself: no second copy
    broker(b"fast", Pull(credit=1))
    assert assigned(broker.turn()) == [(b"fast", "j/0")]


def held_and_copied(broker: Broker, holder: bytes) -> None:
    """``holder`` is given j/0, then a worker ``copier`` falling idle copies it (the batch's holder now)."""
    broker.worker(holder, contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    assert assigned(broker.turn()) == [(holder, "j/0")]
    broker.worker(b"copier", contexts=[A], credit=1)
    assert assigned(broker.turn()) == [(b"copier", "j/0")]


def test_a_copy_whose_holder_dies_goes_back_to_the_worker_still_running_it(broker) -> None:
    """Not requeued, and not charged an attempt: the worker it was copied from is computing it, and with
    max_attempts=2 a requeue charged for the death could have failed a batch a live worker was about to answer."""
    broker(b"s", SinkReady(sink_id="s"))
    held_and_copied(broker, b"slow")
    broker.parts.workers.drop_worker(broker.state.workers[b"copier"], "died", count_attempts=True)
    row = broker.store.get("j/0")
    assert (row.status, row.worker, row.attempts) == (BatchStatus.ASSIGNED, b"slow", 1)
    assert broker.state.counters["requeues"] == 0 and "j/0" not in broker.state.speculated
    broker(b"slow", Completed(result=result_for(batch("j", 0), worker_id="slow")))
    assert [m.result.worker_id for _, m in broker.turn() if isinstance(m, Deliver)] == ["slow"]


def test_a_copy_never_goes_back_to_a_worker_whose_context_failed(broker) -> None:
    """That worker dropped every batch of the context, copied elsewhere or not: handed back a copy whose holder
    then dies, it would hold it for good, and the job would never end."""
    broker.worker(b"loading", credit=4)  # given j/0..j/3 behind its load
    broker.submit(*[batch("j", n) for n in range(4)])
    broker.turn()
    broker.worker(b"ready", contexts=[A], credit=2)
    assert assigned(broker.turn()) == [(b"ready", "j/3"), (b"ready", "j/2")]
    broker(b"loading", ContextFailed(context_id=A, error="cannot load"))
    assert not broker.state.workers[b"loading"].in_flight
    broker.parts.workers.drop_worker(broker.state.workers[b"ready"], "died", count_attempts=True)
    assert {broker.status(f"j/{n}") for n in range(4)} == {BatchStatus.QUEUED}


def test_a_copy_never_goes_back_to_a_worker_that_released_it(broker) -> None:
    held_and_copied(broker, b"leaver")
    broker(b"leaver", Release(batch_ids=["j/0"], leaving=True))  # the copy holds it: nothing to requeue
    assert not broker.state.workers[b"leaver"].in_flight
    broker.parts.workers.drop_worker(broker.state.workers[b"copier"], "died", count_attempts=False)
    assert broker.status("j/0") is BatchStatus.QUEUED


def test_an_assign_never_sent_leaves_the_worker_s_window_whoever_holds_the_batch_now(broker) -> None:
    """The first holder's Assign fails while the other worker, idle in the same turn, copied the batch: the
    first never saw it, keeps its credit, and is not handed the batch back later."""
    broker.worker(b"c", contexts=[A], credit=1)
    broker.worker(b"o", contexts=[A], credit=1)  # the first turn starts one worker along: at o
    broker.gone.add(b"o")
    broker.submit(batch("j", 0))
    broker.turn()
    o, row = broker.state.workers[b"o"], broker.store.get("j/0")
    assert (row.status, row.worker) == (BatchStatus.ASSIGNED, b"c")
    assert not o.in_flight and o.credit == 1
    broker.parts.workers.drop_worker(broker.state.workers[b"c"], "died", count_attempts=False)
    assert broker.status("j/0") is BatchStatus.QUEUED


def test_a_failure_reported_for_a_batch_taken_elsewhere_still_frees_the_worker(broker) -> None:
    held_and_copied(broker, b"slow")
    broker(b"slow", BatchFailed(batch_id="j/0", error="out of memory"))  # the copy is the batch's holder now
    assert not broker.state.workers[b"slow"].in_flight
    assert broker.store.get("j/0").worker == b"copier"


def test_an_assignment_that_cannot_be_sent_goes_back_to_the_front_of_its_queue(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0), batch("j", 1))
    broker.gone.add(b"w")
    assert assigned(broker.turn()) == []
    worker = broker.state.workers[b"w"]
    assert broker.status("j/0") is BatchStatus.QUEUED and worker.credit == 1 and not worker.in_flight
    assert broker.store.next_queued(A).batch_id == "j/0" and broker.store.get("j/0").attempts == 0


def test_every_message_of_a_group_that_cannot_be_sent_is_failed(broker) -> None:
    """A group travels as one frame: a send that fails fails each of its messages (the outbox counts them
    from the group's declared length, not from its frames)."""
    broker.worker(b"w", contexts=[A], credit=3)
    broker.submit(*[batch("j", n) for n in range(3)])
    broker.gone.add(b"w")
    assert assigned(broker.turn()) == []
    assert (b"w", 3) in broker.groups  # one ZeroMQ message carried the three assignments
    worker = broker.state.workers[b"w"]
    assert [broker.status(f"j/{n}") for n in range(3)] == [BatchStatus.QUEUED] * 3
    assert worker.credit == 3 and not worker.in_flight


def test_an_envelope_counts_its_messages_and_at_least_its_frames_towards_a_turn(broker) -> None:
    (frames,) = encode_group([Heartbeat()] * 5)
    assert broker.parts.router.handle([b"p", *frames]) == 5
    assert broker.parts.router.handle([b"p", PROTOCOL_HEADER, b"\x90"]) == 1  # an empty group
    assert broker.parts.router.handle([b"p", PROTOCOL_HEADER] + [b"\x90"] * 100) == 100
    assert broker.parts.router.handle([b"p", PROTOCOL_HEADER, b"\xdc\xff\xff"]) == 1  # refused unread
    assert broker.parts.router.handle([b"p", PROTOCOL_HEADER, b"\x91" * 1000 + b"\xc0"]) == 1  # refused
    assert sum(isinstance(message, Error) for _, message in broker.turn()) == 2


def test_a_turn_reads_a_bounded_number_of_messages_even_from_keys_not_admitted() -> None:
    """``BrokerServer.receive`` over a socket that always has more to read: the turn ends at
    ``RECEIVE_PER_TURN`` messages, whether they are handled or dropped (a key not admitted)."""

    class EndlessSocket:
        reads = 0

        def recv_multipart(self, flags: int, copy: bool = True) -> list[bytes]:
            self.reads += 1
            assert self.reads <= 2 * RECEIVE_PER_TURN, "the turn never ended"
            return [b"x", *encode(Heartbeat())]

    class NoKeyAdmitted:
        def sender(self, identity: bytes) -> None:
            return None

    server = BrokerServer.__new__(BrokerServer)  # its socket and key guard alone: no broker behind them
    server.parts, server.guard, server.plain = SimpleNamespace(router=None), NoKeyAdmitted(), EndlessSocket()
    server.receive()
    assert server.plain.reads == RECEIVE_PER_TURN


# --- what happens to a batch ---------------------------------------------------------------------------


def test_a_dead_worker_s_batches_are_requeued_and_only_the_one_in_hand_is_charged(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=3)
    broker.submit(*[batch("j", n) for n in range(3)])
    broker.turn()
    dead_after = broker.state.config.heartbeats.dead_after_s
    broker.parts.liveness.purge_dead_peers(time.monotonic() + dead_after + 1)
    assert b"w" not in broker.state.workers and broker.state.counters["workers_declared_dead"] == 1
    assert [broker.status(f"j/{n}") for n in range(3)] == [BatchStatus.QUEUED] * 3
    assert [broker.store.get(f"j/{n}").attempts for n in range(3)] == [1, 0, 0]
    assert broker.state.counters["requeues"] == 3
    assert broker.store.next_queued(A).batch_id == "j/0"  # in their order, at the front


def test_a_claim_that_fails_max_attempts_times_is_delivered_to_a_sink_as_a_failure(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=2)
    broker.submit(batch("j", 0, claims=1))  # one claim: retried, never split
    broker.turn()
    broker(b"w", BatchFailed(batch_id="j/0", error="out of memory"))
    assert assigned(broker.turn()) == [(b"w", "j/0")]  # retried
    broker(b"w", BatchFailed(batch_id="j/0", error="out of memory"))
    [failure] = broker.to(b"s")
    assert isinstance(failure, DeliverFailure) and not failure.redelivery
    assert (failure.failure.batch_id, failure.failure.attempts) == ("j/0", 2)
    assert failure.failure.error == "out of memory (attempts: 2)" and failure.failure.claim_ids == ["0-0"]
    assert broker.status("j/0") is BatchStatus.DELIVERED and broker.state.counters["batches_failed"] == 1


def test_a_duplicate_result_is_suppressed_and_told_by_its_row_without_a_read(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    assert broker.to(b"s") == [Deliver(result=result_for(batch("j", 0)))]  # committed: its claims on disk only
    statements: list[str] = []
    broker.store._db.set_trace_callback(statements.append)
    broker(b"w", Completed(result=result_for(batch("j", 0))))  # a copy's answer, after the first
    broker.store._db.set_trace_callback(None)
    assert statements == []
    assert broker.to(b"s") == [] and broker.status("j/0") is BatchStatus.DELIVERED
    assert broker.state.counters["duplicate_results"] == 1 and broker.state.counters["claims_completed"] == 2


def test_a_late_result_from_a_previous_assignee_is_accepted_once(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w1", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w1", Disconnect(reason="lost"))  # w1 drops out; the batch goes to w2
    broker.worker(b"w2", contexts=[A], credit=1)
    assert assigned(broker.turn()) == [(b"w2", "j/0")]
    broker(b"w1", Completed(result=result_for(batch("j", 0), "w1")))  # w1's answer arrives after all
    sent = broker.turn()
    assert (b"s", Deliver(result=result_for(batch("j", 0), "w1"))) in sent
    assert (b"w1", Disconnect(reason=REGISTER_AGAIN)) in sent  # the broker no longer knows w1
    assert broker.state.counters["late_results_accepted"] == 1 and not broker.state.workers[b"w2"].in_flight
    broker(b"w2", Completed(result=result_for(batch("j", 0), "w2")))
    assert broker.to(b"s") == [] and broker.state.counters["duplicate_results"] == 1


def test_a_result_that_does_not_answer_its_batch_is_refused_and_the_batch_requeued(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0), claims=1)))
    [error] = broker.to(b"w")
    assert isinstance(error, Error) and "does not answer exactly the batch's claims" in error.reason
    assert broker.status("j/0") is BatchStatus.QUEUED and broker.store.get("j/0").attempts == 1
    assert broker.state.counters["results_refused"] == 1 and not broker.state.workers[b"w"].in_flight


def test_a_result_from_a_clock_set_wrong_is_kept_on_the_broker_s_clock(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    ahead = msgspec.structs.replace(result_for(batch("j", 0)), started_at=T0 + 7200, finished_at=T0 + 7201)
    broker(b"w", Completed(result=ahead))
    [delivery] = broker.to(b"s")
    assert delivery.result.finished_at <= time.time()
    assert delivery.result.finished_at - delivery.result.started_at == pytest.approx(1.0)
    assert broker.state.counters["clock_skew_corrected"] == 1 and broker.state.workers[b"w"].clock_skewed


def test_a_context_that_kills_whoever_loads_it_fails_its_batches(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.submit(batch("j", 0))
    for n in range(2):  # max_attempts: 2
        broker.worker(b"w%d" % n, credit=1)
        assert isinstance(broker.to(b"w%d" % n)[0], LoadContext)
        broker(b"w%d" % n, Disconnect(reason="killed"))
    [failure] = broker.to(b"s")
    assert isinstance(failure, DeliverFailure) and "2 workers died while loading it" in failure.failure.error
    assert broker.state.failed_contexts[A] and broker.store.get("j/0").attempts == 0


# --- sinks and jobs --------------------------------------------------------------------------------------


def test_a_result_waits_for_a_sink_and_goes_to_the_first_that_joins(broker) -> None:
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    broker.turn()
    assert broker.status("j/0") is BatchStatus.DONE
    broker(b"s", SinkReady(sink_id="s"))
    broker.parts.sinks.deliver_held()
    assert broker.to(b"s") == [Deliver(result=result_for(batch("j", 0)))]
    assert broker.status("j/0") is BatchStatus.DELIVERED and broker.state.sinks[b"s"].unacked == {"j/0"}


def test_what_a_leaving_sink_did_not_acknowledge_is_delivered_again(broker) -> None:
    broker(b"s1", SinkReady(sink_id="s1"))
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    broker.turn()
    broker(b"s1", Disconnect(reason="bye"))
    broker(b"s2", SinkReady(sink_id="s2"))
    broker.parts.sinks.deliver_held()
    assert broker.to(b"s2") == [Deliver(result=result_for(batch("j", 0)), redelivery=True)]
    assert broker.state.counters["redeliveries"] == 1


def test_a_sink_ack_completes_the_job_and_its_producer_hears_job_done(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=2)
    broker.submit(batch("j", 0), batch("j", 1))
    held = broker.state.jobs["j"].holds()
    broker(b"p", EndJob(job_id="j", batches=2, pairs=4, digest=held.digest))
    assert broker.to(b"p")[-1] == JobEnded(job_id="j", batches=2, pairs=4, digest=held.digest, agreed=True)
    broker(b"w", *[Completed(result=result_for(batch("j", n))) for n in range(2)])
    broker.turn()
    broker(b"s", SinkAck(batch_ids=["j/0", "j/1"]))
    sent = broker.turn()
    done = JobDone(job_id="j", batches=2, pairs=4, batches_written=2, pairs_written=4)
    assert (b"p", done) in sent and (b"s", done) in sent
    assert broker.status("j/0") is BatchStatus.WRITTEN and broker.state.jobs["j"].done_reported


def test_a_sink_is_told_to_roll_once_nothing_more_is_coming_for_the_jobs_it_was_delivered(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=1)

    def told_to_roll(now: float) -> list[bytes]:
        broker.parts.sinks.roll_now_if_nothing_more(now)
        return [peer for peer, message in broker.turn() if isinstance(message, RollNow)]

    def end_job(job: str) -> None:
        held = broker.state.jobs[job].holds()
        broker(b"p", EndJob(job_id=job, batches=held.batches, pairs=held.pairs, digest=held.digest))

    broker.submit(batch("j", 0), batch("j", 1))
    end_job("j")
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    assert told_to_roll(10.0) == []  # j/1 is queued
    broker(b"w", Pull(credit=1))
    broker.turn()
    assert told_to_roll(20.0) == []  # j/1 is running
    broker(b"w", Completed(result=result_for(batch("j", 1))), Pull(credit=1))
    assert told_to_roll(30.0) == [b"s"]
    assert told_to_roll(40.0) == []  # once, until something more is delivered to it

    broker.submit(batch("k", 0))  # a job its producer keeps open: it may send more
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("k", 0))), Pull(credit=1))
    assert told_to_roll(50.0) == []  # its sink waits for its idle roll, which acknowledges everything
    broker(b"s", SinkAck(batch_ids=["j/0", "j/1", "k/0"]))
    broker.turn()

    for job, now in (("m", 60.0), ("n", 60.5)):  # the open job k no longer holds back the others' hints
        broker.submit(batch(job, 0))
        end_job(job)
        broker.turn()
        broker(b"w", Completed(result=result_for(batch(job, 0))), Pull(credit=1))
        assert told_to_roll(now) == ([b"s"] if job == "m" else [])  # n: too soon after m's hint
    assert told_to_roll(60.5 + ROLL_NOW_MIN_INTERVAL_S) == [b"s"]


def test_a_failed_batch_acknowledged_makes_a_job_done_with_its_error(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0, claims=1))
    broker(b"p", EndJob(job_id="j", batches=1, pairs=1))
    broker.turn()
    for _ in range(2):
        broker(b"w", BatchFailed(batch_id="j/0", error="bad"), Pull(credit=1))
        broker.turn()
    broker(b"s", SinkAck(batch_ids=["j/0"]))
    [done] = broker.to(b"p")
    assert isinstance(done, JobDone) and (done.failed_batches, done.pairs_failed) == (1, 1)
    assert done.errors == ["j/0: bad (attempts: 2)"]


def test_a_batch_that_cannot_be_scored_is_split_until_its_bad_claim_fails_alone(broker) -> None:
    """One bad claim among four: the batch is halved, the half holding it halved again, and the claim alone
    is retried then failed; the three others get their verdicts, and the job counts its one batch failed
    with exactly one pair failed."""
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=8)
    four = batch("j", 0, claims=4)
    broker.submit(four)
    broker(b"p", EndJob(job_id="j", batches=1, pairs=4))
    broker.turn()
    bad = "0-2"
    to_sink: list[Message] = []

    def answer(sent: list[tuple[bytes, Message]]) -> list[str]:
        """The worker scores what it was assigned: any batch holding the bad claim fails."""
        ids = []
        for peer, message in sent:
            if peer == b"s":
                to_sink.append(message)
            if isinstance(message, Assign):
                part = message.batch
                ids.append(part.batch_id)
                if any(c.claim_id == bad for c in part.claims):
                    broker(b"w", BatchFailed(batch_id=part.batch_id, error="too long"), Pull(credit=1))
                else:
                    broker(b"w", Completed(result=result_for(part)), Pull(credit=1))
        return ids

    broker(b"w", BatchFailed(batch_id="j/0", error="too long"), Pull(credit=1))
    assigned_ids = []
    for _ in range(6):
        assigned_ids += answer(broker.turn())
    assert assigned_ids == ["j/0~0-2", "j/0~2-4", "j/0~2-3", "j/0~3-4", "j/0~2-3"]  # the bad claim: 2 attempts
    assert broker.status("j/0") is BatchStatus.SPLIT and broker.state.counters["batches_split"] == 2
    verdicts = sorted(v.claim_id for m in to_sink if isinstance(m, Deliver) for v in m.result.verdicts)
    [failure] = [m.failure for m in to_sink if isinstance(m, DeliverFailure)]
    assert verdicts == ["0-0", "0-1", "0-3"] and failure.claim_ids == [bad] and failure.batch_id == "j/0~2-3"
    broker(b"s", SinkAck(batch_ids=["j/0~0-2", "j/0~3-4"]))
    assert not [m for peer, m in broker.turn() if peer == b"p"]  # one part still open: the job is not done
    broker(b"s", SinkAck(batch_ids=["j/0~2-3"]))
    [done] = broker.to(b"p")
    assert isinstance(done, JobDone) and (done.batches, done.pairs) == (1, 4)
    assert (done.batches_written, done.failed_batches, done.pairs_written, done.pairs_failed) == (0, 1, 3, 1)
    assert done.errors == ["j/0 (split): j/0~2-3: too long (attempts: 2)"]
    assert broker.status("j/0") is BatchStatus.WRITTEN


def test_a_batch_whose_part_id_a_producer_took_is_retried_whole(broker) -> None:
    """A batch named like a part, queued by a broker of the version before such names were refused (its state
    holds it): the failed batch is then not split, but retried whole, and the broker goes on (a part inserted
    under a taken id would fail the turn's commit)."""
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0, claims=4))
    broker.store.add(msgspec.structs.replace(batch("j", 1), batch_id="j/0~0-2"))  # as the older broker queued it
    assert assigned(broker.turn()) == [(b"w", "j/0")]
    broker(b"w", BatchFailed(batch_id="j/0", error="too long"), Pull(credit=1))
    assert assigned(broker.turn()) == [(b"w", "j/0")]  # retried whole, in front of the other batch
    assert broker.state.counters["batches_split"] == 0 and broker.store.get("j/0").attempts == 2
    assert broker.store.get("j/0~0-2").root is None


def test_a_resubmitted_batch_is_acknowledged_and_not_queued_twice(broker) -> None:
    broker.submit(batch("j", 0))
    broker.submit(batch("j", 0))
    assert broker.to(b"p") == [Accepted(batch_id="j/0"), Accepted(batch_id="j/0", duplicate=True)]
    assert broker.state.queued_total() == 1 and broker.state.counters["duplicate_submissions"] == 1


# --- the router and the outbox ---------------------------------------------------------------------------


def test_a_peer_the_broker_does_not_know_is_told_to_register_again(broker) -> None:
    broker(b"stranger", Pull(credit=1))
    assert broker.to(b"stranger") == [Disconnect(reason=REGISTER_AGAIN)]
    assert broker.state.counters["unknown_peer_messages"] == 1 and not broker.state.workers


def test_nothing_is_sent_before_the_state_it_describes_is_committed(broker) -> None:
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=1)
    broker.submit(batch("j", 0))
    assert broker.parts.outbox.queued and not broker.sent  # queued during the turn, not sent
    broker.turn()
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    broker.turn()
    assert broker.committed_when_sent and all(broker.committed_when_sent)
    reader = sqlite3.connect(broker.store.path)  # another connection sees what the peers were told
    try:
        assert reader.execute("SELECT status FROM batches WHERE batch_id = 'j/0'").fetchone() == ("delivered",)
    finally:
        reader.close()


# --- the status views ----------------------------------------------------------------------------------


def test_a_progress_reply_lists_the_jobs_alone_whatever_the_pool(broker) -> None:
    """A sink's bar asks for progress every second: its answer must not grow with the workers, as the
    status snapshot does, and must agree with the snapshot's jobs."""
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=2)
    broker.submit(batch("j", 0), batch("j", 1))
    held = broker.state.jobs["j"].holds()
    broker(b"p", EndJob(job_id="j", batches=2, pairs=4, digest=held.digest))
    broker(b"w", Completed(result=result_for(batch("j", 0))))
    broker.turn()
    broker(b"s", SinkAck(batch_ids=["j/0"]))
    broker.turn()

    def ask() -> tuple[ProgressReply, StatusReply]:
        broker(b"s", ProgressRequest(), StatusRequest())
        progress, status = broker.to(b"s")
        assert isinstance(progress, ProgressReply) and isinstance(status, StatusReply)
        return progress, status

    few_progress, few_status = ask()
    assert [(j.job_id, j.pairs, j.pairs_done) for j in few_progress.progress.jobs] == [("j", 4, 2)]
    assert few_progress.progress.jobs == few_status.snapshot.jobs
    for n in range(500):
        broker.worker(f"idle-{n}".encode(), contexts=[A])
    many_progress, many_status = ask()
    assert many_progress.progress.jobs == few_progress.progress.jobs
    size = lambda reply: len(encode(reply)[1])  # noqa: E731
    assert size(many_progress) == size(few_progress)  # the same bytes with 501 workers as with one
    assert size(many_status) > 50 * size(many_progress)  # the snapshot lists each of them
    assert broker.state.counters["progress_requests"] == 2


# --- slices ----------------------------------------------------------------------------------------------


@pytest.fixture
def slicing(tmp_path) -> Iterator[Broker]:
    """A broker that slices: up to 6 claims, three of the 2-claim batches ``batch`` makes."""
    b = Broker(tmp_path / "state", slice_claims=6)
    yield b
    b.store.close()


def sent_of(sent: list[tuple[bytes, Message]], kind: type[Message], peer: bytes | None = None) -> list:
    return [m for p, m in sent if isinstance(m, kind) and (peer is None or p == peer)]


def test_small_batches_submitted_together_travel_as_a_slice_and_are_counted_as_themselves(slicing) -> None:
    broker = slicing
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=5)  # a credit per producer batch: 3 for the slice, 2 for the others
    broker.submit(*[batch("j", n) for n in range(4)], batch("k", 0), batch("j", 4, context=CTX_B))
    held = broker.state.jobs["j"].holds()
    broker(b"p", EndJob(job_id="j", batches=5, pairs=10, digest=held.digest))
    sent = broker.turn()
    # One Accepted for the turn's six new batches, in order: one each cost more than the rest of a submission.
    assert sent_of(sent, Accepted) == [Accepted(batch_id="j/0", more=["j/1", "j/2", "j/3", "k/0", "j/4"])]
    assert sent_of(sent, JobEnded)[0].agreed  # the job holds its five batches, sliced or not
    assigns = sent_of(sent, Assign, b"w")
    # Up to 6 claims, one job, one context: j/3 starts a slice of its own, which k/0 (another job) cannot join.
    assert [(a.batch.batch_id.startswith("slice~"), [m.batch_id for m in a.batch.members]) for a in assigns] == [
        (True, ["j/0", "j/1", "j/2"]), (False, []), (False, [])
    ]  # fmt: skip
    assert [c.claim_id for c in assigns[0].batch.claims] == ["0-0", "0-1", "1-0", "1-1", "2-0", "2-1"]
    assert [a.batch.batch_id for a in assigns[1:]] == ["j/3", "k/0"]
    assert broker.state.queued_total() == 1 and broker.store.status_counts[BatchStatus.ASSIGNED] == 5
    assert broker.state.workers[b"w"].credit == 0
    slice_id = assigns[0].batch.batch_id

    broker(b"w", *[Completed(result=result_for(a.batch)) for a in assigns[:2]])
    deliveries = sent_of(broker.turn(), Deliver, b"s")
    assert [(d.result.batch_id, [m.batch_id for m in d.members]) for d in deliveries] == [
        (slice_id, ["j/0", "j/1", "j/2"]), ("j/3", [])
    ]  # fmt: skip
    broker(b"s", SinkAck(batch_ids=[slice_id, "j/3"]))
    sent = broker.turn()
    assert sent_of(sent, JobDone, b"p") == []  # j/4 is still to come
    assert broker.state.jobs["j"].written == 4 and broker.state.jobs["j"].pairs_written == 8
    assert broker.status(slice_id) is BatchStatus.WRITTEN


def test_batches_submitted_at_other_times_are_sliced_apart_and_each_keeps_its_time(slicing) -> None:
    """A slice carries one ``submitted_at``, which the output writes on each of its rows: a batch stamped at
    another time (a later trip, a clock corrected for it alone) starts a slice of its own."""
    broker = slicing
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=4)
    later = [msgspec.structs.replace(batch("j", n, claims=1), submitted_at=T0 + 30.0) for n in (2, 3)]
    broker.submit(batch("j", 0, claims=1), batch("j", 1, claims=1), *later)
    assigns = sent_of(broker.turn(), Assign, b"w")
    assert [([m.batch_id for m in a.batch.members], a.batch.submitted_at) for a in assigns] == [
        (["j/0", "j/1"], T0), (["j/2", "j/3"], T0 + 30.0)
    ]  # fmt: skip
    broker(b"w", *[Completed(result=msgspec.structs.replace(result_for(a.batch), submitted_at=a.batch.submitted_at))
                   for a in assigns])  # fmt: skip
    written = {m.batch_id: d.result.submitted_at for d in sent_of(broker.turn(), Deliver, b"s") for m in d.members}
    assert written == {"j/0": T0, "j/1": T0, "j/2": T0 + 30.0, "j/3": T0 + 30.0}


def test_a_batch_of_a_slice_is_known_by_its_id_after_a_restart_and_a_slice_s_id_is_no_producer_s(tmp_path) -> None:
    broker = Broker(tmp_path / "state", slice_claims=6)
    broker.submit(batch("j", 0), batch("j", 1))
    broker.turn()
    found = broker.store.submitted("j/1")
    assert found is not None and found.slice_id is not None and found.slice_id.startswith("slice~")
    broker.store.close()

    broker = Broker(tmp_path / "state", slice_claims=6)
    broker.submit(batch("j", 1))  # a resend: acknowledged, not queued again
    changed = msgspec.structs.replace(batch("j", 0), claims=[Claim(claim_id="0-0", text="another claim")])
    broker.submit(changed, producer=b"q")
    broker.submit(msgspec.structs.replace(batch("k", 0), batch_id=found.slice_id), producer=b"r")
    named = msgspec.structs.replace(batch("k", 1), members=[Member(batch_id="k/9", claims=2)])
    broker.submit(named, producer=b"t")
    sent = broker.turn()
    assert sent_of(sent, Accepted, b"p") == [Accepted(batch_id="j/1", duplicate=True)]
    assert "submitted before with other claims" in sent_of(sent, Rejected, b"q")[0].reason
    assert "the broker's name for a slice" in sent_of(sent, Rejected, b"r")[0].reason
    assert "cannot name members" in sent_of(sent, Rejected, b"t")[0].reason
    assert broker.state.queued_total() == 2 and broker.state.counters["conflicting_submissions"] == 3
    broker.store.close()


def test_a_slice_that_fails_is_dissolved_and_only_the_batch_at_fault_fails(slicing) -> None:
    broker = slicing
    broker(b"s", SinkReady(sink_id="s"))
    broker.worker(b"w", contexts=[A], credit=3)
    broker.submit(*[batch("j", n, claims=1) for n in range(3)])
    [(_, slice_id)] = assigned(broker.turn())
    broker(b"w", BatchFailed(batch_id=slice_id, error="claim 1-0 is too long"), Pull(credit=3))
    assert assigned(broker.turn()) == [(b"w", "j/0"), (b"w", "j/1"), (b"w", "j/2")]  # at the front, in order
    assert broker.status(slice_id) is BatchStatus.SPLIT and broker.state.counters["slices_dissolved"] == 1
    assert broker.store.get("j/1").attempts == 1  # its own first attempt: the slice's failure is not charged

    broker(
        b"w",
        Completed(result=result_for(batch("j", 0, claims=1))),
        Completed(result=result_for(batch("j", 2, claims=1))),
    )
    broker(b"w", BatchFailed(batch_id="j/1", error="claim 1-0 is too long"), Pull(credit=1))
    broker.turn()
    broker(b"w", BatchFailed(batch_id="j/1", error="claim 1-0 is too long"))
    sent = broker.turn()
    assert [f.failure.batch_id for f in sent_of(sent, DeliverFailure, b"s")] == ["j/1"]
    broker(b"s", SinkAck(batch_ids=["j/0", "j/2", "j/1"]))
    broker(b"p", EndJob(job_id="j", batches=3, pairs=3, digest=broker.state.jobs["j"].holds().digest))
    [done] = sent_of(broker.turn(), JobDone, b"p")
    assert (done.batches_written, done.failed_batches, done.pairs_written, done.pairs_failed) == (2, 1, 2, 1)


def test_an_aborted_job_s_slice_is_recorded_failed_batch_by_batch(slicing) -> None:
    broker = slicing
    broker(b"s", SinkReady(sink_id="s"))
    broker.submit(*[batch("j", n) for n in range(3)])
    broker.turn()
    broker(b"p", AbortJob(job_id="j", reason="bad input"))
    failures = sent_of(broker.turn(), DeliverFailure, b"s")
    assert [f.failure.batch_id for f in failures] == ["j/0", "j/1", "j/2"]
    assert [f.failure.claim_ids for f in failures] == [["0-0", "0-1"], ["1-0", "1-1"], ["2-0", "2-1"]]
    assert broker.state.queued_total() == 0


def test_idle_workers_share_a_slice_and_none_gets_more_than_its_credit(slicing) -> None:
    broker = slicing
    broker.worker(b"a", contexts=[A], credit=8)
    broker.worker(b"b", contexts=[A], credit=2)
    broker.submit(*[batch("j", n, claims=1) for n in range(6)])  # one slice of six batches
    held: dict[bytes, list[str]] = {b"a": [], b"b": []}
    for peer, assign in [(p, m) for p, m in broker.turn() if isinstance(m, Assign)]:
        held[peer] += [m.batch_id for m in assign.batch.members] or [assign.batch.batch_id]
    assert sorted(held[b"a"] + held[b"b"]) == [f"j/{n}" for n in range(6)] and broker.state.queued_total() == 0
    assert len(held[b"b"]) == 2 and len(held[b"a"]) == 4  # b's credit, and the rest: a share at a time
    assert broker.state.workers[b"a"].credit == 4 and broker.state.workers[b"b"].credit == 0
    assert broker.store.status_counts[BatchStatus.ASSIGNED] == 6


def test_a_batch_named_like_a_part_is_refused_and_opens_no_job(slicing) -> None:
    """A part's id (``ROOT~START-STOP``) is the broker's: the sink reads it as claims of the root batch, so a
    producer's batch named ``j/0~0-2`` would have its rows taken for j/0's (or j/0's for its own)."""
    broker = slicing
    broker.submit(batch("j", 0, claims=4))
    broker.turn()
    broker.submit(msgspec.structs.replace(batch("k", 2, claims=1), batch_id="j/0~0-2"), producer=b"q")
    [rejected] = sent_of(broker.turn(), Rejected, b"q")
    assert "form of a split batch's part" in rejected.reason and "k" not in broker.state.jobs
    broker.worker(b"w", contexts=[A], credit=1)
    assert assigned(broker.turn()) == [(b"w", "j/0")]
    broker(b"w", BatchFailed(batch_id="j/0", error="too long"), Pull(credit=2))
    assert assigned(broker.turn()) == [(b"w", "j/0~0-2"), (b"w", "j/0~2-4")]  # split as named


def test_a_worker_dropping_a_slice_it_copied_gets_back_the_credit_it_used_and_no_more(slicing) -> None:
    broker = slicing
    broker.worker(b"a", contexts=[A], credit=5)
    broker.submit(*[batch("j", n, claims=1) for n in range(5)])
    [(_, slice_id)] = assigned(broker.turn())
    broker.worker(b"b", contexts=[A], credit=1)  # idle, loaded, one credit: copies the whole slice
    assert assigned(broker.turn()) == [(b"b", slice_id)] and broker.state.workers[b"b"].credit == 0
    broker(b"b", ContextFailed(context_id=A, error="out of memory"))
    broker.turn()
    assert broker.state.workers[b"b"].credit == 1  # what it granted, not the five batches of the slice


def test_a_turn_s_acceptances_for_a_producer_travel_as_one_message_in_order(broker) -> None:
    broker.submit(batch("j", 0))
    broker.turn()
    broker.submit(batch("j", 1), batch("j", 0), batch("j", 2), batch("j", 3))  # j/0 again: a duplicate
    broker.submit(batch("k", 0), producer=b"q")
    sent = broker.turn()
    assert sent_of(sent, Accepted, b"p") == [
        Accepted(batch_id="j/1"), Accepted(batch_id="j/0", duplicate=True), Accepted(batch_id="j/2", more=["j/3"])
    ]  # fmt: skip
    assert sent_of(sent, Accepted, b"q") == [Accepted(batch_id="k/0")]
    assert broker.state.queued_total() == 5

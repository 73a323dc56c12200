"""The broker, live on a loopback socket, driven by peers that speak the protocol by hand."""

from __future__ import annotations

import time

import msgpack
import pytest

from pervade.batchset import BatchSet
from pervade.broker.constants import REGISTER_AGAIN
from pervade.broker.store import BatchStatus
from pervade.constants import PROTOCOL_HEADER
from pervade.context import ContextSpec
from pervade.protocol import (
    Accepted,
    Assign,
    Batch,
    BatchFailed,
    BatchResult,
    Claim,
    Completed,
    ContextFailed,
    Deliver,
    DeliverFailure,
    DeviceInfo,
    Disconnect,
    Drained,
    EndJob,
    Error,
    Heartbeat,
    JobDone,
    JobEnded,
    LoadContext,
    Pull,
    Rejected,
    RollNow,
    SinkAck,
    SinkReady,
    Submit,
    Verdict,
    WorkerReady,
)
from tests.waiting import until_state

#: When the test batches were "submitted": a true time, so the broker takes it as given (it moves times
#: from a clock set wrong onto its own).
T0 = time.time()
CTX_A = ContextSpec(model="model-a")
CTX_B = ContextSpec(model="model-b")
CPU = DeviceInfo(kind="cpu", name="cpu")


def batch(job: str, n: int, context: ContextSpec = CTX_A, claims: int = 2) -> Batch:
    return Batch(
        batch_id=f"{job}/{n}",
        job_id=job,
        context=context,
        template_id="t",
        template="{claim} Answer:",
        claims=[Claim(claim_id=f"{n}-{i}", text=f"claim {i}") for i in range(claims)],
        submitted_at=T0,
    )


def result_for(b: Batch, worker_id: str = "w1") -> BatchResult:
    return BatchResult(
        batch_id=b.batch_id, job_id=b.job_id, context_id=b.context.context_id, model=b.context.model,
        template_id=b.template_id, worker_id=worker_id, device="cpu", submitted_at=T0, started_at=T0, finished_at=T0,
        verdicts=[Verdict(claim_id=c.claim_id, verdict="SUPPORTS", scores=[1, 0, 0]) for c in b.claims],
    )  # fmt: skip


async def end_job(producer, job_id: str, batches: int, claims: int = 2) -> None:
    """End a job of ``batches`` batches made by ``batch(job_id, n, claims=claims)``, as a producer counts
    them; the broker must agree that it holds exactly those."""
    held = BatchSet()
    for n in range(batches):
        held.add(f"{job_id}/{n}", claims)
    await producer.send(EndJob(job_id=job_id, batches=held.batches, pairs=held.pairs, digest=held.digest))
    assert await producer.receive() == JobEnded(job_id=job_id, batches=held.batches, pairs=held.pairs,
                                                digest=held.digest, agreed=True)  # fmt: skip


async def register_worker(peer, worker_id: str, credit: int, contexts: list[str] = ()) -> None:
    await peer.send(WorkerReady(worker_id=worker_id, host="h", pid=1, device=CPU, contexts=list(contexts)))
    await peer.send(Pull(credit=credit))


async def assign_one(producer, worker, job: str) -> Batch:
    """Submit ``batch(job, 0)`` and register ``worker`` with one credit: the batch it is then assigned,
    after the LoadContext for its model."""
    await producer.send(Submit(batch=batch(job, 0)))
    await producer.receive()
    await register_worker(worker, "w", credit=1)
    assert isinstance(await worker.receive(), LoadContext)
    assigned = await worker.receive()
    assert isinstance(assigned, Assign)
    return assigned.batch


async def test_a_job_flows_from_producer_to_worker_to_sink_and_back(connect) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s1"))
    for n in range(2):
        await producer.send(Submit(batch=batch("j1", n)))
        assert await producer.receive() == Accepted(batch_id=f"j1/{n}")
    await end_job(producer, "j1", 2)

    await register_worker(worker, "w1", credit=2)
    load = await worker.receive()
    assert isinstance(load, LoadContext) and load.context == CTX_A and load.evict == []
    assigned = [await worker.receive(), await worker.receive()]
    assert [a.batch.batch_id for a in assigned] == ["j1/0", "j1/1"]

    for a in assigned:
        await worker.send(Completed(result=result_for(a.batch)))
    delivered = [await sink.receive(), await sink.receive()]
    assert all(isinstance(d, Deliver) for d in delivered)
    assert await sink.receive() == RollNow()  # the job is ended and nothing more is coming: no idle wait
    await producer.expect_silence()  # not done until the sink says the rows are durable
    await sink.send(SinkAck(batch_ids=[d.result.batch_id for d in delivered]))
    done = JobDone(job_id="j1", batches=2, pairs=4, batches_written=2, pairs_written=4)
    assert await producer.receive() == done
    assert await sink.receive() == done  # for sinks run --until-done


async def test_workers_hear_drained_only_when_the_last_open_job_completes(connect) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s1"))
    for job in ("j1", "j2"):
        await producer.send(Submit(batch=batch(job, 0)))
        assert await producer.receive() == Accepted(batch_id=f"{job}/0")
    await end_job(producer, "j1", 1)
    await register_worker(worker, "w1", credit=1)
    assert isinstance(await worker.receive(), LoadContext)

    async def run_one() -> None:
        assigned = await worker.receive()
        await worker.send(Completed(result=result_for(assigned.batch)))
        delivered = await sink.receive()
        await sink.send(SinkAck(batch_ids=[delivered.result.batch_id]))
        await worker.send(Pull(credit=1))

    await run_one()
    assert (await producer.receive()).job_id == "j1"
    assert (await sink.receive()).job_id == "j1"  # JobDone, for sinks run --until-done
    await run_one()
    await worker.expect_silence()  # j2 is still open: its producer has not ended it
    await end_job(producer, "j2", 1)
    assert (await producer.receive()).job_id == "j2"
    assert await worker.receive() == Drained(completed_jobs=2)


async def test_drained_waits_for_a_producer_still_preparing_its_job(connect) -> None:
    """A second producer connected but not yet submitting (hashing a model) holds the workers back."""
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s1"))
    await producer.send(Submit(batch=batch("j1", 0)))
    await producer.receive()
    await end_job(producer, "j1", 1)
    late = await connect(b"p2", producer=True)
    await register_worker(worker, "w1", credit=1)
    assert isinstance(await worker.receive(), LoadContext)
    assigned = await worker.receive()
    await worker.send(Completed(result=result_for(assigned.batch)))
    await sink.send(SinkAck(batch_ids=[(await sink.receive()).result.batch_id]))
    assert (await producer.receive()).job_id == "j1"
    await worker.expect_silence(timeout_s=2.5)  # over a heartbeat tick: no drained while p2 may submit
    await late.send(Disconnect(reason="changed my mind"))
    assert isinstance(await worker.receive(), Drained)


async def test_malformed_input_gets_an_error_and_the_broker_keeps_serving(connect, live_broker) -> None:
    rogue, producer = await connect(b"rogue"), await connect(b"p", producer=True)
    bad_frames = [
        [b"only-one-frame"],
        [b"pervade/0", b"x"],
        [PROTOCOL_HEADER, b"\xc1 not msgpack"],
        [PROTOCOL_HEADER, msgpack.packb({"kind": "nonsense"})],
        [PROTOCOL_HEADER, msgpack.packb({"kind": "pull", "credit": -5})],
        [PROTOCOL_HEADER, msgpack.packb({"kind": "submit", "batch": {"batch_id": 7}})],
    ]
    for frames in bad_frames:
        await rogue.send_raw(frames)
        reply = await rogue.receive()
        assert isinstance(reply, Error) and reply.reason
    # messages that decode but make no sense from this peer
    await rogue.send(JobDone(job_id="j", batches=0, pairs=0))
    assert "does not accept 'job_done'" in (await rogue.receive()).reason
    assert live_broker.counters["invalid_messages"] == len(bad_frames) + 1
    # a peer the broker does not know (it restarted, or declared the peer dead) is told to register again
    await rogue.send(Pull(credit=1))
    assert await rogue.receive() == Disconnect(reason=REGISTER_AGAIN)
    await rogue.send(Heartbeat())
    assert await rogue.receive() == Disconnect(reason=REGISTER_AGAIN)
    # a registered peer sending another role's message is refused
    await producer.send(Pull(credit=1))
    assert "cannot send 'pull'" in (await producer.receive()).reason

    await producer.send(Submit(batch=batch("j2", 0)))
    assert await producer.receive() == Accepted(batch_id="j2/0")


async def test_oversized_messages_cut_the_sender_off_not_the_broker(connect, live_broker) -> None:
    big, producer = await connect(b"big"), await connect(b"p", producer=True)
    await big.send_raw([PROTOCOL_HEADER, b"x" * (2 << 20)])  # the fixture's broker allows 1 MiB
    await big.expect_silence()
    await producer.send(Submit(batch=batch("j3", 0)))
    assert await producer.receive() == Accepted(batch_id="j3/0")
    assert live_broker.counters["invalid_messages"] == 0  # libzmq dropped it before the broker saw it


async def test_resubmitted_batches_are_acknowledged_once_and_queued_once(connect, live_broker) -> None:
    producer = await connect(b"p", producer=True)
    for _ in range(3):
        await producer.send(Submit(batch=batch("j4", 0)))
    replies = [await producer.receive() for _ in range(3)]
    assert [r.duplicate for r in replies] == [False, True, True]
    assert live_broker.queued_total() == 1
    await end_job(producer, "j4", 1)
    await producer.send(Submit(batch=batch("j4", 1)))
    rejected = await producer.receive()
    assert isinstance(rejected, Rejected) and "job j4 has ended and does not hold this batch" in rejected.reason


async def test_affinity_sends_a_context_to_the_worker_that_holds_it(connect) -> None:
    producer, wa, wb = await connect(b"p", producer=True), await connect(b"wa"), await connect(b"wb")
    for n in range(3):
        await producer.send(Submit(batch=batch("ja", n, CTX_A)))
        await producer.send(Submit(batch=batch("jb", n, CTX_B)))
    for _ in range(6):
        await producer.receive()
    # wb already holds B; wa holds nothing and is placed on A, the context nobody hosts
    await register_worker(wb, "wb", credit=3, contexts=[CTX_B.context_id])
    got_b = [await wb.receive() for _ in range(3)]
    assert all(isinstance(m, Assign) and m.batch.context == CTX_B for m in got_b)  # no LoadContext: it holds B
    await register_worker(wa, "wa", credit=4)
    load = await wa.receive()
    assert isinstance(load, LoadContext) and load.context == CTX_A
    got_a = [await wa.receive() for _ in range(3)]
    assert all(m.batch.context == CTX_A for m in got_a)
    await wa.expect_silence()  # B's queue is empty and A ran dry: wa stays warm on A


async def test_a_leaving_worker_has_its_batches_requeued_to_another(connect, live_broker) -> None:
    producer, w1, w2 = await connect(b"p", producer=True), await connect(b"w1"), await connect(b"w2")
    await producer.send(Submit(batch=batch("j5", 0)))
    await producer.receive()
    await register_worker(w1, "w1", credit=1)
    assert isinstance(await w1.receive(), LoadContext)
    assert (await w1.receive()).batch.batch_id == "j5/0"
    await w1.send(Disconnect(reason="preempted"))
    await register_worker(w2, "w2", credit=1, contexts=[CTX_A.context_id])
    assigned = await w2.receive()
    assert isinstance(assigned, Assign) and assigned.batch.batch_id == "j5/0"
    await w2.send(Completed(result=result_for(assigned.batch, "w2")))
    # Two connections: the broker may read w1's next message before this one unless it is counted first.
    await until_state(lambda: live_broker.store.get("j5/0").status is not BatchStatus.ASSIGNED, "w2's answer")
    # a late answer from the departed worker, and an answer repeated, are duplicates: suppressed
    await w1.send(Completed(result=result_for(assigned.batch, "w1")))
    assert await w1.receive() == Disconnect(reason=REGISTER_AGAIN)  # and w1 is told to register again
    await w2.send(Completed(result=result_for(assigned.batch, "w2")))
    sink = await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    delivered = await sink.receive()
    assert isinstance(delivered, Deliver) and delivered.result.worker_id == "w2"
    await sink.expect_silence()
    assert live_broker.counters["duplicate_results"] == 2


async def test_a_failing_batch_is_retried_then_recorded_as_failed(connect) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    await producer.send(Submit(batch=batch("j6", 0, claims=1)))  # one claim: retried, not split
    await producer.receive()
    await end_job(producer, "j6", 1, claims=1)
    await register_worker(worker, "w", credit=1)
    assert isinstance(await worker.receive(), LoadContext)
    for attempt in range(2):  # the fixture's broker allows 2 attempts
        assigned = await worker.receive()
        assert isinstance(assigned, Assign), f"attempt {attempt}"
        await worker.send(BatchFailed(batch_id="j6/0", error="CUDA out of memory"))
        await worker.send(Pull(credit=1))
    failure = await sink.receive()  # the failure is recorded by a sink, like a result
    assert isinstance(failure, DeliverFailure) and failure.failure.claim_ids == ["0-0"]
    assert "CUDA out of memory" in failure.failure.error and failure.failure.attempts == 2
    await producer.expect_silence()  # not done until the failure is durably recorded
    await sink.send(SinkAck(batch_ids=["j6/0"]))
    done = await producer.receive()
    assert isinstance(done, JobDone) and done.failed_batches == 1 and "CUDA out of memory" in done.errors[0]


async def test_a_context_no_worker_can_load_fails_its_batches(connect) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    for n in range(3):
        await producer.send(Submit(batch=batch("j7", n)))
        await producer.receive()
    await end_job(producer, "j7", 3)
    await register_worker(worker, "w", credit=1)
    assert isinstance(await worker.receive(), LoadContext)
    assert isinstance(await worker.receive(), Assign)
    await worker.send(ContextFailed(context_id=CTX_A.context_id, error="no such model"))
    failures = [await sink.receive() for _ in range(3)]
    assert all(isinstance(f, DeliverFailure) for f in failures)
    await sink.send(SinkAck(batch_ids=[f.failure.batch_id for f in failures]))
    done = await producer.receive()
    assert isinstance(done, JobDone) and done.failed_batches == 3
    assert all("no such model" in e for e in done.errors)
    assert isinstance(await worker.receive(), Drained)  # the run is over: batch jobs may end
    await worker.expect_silence()  # never offered the context it could not load
    # later batches of that context are refused at once instead of queued forever...
    await producer.send(Submit(batch=batch("j8", 0)))
    refused = await producer.receive()
    assert isinstance(refused, Rejected) and "no worker can load this context: no such model" in refused.reason
    # ...until a new worker brings capacity that might load it
    w2 = await connect(b"w2")
    await register_worker(w2, "w2", credit=1)
    # messages on one socket arrive in order: an answered round trip proves w2's registration was handled
    await w2.send(JobDone(job_id="x", batches=0, pairs=0))
    assert isinstance(await w2.receive(), Error)
    await producer.send(Submit(batch=batch("j8", 1)))
    assert await producer.receive() == Accepted(batch_id="j8/1")


async def test_a_finished_job_sent_again_is_answered_without_running_again(connect, live_broker) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    await register_worker(worker, "w", credit=1)
    await producer.send(Submit(batch=batch("j9", 0)))
    await producer.receive()
    await end_job(producer, "j9", 1)
    assert isinstance(await worker.receive(), LoadContext)
    await worker.send(Completed(result=result_for((await worker.receive()).batch)))
    await sink.send(SinkAck(batch_ids=[(await sink.receive()).result.batch_id]))
    assert isinstance(await producer.receive(), JobDone)
    assert live_broker.store.get("j9/0").status is BatchStatus.WRITTEN
    assert isinstance(await worker.receive(), Drained)

    rerun = await connect(b"p2", producer=True)  # the producer, restarted
    await rerun.send(Submit(batch=batch("j9", 0)))
    assert await rerun.receive() == Accepted(batch_id="j9/0", duplicate=True)
    await end_job(rerun, "j9", 1)
    assert await rerun.receive() == JobDone(job_id="j9", batches=1, pairs=2, batches_written=1, pairs_written=2)
    await worker.expect_silence()  # nothing to run, and no second Drained: the job was done already


async def test_a_leaving_sink_has_its_unwritten_results_delivered_to_another(connect) -> None:
    producer, worker, s1, s2 = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s1"), await connect(b"s2")
    await s1.send(SinkReady(sink_id="s1"))
    await producer.send(Submit(batch=batch("j10", 0)))
    await producer.receive()
    await register_worker(worker, "w", credit=1)
    assert isinstance(await worker.receive(), LoadContext)
    await worker.send(Completed(result=result_for((await worker.receive()).batch)))
    assert isinstance(await s1.receive(), Deliver)
    await s2.send(SinkReady(sink_id="s2"))
    await s1.send(Disconnect(reason="stopping"))  # left without acknowledging
    redelivered = await s2.receive()
    assert isinstance(redelivered, Deliver) and redelivered.result.batch_id == "j10/0"


async def test_the_producer_api_refuses_a_claim_the_broker_would_refuse(live_broker) -> None:
    from pervade.errors import InputError
    from pervade.producer.client import Producer

    async with Producer(live_broker.endpoint) as producer:
        claims = [Claim(claim_id="1", text="fine", gold_label="X" * 65)]  # labels are at most 64 characters
        with pytest.raises(InputError, match=r"gold_label"):
            await producer.submit_sweep(claims, {"t": "{claim}"}, CTX_A)
    assert live_broker.queued_total() == 0 and live_broker.counters["invalid_messages"] == 0


async def test_a_producer_exits_without_waiting_out_its_receive_poll(start_broker, monkeypatch) -> None:
    from pervade.producer import client
    from pervade.session import Heartbeats

    # A poll and heartbeats (both sides') far longer than the test's bound: nothing wakes the producer's
    # receiving loop, so an exit that waited for its poll to end (as it once did, for half a second after
    # every job) fails here.
    slow = Heartbeats(interval_s=60.0)
    broker = await start_broker(heartbeats=slow)
    monkeypatch.setattr(client, "RECEIVE_POLL_S", 60.0)
    producer = client.Producer(broker.endpoint, heartbeats=slow)
    async with producer:
        await producer.submit_sweep([Claim(claim_id="1", text="fine")], {"t": "{claim}"}, CTX_A)
        exiting = time.monotonic()
    assert time.monotonic() - exiting < 5.0
    assert broker.queued_total() == 1


async def test_a_producer_sends_what_it_read_a_template_at_a_time(live_broker) -> None:
    from pervade.producer.client import Producer

    # A worker scores one template's claims in a run: small batches of interleaved templates left its runs
    # a fraction full, where large batches fill them (docs/benchmarks.md, RQ2).
    claims = [Claim(claim_id=str(i), text=f"claim {i}") for i in range(3)]
    async with Producer(live_broker.endpoint) as producer:
        await producer.submit_sweep(claims, {"a": "A {claim}", "b": "B {claim}"}, CTX_A, batch_size=1)
    store = live_broker.state.store
    queued = [  # a slice's batches in its order (the broker slices what arrives together)
        member for row_id in store.queued_ids(CTX_A.context_id)
        for member in ([m.batch_id for m in store.batch(row_id).members] or [row_id])
    ]  # fmt: skip
    assert [batch_id.split("/")[1:3] for batch_id in queued] == [
        ["0000000", "a"], ["0000001", "a"], ["0000002", "a"], ["0000000", "b"], ["0000001", "b"], ["0000002", "b"],
    ]  # fmt: skip


async def test_a_task_waiting_on_a_producer_that_closes_fails_instead_of_waiting_for_ever(live_broker) -> None:
    import asyncio

    from pervade.errors import JobFailed
    from pervade.producer.client import Producer

    async with Producer(live_broker.endpoint) as producer:
        report = await producer.submit_sweep([Claim(claim_id="1", text="fine")], {"t": "{claim}"}, CTX_A)
        waiting = asyncio.create_task(producer.wait(report.job_id))  # no worker: the job never ends
        await asyncio.sleep(0)  # a yield: the task is awaiting the job when the producer closes
    with pytest.raises(JobFailed, match="closed before the broker answered"):
        await asyncio.wait_for(waiting, 10)

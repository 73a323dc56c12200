"""Exit 0 means every pair is written, exactly once: the producer checks the broker's word against its own
count, resubmits what a broker lost, and a job whose input turns bad midway is closed. The broker refuses
what would be computed under a wrong name, keeps results timed by a wrong clock, never leaves a refused
result assigned, and lets one live process hold a worker or sink name.

A real broker serves in the test's event loop; workers and sinks are peers speaking the protocol by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import msgspec
import pytest

from pervade.broker.store import BatchStatus
from pervade.constants import PROTOCOL_HEADER
from pervade.errors import ClaimsError, JobFailed, RegistrationRefused
from pervade.producer.client import Producer
from pervade.protocol import (
    AbortJob,
    Accepted,
    Assign,
    Claim,
    Completed,
    Deliver,
    DeliverFailure,
    Disconnect,
    EndJob,
    Error,
    Heartbeat,
    JobDone,
    JobEnded,
    Pull,
    Refused,
    Rejected,
    RollNow,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
    bodies,
    decode_body,
    encode,
)
from pervade.sinks.parquet import read_verdicts
from pervade.sinks.sink import Sink, SinkConfig
from tests.conftest import FAST_HEARTBEATS
from tests.test_broker import CPU, CTX_A, T0, assign_one, batch, end_job, register_worker, result_for

TEMPLATES = {"t": "{claim} Answer:"}


def claims(n: int) -> list[Claim]:
    return [Claim(claim_id=f"c{i}", text=f"claim {i}") for i in range(n)]


@contextlib.asynccontextmanager
async def serving(worker, sink=None) -> AsyncIterator[None]:
    """A worker peer that answers every batch it is given and (unless a real sink writes) a sink peer that
    acknowledges every outcome, until the block ends."""

    async def work() -> None:
        while True:
            message = await worker.receive(timeout_s=30)
            if isinstance(message, Assign):
                await worker.send(Completed(result=result_for(message.batch)))
                await worker.send(Pull(credit=1))

    async def write() -> None:
        while True:
            message = await sink.receive(timeout_s=30)
            if isinstance(message, Deliver):
                await sink.send(SinkAck(batch_ids=[message.result.batch_id]))
            elif isinstance(message, DeliverFailure):
                await sink.send(SinkAck(batch_ids=[message.failure.batch_id]))

    tasks = [asyncio.create_task(work())] + ([asyncio.create_task(write())] if sink is not None else [])
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_waiting_producer_resubmits_what_a_broker_on_new_state_lost(start_broker, connect, tmp_path) -> None:
    first = await start_broker(state_dir=tmp_path / "state")
    async with Producer(first.endpoint) as producer:
        report = await producer.submit_sweep(claims(6), TEMPLATES, CTX_A, batch_size=2, job_id="jr")
        assert report.accepted == 3
        first.stop()  # the login node comes back with an empty --state
        await first.closed.wait()
        second = await start_broker(state_dir=tmp_path / "new-state", bind=first.endpoint)
        worker, sink = await connect(b"w", endpoint=second.endpoint), await connect(b"s", endpoint=second.endpoint)
        await sink.send(SinkReady(sink_id="s"))
        await register_worker(worker, "w", credit=3)
        async with serving(worker, sink):
            done = await producer.wait("jr", timeout_s=20)  # it asked again, heard "0 held", and resubmitted
    assert (done.batches, done.pairs, done.pairs_written) == (3, 6, 6)
    assert (report.resubmissions, report.recovered_batches) == (1, 3)
    assert second.counters["jobs_found_incomplete"] == 1


async def test_claims_that_cannot_be_read_again_fail_with_what_is_missing(start_broker, tmp_path) -> None:
    first = await start_broker(state_dir=tmp_path / "state")
    async with Producer(first.endpoint) as producer:
        await producer.submit_sweep(iter(claims(6)), TEMPLATES, CTX_A, batch_size=2, job_id="jo")  # one-shot
        first.stop()
        await first.closed.wait()
        await start_broker(state_dir=tmp_path / "new-state", bind=first.endpoint)
        with pytest.raises(
            JobFailed, match=r"the broker lost 3 batches \(6 pairs\) of 3 batches .* cannot be read again"
        ):
            await producer.wait("jo", timeout_s=20)


async def test_end_job_is_refused_until_the_broker_holds_every_batch(connect, live_broker) -> None:
    producer = await connect(b"p", producer=True)
    await producer.send(Submit(batch=batch("j1", 0)))
    await producer.receive()
    await producer.send(EndJob(job_id="j1", batches=2, pairs=4))  # the producer had j1/1 accepted too
    reply = await producer.receive()
    assert reply == JobEnded(job_id="j1", batches=1, pairs=2, digest=reply.digest, agreed=False)
    assert not live_broker.jobs["j1"].ended and live_broker.counters["jobs_found_incomplete"] == 1
    await producer.send(Submit(batch=batch("j1", 1)))  # the resubmission: new batches are still taken
    assert await producer.receive() == Accepted(batch_id="j1/1")
    await end_job(producer, "j1", 2)
    assert live_broker.jobs["j1"].ended


async def test_a_changed_sweep_under_an_old_job_id_is_refused_not_computed(connect, live_broker) -> None:
    producer = await connect(b"p", producer=True)
    await producer.send(Submit(batch=batch("j2", 0)))
    await producer.receive()
    changed = msgspec.structs.replace(batch("j2", 0), claims=[Claim(claim_id="new", text="another claim")])
    await producer.send(Submit(batch=changed))
    refused = await producer.receive()
    assert isinstance(refused, Rejected) and "submitted before with other claims" in refused.reason
    await end_job(producer, "j2", 1)
    await producer.send(Submit(batch=batch("j2", 1)))  # an ended job takes no new batch either
    refused = await producer.receive()
    assert isinstance(refused, Rejected) and "has ended and does not hold this batch" in refused.reason
    assert live_broker.queued_total() == 1 and live_broker.counters["conflicting_submissions"] == 2


def claims_then_bad_record(good: int) -> Iterator[Claim]:
    yield from claims(good)
    raise ClaimsError(f"claims.jsonl: record {good + 1}: id 'c0' was already used by an earlier record")


async def test_a_sweep_whose_input_turns_bad_midway_is_aborted_and_closed(connect, live_broker) -> None:
    sink = await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    async with Producer(live_broker.endpoint) as producer:
        with pytest.raises(ClaimsError, match="record 5"):
            await producer.submit_sweep(claims_then_bad_record(4), TEMPLATES, CTX_A, batch_size=2, job_id="ja")
    job = live_broker.jobs["ja"]
    assert job.ended and "record 5" in job.aborted and live_broker.counters["jobs_aborted"] == 1
    failures = [await sink.receive() for _ in range(2)]  # the two batches sent: recorded failed, never run
    assert all(isinstance(f, DeliverFailure) and "job aborted by its producer" in f.failure.error for f in failures)
    assert await sink.receive() == RollNow()  # the job is closed: nothing more is coming
    await sink.send(SinkAck(batch_ids=[f.failure.batch_id for f in failures]))
    done = await sink.receive()  # so a sink run --until-done does not wait for it for ever
    assert isinstance(done, JobDone) and done.job_id == "ja" and done.open_jobs == 0 and done.pairs_failed == 4
    assert "record 5" in done.errors[0]


async def test_an_abort_after_the_job_ended_changes_nothing(connect, live_broker) -> None:
    producer = await connect(b"p", producer=True)
    await producer.send(Submit(batch=batch("j3", 0)))
    await producer.receive()
    await end_job(producer, "j3", 1)
    await producer.send(AbortJob(job_id="j3", reason="late"))
    assert (await producer.receive()).agreed
    assert live_broker.jobs["j3"].aborted is None and live_broker.queued_total() == 1


async def test_a_result_timed_by_a_wrong_clock_is_kept_and_timed_on_the_brokers(connect, live_broker) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    assigned = await assign_one(producer, worker, "j4")
    skewed = msgspec.structs.replace(result_for(assigned), started_at=T0 - 2e9 - 1.5, finished_at=T0 - 2e9)
    await worker.send(Completed(result=skewed))  # a clock 2e9 s behind: before 1970
    delivered = (await sink.receive()).result
    assert delivered.finished_at >= T0 and delivered.finished_at - delivered.started_at == pytest.approx(1.5)
    assert live_broker.counters["clock_skew_corrected"] == 1


async def test_a_refused_result_is_requeued_and_its_worker_told(connect, live_broker) -> None:
    producer, worker = await connect(b"p", producer=True), await connect(b"w")
    assigned = await assign_one(producer, worker, "j5")
    body = msgpack.unpackb(encode(Completed(result=result_for(assigned)))[1])
    body["result"]["verdicts"][0]["verdict"] = "X" * 100  # longer than any label: fails validation
    await worker.send_raw([PROTOCOL_HEADER, msgpack.packb(body)])
    told = await worker.receive()
    assert isinstance(told, Error) and "the result of batch 'j5/0' was refused" in told.reason
    row = live_broker.store.get("j5/0")
    assert row.status is BatchStatus.QUEUED and row.worker is None  # not left assigned for ever
    assert live_broker.counters["results_refused"] == 1 and "j5/0" not in live_broker.workers[b"w"].in_flight


async def handled(peer) -> None:
    """A round trip on the peer's socket: everything it sent before has been handled by the broker."""
    await peer.send(JobDone(job_id="x", batches=0, pairs=0))  # not a broker's message: answered with Error
    assert isinstance(await peer.receive(timeout_s=2), Error)


async def test_one_live_process_holds_a_worker_name(start_broker, connect) -> None:
    broker = await start_broker()
    first, second = await connect(b"w1", endpoint=broker.endpoint), await connect(b"w2", endpoint=broker.endpoint)
    await first.send(WorkerReady(worker_id="gpu-0", host="a", pid=1, device=CPU, instance="aaaa"))
    await handled(first)
    await second.send(WorkerReady(worker_id="gpu-0", host="b", pid=2, device=CPU, instance="bbbb"))
    refused = await second.receive()
    assert isinstance(refused, Refused) and "worker id 'gpu-0' is in use by another live worker" in refused.reason
    assert [w.identity for w in broker.workers.values()] == [b"w1"]
    # the same process on a new connection replaces its own registration at once
    again = await connect(b"w1-again", endpoint=broker.endpoint)
    await again.send(WorkerReady(worker_id="gpu-0", host="a", pid=1, device=CPU, instance="aaaa"))
    await handled(again)
    assert [w.identity for w in broker.workers.values()] == [b"w1-again"]
    # a holder silent for longer than the liveness (killed, not yet declared dead) no longer holds the name
    broker.workers[b"w1-again"].last_seen -= broker.config.heartbeats.dead_after_s + 1
    await second.send(WorkerReady(worker_id="gpu-0", host="b", pid=2, device=CPU, instance="bbbb"))
    await handled(second)
    assert [w.identity for w in broker.workers.values()] == [b"w2"] and broker.counters["registrations_refused"] == 1


async def test_a_sink_refused_its_name_gives_up_with_the_reason(start_broker, connect, tmp_path) -> None:
    # A liveness of 1 s, with the holder beating every 0.1 s: beside other tests on 2 cores, a liveness of
    # 0.3 s once let the holder be declared dead while its beats waited, and the sink was (rightly) let in.
    heartbeats = replace(FAST_HEARTBEATS, liveness=10)
    broker = await start_broker(heartbeats=heartbeats)
    holder = await connect(b"holder", endpoint=broker.endpoint)
    await holder.send(SinkReady(sink_id="sink-a", instance="aaaa"))

    async def keep_beating() -> None:
        while True:
            await holder.send(Heartbeat())
            await asyncio.sleep(heartbeats.interval_s)

    beating = asyncio.create_task(keep_beating())
    try:
        sink = Sink(
            SinkConfig(out_dir=tmp_path / "out", broker=broker.endpoint, sink_id="sink-a", heartbeats=heartbeats)
        )
        with pytest.raises(RegistrationRefused, match="sink id 'sink-a' is in use by another live sink"):
            await asyncio.wait_for(sink.run(), 10)
    finally:
        beating.cancel()
    assert broker.counters["registrations_refused"] == 3  # tried again after each liveness period


async def test_the_same_sweep_run_twice_at_once_tells_both_producers(start_broker, connect) -> None:
    """A job id names its content, so two producers of one sweep share the job: both hear it is done."""
    broker = await start_broker()
    worker, sink = await connect(b"w", endpoint=broker.endpoint), await connect(b"s", endpoint=broker.endpoint)
    async with Producer(broker.endpoint) as first, Producer(broker.endpoint) as second:
        await first.submit_sweep(claims(4), TEMPLATES, CTX_A, batch_size=2, job_id="jt")
        await second.submit_sweep(claims(4), TEMPLATES, CTX_A, batch_size=2, job_id="jt")  # all duplicates
        await sink.send(SinkReady(sink_id="s"))
        await register_worker(worker, "w", credit=2)
        async with serving(worker, sink):
            done = await asyncio.gather(first.wait("jt", timeout_s=10), second.wait("jt", timeout_s=10))
    assert [d.pairs_written for d in done] == [4, 4]


async def run_sweep_to_a_real_sink(start_broker, connect, out: Path, state: Path, sweep: list[Claim]) -> JobDone:
    """One broker on ``state``, a worker peer, a real sink writing to ``out``; a producer of ``sweep``
    under the job id "myrun", waiting."""
    broker = await start_broker(state_dir=state, heartbeats=FAST_HEARTBEATS)
    worker = await connect(state.name.encode(), endpoint=broker.endpoint)
    await register_worker(worker, "w", credit=4)
    sink = Sink(SinkConfig(out_dir=out, broker=broker.endpoint, heartbeats=FAST_HEARTBEATS, idle_roll_seconds=0.05))
    writing = asyncio.create_task(sink.run())
    try:
        async with serving(worker), Producer(broker.endpoint, heartbeats=FAST_HEARTBEATS) as producer:
            await producer.submit_sweep(sweep, TEMPLATES, CTX_A, batch_size=2, job_id="myrun")
            return await producer.wait("myrun", timeout_s=20)
    finally:
        sink.stop()
        await writing
        broker.stop()
        await broker.closed.wait()


async def test_a_job_id_reused_for_other_claims_where_nobody_remembers_it_is_written(
    start_broker, connect, tmp_path
) -> None:
    """A batch id names its content, so a sink never mistakes another sweep's batch, reusing a job id on a
    broker with new state, for one it already wrote."""
    first = [Claim(claim_id=f"c{i}", text=f"old {i}") for i in range(4)]
    second = [Claim(claim_id=f"d{i}", text=f"new {i}") for i in range(4)]
    await run_sweep_to_a_real_sink(start_broker, connect, tmp_path / "out", tmp_path / "s1", first)
    done = await run_sweep_to_a_real_sink(start_broker, connect, tmp_path / "out", tmp_path / "s2", second)
    rows = read_verdicts(tmp_path / "out", ["claim_id"])["claim_id"].to_pylist()
    assert done.pairs_written == 4 and sorted(rows) == [c.claim_id for c in first + second]


async def test_a_reconnection_during_a_resubmission_does_not_count_as_another_loss(
    start_broker, connect, tmp_path
) -> None:
    first = await start_broker(state_dir=tmp_path / "state")
    async with Producer(first.endpoint, max_unacked=2) as producer:
        report = await producer.submit_sweep(claims(20), TEMPLATES, CTX_A, batch_size=2, job_id="jb")
        first.stop()
        await first.closed.wait()
        second = await start_broker(state_dir=tmp_path / "new-state", bind=first.endpoint)
        resent = 0
        send_frames = producer.session.send_frames

        async def blip_midway(frames: list[bytes]) -> bool:  # the network drops once, mid-resubmission
            nonlocal resent
            sent = await send_frames(frames)
            before, resent = resent, resent + sum(isinstance(decode_body(body), Submit) for body in bodies(frames))
            if before < 3 <= resent:
                for identity in list(second.producers):
                    second.producers.pop(identity)
                    second.send(identity, Disconnect(reason="blip"))
            return sent

        producer.session.send_frames = blip_midway  # type: ignore[method-assign]
        worker, sink = await connect(b"w", endpoint=second.endpoint), await connect(b"s", endpoint=second.endpoint)
        await sink.send(SinkReady(sink_id="s"))
        await register_worker(worker, "w", credit=3)
        async with serving(worker, sink):
            done = await producer.wait("jb", timeout_s=30)
    assert done.pairs_written == 20 and report.resubmissions == 1
    assert second.counters["jobs_found_incomplete"] == 1  # the EndJob resent mid-pass was not another loss

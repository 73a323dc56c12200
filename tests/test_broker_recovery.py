"""The broker when peers die, leave, come back, or the broker itself restarts on its state directory."""

from __future__ import annotations

import asyncio

import msgspec

from pervade.broker.constants import REGISTER_AGAIN
from pervade.broker.store import BatchStatus
from pervade.producer.client import Producer
from pervade.protocol import (
    Accepted,
    Assign,
    Claim,
    Completed,
    Deliver,
    Disconnect,
    Error,
    Heartbeat,
    JobDone,
    LoadContext,
    Pull,
    Release,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
    decode,
)
from tests.conftest import FAST_HEARTBEATS
from tests.test_broker import CPU, CTX_A, assign_one, batch, end_job, register_worker, result_for
from tests.waiting import until_state


async def test_a_silent_worker_is_declared_dead_and_its_batches_go_to_another(start_broker, connect) -> None:
    broker = await start_broker(heartbeats=FAST_HEARTBEATS)
    producer = await connect(b"p", producer=True, endpoint=broker.endpoint)
    silent, alive = await connect(b"silent", endpoint=broker.endpoint), await connect(b"alive", endpoint=broker.endpoint)
    await producer.send(Submit(batch=batch("j1", 0)))
    await producer.receive()
    await register_worker(silent, "silent", credit=1)
    assert isinstance(await silent.receive(), LoadContext)
    assert (await silent.receive()).batch.batch_id == "j1/0"
    # `silent` never beats again (SIGKILL); `alive` joins holding the same context and keeps beating, with no
    # credit until `silent` is declared dead (with credit and nothing to do it would take a copy of j1/0 at
    # once, the end of a queue: test_broker_verbs)
    await alive.send(WorkerReady(worker_id="alive", host="h", pid=1, device=CPU, contexts=[CTX_A.context_id]))
    for _ in range(50):
        await alive.send(Heartbeat())
        if broker.counters["workers_declared_dead"]:
            break
        await asyncio.sleep(0.1)
    await alive.send(Pull(credit=1))
    reassigned = await alive.receive()
    assert isinstance(reassigned, Assign) and reassigned.batch.batch_id == "j1/0"  # no LoadContext: affinity
    assert broker.counters["workers_declared_dead"] == 1 and broker.counters["requeues"] == 1
    await silent.send(Pull(credit=1))  # the dead worker's socket speaks again: it must register anew
    assert await silent.receive() == Disconnect(reason=REGISTER_AGAIN)


async def test_the_broker_sends_heartbeats_to_registered_peers(start_broker, connect) -> None:
    broker = await start_broker(heartbeats=FAST_HEARTBEATS)
    sink = await connect(b"s", endpoint=broker.endpoint)
    await sink.send(SinkReady(sink_id="s"))
    for _ in range(5):  # a peer that beats back stays registered and keeps hearing the broker
        await sink.send(Heartbeat())
        assert await sink.socket.poll(1000), "no heartbeat from the broker"
        assert isinstance(decode(await sink.socket.recv_multipart()), Heartbeat)


async def test_released_batches_are_requeued_at_once_without_counting_an_attempt(connect, live_broker) -> None:
    producer, leaving, other = await connect(b"p", producer=True), await connect(b"w1"), await connect(b"w2")
    for n in range(2):
        await producer.send(Submit(batch=batch("j2", n)))
        await producer.receive()
    await register_worker(leaving, "w1", credit=2)
    assert isinstance(await leaving.receive(), LoadContext)
    held = [(await leaving.receive()).batch.batch_id for _ in range(2)]
    await leaving.send(Release(batch_ids=held, leaving=True))  # SIGTERM: hand everything back
    await leaving.send(Pull(credit=5))  # a leaving worker gets no more work, whatever it asks
    await register_worker(other, "w2", credit=2, contexts=[CTX_A.context_id])
    assert sorted([(await other.receive()).batch.batch_id for _ in range(2)]) == sorted(held)
    await leaving.expect_silence()
    assert live_broker.counters["released"] == 2
    assert all(live_broker.store.get(b).attempts == 1 for b in held)  # only w2's attempt counts


async def test_a_result_that_does_not_answer_the_batch_is_refused(connect, live_broker) -> None:
    producer, worker = await connect(b"p", producer=True), await connect(b"w")
    assigned = await assign_one(producer, worker, "j3")
    wrong = result_for(batch("j3", 1))  # another batch's claims under this batch's id
    await worker.send(Completed(result=msgspec.structs.replace(wrong, batch_id="j3/0")))
    reply = await worker.receive()
    assert isinstance(reply, Error) and "does not answer exactly the batch's claims" in reply.reason
    assert live_broker.store.get(assigned.batch_id).status is BatchStatus.QUEUED  # retried, not taken


async def test_a_restarted_broker_resumes_from_its_state(start_broker, connect, tmp_path) -> None:
    state = tmp_path / "state"
    first = await start_broker(state_dir=state)
    producer = await connect(b"p", producer=True, endpoint=first.endpoint)
    worker, sink = await connect(b"w", endpoint=first.endpoint), await connect(b"s", endpoint=first.endpoint)
    for n in range(3):
        await producer.send(Submit(batch=batch("j4", n)))
        assert await producer.receive() == Accepted(batch_id=f"j4/{n}")
    await end_job(producer, "j4", 3)
    await sink.send(SinkReady(sink_id="s"))
    await register_worker(worker, "w", credit=2)
    await worker.receive()
    a0, a1 = (await worker.receive()).batch, (await worker.receive()).batch
    await worker.send(Completed(result=result_for(a0)))
    assert (await sink.receive()).result.batch_id == a0.batch_id  # delivered, never acknowledged
    first.stop()  # the broker goes away: j4/0 delivered, j4/1 assigned, j4/2 queued
    await first.closed.wait()

    second = await start_broker(state_dir=state)
    assert second.store.status_counts[BatchStatus.QUEUED] == 2  # the assignment died with the broker
    assert second.store.status_counts[BatchStatus.DONE] == 1  # to be delivered again
    assert second.store.get(a1.batch_id).attempts == 0  # the broker failed, not the batch
    p2 = await connect(b"p2", producer=True, endpoint=second.endpoint)
    await p2.send(Submit(batch=batch("j4", 0)))  # the producer, reconnected, resends: a duplicate
    assert await p2.receive() == Accepted(batch_id="j4/0", duplicate=True)
    await end_job(p2, "j4", 3)
    # the old worker's late answer reaches the new broker: taken (nobody else answered), then re-register
    w_old = await connect(b"w", endpoint=second.endpoint)
    await w_old.send(Completed(result=result_for(a1)))
    assert await w_old.receive() == Disconnect(reason=REGISTER_AGAIN)
    assert second.counters["late_results_accepted"] >= 1
    s2 = await connect(b"s2", endpoint=second.endpoint)
    await s2.send(SinkReady(sink_id="s"))
    got = {}
    for _ in range(2):
        delivery = await s2.receive()
        assert isinstance(delivery, Deliver)
        got[delivery.result.batch_id] = delivery.redelivery
    assert got == {a0.batch_id: True, a1.batch_id: False}  # the sink checks its output for redeliveries
    await s2.send(SinkAck(batch_ids=list(got)))
    w2 = await connect(b"w2", endpoint=second.endpoint)
    await register_worker(w2, "w2", credit=1, contexts=[CTX_A.context_id])
    last = await w2.receive()
    assert isinstance(last, Assign) and last.batch.batch_id == "j4/2"
    await w2.send(Completed(result=result_for(last.batch)))
    await s2.send(SinkAck(batch_ids=[(await s2.receive()).result.batch_id]))
    assert await p2.receive() == JobDone(job_id="j4", batches=3, pairs=6, batches_written=3, pairs_written=6)


async def test_a_waiting_producer_reconnects_to_a_restarted_broker_and_gets_its_answer(start_broker, connect, tmp_path) -> None:
    state = tmp_path / "state"
    first = await start_broker(state_dir=state)
    async with Producer(first.endpoint) as producer:
        claims = [Claim(claim_id=f"c{i}", text=f"claim {i}") for i in range(3)]
        report = await producer.submit_sweep(claims, {"t": "{claim} Answer:"}, CTX_A, batch_size=1, job_id="j5")
        assert report.accepted == 3
        first.stop()  # the login node reboots while the producer waits
        await first.closed.wait()
        second = await start_broker(state_dir=state, bind=first.endpoint)  # same state, same address

        worker, sink = await connect(b"w", endpoint=second.endpoint), await connect(b"s", endpoint=second.endpoint)
        await sink.send(SinkReady(sink_id="s"))
        await register_worker(worker, "w", credit=3)
        assert isinstance(await worker.receive(), LoadContext)
        answered = 0
        while answered < 3:  # three batches, alone or sliced together
            assign = await worker.receive()
            await worker.send(Completed(result=result_for(assign.batch)))
            await sink.send(SinkAck(batch_ids=[(await sink.receive()).result.batch_id]))
            answered += len(assign.batch.members) or 1
        done = await producer.wait("j5", timeout_s=20)  # its EndJob was resent on the new connection
    assert done.batches == 3 and done.failed_batches == 0
    assert producer.session.reconnects >= 1 and second.counters["unknown_peer_messages"] >= 1


async def test_a_batch_that_kills_its_workers_fails_but_the_batches_behind_it_do_not(start_broker, connect) -> None:
    broker = await start_broker(heartbeats=FAST_HEARTBEATS)  # 2 attempts
    producer = await connect(b"p", producer=True, endpoint=broker.endpoint)
    for n in range(2):
        await producer.send(Submit(batch=batch("j6", n)))
        await producer.receive()
    for death, name in enumerate([b"w1", b"w2"], start=1):
        worker = await connect(name, endpoint=broker.endpoint)
        await register_worker(worker, name.decode(), credit=2, contexts=[CTX_A.context_id])
        held = [(await worker.receive()).batch.batch_id for _ in range(2)]
        assert held == ["j6/0", "j6/1"]  # requeued in their order: the one in hand comes first again
        # SIGKILLed: silence
        await until_state(lambda d=death: broker.counters["workers_declared_dead"] == d, f"death {death}")
    poison, behind = broker.store.get("j6/0"), broker.store.get("j6/1")
    assert poison.status is BatchStatus.DONE and "died while running it (attempts: 2)" in poison.error
    assert behind.status is BatchStatus.QUEUED and behind.attempts == 0


async def test_workers_dying_while_loading_a_context_fail_it_only_if_it_never_works(start_broker, connect) -> None:
    broker = await start_broker(heartbeats=FAST_HEARTBEATS)  # 2 attempts
    producer = await connect(b"p", producer=True, endpoint=broker.endpoint)
    await producer.send(Submit(batch=batch("j7", 0)))
    await producer.receive()
    for death, name in enumerate([b"w1", b"w2"], start=1):
        worker = await connect(name, endpoint=broker.endpoint)
        await register_worker(worker, name.decode(), credit=1)
        assert isinstance(await worker.receive(), LoadContext)
        assert isinstance(await worker.receive(), Assign)
        # died loading the model
        await until_state(lambda d=death: broker.counters["workers_declared_dead"] == d, f"death {death}")
    row = broker.store.get("j7/0")
    assert row.status is BatchStatus.DONE and "2 workers died while loading it" in row.error
    assert row.attempts == 0  # the batch itself was never run


async def test_a_sink_joining_after_every_job_is_done_hears_so(connect) -> None:
    """A sink run --until-done that was away (restarting) when the last job_done went out must not wait forever."""
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s"))
    await producer.send(Submit(batch=batch("j8", 0)))
    await producer.receive()
    await end_job(producer, "j8", 1)
    await register_worker(worker, "w", credit=1)
    await worker.receive()
    await worker.send(Completed(result=result_for((await worker.receive()).batch)))
    await sink.send(SinkAck(batch_ids=[(await sink.receive()).result.batch_id]))
    assert isinstance(await producer.receive(), JobDone)
    late = await connect(b"s2")
    await late.send(SinkReady(sink_id="s2"))
    done = await late.receive()
    assert isinstance(done, JobDone) and done.job_id == "j8" and done.open_jobs == 0

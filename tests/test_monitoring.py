"""What the broker reports about a run: the status snapshot and the rate behind claims per second, on a
live broker driven by peers speaking the protocol by hand."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

import pytest

from pervade.broker.store import STORE_FILE, BrokerStore
from pervade.monitor import StatusClient
from pervade.protocol import (
    Accepted,
    Assign,
    Completed,
    Deliver,
    LoadContext,
    Pull,
    SinkReady,
    StatusReply,
    StatusRequest,
    StatusSnapshot,
    Submit,
    WorkerReady,
)
from pervade.rates import ComputePace, RateMeter
from tests.test_broker import CPU, CTX_A, batch, end_job, result_for


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def snapshot_when(
    client: StatusClient, ready: Callable[[StatusSnapshot], object], timeout_s: float = 5.0
) -> StatusSnapshot:
    """The first snapshot for which ``ready`` holds."""
    async with asyncio.timeout(timeout_s):
        while not ready(snapshot := await client.snapshot()):
            pass
    return snapshot


def test_the_rate_counts_the_last_window_only() -> None:
    clock = FakeClock()
    meter = RateMeter(window_s=10, clock=clock)
    clock.now += 2
    meter.add(100)
    assert meter.rate() == pytest.approx(50.0)  # younger than the window: over its lifetime
    clock.now += 8
    meter.add(100)
    assert meter.rate() == pytest.approx(20.0)  # 200 over the 10 s window
    clock.now += 9
    assert meter.rate() == pytest.approx(10.0)  # the first 100 fell out of the window
    clock.now += 30
    assert meter.rate() == 0.0 and meter.total == 200


def test_a_pace_counts_each_run_s_time_once_and_ignores_idle_time() -> None:
    pace = ComputePace()
    assert pace.per_second() is None
    pace.add(2, started_at=100.0, finished_at=100.0)  # no duration: says nothing, claims left out too
    pace.add(100_000, started_at=101.0, finished_at=99.0)
    assert pace.per_second() is None
    for _ in range(4):  # one run of four batches of 10 claims, 2 s: they share its start and finish
        pace.add(10, started_at=100.0, finished_at=102.0)
    assert pace.per_second() == pytest.approx(40 / 2)
    pace.add(60, started_at=500.0, finished_at=501.0)  # idle for minutes in between: not counted
    assert pace.per_second() == pytest.approx(100 / 3)


async def test_the_snapshot_follows_a_batch_from_queue_to_worker_to_done(live_broker, connect) -> None:
    producer, worker, sink = await connect(b"p", producer=True), await connect(b"w"), await connect(b"s")
    await sink.send(SinkReady(sink_id="s1"))
    client = StatusClient(live_broker.endpoint)
    try:
        for n in range(3):
            await producer.send(Submit(batch=batch("j1", n)))
            assert await producer.receive() == Accepted(batch_id=f"j1/{n}")
        await end_job(producer, "j1", 3)
        await worker.send(WorkerReady(worker_id="w1", host="h", pid=1, device=CPU))  # no credit yet

        # Messages on different connections reach the broker in no set order: wait for it to know the worker.
        queued = await snapshot_when(client, lambda s: s.workers and s.sinks)
        assert [(c.context_id, c.model, c.queued_batches, c.workers) for c in queued.contexts] == [
            (CTX_A.context_id, "model-a", 3, 0)
        ]
        assert [(w.worker_id, w.host, w.device, w.state, w.batches_done) for w in queued.workers] == [
            ("w1", "h", "cpu", "idle", 0)
        ]
        assert (queued.pairs_total, queued.pairs_done, queued.eta_s) == (6, 0, None)  # nothing moving: no ETA
        assert queued.batches["queued"] == 3 and queued.producers == 1

        await worker.send(Pull(credit=1))
        assert isinstance(await worker.receive(), LoadContext)
        assigned = await worker.receive()
        assert isinstance(assigned, Assign)
        loading = await client.snapshot()
        assert loading.workers[0].state == "loading" and loading.workers[0].contexts == ["model-a"]
        assert loading.contexts[0].queued_batches == 2 and loading.contexts[0].workers == 1

        await worker.send(Completed(result=result_for(assigned.batch)))
        assert isinstance(await sink.receive(), Deliver)  # the broker has taken the result
        done = await client.snapshot()
        (w1,) = done.workers
        assert (w1.batches_done, w1.claims_done, w1.in_flight) == (1, 2, 0)
        assert w1.claims_per_s > 0 and done.claims_per_s > 0
        assert done.counters["claims_completed"] == 2
        assert done.eta_s is not None and done.eta_s > 0  # 6 pairs to go at a known rate
        assert [(j.job_id, j.pairs, j.pairs_done, j.ended, j.done) for j in done.jobs] == [("j1", 6, 0, True, False)]
    finally:
        client.close()
        for peer in (producer, worker, sink):
            peer.close()


async def test_anyone_past_authentication_may_ask_without_registering(connect) -> None:
    stranger = await connect(b"never-registered")
    await stranger.send(StatusRequest())
    reply = await stranger.receive()
    assert (
        isinstance(reply, StatusReply)
        and reply.snapshot.workers == []
        and reply.snapshot.counters["status_requests"] == 1
    )


def test_state_from_an_older_broker_gains_the_pairs_column(tmp_path) -> None:
    store = BrokerStore.open(tmp_path)
    store.add(batch("j1", 0))
    store.commit()
    store.close()
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # what an older broker wrote: no pairs column
        db.execute("ALTER TABLE batches DROP COLUMN pairs")
    store = BrokerStore.open(tmp_path)
    try:
        assert store.get("j1/0").pairs == 0  # unknown for old batches, counted for new ones
        store.add(batch("j1", 1))
        assert store.get("j1/1").pairs == 2
    finally:
        store.close()

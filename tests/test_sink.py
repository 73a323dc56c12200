"""The sink against a broker's side of the protocol (a ROUTER socket driven by the test): what it writes,
what it acknowledges, and that a batch delivered again is never written twice, whoever wrote it first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
import zmq
import zmq.asyncio

from pervade.protocol import (
    BatchFailure,
    Deliver,
    DeliverFailure,
    JobDone,
    Message,
    SinkAck,
    SinkReady,
    decode,
    encode,
)
from sinks.failures import read_failures
from sinks.sink import Sink, SinkConfig
from sinks.summary import read_verdicts
from tests.test_broker import batch, result_for


class BrokerSide:
    """A ROUTER on loopback that sinks connect to; the test speaks the broker's part."""

    def __init__(self, ctx: zmq.asyncio.Context) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def receive(self, kind: type[Message], timeout_s: float = 10.0) -> tuple[bytes, Message]:
        """The next message of ``kind`` (heartbeats and others are skipped), with its sender."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (left := deadline - loop.time()) > 0:
            if await self.socket.poll(int(left * 1000)):
                identity, *frames = await self.socket.recv_multipart()
                message = decode(frames)
                if isinstance(message, kind):
                    return identity, message
        raise TimeoutError(f"no {kind.__name__} from a sink")

    async def send(self, identity: bytes, message: Message) -> None:
        await self.socket.send_multipart([identity, *encode(message)])


@pytest_asyncio.fixture
async def broker_side() -> AsyncIterator[BrokerSide]:
    ctx = zmq.asyncio.Context()
    side = BrokerSide(ctx)
    yield side
    side.socket.close()
    ctx.term()


async def start_sink(side: BrokerSide, out: Path, name: str, **config: object) -> tuple[Sink, asyncio.Task, bytes]:
    sink = Sink(SinkConfig(out_dir=out, broker=side.endpoint, sink_id=name, idle_roll_seconds=0.05, **config))  # type: ignore[arg-type]
    task = asyncio.create_task(sink.run())
    while True:
        identity, ready = await side.receive(SinkReady)
        if ready.sink_id == name:
            return sink, task, identity


async def test_a_batch_delivered_again_is_acknowledged_and_never_written_twice(broker_side, tmp_path) -> None:
    out = tmp_path / "out"
    first, first_task, first_id = await start_sink(broker_side, out, "first")
    other, other_task, other_id = await start_sink(broker_side, out, "other")  # shares the directory
    result = result_for(batch("j1", 0))

    await broker_side.send(first_id, Deliver(result=result))
    _, ack = await broker_side.receive(SinkAck)
    assert ack.batch_ids == ["j1/0"]
    assert read_verdicts(out).num_rows == 2  # acknowledged only once the file is final

    # the ack was lost (say the broker died): the same sink gets the batch again
    await broker_side.send(first_id, Deliver(result=result, redelivery=True))
    assert (await broker_side.receive(SinkAck))[1].batch_ids == ["j1/0"]
    # or another sink writing to the same directory, whose index predates the file, gets it
    await broker_side.send(other_id, Deliver(result=result, redelivery=True))
    assert (await broker_side.receive(SinkAck))[1].batch_ids == ["j1/0"]
    first.stop()
    other.stop()
    await asyncio.gather(first_task, other_task)

    # or the sink was restarted, and finds the batch in the output when it starts
    restarted, restarted_task, restarted_id = await start_sink(broker_side, out, "first")
    await broker_side.send(restarted_id, Deliver(result=result, redelivery=True))
    assert (await broker_side.receive(SinkAck))[1].batch_ids == ["j1/0"]
    restarted.stop()
    await restarted_task

    assert read_verdicts(out).num_rows == 2
    assert first.duplicates_skipped == other.duplicates_skipped == restarted.duplicates_skipped == 1


async def test_failures_are_recorded_beside_the_output_and_until_done_exits(broker_side, tmp_path) -> None:
    out = tmp_path / "out"
    _, task, identity = await start_sink(broker_side, out, "s", until_done=True)
    failed = batch("j2", 0)
    failure = BatchFailure(
        batch_id=failed.batch_id, job_id="j2", context_id=failed.context.context_id, model=failed.context.model,
        template_id="t", claim_ids=[c.claim_id for c in failed.claims], error="prompt too long", attempts=3,
    )  # fmt: skip
    await broker_side.send(identity, DeliverFailure(failure=failure))
    await broker_side.send(identity, Deliver(result=result_for(batch("j2", 1))))
    acked: set[str] = set()
    while acked != {"j2/0", "j2/1"}:
        acked.update((await broker_side.receive(SinkAck))[1].batch_ids)
    assert [(f["claim_id"], f["error"], f["attempts"]) for f in read_failures(out)] == [
        ("0-0", "prompt too long", 3), ("0-1", "prompt too long", 3),
    ]  # fmt: skip
    assert not any(out.glob("*.jsonl")), "the output directory holds Parquet files only"

    await broker_side.send(identity, JobDone(job_id="j2", batches=2, pairs=4, failed_batches=1, open_jobs=0))
    await asyncio.wait_for(task, 10)  # --until-done: every job is complete, so the sink exits
    assert read_verdicts(out).num_rows == 2


def test_a_failures_write_cut_short_leaves_no_half_recorded_batch(tmp_path) -> None:
    """A sink killed mid-append: the batch without its closing line does not count as recorded (it was
    never acknowledged and will be recorded again whole), and the torn line is skipped."""
    from sinks.failures import FailureLog, failures_dir_for
    from sinks.written import WrittenIndex

    out = tmp_path / "out"
    log = FailureLog(out, "s")
    for n in range(2):
        failed = batch("j3", n)
        log.add(BatchFailure(batch_id=failed.batch_id, job_id="j3", context_id="c", model="m", template_id="t",
                             claim_ids=[c.claim_id for c in failed.claims], error="boom", attempts=3))  # fmt: skip
    assert log.flush() == ["j3/0", "j3/1"]
    path = failures_dir_for(out) / "failures-s.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4]) + lines[4][:10])  # j3/1: one pair written, then a torn line
    assert {f["batch_id"] for f in read_failures(out)} == {"j3/0"}
    index = WrittenIndex(out)
    index.refresh()
    assert "j3/0" in index and "j3/1" not in index

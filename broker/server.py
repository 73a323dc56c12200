"""The broker: one asyncio process, one ROUTER socket, every peer (producers, workers, sinks) on it.

Shaped like the ZeroMQ Guide's Majordomo broker: ``serve`` reads frames, ``handle`` decodes and routes
each message to a small verb method (``on_submit``, ``on_pull``, ...), ``dispatch`` matches queued
batches with worker credit through the affinity policy, and ``send`` is the one place that builds
envelopes. Handlers are synchronous and never block: sends are non-blocking, so a slow or vanished peer
cannot stall everyone else. No message, however malformed, escapes ``handle``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import zmq
import zmq.asyncio

from broker.policy import choose_context
from broker.records import BatchRecord, BatchStatus, ContextQueues, JobRecord, SinkRecord, WorkerRecord
from pervade.constants import DEFAULT_BROKER_BIND, DEFAULT_MAX_MESSAGE_BYTES
from pervade.errors import ConfigError, ProtocolError
from pervade.protocol import (
    Accepted,
    Assign,
    BatchFailed,
    Completed,
    ContextFailed,
    ContextLoaded,
    Deliver,
    Disconnect,
    EndJob,
    Error,
    Heartbeat,
    JobDone,
    LoadContext,
    Message,
    Pull,
    Rejected,
    SinkAck,
    SinkReady,
    Submit,
    WorkerReady,
    decode,
    encode,
    kind_of,
)
from pervade.transport import router_socket

log = structlog.get_logger("broker")


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker runs. Every field has a default that suits a small cluster."""

    #: ZeroMQ endpoint to bind; ``tcp://127.0.0.1:*`` picks a free port (see ``endpoint_file``).
    bind: str = DEFAULT_BROKER_BIND
    #: Where to write the endpoint actually bound, for launchers that asked for a free port.
    endpoint_file: Path | None = None
    #: Frames larger than this make libzmq drop the sender's connection.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: A batch that fails this many times is recorded as failed instead of retried.
    max_attempts: int = 3
    #: Queued batches per host at which an idle worker leaves its context for another (see policy.py).
    rebalance_backlog: int = 8
    #: How often the broker logs its counters.
    stats_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.rebalance_backlog < 1:
            raise ConfigError("rebalance_backlog must be at least 1")


class Broker:
    """Queues claim batches per context, hands them to workers by affinity, routes results to sinks."""

    def __init__(self, config: BrokerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self.endpoint = ""
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sinks: dict[bytes, SinkRecord] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.jobs: dict[str, JobRecord] = {}
        self.queues = ContextQueues()
        self.undelivered: deque[str] = deque()
        #: Contexts no live worker could load, with the error; cleared when a new worker joins.
        self.failed_contexts: dict[str, str] = {}
        self._next_sink = 0
        self._stopping = asyncio.Event()
        self.counters = {"invalid_messages": 0, "duplicate_submissions": 0, "duplicate_results": 0}
        self._handlers: dict[type[Message], Callable[[bytes, Message], None]] = {
            Submit: self.on_submit,
            EndJob: self.on_end_job,
            WorkerReady: self.on_worker_ready,
            Pull: self.on_pull,
            ContextLoaded: self.on_context_loaded,
            ContextFailed: self.on_context_failed,
            Completed: self.on_completed,
            BatchFailed: self.on_batch_failed,
            SinkReady: self.on_sink_ready,
            SinkAck: self.on_sink_ack,
            Disconnect: self.on_disconnect,
            Heartbeat: self.on_heartbeat,
            Error: self.on_error,
        }

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Bind the socket; returns the endpoint actually bound."""
        self._sock = router_socket(self._ctx, self.config.bind, self.config.max_message_bytes)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.endpoint_file:
            tmp = self.config.endpoint_file.with_suffix(".tmp")
            tmp.write_text(self.endpoint)
            tmp.replace(self.config.endpoint_file)  # readers never see a half-written endpoint
        log.info("broker_listening", endpoint=self.endpoint)
        return self.endpoint

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        """Serve until ``stop`` is called (or SIGTERM/SIGINT when installed by ``run_broker``)."""
        if self._sock is None:
            self.start()
        assert self._sock is not None
        next_stats = time.monotonic() + self.config.stats_interval_s
        try:
            while not self._stopping.is_set():
                if await self._sock.poll(200, zmq.POLLIN):
                    # Drain what is ready, then dispatch once: fewer policy passes under load.
                    for _ in range(1000):
                        try:
                            frames = await self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle(frames)
                    self.dispatch()
                if self.undelivered and self.sinks:
                    self.deliver_held()
                if time.monotonic() >= next_stats:
                    self.log_stats()
                    next_stats = time.monotonic() + self.config.stats_interval_s
        finally:
            self.log_stats()
            self._sock.close()
            self._sock = None

    # --- envelopes -------------------------------------------------------------------------------

    def send(self, identity: bytes, message: Message) -> bool:
        """Send without blocking; False when the peer is gone or not keeping up (logged, not raised)."""
        assert self._sock is not None
        future = self._sock.send_multipart([identity, *encode(message)], flags=zmq.NOBLOCK)
        error = future.exception() if future.done() else None
        if error is not None:
            log.warning("send_failed", peer=identity.decode(errors="replace"), kind=kind_of(message), error=str(error))
            return False
        return True

    def handle(self, frames: list[bytes]) -> None:
        """Decode one envelope and run its verb. Bad input is logged and answered, never raised."""
        if len(frames) < 2:
            self.counters["invalid_messages"] += 1
            log.warning("dropped_invalid_envelope", frames=len(frames))
            return
        identity, body = frames[0], frames[1:]
        try:
            message = decode(body)
            handler = self._handlers.get(type(message))
            if handler is None:
                raise ProtocolError(f"a broker does not accept {kind_of(message)!r} messages")
            handler(identity, message)
        except ProtocolError as exc:
            self.counters["invalid_messages"] += 1
            log.warning("rejected_message", peer=identity.decode(errors="replace"), error=str(exc))
            self.send(identity, Error(reason=str(exc)))
        except Exception as exc:  # a bug must cost one message, not the broker
            self.counters["invalid_messages"] += 1
            log.exception("handler_failed", peer=identity.decode(errors="replace"))
            self.send(identity, Error(reason="internal broker error", detail=repr(exc)))

    # --- producers -------------------------------------------------------------------------------

    def on_submit(self, identity: bytes, message: Submit) -> None:
        batch = message.batch
        job = self.jobs.get(batch.job_id)
        if job is None:
            job = self.jobs[batch.job_id] = JobRecord(job_id=batch.job_id, producer=identity)
        job.producer = identity
        if batch.batch_id in self.batches or job.done_reported:
            # A resend (the producer restarted, or lost our answer): acknowledged, never queued twice.
            # A finished job's batch records are pruned, so its id alone answers for all of them.
            self.counters["duplicate_submissions"] += 1
            self.send(identity, Accepted(batch_id=batch.batch_id, duplicate=True))
            return
        if job.total_batches is not None:
            self.send(identity, Rejected(batch_id=batch.batch_id, reason=f"job {batch.job_id} has already ended"))
            return
        failure = self.failed_contexts.get(batch.context.context_id)
        if failure is not None:
            self.send(identity, Rejected(batch_id=batch.batch_id, reason=f"no worker can load this context: {failure}"))
            return
        self.batches[batch.batch_id] = BatchRecord(batch=batch)
        self.queues.push(batch)
        job.total_pairs += len(batch.claims)
        self.send(identity, Accepted(batch_id=batch.batch_id))

    def on_end_job(self, identity: bytes, message: EndJob) -> None:
        job = self.jobs.get(message.job_id)
        if job is None:
            job = self.jobs[message.job_id] = JobRecord(job_id=message.job_id, producer=identity)
        job.producer = identity
        if job.total_batches is None:
            job.total_batches = message.batches
        # A producer re-running a finished job waits for JobDone again: answer every EndJob.
        self.report_if_complete(job, again=True)

    def report_if_complete(self, job: JobRecord, again: bool = False) -> None:
        if not job.complete or (job.done_reported and not again):
            return
        if not job.done_reported:
            job.done_reported = True
            log.info("job_done", job_id=job.job_id, written=job.written, failed=job.failed)
            self.forget_batches(job.job_id)
        self.send(
            job.producer,
            JobDone(
                job_id=job.job_id,
                batches=job.total_batches or 0,
                pairs=job.total_pairs,
                failed_batches=job.failed,
                errors=job.errors[:20],
            ),
        )

    def forget_batches(self, job_id: str) -> None:
        """A reported job's batch records (claims and all) are no longer needed: keep memory bounded."""
        for batch_id in [b for b, r in self.batches.items() if r.batch.job_id == job_id]:
            del self.batches[batch_id]

    # --- workers ---------------------------------------------------------------------------------

    def on_worker_ready(self, identity: bytes, message: WorkerReady) -> None:
        worker = WorkerRecord(
            identity=identity,
            worker_id=message.worker_id,
            host=message.host,
            device=message.device,
            max_contexts=message.max_contexts,
        )
        worker.contexts.update(dict.fromkeys(message.contexts))
        self.workers[identity] = worker
        self.failed_contexts.clear()  # new capacity: contexts that failed elsewhere may load here
        log.info("worker_joined", worker_id=message.worker_id, host=message.host, device=message.device.describe())

    def worker(self, identity: bytes) -> WorkerRecord:
        worker = self.workers.get(identity)
        if worker is None:
            raise ProtocolError("unknown worker: send worker_ready first")
        worker.last_seen = time.monotonic()
        return worker

    def on_pull(self, identity: bytes, message: Pull) -> None:
        self.worker(identity).credit += message.credit

    def on_context_loaded(self, identity: bytes, message: ContextLoaded) -> None:
        worker = self.worker(identity)
        log.info("context_loaded", worker_id=worker.worker_id, context_id=message.context_id, seconds=round(message.seconds, 3))

    def on_context_failed(self, identity: bytes, message: ContextFailed) -> None:
        worker = self.worker(identity)
        context_id = message.context_id
        worker.contexts.pop(context_id, None)
        worker.refused.add(context_id)
        log.error("context_failed", worker_id=worker.worker_id, context_id=context_id, error=message.error)
        for batch_id in [b for b in worker.in_flight if self.batches[b].context_id == context_id]:
            worker.in_flight.discard(batch_id)
            worker.credit += 1  # the worker will never answer these, so their credit comes back
            self.retry_or_fail(self.batches[batch_id], f"context {context_id} failed to load: {message.error}")
        if all(context_id in w.refused for w in self.workers.values()):
            self.fail_context(context_id, message.error)

    def fail_context(self, context_id: str, error: str) -> None:
        """No live worker can load this context: fail its queued batches rather than loop forever,
        and refuse new ones until another worker joins."""
        self.failed_contexts[context_id] = error
        for batch_id in self.queues.drain(context_id):
            self.mark_failed(self.batches[batch_id], f"no worker could load context {context_id}: {error}")

    def on_completed(self, identity: bytes, message: Completed) -> None:
        worker = self.worker(identity)
        result = message.result
        record = self.batches.get(result.batch_id)
        if record is None or record.status is not BatchStatus.ASSIGNED or record.worker != identity:
            self.counters["duplicate_results"] += 1
            log.info("duplicate_result_suppressed", batch_id=result.batch_id, worker_id=worker.worker_id)
            return
        worker.in_flight.discard(result.batch_id)
        worker.batches_done += 1
        record.status, record.result, record.worker = BatchStatus.COMPLETED, result, None
        self.deliver(record)

    def on_batch_failed(self, identity: bytes, message: BatchFailed) -> None:
        worker = self.worker(identity)
        record = self.batches.get(message.batch_id)
        if record is None or record.worker != identity or record.status is not BatchStatus.ASSIGNED:
            raise ProtocolError(f"batch {message.batch_id!r} is not assigned to this worker")
        worker.in_flight.discard(message.batch_id)
        log.warning("batch_failed", batch_id=message.batch_id, worker_id=worker.worker_id, error=message.error)
        self.retry_or_fail(record, message.error)

    def retry_or_fail(self, record: BatchRecord, error: str) -> None:
        record.worker = None
        if record.attempts >= self.config.max_attempts:
            self.mark_failed(record, error)
        else:
            record.status = BatchStatus.QUEUED
            self.queues.push(record.batch, front=True)

    def mark_failed(self, record: BatchRecord, error: str) -> None:
        record.status, record.error, record.worker = BatchStatus.FAILED, error, None
        job = self.jobs[record.batch.job_id]
        job.failed += 1
        job.errors.append(f"{record.batch.batch_id}: {error}")
        self.report_if_complete(job)

    def requeue_in_flight(self, worker: WorkerRecord) -> None:
        for batch_id in sorted(worker.in_flight):
            record = self.batches[batch_id]
            record.status, record.worker = BatchStatus.QUEUED, None
            self.queues.push(record.batch, front=True)
        if worker.in_flight:
            log.info("requeued", worker_id=worker.worker_id, batches=len(worker.in_flight))
        worker.in_flight.clear()

    # --- sinks -----------------------------------------------------------------------------------

    def on_sink_ready(self, identity: bytes, message: SinkReady) -> None:
        self.sinks[identity] = SinkRecord(identity=identity, sink_id=message.sink_id)
        log.info("sink_joined", sink_id=message.sink_id)
        self.deliver_held()

    def deliver_held(self) -> None:
        """Try again to deliver the results held back (no sink, or a failed send). Each is tried once per
        call: one that fails again goes back to the end of the line, not into an endless loop."""
        for _ in range(len(self.undelivered)):
            self.deliver(self.batches[self.undelivered.popleft()])

    def deliver(self, record: BatchRecord) -> None:
        """Hand a completed batch to a sink (round robin), or hold it until one is there."""
        sinks = list(self.sinks.values())
        if not sinks:
            self.undelivered.append(record.batch.batch_id)
            return
        sink = sinks[self._next_sink % len(sinks)]
        self._next_sink += 1
        assert record.result is not None
        if not self.send(sink.identity, Deliver(result=record.result)):
            self.undelivered.append(record.batch.batch_id)
            return
        record.status, record.sink = BatchStatus.DELIVERED, sink.identity
        sink.unacked.add(record.batch.batch_id)

    def on_sink_ack(self, identity: bytes, message: SinkAck) -> None:
        sink = self.sinks.get(identity)
        if sink is None:
            raise ProtocolError("unknown sink: send sink_ready first")
        touched: dict[str, JobRecord] = {}
        for batch_id in message.batch_ids:
            record = self.batches.get(batch_id)
            if record is None or record.status is not BatchStatus.DELIVERED or record.sink != identity:
                log.warning("unexpected_sink_ack", batch_id=batch_id, sink_id=sink.sink_id)
                continue
            sink.unacked.discard(batch_id)
            record.status, record.result = BatchStatus.WRITTEN, None  # the rows live in Parquet now
            job = self.jobs[record.batch.job_id]
            job.written += 1
            touched[job.job_id] = job
        for job in touched.values():
            self.report_if_complete(job)

    # --- any peer --------------------------------------------------------------------------------

    def on_disconnect(self, identity: bytes, message: Disconnect) -> None:
        worker = self.workers.pop(identity, None)
        if worker is not None:
            log.info("worker_left", worker_id=worker.worker_id, reason=message.reason, batches_done=worker.batches_done)
            self.requeue_in_flight(worker)
        sink = self.sinks.pop(identity, None)
        if sink is not None:
            log.info("sink_left", sink_id=sink.sink_id, reason=message.reason)
            for batch_id in sorted(sink.unacked):
                record = self.batches[batch_id]
                record.status, record.sink = BatchStatus.COMPLETED, None
                self.deliver(record)

    def on_heartbeat(self, identity: bytes, message: Heartbeat) -> None:
        if identity in self.workers:
            self.workers[identity].last_seen = time.monotonic()

    def on_error(self, identity: bytes, message: Error) -> None:
        log.warning("peer_reported_error", peer=identity.decode(errors="replace"), reason=message.reason)

    # --- scheduling ------------------------------------------------------------------------------

    def hosts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for worker in self.workers.values():
            for context_id in worker.contexts:
                counts[context_id] = counts.get(context_id, 0) + 1
        return counts

    def dispatch(self) -> None:
        """Match queued batches with worker credit, by affinity (see broker/policy.py)."""
        if not self.queues.total():
            return
        for worker in list(self.workers.values()):
            while worker.credit > 0:
                choice = choose_context(
                    held=worker.contexts,
                    pending=self.queues.pending(),
                    hosts=self.hosts(),
                    refused=worker.refused,
                    rebalance_backlog=self.config.rebalance_backlog,
                )
                if choice is None:
                    break
                if choice.load and not self.tell_to_load(worker, choice.context_id):
                    break
                if not self.assign(worker, self.queues.pop(choice.context_id)):
                    break  # unreachable for now: try again at the next dispatch

    def tell_to_load(self, worker: WorkerRecord, context_id: str) -> bool:
        evict = list(worker.contexts)[: max(0, len(worker.contexts) + 1 - worker.max_contexts)]
        if not self.send(worker.identity, LoadContext(context=self.queues.specs[context_id], evict=evict)):
            return False
        for context_id_evicted in evict:
            worker.contexts.pop(context_id_evicted, None)
        worker.contexts[context_id] = None
        log.info("told_to_load", worker_id=worker.worker_id, context_id=context_id, evict=evict)
        return True

    def assign(self, worker: WorkerRecord, batch_id: str) -> bool:
        """Send a batch to a worker; on a failed send the batch goes back to the front of its queue and
        the worker keeps its credit (it never saw the batch)."""
        record = self.batches[batch_id]
        if not self.send(worker.identity, Assign(batch=record.batch)):
            self.queues.push(record.batch, front=True)
            return False
        worker.credit -= 1
        worker.in_flight.add(batch_id)
        record.status, record.worker = BatchStatus.ASSIGNED, worker.identity
        record.attempts += 1
        return True

    def log_stats(self) -> None:
        by_status: dict[str, int] = {}
        for record in self.batches.values():
            by_status[record.status.value] = by_status.get(record.status.value, 0) + 1
        log.info(
            "broker_stats",
            workers=len(self.workers),
            sinks=len(self.sinks),
            queued=self.queues.total(),
            batches=by_status,
            **self.counters,
        )


async def run_broker(config: BrokerConfig) -> None:
    """Run a broker until SIGTERM or SIGINT."""
    broker = Broker(config)
    broker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.stop)
    await broker.serve()

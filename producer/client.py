"""The producer's Python API: submit a Prompt-for-Fact sweep to the broker and, if asked, wait for it.

    async with Producer("tcp://login1:5555") as producer:
        report = await producer.submit_sweep(claims, templates, make_context("HuggingFaceTB/SmolLM2-1.7B-Instruct"))
        done = await producer.wait(report.job_id)

Every (claim, template) pair is sent once, in batches of one template and up to ``batch_size`` claims.
Claims are read once, as a stream: each chunk of claims becomes one batch per template. At most
``max_unacked`` batches are in flight without the broker's acknowledgement (backpressure), so a producer
never floods a broker that is slower than the claims source.

Nothing is lost if the broker restarts or the network fails: the session reconnects (``pervade.session``),
then every batch not yet acknowledged is sent again, and so is the EndJob of every job still awaited. Batch
ids are deterministic, so the broker recognises a resend as a duplicate and queues it once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice

import msgspec
import structlog
import zmq.asyncio

from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.context import ContextSpec, ResolvedContext
from pervade.errors import ConfigError, InputError, JobFailed, ProtocolError
from pervade.keys import ClientKeys
from pervade.protocol import (
    Accepted,
    Batch,
    Claim,
    DeclareContext,
    Disconnect,
    EndJob,
    Error,
    JobDone,
    ProducerReady,
    Rejected,
    Submit,
    decode,
    encode,
)
from pervade.session import BrokerSession, Heartbeats
from producer.templates import validate_templates

log = structlog.get_logger("producer")


@dataclass
class SubmitReport:
    """What a sweep submission came to."""

    job_id: str
    batches: int = 0
    pairs: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rejected_pairs: int = 0
    #: Pairs of the batches the broker has answered (accepted or rejected) so far.
    answered_pairs: int = 0


def job_id_for(context: ContextSpec | ResolvedContext, templates: Mapping[str, str], source: str, batch_size: int) -> str:
    """A job id that is the same whenever the same sweep is submitted again, so a restarted producer's
    batches are recognised by the broker instead of being run twice."""
    key = msgspec.msgpack.encode((context.context_id, sorted(templates.items()), source, batch_size))
    return "job-" + hashlib.sha256(key).hexdigest()[:16]


def _chunks(claims: Iterable[Claim], size: int) -> Iterator[list[Claim]]:
    iterator = iter(claims)
    while chunk := list(islice(iterator, size)):
        yield chunk


class Producer:
    """A connection to the broker that submits sweeps. Use as an async context manager."""

    def __init__(
        self,
        broker: str = DEFAULT_BROKER_CONNECT,
        max_unacked: int = 16,
        ctx: zmq.asyncio.Context | None = None,
        heartbeats: Heartbeats | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        if max_unacked < 1:
            raise ConfigError("max_unacked must be at least 1")
        self.broker = broker
        self.max_unacked = max_unacked
        self.producer_id = f"producer-{uuid.uuid4().hex[:12]}"
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._closing = asyncio.Event()
        self.session = BrokerSession(
            self._ctx, broker, "producer", self._register, heartbeats, stopping=self._closing, keys=keys
        )
        self._receiver: asyncio.Task[None] | None = None
        self._window = asyncio.Semaphore(max_unacked)
        self._reports: dict[str, SubmitReport] = {}
        #: Batches sent and not yet answered: batch id -> (job id, pairs, frames to send again).
        self._unanswered: dict[str, tuple[str, int, list[bytes]]] = {}
        #: Jobs ended and not yet reported done: their EndJob is sent again after a reconnection.
        self._awaiting: dict[str, EndJob] = {}
        #: Manifests declared to the broker: declared again on every new connection, before any resend.
        self._declared: dict[str, DeclareContext] = {}
        self._done: dict[str, asyncio.Future[JobDone]] = {}
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        #: Set when the broker answers with Error: it refused a message we cannot match to a batch.
        self._refusal: str | None = None

    async def __aenter__(self) -> Producer:
        await self.session.open()
        self._receiver = asyncio.create_task(self._receive_loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing.set()
        if self._receiver is not None:
            await asyncio.gather(self._receiver, return_exceptions=True)
        await self.session.send_if_connected(Disconnect(reason="done"))
        self.session.close()

    async def _register(self, session: BrokerSession) -> None:
        await session.send_registration(ProducerReady(producer_id=self.producer_id))
        for declaration in list(self._declared.values()):
            await session.send_registration(declaration)
        for _, _, frames in list(self._unanswered.values()):
            await session.send_frames_registration(frames)
        for end in list(self._awaiting.values()):
            await session.send_registration(end)
        if self._unanswered or self._awaiting:
            log.info("resent_after_reconnect", batches=len(self._unanswered), jobs=len(self._awaiting))

    def _done_future(self, job_id: str) -> asyncio.Future[JobDone]:
        return self._done.setdefault(job_id, asyncio.get_running_loop().create_future())

    async def _receive_loop(self) -> None:
        while not self._closing.is_set():
            message = await self.session.receive(timeout_s=0.5)
            if isinstance(message, (Accepted, Rejected)):
                self._acknowledge(message)
            elif isinstance(message, JobDone):
                self._awaiting.pop(message.job_id, None)
                future = self._done_future(message.job_id)
                if not future.done():
                    future.set_result(message)
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
                self._fail_pending(message.reason)

    def _fail_pending(self, reason: str) -> None:
        """The broker refused something it could not name: whatever waits on an answer stops waiting."""
        self._refusal = reason
        for _ in range(len(self._unanswered)):
            self._window.release()
        self._unanswered.clear()
        self._all_acked.set()

    def _acknowledge(self, message: Accepted | Rejected) -> None:
        pending = self._unanswered.pop(message.batch_id, None)
        if pending is None:
            return  # an answer to a resend we no longer wait for
        job_id, pairs, _ = pending
        report = self._reports[job_id]
        report.answered_pairs += pairs
        if isinstance(message, Accepted):
            report.accepted += 1
            report.duplicates += message.duplicate
        else:
            report.rejected.append(f"{message.batch_id}: {message.reason}")
            report.rejected_pairs += pairs
            log.error("batch_rejected", batch_id=message.batch_id, reason=message.reason)
        self._window.release()
        if not self._unanswered:
            self._all_acked.set()

    async def submit_sweep(
        self,
        claims: Iterable[Claim],
        templates: Mapping[str, str],
        context: ResolvedContext | ContextSpec,
        batch_size: int = 32,
        job_id: str | None = None,
    ) -> SubmitReport:
        """Send every (claim, template) pair for ``context`` and end the job; returns once the broker
        has acknowledged every batch. ``job_id`` defaults to a fresh random id; pass a stable one (such as
        ``job_id_for(...)`` over the claims' source) to let a re-run be recognised instead of redone."""
        if self._receiver is None:
            raise ConfigError("use the Producer as 'async with Producer(...) as producer'")
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        templates = validate_templates(dict(templates))
        context = await self.declare(context)
        job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
        report = self._reports[job_id] = SubmitReport(job_id=job_id)
        self._done[job_id] = asyncio.get_running_loop().create_future()  # never an earlier run's answer
        started = time.perf_counter()
        chunks = _chunks(claims, batch_size)
        index = 0
        # Reading claims (files, the hub) blocks: take each chunk on a thread so acknowledgements
        # keep flowing while the next chunk is read.
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            for template_id, template in templates.items():
                batch = Batch(
                    batch_id=f"{job_id}/{index:07d}/{template_id}",
                    job_id=job_id,
                    context=context,
                    template_id=template_id,
                    template=template,
                    claims=chunk,
                    submitted_at=time.time(),
                )
                await self._send_batch(batch, report)
            index += 1
        await self._all_acked.wait()
        self._raise_if_refused()
        # Only what the broker took counts: a rejected batch would never complete.
        accepted_pairs = report.pairs - report.rejected_pairs
        end = self._awaiting[job_id] = EndJob(job_id=job_id, batches=report.accepted, pairs=accepted_pairs)
        await self.session.send(end)
        report.seconds = time.perf_counter() - started
        log.info("job_submitted", job_id=job_id, batches=report.batches, pairs=report.pairs, accepted=report.accepted)
        return report

    async def declare(self, context: ResolvedContext | ContextSpec) -> ContextSpec:
        """Give the broker the context's manifest (once per connection); returns the spec batches carry."""
        if isinstance(context, ContextSpec):
            if context.files is not None:
                raise ConfigError("a context with files needs its manifest: pass the ResolvedContext from make_context")
            return context.validate()
        spec = context.spec.validate()
        if context.manifest is not None and spec.context_id not in self._declared:
            declaration = self._declared[spec.context_id] = DeclareContext(context=spec, manifest=context.manifest)
            await self.session.send(declaration)
        return spec

    def report(self, job_id: str) -> SubmitReport | None:
        """How far the submission of ``job_id`` has got (it grows while ``submit_sweep`` runs)."""
        return self._reports.get(job_id)

    def _raise_if_refused(self) -> None:
        if self._refusal is not None:
            raise JobFailed(f"the broker refused a message: {self._refusal}")

    async def _send_batch(self, batch: Batch, report: SubmitReport) -> None:
        frames = encode(Submit(batch=batch))
        try:
            decode(frames)  # what the broker would refuse, refused here, with the field named
        except ProtocolError as exc:
            raise InputError(f"batch {batch.batch_id} cannot be sent: {exc}") from None
        await self._window.acquire()
        self._raise_if_refused()
        self._unanswered[batch.batch_id] = (batch.job_id, len(batch.claims), frames)
        self._all_acked.clear()
        await self.session.send_frames(frames)
        report.batches += 1
        report.pairs += len(batch.claims)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobDone:
        """Until every batch of the job is durably written by a sink or has failed. Raises JobFailed if
        any batch failed or was rejected."""
        done = await asyncio.wait_for(asyncio.shield(self._done_future(job_id)), timeout_s)
        report = self._reports.get(job_id)
        problems = list(done.errors) + (report.rejected if report else [])
        if done.failed_batches or problems:
            raise JobFailed(f"job {job_id}: {done.failed_batches} of {done.batches} batches failed; " + "; ".join(problems[:5]))
        return done

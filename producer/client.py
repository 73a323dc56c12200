"""The producer's Python API: submit a Prompt-for-Fact sweep to the broker and, if asked, wait for it.

    async with Producer("tcp://login1:5555") as producer:
        report = await producer.submit_sweep(claims, templates, make_context("HuggingFaceTB/SmolLM2-1.7B-Instruct"))
        done = await producer.wait(report.job_id)

Every (claim, template) pair is sent once, in batches of one template and up to ``batch_size`` claims.
Claims are read once, as a stream: each chunk of claims becomes one batch per template. At most
``max_unacked`` batches and ``max_unacked_pairs`` pairs are in flight without the broker's acknowledgement
(backpressure, ``producer/window.py``), so a producer never floods a broker that is slower than the claims
source. Batches travel in groups: as many as the window has room for go in one message (the broker answers
them in one message too), so a small batch size costs no round trip per batch. Nothing waits to fill a
group: it closes when the window is full or the claims read so far are sent.

Nothing is lost if the broker restarts or the network fails: the session reconnects (``pervade.session``),
then every batch not yet acknowledged is sent again, and so is the EndJob of every job still awaited. Batch
ids are deterministic, so the broker recognises a resend as a duplicate and queues it once.

Nor does the producer take the broker's word for it. It keeps its own count of what the broker accepted
(``pervade.batchset.BatchSet``: batches, pairs, a digest of their ids), ends a job only once the broker
holds exactly that, and returns from ``wait`` only when the broker reports that many pairs written or
recorded failed. A broker whose state was damaged or replaced holds less: the producer reads the claims
again (when they can be iterated again: a list, a ``ClaimsReader``) and resubmits the whole sweep, of which
the broker queues only what it lost; or fails with the count of pairs missing. Each chunk of claims read
again must digest as it did the first time (or as a scan said), so a file changed meanwhile is refused,
never computed under the old job's name. A sweep whose claims turn out bad midway is aborted: the broker
closes the job, so no sink or producer waits for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping

import structlog
import zmq.asyncio

from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.context import ContextSpec, ResolvedContext
from pervade.errors import ClaimsError, ConfigError, InputError, JobFailed, ProtocolError
from pervade.keys import ClientKeys
from pervade.producer.claims import chunk_digest, chunks, read_ahead
from pervade.producer.sweep import SubmitReport, Sweep, batch_id_for, work_key
from pervade.producer.templates import validate_templates
from pervade.producer.window import DEFAULT_MAX_UNACKED, DEFAULT_MAX_UNACKED_PAIRS, SendWindow
from pervade.prompts import PromptTemplate
from pervade.protocol import (
    AbortJob,
    Accepted,
    Batch,
    Claim,
    DeclareContext,
    Disconnect,
    EndJob,
    Error,
    JobDone,
    JobEnded,
    ProducerReady,
    Rejected,
    Submit,
    decode_body,
    encode_body,
    group_frames,
)
from pervade.session import BrokerSession, Heartbeats

log = structlog.get_logger("producer")

#: Times a producer submits a sweep again to a broker that lost part of it, before it gives up.
MAX_RESUBMISSIONS = 3
#: Seconds a producer waits for the broker to confirm an aborted job before it exits anyway.
ABORT_CONFIRM_S = 5.0
#: Pairs a producer reads ahead per trip to its reading thread (in whole chunks, at least one).
READ_AHEAD_PAIRS = 4096
#: How long one wait of the receiving loop for the broker's next message lasts (heartbeats are kept in it).
RECEIVE_POLL_S = 0.5


class Producer:
    """A connection to the broker that submits sweeps. Use as an async context manager."""

    def __init__(
        self,
        broker: str = DEFAULT_BROKER_CONNECT,
        max_unacked: int = DEFAULT_MAX_UNACKED,
        ctx: zmq.asyncio.Context | None = None,
        heartbeats: Heartbeats | None = None,
        keys: ClientKeys | None = None,
        max_unacked_pairs: int = DEFAULT_MAX_UNACKED_PAIRS,
    ) -> None:
        self._window = SendWindow(max_unacked, max_unacked_pairs)
        self.broker = broker
        self.max_unacked = max_unacked
        self.producer_id = f"producer-{uuid.uuid4().hex[:12]}"
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._closing = asyncio.Event()
        self.session = BrokerSession(
            self._ctx, broker, "producer", self._register, heartbeats, stopping=self._closing, keys=keys
        )
        self._receiver: asyncio.Task[None] | None = None
        self._sweeps: dict[str, Sweep] = {}
        #: Batches sent and not yet answered: batch id -> (job id, pairs, body to send again, first pass).
        self._unanswered: dict[str, tuple[str, int, bytes, bool]] = {}
        #: Jobs ended (or aborted) and not yet reported done: sent again after a reconnection.
        self._awaiting: dict[str, EndJob | AbortJob] = {}
        #: Manifests declared to the broker: declared again on every new connection, before any resend.
        self._declared: dict[str, DeclareContext] = {}
        #: JobDone of jobs this producer did not submit (``wait`` on another producer's job id).
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
            # Cancelled, not left to finish its wait: a producer whose job was done exited RECEIVE_POLL_S
            # later (half a second of every `produce --wait`). The loop's only await is the session's receive:
            # a cancel there loses at most a message that nobody waits for now.
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        self._fail_waiters()
        await self.session.send_if_connected(Disconnect(reason="done"))
        self.session.close()

    async def _register(self, session: BrokerSession) -> None:
        await session.send_registration(ProducerReady(producer_id=self.producer_id))
        for declaration in list(self._declared.values()):
            await session.send_registration(declaration)
        for frames in group_frames([body for _, _, body, _ in self._unanswered.values()]):
            await session.send_frames_registration(frames)
        for end in list(self._awaiting.values()):
            await session.send_registration(end)
        if self._unanswered or self._awaiting:
            log.info("resent_after_reconnect", batches=len(self._unanswered), jobs=len(self._awaiting))

    def _done_future(self, job_id: str) -> asyncio.Future[JobDone]:
        sweep = self._sweeps.get(job_id)
        if sweep is not None:
            return sweep.done
        return self._done.setdefault(job_id, asyncio.get_running_loop().create_future())

    async def _receive_loop(self) -> None:
        while not self._closing.is_set():
            message = await self.session.receive(timeout_s=RECEIVE_POLL_S)
            if isinstance(message, (Accepted, Rejected)):
                self._acknowledge(message)
            elif isinstance(message, JobEnded):
                self._job_ended(message)
            elif isinstance(message, JobDone):
                self._awaiting.pop(message.job_id, None)
                future = self._done_future(message.job_id)
                if not future.done():
                    future.set_result(message)
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
                self._fail_pending(f"the broker refused a message: {message.reason}")

    def _job_ended(self, message: JobEnded) -> None:
        sweep = self._sweeps.get(message.job_id)
        if sweep is None:
            return
        if sweep.ended is not None and not sweep.ended.done():
            sweep.ended.set_result(message)
        elif not message.agreed and not sweep.done.done():
            # Our EndJob, resent after a reconnection, found a broker that lost the job (it restarted on
            # damaged or new state): whoever waits for the job resubmits it.
            sweep.lost = message
            sweep.lost_signal.set()

    def _fail_pending(self, reason: str) -> None:
        """The broker refused something it could not name, or the producer closed: whatever waits on an answer
        stops waiting, and fails with ``reason``."""
        self._refusal = reason
        self._window.clear()
        self._unanswered.clear()
        self._all_acked.set()

    def _fail_waiters(self) -> None:
        """Closed: nothing reads the broker's answers any more, so whatever another task still awaits (a job's
        end or its ``wait``, room to submit) fails now with JobFailed instead of waiting for ever."""
        if self._refusal is None:
            self._fail_pending("the producer was closed before the broker answered")
        futures = [*self._done.values(), *(s.done for s in self._sweeps.values())]
        futures += [s.ended for s in self._sweeps.values() if s.ended is not None]
        for future in futures:
            if not future.done():
                future.set_exception(JobFailed(self._refusal))
                future.exception()  # retrieved here: nobody may be awaiting it, and that is no error

    def _acknowledge(self, message: Accepted | Rejected) -> None:
        self._answer(message)
        if isinstance(message, Accepted):
            for batch_id in message.more:  # accepted in the same turn, none of them a duplicate
                self._answer(Accepted(batch_id=batch_id))

    def _answer(self, message: Accepted | Rejected) -> None:
        """One batch's answer: counted towards its job, and its place in the window freed."""
        pending = self._unanswered.pop(message.batch_id, None)
        if pending is None:
            return  # an answer to a resend we no longer wait for
        job_id, pairs, _, first_pass = pending
        sweep = self._sweeps[job_id]
        report = sweep.report
        if isinstance(message, Rejected):
            report.rejected.append(f"{message.batch_id}: {message.reason}")
            report.rejected_pairs += pairs
            log.error("batch_rejected", batch_id=message.batch_id, reason=message.reason)
        elif first_pass:
            sweep.accepted.add(message.batch_id, pairs)
            report.accepted += 1
            report.duplicates += message.duplicate
        elif not message.duplicate:
            report.recovered_batches += 1  # the broker had lost it and took it again
        if first_pass:
            report.answered_pairs += pairs
        self._window.release(pairs)
        if not self._unanswered:
            self._all_acked.set()

    async def submit_sweep(
        self,
        claims: Iterable[Claim],
        templates: Mapping[str, str | PromptTemplate],
        context: ResolvedContext | ContextSpec,
        batch_size: int = 32,
        job_id: str | None = None,
        chunk_digests: Iterable[bytes] | None = None,
    ) -> SubmitReport:
        """Send every (claim, template) pair for ``context`` and end the job; returns once the broker holds
        exactly the batches it accepted (resubmitting what it lost, when ``claims`` can be iterated again).

        ``job_id`` defaults to a fresh random id; pass a stable one (``job_id_for`` over a ``scan_claims``)
        to let a re-run be recognised instead of redone. ``chunk_digests`` (from that scan) makes every
        chunk read be checked against what was scanned. A ClaimsError while reading aborts the job."""
        if self._receiver is None:
            raise ConfigError("use the Producer as 'async with Producer(...) as producer'")
        if batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        templates = validate_templates(dict(templates))
        spec = await self.declare(context)
        job_id = job_id or f"job-{uuid.uuid4().hex[:16]}"
        report = SubmitReport(job_id=job_id)
        sweep = self._sweeps[job_id] = Sweep(
            job_id=job_id, claims=claims, templates=templates, context=spec, batch_size=batch_size, report=report,
            done=asyncio.get_running_loop().create_future(),  # never an earlier run's answer
            chunk_digests=list(chunk_digests) if chunk_digests is not None else None,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            await self._send_pass(sweep, first=True)
        except InputError as exc:
            await self._abort(sweep, str(exc))
            raise
        await self._end(sweep)
        report.seconds = time.perf_counter() - started
        log.info("job_submitted", job_id=job_id, batches=report.batches, pairs=report.pairs, accepted=report.accepted)
        return report

    async def _send_pass(self, sweep: Sweep, first: bool) -> None:
        """Read the claims and send every batch: the first submission, or a resubmission after the broker
        lost part of the job (each chunk checked against the first pass, or the scan)."""
        expected = sweep.chunk_digests
        recorded: list[bytes] = []
        claims = chunks(sweep.claims, sweep.batch_size)
        index = 0
        # Reading claims (files, the hub) blocks: chunks are read on a thread, many per trip (a trip per
        # chunk cost more than the rest of a small batch's way), so acknowledgements keep flowing meanwhile.
        # A chunk that cannot be read stops the pass after the chunks read before it are sent.
        while True:
            taken, failure = await asyncio.to_thread(read_ahead, claims, READ_AHEAD_PAIRS // len(sweep.templates))
            checked: list[tuple[int, bytes, list[Claim]]] = []
            for chunk in taken:
                digest = chunk_digest(chunk)
                if expected is not None and (index >= len(expected) or expected[index] != digest):
                    first_claim = index * sweep.batch_size + 1
                    failure = ClaimsError(
                        f"the claims changed while job {sweep.job_id} was submitted: claims {first_claim}-"
                        f"{first_claim + len(chunk) - 1} are not the ones read before"
                    )
                    break
                recorded.append(digest)
                checked.append((index, digest, chunk))
                index += 1
            await self._send_batches(self._trip_batches(sweep, checked), sweep.report, first)
            if failure is not None:
                raise failure
            if not taken:
                break
        if expected is not None and index != len(expected):
            raise ClaimsError(f"the claims changed while job {sweep.job_id} was submitted: {index * sweep.batch_size} "
                              f"or fewer claims now, {len(expected) * sweep.batch_size} or fewer before")  # fmt: skip
        if expected is None:
            sweep.chunk_digests = recorded
        await self._all_acked.wait()
        self._raise_if_refused()

    @staticmethod
    def _trip_batches(sweep: Sweep, chunks_read: list[tuple[int, bytes, list[Claim]]]) -> list[Batch]:
        """The batches of the chunks one trip read, a template at a time: every chunk under the first template,
        then under the next. A worker scores a run of one template's claims at once (gpuworker/intake.py) and
        holds about two runs' worth: with the templates interleaved chunk by chunk, batches of one claim under
        two templates made runs of about 200 claims of 256, under ten templates runs of 51 to 102, where
        batches of 512 fill each run whole (RQ2, docs/benchmarks.md). A trip holds READ_AHEAD_PAIRS pairs, so
        the templates still advance together."""
        submitted_at = time.time()
        work = {template_id: work_key(template, sweep.context) for template_id, template in sweep.templates.items()}
        return [
            Batch(
                batch_id=batch_id_for(sweep.job_id, index, template_id, digest, work[template_id]),
                job_id=sweep.job_id, context=sweep.context, template_id=template_id, template=template,
                claims=chunk, submitted_at=submitted_at,
            )  # fmt: skip
            for template_id, template in sweep.templates.items()
            for index, digest, chunk in chunks_read
        ]

    async def _end(self, sweep: Sweep) -> None:
        """End the job once the broker holds exactly what it accepted; resubmit while it holds less."""
        while True:
            reply = await self._ask(sweep, sweep.end_message())
            if reply.agreed:
                sweep.lost = None  # an answer to an older EndJob, resent mid-resubmission, is stale now
                sweep.lost_signal.clear()
                return
            await self._recover(sweep, reply)

    async def _ask(self, sweep: Sweep, message: EndJob | AbortJob) -> JobEnded:
        """Send an EndJob or AbortJob (sent again after a reconnection) and wait for the broker's JobEnded."""
        sweep.ended = asyncio.get_running_loop().create_future()
        self._awaiting[sweep.job_id] = message
        await self.session.send(message)
        return await sweep.ended

    async def _recover(self, sweep: Sweep, held: JobEnded) -> None:
        """The broker holds less of the job than it accepted (its state was damaged or replaced): submit the
        sweep again, or fail with what is missing when that cannot help."""
        ours, report = sweep.accepted, sweep.report
        missing = f"{ours.batches - held.batches} batches ({ours.pairs - held.pairs} pairs)"
        if held.batches > ours.batches or (held.batches == ours.batches and held.digest != ours.digest):
            raise JobFailed(
                f"job {sweep.job_id}: the broker holds {held.batches} batches ({held.pairs} pairs) under this job id, "
                f"this producer submitted {ours.batches} ({ours.pairs} pairs): another sweep used the same job id"
            )
        if not sweep.rereadable:
            raise JobFailed(
                f"job {sweep.job_id}: the broker lost {missing} of {ours.batches} batches (its state was damaged or "
                "replaced), and these claims cannot be read again to resubmit them: submit the same sweep again"
            )
        if report.resubmissions >= MAX_RESUBMISSIONS:
            raise JobFailed(
                f"job {sweep.job_id}: the broker still lacks {missing} after {report.resubmissions} resubmissions"
            )
        report.resubmissions += 1
        log.error(
            "broker_lost_batches", job_id=sweep.job_id, broker_batches=held.batches, our_batches=ours.batches,
            missing_pairs=ours.pairs - held.pairs, resubmission=report.resubmissions,
        )  # fmt: skip
        # No EndJob is resent mid-pass after a reconnection: the broker's answer would only count a pass
        # not yet finished as another loss. ``_end`` sends it again once the pass is done.
        self._awaiting.pop(sweep.job_id, None)
        try:
            await self._send_pass(sweep, first=False)
        except InputError as exc:
            await self._abort(sweep, str(exc))
            raise

    async def _abort(self, sweep: Sweep, reason: str) -> None:
        """The sweep cannot be finished: have the broker close the job, so nobody waits for it."""
        for batch_id in [b for b, pending in self._unanswered.items() if pending[0] == sweep.job_id]:
            _, pairs, _, _ = self._unanswered.pop(batch_id)  # answers to these no longer matter
            self._window.release(pairs)
        if not self._unanswered:
            self._all_acked.set()
        try:
            async with asyncio.timeout(ABORT_CONFIRM_S):
                await self._ask(sweep, AbortJob(job_id=sweep.job_id, reason=reason[:2000]))
            log.error("job_aborted", job_id=sweep.job_id, reason=reason)
        except TimeoutError:
            log.error("job_abort_unconfirmed", job_id=sweep.job_id, reason=reason,
                      hint="the broker keeps the job open until this producer reaches it again")  # fmt: skip

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
        sweep = self._sweeps.get(job_id)
        return sweep.report if sweep is not None else None

    def _raise_if_refused(self) -> None:
        if self._refusal is not None:
            raise JobFailed(self._refusal)

    async def _send_batches(self, batches: list[Batch], report: SubmitReport, first_pass: bool) -> None:
        """Send batches in order, as many per message as the window has room for. Each is checked first: one
        the broker would refuse raises InputError naming the field, after the batches before it are sent."""
        pending: list[tuple[Batch, bytes]] = []
        failure: InputError | None = None
        for batch in batches:
            body = encode_body(Submit(batch=batch))
            try:
                decode_body(body)  # what the broker would refuse, refused here, with the field named
            except ProtocolError as exc:
                failure = InputError(f"batch {batch.batch_id} cannot be sent: {exc}")
                break
            pending.append((batch, body))
        start = 0
        while start < len(pending):
            await self._window.acquire(len(pending[start][0].claims))
            end = start + 1
            while end < len(pending) and self._window.try_acquire(len(pending[end][0].claims)):
                end += 1
            self._raise_if_refused()
            group = pending[start:end]
            for batch, body in group:
                self._unanswered[batch.batch_id] = (batch.job_id, len(batch.claims), body, first_pass)
            self._all_acked.clear()
            for frames in group_frames([body for _, body in group]):
                await self.session.send_frames(frames)
            if first_pass:
                report.batches += len(group)
                report.pairs += sum(len(batch.claims) for batch, _ in group)
            start = end
        if failure is not None:
            raise failure

    async def wait(self, job_id: str, timeout_s: float | None = None) -> JobDone:
        """Until every batch of the job is durably written by a sink or recorded failed, as counted against
        this producer's own record; resubmits what a restarted broker lost meanwhile. Raises JobFailed if
        any batch failed or was rejected, or the broker's count is not this producer's."""
        sweep = self._sweeps.get(job_id)
        if sweep is None:  # another producer's job: the broker's word is all there is
            done = await asyncio.wait_for(asyncio.shield(self._done_future(job_id)), timeout_s)
            if done.failed_batches or done.errors:
                raise JobFailed(f"job {job_id}: {done.failed_batches} of {done.batches} batches failed; "
                                + "; ".join(done.errors[:5]))  # fmt: skip
            return done
        async with asyncio.timeout(timeout_s):
            while not sweep.done.done():
                lost = asyncio.ensure_future(sweep.lost_signal.wait())
                await asyncio.wait([sweep.done, lost], return_when=asyncio.FIRST_COMPLETED)
                lost.cancel()
                if sweep.lost is not None and not sweep.done.done():
                    held, sweep.lost = sweep.lost, None
                    sweep.lost_signal.clear()
                    await self._recover(sweep, held)
                    await self._end(sweep)
        done = sweep.done.result()
        self._verify(sweep, done)
        return done

    @staticmethod
    def _verify(sweep: Sweep, done: JobDone) -> None:
        ours, report = sweep.accepted, sweep.report
        counted = (done.batches, done.pairs) == (ours.batches, ours.pairs)
        settled = (
            done.batches_written + done.failed_batches == done.batches
            and done.pairs_written + done.pairs_failed == done.pairs
        )
        if not counted or not settled:
            raise JobFailed(
                f"job {sweep.job_id}: the broker reports {done.pairs_written} pairs written and {done.pairs_failed} "
                f"failed of {done.pairs} in {done.batches} batches, but this producer had {ours.pairs} pairs in "
                f"{ours.batches} batches accepted: "
                f"{ours.pairs - done.pairs_written - done.pairs_failed} unaccounted for"
            )
        problems = list(done.errors) + report.rejected
        if done.failed_batches or problems:
            raise JobFailed(
                f"job {sweep.job_id}: {done.failed_batches} of {done.batches} batches failed "
                f"({done.pairs_failed} pairs recorded failed); " + "; ".join(problems[:5])
            )

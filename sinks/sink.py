"""The sink: receives outcomes from the broker, writes them durably, acknowledges only what is durable.

Verdicts go to Parquet (``sinks/parquet.py``), failed batches to the failures log beside the output
(``sinks/failures.py``). A batch is acknowledged only after the file holding it has its final name (or is
fsynced), so the broker knows exactly which outcomes could still be lost and delivers those again. A
delivery of a batch already durable in the output (``sinks/written.py``) is acknowledged, not written
again, and a file is published under the output directory's commit lock, without the batches another sink
published meanwhile (``sinks/commit.py``): every (claim, template, context) gets exactly one row, however
many sinks share the directory and however long one of them stalls.

A write that fails (a full disk, a directory gone read-only) costs nothing but time: the sink drops what
it had not made durable, steps away from the broker (which delivers those batches again, to another sink
or to this one when it returns), and registers again after a back-off that doubles up to a minute.

Files roll when they reach ``file_rows`` rows, when the oldest unacknowledged outcome is ``roll_seconds``
old, when nothing has arrived for ``idle_roll_seconds``, when the broker says nothing more is coming
(``RollNow``: every job of what it holds ended and delivered), and on shutdown. With ``until_done`` the sink
exits once the broker reports every job complete.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec
import structlog
import zmq.asyncio

from pervade.keys import ClientKeys
from pervade.monitor import format_duration
from pervade.options import POSITIVE, at_least, broker_option, check_options, nested, option, progress_option
from pervade.progress import reported_bars
from pervade.protocol import (
    PART_MARK,
    BatchFailure,
    Deliver,
    DeliverFailure,
    Disconnect,
    Error,
    JobDone,
    Member,
    ProgressReply,
    ProgressRequest,
    RollNow,
    RunProgress,
    SinkAck,
    SinkReady,
    member_spans,
)
from pervade.session import BrokerSession, Heartbeats
from pervade.sinks.commit import OutputDirectory, Published
from pervade.sinks.coverage import PartsByRoot, Span, claims_left, extent, rows_in
from pervade.sinks.failures import FailureLog
from pervade.sinks.parquet import RollingParquetWriter

log = structlog.get_logger("sinks")
T = TypeVar("T")

#: Seconds between the progress requests that feed the progress bar (only while it is drawn).
PROGRESS_POLL_S = 1.0
#: Back-off after a failed write, doubling from the first to the last while writes keep failing.
WRITE_RETRY_MIN_S = 1.0
WRITE_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class SinkConfig:
    """How a sink writes."""

    #: Directory for the Parquet files (created if missing). Sinks of one run share it.
    out_dir: Path = option(help="output directory (created if missing)", flag="--out", metavar="DIR")
    broker: str = broker_option()
    #: Rows per Parquet row group; a full group is written out at once.
    row_group_rows: int = option(10_000, "rows per Parquet row group", flag="--row-group-rows", check=at_least(1))
    #: Rows per file; a full file is closed, renamed and acknowledged.
    file_rows: int = option(1_000_000, "rows per file before it is closed", flag="--file-rows", check=at_least(1))
    #: Longest a received result waits before its file is closed and it is acknowledged.
    roll_seconds: float = option(
        2.0, "longest a result waits before its file is closed and acknowledged", flag="--roll-seconds", check=POSITIVE
    )
    #: Close the file early once no result has arrived for this long (the end of a job, a lull).
    idle_roll_seconds: float = option(
        0.5, "close the file once no result has come for this long", flag="--idle-roll-seconds", check=POSITIVE
    )
    #: A name for the files and logs; defaults to a fresh random id. One live sink holds a name: a restarted
    #: sink given it takes over once the old one is silent for a heartbeat liveness (a second live one is
    #: refused).
    sink_id: str | None = option(
        None,
        "name in file names and logs; one live sink holds it: a restarted sink with the same name takes over "
        "once the old one is silent for a heartbeat liveness (default: random)",
        flag="--sink-id",
    )
    #: Exit once the broker reports every job complete.
    until_done: bool = option(False, "exit once the broker reports every job complete", flag="--until-done")
    heartbeats: Heartbeats = nested(Heartbeats)
    #: CURVE keys for the broker connection (None: plain TCP).
    keys: ClientKeys | None = None
    #: A progress bar of the verdicts written on stderr; None: only when stderr is a terminal.
    progress: bool | None = progress_option()

    def __post_init__(self) -> None:
        check_options(self)


class Sink:
    def __init__(self, config: SinkConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.sink_id = config.sink_id or f"sink-{uuid.uuid4().hex[:8]}"
        #: Tells this process's reconnections from a second process started under the same sink id.
        self.instance = uuid.uuid4().hex
        # A restarted sink of the same name must never reuse (and so replace) a file already acknowledged.
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"
        self.output = OutputDirectory(config.out_dir)
        self.writer = RollingParquetWriter(self.output, f"verdicts-{stamp}-{self.sink_id}", config.row_group_rows)
        self.failures = FailureLog(config.out_dir, f"{stamp}-{self.sink_id}")
        self.index = self.output.index
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._stopping = asyncio.Event()
        self.session = BrokerSession(
            self._ctx,
            config.broker,
            "sink",
            self._register,
            config.heartbeats,
            stopping=self._stopping,
            keys=config.keys,
        )
        #: The producer batches of the slices held and not yet acknowledged: batch id -> its slice's id. Rows,
        #: the output's index and its ledger name producer batches; the broker is answered with slice ids.
        self._slice_of: dict[str, list[str]] = {}
        #: The split batches' parts among the outcomes held (``sinks/coverage.py``): in the current file, and
        #: among the failures to record.
        self._file_parts = PartsByRoot()
        self._failure_parts = PartsByRoot()
        self._oldest_unacked: float | None = None
        self._last_delivery = 0.0
        self._all_jobs_done = False
        self.rows_written = 0
        self.files_written = 0
        self.duplicates_skipped = 0
        self.write_failures = 0
        self._retry_s = WRITE_RETRY_MIN_S
        self.progress = WrittenProgress(config.progress)

    def stop(self) -> None:
        self._stopping.set()

    async def _register(self, session: BrokerSession) -> None:
        await session.send_registration(SinkReady(sink_id=self.sink_id, instance=self.instance))

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(sink_id=self.sink_id)
        cleaned = await asyncio.to_thread(self.output.clean_staging)
        known = await asyncio.to_thread(self.index.refresh)
        await self.session.open()
        log.info("sink_started", broker=self.config.broker, out_dir=str(self.config.out_dir), batches_in_output=known,
                 leftovers_removed=cleaned)  # fmt: skip
        next_poll = time.monotonic()
        try:
            while not self._stopping.is_set():
                if self.progress.shown and time.monotonic() >= next_poll:
                    await self.session.send(ProgressRequest())
                    next_poll = time.monotonic() + PROGRESS_POLL_S
                message = await self.session.receive(timeout_s=0.1)
                if isinstance(message, (Deliver, DeliverFailure)):
                    await self.accept(message)
                elif isinstance(message, RollNow):
                    if self.holding():  # nothing more is coming: waiting for the idle roll would only delay
                        await self.roll()
                elif isinstance(message, JobDone):
                    self.job_done(message)
                elif isinstance(message, ProgressReply):
                    self.progress.show(message.progress)
                elif isinstance(message, Error):
                    log.error("broker_error", reason=message.reason, detail=message.detail)
                elif message is not None:
                    log.warning("unexpected_message", kind=type(message).__name__)
                if self.roll_due(time.monotonic()):
                    await self.roll()
                if self._all_jobs_done and not self.holding():
                    log.info("all_jobs_done")
                    break
            await self.roll()
            await self.session.send_if_connected(Disconnect(reason="stopping"))
        finally:
            self.session.close()
            self.progress.close()
            log.info(
                "sink_stopped", rows_written=self.rows_written, files=self.files_written,
                duplicates_skipped=self.duplicates_skipped, write_failures=self.write_failures,
            )  # fmt: skip

    def holding(self) -> bool:
        """Whether outcomes are waiting to be made durable."""
        return bool(self.writer.rows_in_file or self.failures.pending)

    def job_done(self, message: JobDone) -> None:
        log.info(
            "job_done",
            job_id=message.job_id,
            batches=message.batches,
            failed=message.failed_batches,
            open_jobs=message.open_jobs,
        )
        if self.config.until_done and message.open_jobs == 0:
            self._all_jobs_done = True

    def roll_due(self, now: float) -> bool:
        if self._oldest_unacked is None:
            return False
        return (
            now - self._oldest_unacked >= self.config.roll_seconds
            or now - self._last_delivery >= self.config.idle_roll_seconds
        )

    async def accept(self, message: Deliver | DeliverFailure) -> None:
        if isinstance(message, Deliver) and message.members:
            await self.accept_slice(message)
            return
        outcome = message.result if isinstance(message, Deliver) else message.failure
        failure = isinstance(outcome, BatchFailure)
        batch_id = outcome.batch_id
        claims = len(outcome.claim_ids) if failure else len(outcome.verdicts)
        if batch_id in self.writer.batches_in_file or batch_id in self.failures.pending:
            if batch_id in self._slice_of:  # held as part of a slice: acknowledged as itself too
                self._acknowledge_with(batch_id, batch_id)
            return  # delivered again before our roll: the roll acknowledges it
        if message.redelivery and batch_id not in self.index:
            await asyncio.to_thread(self.index.refresh)  # another sink (or our former self) may have it
        left, held = self._claims_left(batch_id, claims, failure)
        if not left:
            self.duplicates_skipped += 1
            log.info("duplicate_delivery_skipped", batch_id=batch_id)
            if held:  # the rest of its claims are in what we hold: acknowledged with it
                self._acknowledge_with(self._any_held(), batch_id)
            else:
                await self.session.send(SinkAck(batch_ids=[batch_id]))
            return
        start = extent(batch_id, claims).start
        if left != [(start, start + claims)]:  # some of its claims are in the output under its root's other ids
            rows = rows_in(left, start)
            log.info("duplicate_claims_skipped", batch_id=batch_id, claims=claims - len(rows))
            if failure:
                outcome = msgspec.structs.replace(outcome, claim_ids=[outcome.claim_ids[row] for row in rows])
            else:
                outcome = msgspec.structs.replace(outcome, verdicts=[outcome.verdicts[row] for row in rows])
        if failure:
            self.failures.add(outcome)
            self._failure_parts.note([batch_id])
        else:
            self.writer.add(outcome)
            self._file_parts.note([batch_id])
        await self._held()

    async def accept_slice(self, message: Deliver) -> None:
        """A slice's verdicts: each row under its producer batch. The claims of a batch already in the output
        (written before the broker lost its state and sliced or split it otherwise, say) are skipped, so every
        claim of every producer batch is written once, however it was sliced."""
        result, members = message.result, message.members
        slice_id, spans = result.batch_id, member_spans(members)
        if spans[-1][1] != len(result.verdicts):
            log.error("slice_delivery_malformed", batch_id=slice_id, members=len(members), rows=len(result.verdicts))
            return
        if slice_id in self._slice_of.get(members[0].batch_id, ()):
            return  # delivered again before our roll: the roll acknowledges it
        if message.redelivery and any(member.batch_id not in self.index for member in members):
            await asyncio.to_thread(self.index.refresh)
        # Each batch: new (written whole), durable already or held (skipped; a held one acknowledged with
        # what holds it), or some of each (its claims not in the output nor in the current file written).
        verdicts, fresh, skipped, waiting = [], [], 0, False
        for member, (start, end) in zip(members, spans, strict=True):
            left, held = self._claims_left(member.batch_id, member.claims)
            waiting = waiting or held
            if left == [(0, member.claims)]:
                verdicts += result.verdicts[start:end]
                fresh.append(member)
                continue
            skipped += 1
            if left:
                rows = rows_in(left, 0)
                verdicts += [result.verdicts[start + row] for row in rows]
                fresh.append(Member(batch_id=member.batch_id, claims=len(rows)))
        if skipped:
            self.duplicates_skipped += skipped
            log.info("duplicate_delivery_skipped", batch_id=slice_id, batches=skipped)
            if not fresh:
                if waiting:
                    self._acknowledge_with(self._any_held(), slice_id)
                else:
                    await self.session.send(SinkAck(batch_ids=[slice_id]))
                return
            result, members = msgspec.structs.replace(result, verdicts=verdicts), fresh
        self.writer.add(result, members)
        slice_of = self._slice_of
        for member in members:
            slice_of[member.batch_id] = [slice_id]
        await self._held()

    def _claims_left(self, batch_id: str, claims: int, failure: bool = False) -> tuple[list[Span], bool]:
        """The claims of a delivery (offsets in its root) to write, and whether it is all held already (then
        it is acknowledged with the next roll, which makes what is held durable).

        The claims to write are those neither in the output nor held where the delivery goes: the current
        file for verdicts, the failures to record for a failure. What the other place holds does not count:
        a roll publishes the file first and records the failures next, and an id in the output must mean
        all its claims are there, whatever becomes of the rest of the roll."""
        index, in_file, pending = self.index, self.writer.batches_in_file, self.failures.pending
        if (
            PART_MARK not in batch_id
            and batch_id not in index.parts
            and batch_id not in self._file_parts
            and batch_id not in self._failure_parts
        ):  # a batch of which no part is known (nearly all): in the output or held as itself, or not at all
            if batch_id in index:
                return [], False
            return ([], True) if batch_id in in_file or batch_id in pending else ([(0, claims)], False)
        durable = [(index, index.parts)]
        if not claims_left(batch_id, claims, durable):
            return [], False
        in_file_too, pending_too = (in_file, self._file_parts), (pending, self._failure_parts)
        if not claims_left(batch_id, claims, [*durable, in_file_too, pending_too]):
            return [], True
        return claims_left(batch_id, claims, [*durable, pending_too if failure else in_file_too]), False

    def _any_held(self) -> str:
        """A batch held now: made durable, and acknowledged, at the next roll with all the others."""
        return next(iter(self.writer.batches_in_file or self.failures.pending))

    def _acknowledge_with(self, batch_id: str, ack_id: str) -> None:
        """Acknowledge ``ack_id`` too once ``batch_id``, held in the current file, is durable."""
        acks = self._slice_of.get(batch_id)
        if acks is None:  # held as a batch of its own: acknowledged as itself as well
            acks = self._slice_of[batch_id] = [batch_id]
        if ack_id not in acks:
            acks.append(ack_id)

    async def _held(self) -> None:
        """A delivery is held: roll or flush when the file or the row group is full."""
        self._last_delivery = time.monotonic()
        if self._oldest_unacked is None:
            self._oldest_unacked = self._last_delivery
        if self.writer.rows_in_file >= self.config.file_rows:
            await self.roll()
        elif self.writer.buffered_rows >= self.config.row_group_rows:
            try:
                await self.while_alive(self.writer.flush)
            except OSError as exc:
                await self.step_away(exc)

    async def roll(self) -> None:
        """Make what is held durable and acknowledge it; on a failed write, step away (nothing is lost)."""
        try:
            published, failed = await self.while_alive(self._commit)
        except OSError as exc:
            await self.step_away(exc)
            return
        finally:
            self._file_parts.clear()  # durable now (the index has them), or dropped
            self._failure_parts.clear()
        self._oldest_unacked = None
        self._retry_s = WRITE_RETRY_MIN_S
        durable = list(failed)
        if published is not None:
            durable += published.batch_ids
            self.duplicates_skipped += published.skipped
            if published.path is not None:
                self.rows_written += published.rows
                self.files_written += 1
                log.info("file_written", batches=len(published.batch_ids) - published.skipped, rows=published.rows,
                         path=str(published.path))  # fmt: skip
        if failed:
            log.info("failures_recorded", batches=len(failed), path=str(self.failures.path))
        if durable:
            await self.session.send(SinkAck(batch_ids=self._acknowledged(durable)))

    def _acknowledged(self, durable: list[str]) -> list[str]:
        """The ids to acknowledge for these durable producer batches: a slice's for its batches, once."""
        if not self._slice_of:
            return durable
        ids: dict[str, None] = {}
        for batch_id in durable:
            for acknowledged in self._slice_of.pop(batch_id, (batch_id,)):
                ids[acknowledged] = None
        return list(ids)

    async def while_alive(self, work: Callable[[], T]) -> T:
        """Run blocking output work on a thread, heartbeating meanwhile: a sink waiting for another's commit
        lock, or fsyncing a large file, is busy, not dead, and its batches must not be redelivered."""
        task = asyncio.ensure_future(asyncio.to_thread(work))
        while not task.done():
            await asyncio.wait([task], timeout=self.config.heartbeats.interval_s / 2)
            await self.session.keep_alive()
        return task.result()

    def _commit(self) -> tuple[Published | None, list[str]]:
        """Publish the current file and record the pending failures (on a thread)."""
        published = self.writer.roll()
        return published, self.output.record_failures(self.failures)

    async def step_away(self, error: OSError) -> None:
        """A write failed: drop what is not durable, leave the broker (which delivers it again, elsewhere
        or to us later), wait, and come back. A full disk is waited out, never fatal."""
        self.write_failures += 1
        log.error(
            "output_write_failed", out_dir=str(self.config.out_dir), error=str(error), retry_in_s=self._retry_s,
            hint="nothing is lost: the broker keeps these results and delivers them again once a sink can write",
        )  # fmt: skip
        try:
            await asyncio.to_thread(self.writer.discard)
        except OSError as exc:
            log.warning("discard_failed", error=str(exc))
        self.failures.discard()
        self._slice_of.clear()
        self._file_parts.clear()
        self._failure_parts.clear()
        self._oldest_unacked = None
        await self.session.send_if_connected(Disconnect(reason=f"cannot write its output: {error.strerror or error}"))
        self.session.close()
        try:
            await asyncio.wait_for(self._stopping.wait(), self._retry_s)
        except TimeoutError:
            pass
        self._retry_s = min(self._retry_s * 2, WRITE_RETRY_MAX_S)
        if not self._stopping.is_set():
            await self.session.open()


class WrittenProgress:
    """The sink's bar: pairs written (by every sink of the run) of the jobs open since this sink started,
    with the broker's rate and ETA, from its progress replies (the jobs alone, not the status snapshot:
    that one lists every worker)."""

    def __init__(self, enabled: bool | None) -> None:
        self.bars = reported_bars("verdicts", enabled)
        self.shown = not self.bars.disable
        self._task = self.bars.add_task("verdicts written", total=None, rate=0.0, eta=format_duration(None))
        #: job id -> (pairs, pairs done), for every job not already finished when the sink started.
        self._jobs: dict[str, tuple[int, int]] = {}
        #: Jobs finished before the sink's first progress reply: not this sink's business.
        self._finished_before: set[str] | None = None
        if self.shown:
            self.bars.start()

    def show(self, progress: RunProgress) -> None:
        if self._finished_before is None:
            self._finished_before = {job.job_id for job in progress.jobs if job.done}
        for job in progress.jobs:
            if job.job_id not in self._finished_before:
                self._jobs[job.job_id] = (job.pairs, job.pairs_done)
        total = sum(pairs for pairs, _ in self._jobs.values())
        self.bars.update(
            self._task,
            completed=sum(done for _, done in self._jobs.values()),
            total=total or None,
            rate=progress.claims_per_s,
            eta=format_duration(progress.eta_s),
        )

    def close(self) -> None:
        self.bars.stop()


async def run_sink(config: SinkConfig) -> None:
    """Run a sink until SIGTERM or SIGINT (or every job is done, with ``until_done``); the open file is
    finished and acknowledged before exit."""
    sink = Sink(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sink.stop)
    await sink.run()

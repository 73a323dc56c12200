"""The GPU worker: registers with the broker, loads contexts when told, and scores batches it pulls.

Two tasks share one broker session. ``receive_loop`` files every LoadContext and Assign into a local queue
as it arrives (and keeps the heartbeats going); ``compute_loop`` takes them in order and runs the blocking
model work on a dedicated thread so the event loop stays free. The worker grants credit for
``prefetch + 1`` batches, so the next batch is already on the worker when the current one finishes: the
device never waits on the network.

Preemption. On SIGTERM (what Slurm, HTCondor and Grid Engine send before SIGKILL) the worker stops taking
work, hands its queued batches straight back (``Release``), finishes the batch in hand if it can within
``grace_s`` (judged from how long batches have taken), else hands that back too, says goodbye and exits.
A forward pass cannot be interrupted, so a worker that gives up on one exits without waiting for it.

Reconnection. When the session reconnects (the broker restarted, or declared this worker dead), work queued
from the old connection is dropped (the broker requeues it), the contexts still resident are announced
again, and the batch in hand, once finished, is sent on the new connection: the broker takes it if nobody
else has answered that batch yet.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog
import torch
import zmq.asyncio

from gpuworker.device import describe_device, select_device
from gpuworker.engine import LoadedContext, load_context, score_claims
from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.errors import ConfigError
from pervade.protocol import (
    Assign,
    BatchFailed,
    BatchResult,
    Completed,
    ContextFailed,
    ContextLoaded,
    Disconnect,
    Error,
    LoadContext,
    Pull,
    Release,
    Verdict,
    WorkerReady,
)
from pervade.session import BrokerSession, Heartbeats

log = structlog.get_logger("gpuworker")


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker runs."""

    #: The broker's endpoint.
    broker: str = DEFAULT_BROKER_CONNECT
    #: ``auto`` (first visible GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    device: str = "auto"
    #: Batches held beyond the one computing, so the device never waits on the network.
    prefetch: int = 1
    #: Contexts kept resident at once; the broker evicts the oldest when it asks for one more.
    max_contexts: int = 1
    #: CPU threads for torch (None: torch's default). Several CPU workers on one node want fewer each.
    threads: int | None = None
    #: A name for logs and output rows; defaults to ``host-pid``.
    worker_id: str | None = None
    #: Seconds from SIGTERM to exit: the batch in hand is finished only if it fits (batch systems send
    #: SIGKILL after a grace time: Slurm's KillWait is 30 s by default).
    grace_s: float = 20.0
    heartbeats: Heartbeats = field(default_factory=Heartbeats)

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ConfigError("prefetch must be 0 or more")
        if self.max_contexts < 1:
            raise ConfigError("max_contexts must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.grace_s <= 0:
            raise ConfigError("grace_s must be positive")


@dataclass
class _Work:
    """An order from the broker, tagged with the connection it came on."""

    order: LoadContext | Assign
    generation: int


class Worker:
    def __init__(self, config: WorkerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.device = select_device(config.device)
        self.device_info = describe_device(self.device)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._work: asyncio.Queue[_Work] = asyncio.Queue()
        self._stopping = asyncio.Event()  # SIGTERM: take no more work
        self._finished = asyncio.Event()  # the goodbye is sent: the receive loop may end
        self._in_hand: _Work | None = None
        self._in_hand_since = 0.0
        self.session = BrokerSession(
            self._ctx, config.broker, "worker", self._register, config.heartbeats, stopping=self._finished
        )
        self.contexts: OrderedDict[str, LoadedContext] = OrderedDict()
        self._failed_contexts: set[str] = set()
        self.batches_done = 0
        self.loads = 0
        #: Moving average of seconds per batch, to judge whether the batch in hand fits in the grace time.
        self.batch_seconds = 0.0
        #: True when the worker stopped while the device was still busy (see ``run_worker``).
        self.abandoned_compute = False

    def stop(self) -> None:
        self._stopping.set()

    async def _register(self, session: BrokerSession) -> None:
        self._failed_contexts.clear()  # the broker forgets refusals when we register: so do we
        stale = self._take_queued()
        if stale:
            log.info("dropped_stale_work", orders=len(stale))  # the broker requeues what it sent us
        await session.send_registration(
            WorkerReady(
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.device_info,
                contexts=list(self.contexts),
                max_contexts=self.config.max_contexts,
            )
        )
        if not self._stopping.is_set():
            await session.send_registration(Pull(credit=self.config.prefetch + 1))

    def _take_queued(self) -> list[_Work]:
        taken = []
        while not self._work.empty():
            taken.append(self._work.get_nowait())
        return taken

    async def run(self) -> None:
        """Serve the broker until ``stop`` (SIGTERM/SIGINT under ``run_worker``), then leave gracefully."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        await self.session.open()
        log.info("worker_started", broker=self.config.broker, device=self.device_info.describe())
        receiver = asyncio.create_task(self.receive_loop())
        computer = asyncio.create_task(self.compute_loop())
        stop = asyncio.create_task(self._stopping.wait())
        failure: BaseException | None = None
        try:
            # The loops run until stop(). If either dies instead, the worker must not linger holding
            # credit and batches: leave, and say why.
            await asyncio.wait([receiver, computer, stop], return_when=asyncio.FIRST_COMPLETED)
            failure = next((t.exception() for t in (receiver, computer) if t.done() and t.exception()), None)
            self.stop()
            await self.leave(computer, reason=f"worker failed: {failure!r}" if failure else "stopping")
        finally:
            self._finished.set()
            stop.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            self.session.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
            log.info("worker_stopped", batches_done=self.batches_done, loads=self.loads, abandoned=self.abandoned_compute)
        if failure is not None:
            raise failure

    async def leave(self, computer: asyncio.Task[None], reason: str) -> None:
        """Hand back queued work now, finish the batch in hand if it fits the grace time, say goodbye."""
        deadline = time.monotonic() + self.config.grace_s
        returned = [w.order.batch.batch_id for w in self._take_queued() if isinstance(w.order, Assign)]
        in_hand = self._in_hand
        if in_hand is not None and not self._fits(in_hand, deadline):
            if isinstance(in_hand.order, Assign):
                returned.append(in_hand.order.batch.batch_id)
            in_hand = None
        await self.session.send_if_connected(Release(batch_ids=returned, leaving=True))
        log.info("worker_leaving", reason=reason, returned=len(returned), finishing=in_hand is not None)
        if in_hand is not None:
            await asyncio.wait([computer], timeout=max(0.0, deadline - time.monotonic() - 0.5))
            if not computer.done() and isinstance(in_hand.order, Assign):  # it overran its estimate
                await self.session.send_if_connected(Release(batch_ids=[in_hand.order.batch.batch_id], leaving=True))
        elif self._in_hand is None:
            await asyncio.wait([computer], timeout=1.0)  # idle: the loop sees the stop within its poll
        self.abandoned_compute = self._in_hand is not None
        await self.session.send_if_connected(Disconnect(reason=reason))

    def _fits(self, work: _Work, deadline: float) -> bool:
        """Whether the order in hand will likely finish before the grace time runs out."""
        if isinstance(work.order, LoadContext):
            return False  # a load takes minutes on a real cluster, and no batch waits on it
        expected_end = self._in_hand_since + max(self.batch_seconds, 0.0) * 1.5
        return expected_end < deadline - 1.0

    async def receive_loop(self) -> None:
        while not self._finished.is_set():
            message = await self.session.receive(timeout_s=0.2)
            if isinstance(message, (LoadContext, Assign)):
                if self._stopping.is_set():
                    if isinstance(message, Assign):  # sent before the broker heard we are leaving
                        await self.session.send(Release(batch_ids=[message.batch.batch_id], leaving=True))
                    continue
                self._work.put_nowait(_Work(message, self.session.generation))
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
            elif message is not None:
                log.warning("unexpected_message", kind=type(message).__name__)

    async def compute_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                work = await asyncio.wait_for(self._work.get(), timeout=0.2)
            except TimeoutError:
                continue
            self._in_hand, self._in_hand_since = work, time.monotonic()
            try:
                if isinstance(work.order, LoadContext):
                    await self.load(work.order)
                else:
                    await self.score(work)
            finally:
                self._in_hand = None

    async def load(self, order: LoadContext) -> bool:
        context_id = order.context.context_id
        for evicted in order.evict:
            if self.contexts.pop(evicted, None) is not None:
                log.info("context_evicted", context_id=evicted)
        if context_id in self.contexts:
            return True
        while len(self.contexts) >= self.config.max_contexts:  # on-demand loads respect the limit too
            self.contexts.popitem(last=False)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("context_loading", context_id=context_id, model=order.context.model)
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(self._executor, load_context, order.context, self.device)
        except Exception as exc:
            self._failed_contexts.add(context_id)
            log.error("context_load_failed", context_id=context_id, error=str(exc))
            await self.session.send(ContextFailed(context_id=context_id, error=str(exc)))
            return False
        self.contexts[context_id] = loaded
        self._failed_contexts.discard(context_id)
        self.loads += 1
        log.info("context_loaded", context_id=context_id, seconds=round(loaded.load_seconds, 3))
        await self.session.send(ContextLoaded(context_id=context_id, seconds=loaded.load_seconds))
        return True

    async def score(self, work: _Work) -> None:
        assert isinstance(work.order, Assign)
        batch = work.order.batch
        context_id = batch.context.context_id
        if context_id in self._failed_contexts:
            return  # the broker requeued it when it heard the context failed here
        bound = log.bind(batch_id=batch.batch_id, context_id=context_id)
        if context_id not in self.contexts and not await self.load(LoadContext(context=batch.context)):
            return
        context = self.contexts[context_id]
        self.contexts.move_to_end(context_id)
        started = time.time()
        loop = asyncio.get_running_loop()
        try:
            scored = await loop.run_in_executor(
                self._executor, score_claims, context, batch.template, [c.text for c in batch.claims]
            )
        except Exception as exc:
            bound.warning("batch_failed", error=str(exc))
            await self.session.send(BatchFailed(batch_id=batch.batch_id, error=str(exc)))
            await self._grant_credit(work)
            return
        result = BatchResult(
            batch_id=batch.batch_id,
            job_id=batch.job_id,
            context_id=context_id,
            model=batch.context.model,
            template_id=batch.template_id,
            worker_id=self.worker_id,
            device=self.device_info.describe(),
            submitted_at=batch.submitted_at,
            started_at=started,
            finished_at=time.time(),
            verdicts=[
                Verdict(claim_id=claim.claim_id, verdict=verdict, scores=scores, gold_label=claim.gold_label)
                for claim, (verdict, scores) in zip(batch.claims, scored, strict=True)
            ],
        )
        # Sent even if the connection changed meanwhile: the broker takes it if the batch is still open.
        await self.session.send(Completed(result=result))
        await self._grant_credit(work)
        self.batches_done += 1
        seconds = result.finished_at - started
        self.batch_seconds = seconds if self.batches_done == 1 else 0.8 * self.batch_seconds + 0.2 * seconds
        bound.debug("batch_done", claims=len(batch.claims), seconds=round(seconds, 4))

    async def _grant_credit(self, work: _Work) -> None:
        """One more batch, please: unless stopping, or the work came on an older connection (the new one
        was granted a full window when it registered)."""
        if not self._stopping.is_set() and work.generation == self.session.generation:
            await self.session.send(Pull(credit=1))


async def run_worker(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM or SIGINT. If it stopped with the device still busy, exit at once: the
    thread cannot be interrupted, and waiting for it would overrun the batch system's grace time."""
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    if worker.abandoned_compute:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

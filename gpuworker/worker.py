"""The GPU worker: registers with the broker, loads contexts when told, and scores batches it pulls.

Two tasks share one DEALER socket. ``receive_loop`` files every LoadContext and Assign into a local queue
as it arrives; ``compute_loop`` takes them in order and runs the blocking model work on a dedicated thread
so the event loop stays free to receive. The worker grants credit for ``prefetch + 1`` batches, so the next
batch is already on the worker when the current one finishes: the device never waits on the network.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch
import zmq.asyncio

from gpuworker.device import describe_device, select_device
from gpuworker.engine import LoadedContext, load_context, score_claims
from pervade.constants import DEFAULT_BROKER_CONNECT
from pervade.errors import ConfigError
from pervade.protocol import (
    Assign,
    Batch,
    BatchFailed,
    BatchResult,
    Completed,
    ContextFailed,
    ContextLoaded,
    Disconnect,
    Error,
    LoadContext,
    Pull,
    Verdict,
    WorkerReady,
)
from pervade.transport import BrokerConnection

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

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ConfigError("prefetch must be 0 or more")
        if self.max_contexts < 1:
            raise ConfigError("max_contexts must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")


class Worker:
    def __init__(self, config: WorkerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.device = select_device(config.device)
        self.device_info = describe_device(self.device)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._work: asyncio.Queue[LoadContext | Assign] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self.contexts: OrderedDict[str, LoadedContext] = OrderedDict()
        self._failed_contexts: set[str] = set()
        self.batches_done = 0
        self.loads = 0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve the broker until ``stop`` (SIGTERM/SIGINT under ``run_worker``)."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        conn = BrokerConnection.open(self._ctx, self.config.broker, "worker")
        try:
            await conn.send(
                WorkerReady(
                    worker_id=self.worker_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    device=self.device_info,
                    contexts=list(self.contexts),
                    max_contexts=self.config.max_contexts,
                )
            )
            await conn.send(Pull(credit=self.config.prefetch + 1))
            log.info("worker_started", broker=self.config.broker, device=self.device_info.describe())
            tasks = [asyncio.create_task(self.receive_loop(conn)), asyncio.create_task(self.compute_loop(conn))]
            # Both loops return once stop() is called, the compute loop after the item in hand. If either
            # dies instead, the worker must not linger holding credit and batches: stop, and say so.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            self.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            failure = next((t.exception() for t in done if t.exception() is not None), None)
            await conn.send(Disconnect(reason=f"worker failed: {failure!r}" if failure else "stopping"))
            if failure is not None:
                raise failure
        finally:
            conn.close()
            self._executor.shutdown(wait=True)
            log.info("worker_stopped", batches_done=self.batches_done, loads=self.loads)

    async def receive_loop(self, conn: BrokerConnection) -> None:
        while not self._stopping.is_set():
            message = await conn.receive(timeout_s=0.2)
            if isinstance(message, (LoadContext, Assign)):
                self._work.put_nowait(message)
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
            elif message is not None:
                log.warning("unexpected_message", kind=type(message).__name__)

    async def compute_loop(self, conn: BrokerConnection) -> None:
        while not self._stopping.is_set():
            try:
                item = await asyncio.wait_for(self._work.get(), timeout=0.2)
            except TimeoutError:
                continue
            if isinstance(item, LoadContext):
                await self.load(conn, item)
            else:
                await self.score(conn, item.batch)

    async def load(self, conn: BrokerConnection, order: LoadContext) -> bool:
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
            await conn.send(ContextFailed(context_id=context_id, error=str(exc)))
            return False
        self.contexts[context_id] = loaded
        self.loads += 1
        log.info("context_loaded", context_id=context_id, seconds=round(loaded.load_seconds, 3))
        await conn.send(ContextLoaded(context_id=context_id, seconds=loaded.load_seconds))
        return True

    async def score(self, conn: BrokerConnection, batch: Batch) -> None:
        context_id = batch.context.context_id
        if context_id in self._failed_contexts:
            return  # the broker requeued it when it heard the context failed here
        bound = log.bind(batch_id=batch.batch_id, context_id=context_id)
        if context_id not in self.contexts and not await self.load(conn, LoadContext(context=batch.context)):
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
            await conn.send(BatchFailed(batch_id=batch.batch_id, error=str(exc)))
            await conn.send(Pull(credit=1))
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
        await conn.send(Completed(result=result))
        await conn.send(Pull(credit=1))
        self.batches_done += 1
        bound.debug("batch_done", claims=len(batch.claims), seconds=round(result.finished_at - started, 4))


async def run_worker(config: WorkerConfig) -> None:
    """Run a worker until SIGTERM or SIGINT."""
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()

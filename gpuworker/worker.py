"""The GPU worker: registers with the broker, loads contexts when told, and scores batches it pulls.

This module wires the pieces, each in a module of its own (the way nano-vllm splits its engine):

- ``config.py``: every setting (``WorkerConfig``);
- ``orders.py``: the broker's orders as held here (``LoadOrder``, ``BatchWork``);
- ``link.py``: the broker session: registration, the receive loop that files orders, credit, sending; reconnection;
- ``contexts.py``: loading, fetching, dropping contexts, and pinning their files in the node cache;
- ``encoder.py``: tokenizing the batches of resident contexts ahead, on a thread of its own;
- ``runner.py``: the compute loop: runs of batches scored on the compute thread, results sent;
- ``lifecycle.py``: signals, the grace time, leaving, and ending on its own (idle, drained, broker gone).

Four loops share the event loop: receive (link), encode (encoder), compute (runner) and watch (lifecycle). No
call that can block runs on it: file-system and lock work runs on threads, model work on the compute thread.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.gpuworker.cache import FileCache, default_cache_root
from pervade.gpuworker.config import WorkerConfig
from pervade.gpuworker.contexts import Contexts
from pervade.gpuworker.device import describe_device, select_device
from pervade.gpuworker.encoder import Encoder
from pervade.gpuworker.fetch import Fetcher
from pervade.gpuworker.fileserver import FileServer
from pervade.gpuworker.lifecycle import Lifecycle
from pervade.gpuworker.link import BrokerLink
from pervade.gpuworker.orders import BatchWork, InHand
from pervade.gpuworker.runner import Runner
from pervade.keys import PeerAdmission
from pervade.protocol import WorkerReady
from pervade.transport import start_authenticator

log = structlog.get_logger("gpuworker")

#: Most manifests a registration lists as held (the broker learns of the others as peers ask).
MAX_ANNOUNCED_FILES = 4096


class Worker:
    """One worker process: serves the broker until ``stop``, then leaves gracefully."""

    def __init__(self, config: WorkerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        #: Tells this process's reconnections from a second process started under the same worker id.
        self.instance = uuid.uuid4().hex
        self.device = select_device(config.device)
        self.device_info = describe_device(self.device)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        #: Model work (loads, passes, frees) runs here, one at a time, so the event loop stays free.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.lifecycle = Lifecycle(config)
        self.in_hand = InHand()
        #: Whom the peer file service admits (None: no keys, or no file service).
        self.peer_admission = PeerAdmission(config.keys) if config.keys is not None and config.serve_files else None
        self.link = BrokerLink(
            self._ctx, config, self.lifecycle, self.in_hand, self._registration, self._tokenize_ahead,
            self.peer_admission.vouch if self.peer_admission is not None else lambda keys: None,
        )  # fmt: skip
        self.cache = FileCache(config.cache_dir or default_cache_root(), config.cache_limit_bytes)
        self.file_server = (
            FileServer(self._ctx, self.cache, config.files, socket.gethostname(), config.keys)
            if config.serve_files
            else None
        )
        # Our key pair as a downloader; each peer's server key comes with the sources the broker names
        # (``Sources.peer_keys``), falling back to our own public key (a run whose workers share one key).
        peer_keys = config.keys.for_peers() if config.keys is not None else None
        fetcher = Fetcher(self._ctx, self.cache, config.transfer, self.link.find_sources, peer_keys)
        self.contexts = Contexts(
            config, self.device, self.device_info, self.cache, fetcher, self.file_server, self.link, self._compute
        )
        self.encoder = Encoder(self.contexts)
        self.runner = Runner(self.worker_id, self.contexts, self.encoder, self.link, self.in_hand, self._compute)

    def stop(self, reason: str = "signal", status: int = 0) -> None:
        """Leave gracefully; the first reason given is the one reported."""
        self.lifecycle.stop(reason, status)

    async def _registration(self) -> WorkerReady:
        """What the broker hears on each new connection: who this worker is and what it holds."""
        self.contexts.forget_failures()  # the broker forgets refusals when we register: so do we
        held_files = await asyncio.to_thread(self.cache.complete_digests) if self.file_server else []
        return WorkerReady(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.device_info,
            contexts=self.contexts.ids(),
            max_contexts=self.config.max_contexts,
            file_endpoint=self.file_server.endpoint if self.file_server else "",
            files=held_files[:MAX_ANNOUNCED_FILES],
            instance=self.instance,
        )

    def _tokenize_ahead(self, work: BatchWork) -> None:
        self.encoder.tokenize_ahead(work)

    async def run(self) -> None:
        """Serve the broker until ``stop`` (SIGTERM/SIGINT under ``run_worker``), then leave gracefully."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        await asyncio.to_thread(self.cache.clean_partials)
        auth, serving = self._serve_files()
        await self.link.open()
        log.info(
            "worker_started", broker=self.config.broker, device=self.device_info.describe(),
            context_mode=self.config.context_mode.value, cache=str(self.cache.root),
            file_endpoint=self.file_server.endpoint if self.file_server else "",
        )  # fmt: skip
        lifecycle = self.lifecycle
        receiver = asyncio.create_task(self.link.receive_loop())
        computer = asyncio.create_task(self.runner.compute_loop(lifecycle.stopping))
        watcher = asyncio.create_task(lifecycle.watch(self.link.session, lambda: self.link.idle))
        encoder = asyncio.create_task(self.encoder.encode_loop(lifecycle.finished))
        stop = asyncio.create_task(lifecycle.stopping.wait())
        failure: BaseException | None = None
        try:
            # The loops run until stop(). If either dies instead, the worker must not linger holding
            # credit and batches: leave, and say why.
            await asyncio.wait([receiver, computer, watcher, encoder, stop], return_when=asyncio.FIRST_COMPLETED)
            loops = (receiver, computer, watcher, encoder)
            failure = next((t.exception() for t in loops if t.done() and not t.cancelled() and t.exception()), None)
            self.stop("failed" if failure else "stopping", 1 if failure else 0)
            reason = f"worker failed: {failure!r}" if failure else lifecycle.exit_reason
            queued = self.link.take_queued()
            await lifecycle.leave(self.link.session, queued, self.in_hand, self.runner.batch_seconds, computer, reason)
        finally:
            lifecycle.finished.set()
            stop.cancel()
            watcher.cancel()
            await asyncio.gather(receiver, encoder, *([serving] if serving else []), return_exceptions=True)
            self.link.close()
            if auth is not None:
                auth.stop()
            self._compute.shutdown(wait=False, cancel_futures=True)
            log.info(
                "worker_stopped", reason=lifecycle.exit_reason, exit_status=lifecycle.exit_status,
                batches_done=self.runner.batches_done, loads=self.contexts.loads, abandoned=lifecycle.abandoned_compute,
            )  # fmt: skip
        if failure is not None:
            raise failure

    def _serve_files(self) -> tuple[AsyncioAuthenticator | None, asyncio.Task[None] | None]:
        """Start the peer file service, if this worker serves files: its CURVE authenticator (peers must hold
        a worker key it admits: ``PeerAdmission``) and the task serving it until the worker is finished."""
        if self.file_server is None:
            return None, None
        auth = None
        if self.peer_admission is not None:
            auth = start_authenticator(self._ctx, self.peer_admission)
        self.file_server.start()
        return auth, asyncio.create_task(self.file_server.serve(self.lifecycle.finished))


async def run_worker(config: WorkerConfig) -> int:
    """Run a worker until a leave signal (``LEAVE_SIGNALS``) or until it ends on its own; returns its exit
    status. If it stopped with the device still busy, exit at once: the thread cannot be interrupted, and
    waiting for it would overrun the batch system's grace time."""
    worker = Worker(config)
    worker.lifecycle.handle_leave_signals()
    await worker.run()
    worker.lifecycle.exit_now_if_abandoned()
    return worker.lifecycle.exit_status

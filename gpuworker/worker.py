"""The GPU worker: registers with the broker, loads contexts when told, and scores batches it pulls.

Two tasks share one broker session. ``receive_loop`` files every LoadContext and Assign into a local queue
as it arrives (and keeps the heartbeats going); ``compute_loop`` takes them in order and runs the blocking
model work on a dedicated thread so the event loop stays free. The worker grants credit for
``prefetch + 1`` batches, so the next batch is already on the worker when the current one finishes: the
device never waits on the network.

Preemption. On SIGTERM (what Slurm and HTCondor send before SIGKILL; Grid Engine's ``-notify`` sends SIGUSR1
before a suspension and SIGUSR2 before a kill, handled alike) the worker stops taking work, hands its queued batches straight back (``Release``), finishes the batch in hand if it can within
``grace_s`` (judged from how long batches have taken), else hands that back too, says goodbye and exits.
A forward pass cannot be interrupted, so a worker that gives up on one exits without waiting for it.

Ending on its own. A worker in a batch job must not hold a GPU idle: with ``exit_when_drained`` it leaves
when the broker says the last open job is done (``Drained``); with ``idle_timeout_s`` it leaves after that
long without work from a live broker; with ``broker_deadline_s`` it gives up on a broker not heard for that long (one not up
yet, or gone for good), and exits with status ``EXIT_BROKER_UNREACHABLE`` (3).

Context files. A context with a manifest is loaded from the node cache (``gpuworker/cache.py``); files
missing there are fetched from peers or the origin first (``gpuworker/fetch.py``), and the worker serves
the files it holds to other workers on a socket of its own (``gpuworker/fileserver.py``). ``context_mode``
picks how long a context is kept: resident (full), files only (partial), or nothing (agnostic).

Reconnection. When the session reconnects (the broker restarted, or declared this worker dead), work queued
from the old connection is dropped (the broker requeues it), the contexts still resident are announced
again, and the batch in hand, once finished, is sent on the new connection: the broker takes it if nobody
else has answered that batch yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.gpuworker.cache import FileCache, default_cache_root
from pervade.gpuworker.device import describe_device, fit_dtype, select_device
from pervade.gpuworker.engine import (
    LOAD_STAGES,
    EncodedClaims,
    LoadedContext,
    Scored,
    encode_claims,
    load_context,
    rows_per_pass,
    score_claims,
    score_encoded,
)
from pervade.gpuworker.fetch import Fetcher, FetchStats, TransferConfig
from pervade.gpuworker.fileserver import FileServer, FileServiceConfig
from pervade.gpuworker.intake import MIN_RUN_CLAIMS, CreditWindow, WorkQueue
from pervade.constants import DEFAULT_BROKER_CONNECT, EXIT_BROKER_UNREACHABLE, LEAVE_SIGNALS
from pervade.context import ContextMode, ContextSpec
from pervade.errors import ConfigError
from pervade.keys import ClientKeys, PeerAdmission
from pervade.manifest import Manifest
from pervade.progress import byte_bars, stage_bars
from pervade.protocol import (
    Assign,
    BatchFailed,
    BatchResult,
    Completed,
    ContextFailed,
    ContextLoaded,
    Disconnect,
    Drained,
    Error,
    FilesDropped,
    FilesHeld,
    FindSources,
    LoadContext,
    Pull,
    Release,
    Sources,
    Verdict,
    WorkerReady,
)
from pervade.session import BrokerSession, Heartbeats

log = structlog.get_logger("gpuworker")

#: Most claims tokenized in one call by the encode loop (the first pass of a run waits for it).
ENCODE_RUN_CLAIMS = 1024

#: How often the worker checks its idle timeout and broker deadline.
WATCH_INTERVAL_S = 0.5

#: Seconds a worker waits for the broker's answer to FindSources before asking again (the broker may have
#: restarted; it answers at once when it can, or the moment a source frees up).
SOURCES_RETRY_S = 30.0


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
    #: How long a context is kept (see ContextMode).
    context_mode: ContextMode = ContextMode.FULL
    #: The node cache of model files (None: the batch system's scratch dir, see gpuworker/cache.py).
    cache_dir: Path | None = None
    #: Largest size of the node cache in bytes (None: unbounded).
    cache_limit_bytes: int | None = None
    #: Serve cached files to peers.
    serve_files: bool = True
    files: FileServiceConfig = field(default_factory=FileServiceConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    #: Leave when the broker says every job is done (batch jobs: no GPU held idle).
    exit_when_drained: bool = False
    #: Leave after this many seconds without work (None: never).
    idle_timeout_s: float | None = None
    #: Give up (exit status 3) when the broker has not been heard for this long, counting from the start
    #: for a broker not up yet (None: retry for ever).
    broker_deadline_s: float | None = None
    #: CURVE keys for the broker connection (None: plain TCP).
    keys: ClientKeys | None = None
    #: Progress bars of model-file transfers and model loads on stderr; None: only when stderr is a terminal.
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ConfigError("prefetch must be 0 or more")
        if self.max_contexts < 1:
            raise ConfigError("max_contexts must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.grace_s <= 0:
            raise ConfigError("grace_s must be positive")
        for name in ("idle_timeout_s", "broker_deadline_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive")


@dataclass
class HeldContext:
    """A context this worker holds: its files (a local directory, or None to read the origin) and, in
    full mode, the model resident on the device."""

    spec: ContextSpec
    manifest: Manifest | None
    files_dir: Path | None
    loaded: LoadedContext | None


@dataclass
class _Work:
    """An order from the broker, tagged with the connection it came on. A batch for a resident context is
    tokenized as soon as it arrives, on the tokenizer thread (``encoding``), while the device computes."""

    order: LoadContext | Assign
    generation: int
    #: The batch's tokens, once the encode loop has them (None inside: tokenize it alone).
    encoding: asyncio.Future[EncodedClaims | None] | None = None

    @property
    def claims(self) -> int:
        return len(self.order.batch.claims) if isinstance(self.order, Assign) else 0

    @property
    def batch_id(self) -> str | None:
        return self.order.batch.batch_id if isinstance(self.order, Assign) else None


class Worker:
    def __init__(self, config: WorkerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        #: Tells this process's reconnections from a second process started under the same worker id.
        self.instance = uuid.uuid4().hex
        self.device = select_device(config.device)
        self.device_info = describe_device(self.device)
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        #: Tokenization runs here, never on the compute thread: the device does not wait on the tokenizer.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._work: WorkQueue[_Work] = WorkQueue(lambda w: w.claims)
        self._to_encode: deque[_Work] = deque()
        self._encode_wanted = asyncio.Event()
        self.window = CreditWindow(min_batches=config.prefetch + 1)
        self._stopping = asyncio.Event()  # SIGTERM: take no more work
        self._finished = asyncio.Event()  # the goodbye is sent: the receive loop may end
        self._in_hand: list[_Work] = []
        self._in_hand_since = 0.0
        self.session = BrokerSession(
            self._ctx,
            config.broker,
            "worker",
            self._register,
            config.heartbeats,
            stopping=self._finished,
            keys=config.keys,
        )
        self.contexts: OrderedDict[str, HeldContext] = OrderedDict()
        self.cache = FileCache(config.cache_dir or default_cache_root(), config.cache_limit_bytes)
        self.file_server = (
            FileServer(self._ctx, self.cache, config.files, socket.gethostname(), config.keys)
            if config.serve_files
            else None
        )
        self.fetcher = Fetcher(
            self._ctx, self.cache, config.transfer, self.find_sources, config.keys and config.keys.for_peers()
        )
        self._auth: AsyncioAuthenticator | None = None
        self._sources_wanted: dict[str, asyncio.Future[Sources]] = {}
        #: Manifests of the contexts the broker told us about, for a context reloaded without an order.
        self._manifests: dict[str, Manifest] = {}
        self._failed_contexts: set[str] = set()
        self.batches_done = 0
        self.loads = 0
        #: Moving average of seconds per batch, to judge whether the batch in hand fits in the grace time.
        self.batch_seconds = 0.0
        #: True when the worker stopped while the device was still busy (see ``run_worker``).
        self.abandoned_compute = False
        #: Why the worker stopped, and the exit status that says it.
        self.exit_reason = ""
        self.exit_status = 0
        self._idle_since = time.monotonic()

    def stop(self, reason: str = "signal", status: int = 0) -> None:
        """Leave gracefully; the first reason given is the one reported."""
        if not self._stopping.is_set():
            self.exit_reason, self.exit_status = reason, status
        self._stopping.set()

    @property
    def idle(self) -> bool:
        return not self._in_hand and not len(self._work)

    async def _register(self, session: BrokerSession) -> None:
        self._failed_contexts.clear()  # the broker forgets refusals when we register: so do we
        stale = self._take_queued()
        if stale:
            log.info("dropped_stale_work", orders=len(stale))  # the broker requeues what it sent us
        held_files = await asyncio.to_thread(self.cache.complete_digests) if self.file_server else []
        await session.send_registration(
            WorkerReady(
                worker_id=self.worker_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self.device_info,
                contexts=list(self.contexts),
                max_contexts=self.config.max_contexts,
                file_endpoint=self.file_server.endpoint if self.file_server else "",
                files=held_files[:4096],
                instance=self.instance,
            )
        )
        self.window.reset()  # a new connection: the broker knows of no credit
        if not self._stopping.is_set():
            await self._top_up_credit(session.send_registration)

    def _take_queued(self) -> list[_Work]:
        return self._work.drain()

    async def run(self) -> None:
        """Serve the broker until ``stop`` (SIGTERM/SIGINT under ``run_worker``), then leave gracefully."""
        structlog.contextvars.bind_contextvars(worker_id=self.worker_id)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        await asyncio.to_thread(self.cache.clean_partials)
        serving = None
        if self.file_server is not None:
            if self.config.keys is not None:  # peers must hold the run's keys to download
                self._auth = AsyncioAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve_callback("*", credentials_provider=PeerAdmission(self.config.keys))
            self.file_server.start()
            serving = asyncio.create_task(self.file_server.serve(self._finished))
        await self.session.open()
        log.info(
            "worker_started", broker=self.config.broker, device=self.device_info.describe(),
            context_mode=self.config.context_mode.value, cache=str(self.cache.root),
            file_endpoint=self.file_server.endpoint if self.file_server else "",
        )  # fmt: skip
        receiver = asyncio.create_task(self.receive_loop())
        computer = asyncio.create_task(self.compute_loop())
        watcher = asyncio.create_task(self.watch_loop())
        encoder = asyncio.create_task(self.encode_loop())
        stop = asyncio.create_task(self._stopping.wait())
        failure: BaseException | None = None
        try:
            # The loops run until stop(). If either dies instead, the worker must not linger holding
            # credit and batches: leave, and say why.
            await asyncio.wait([receiver, computer, watcher, encoder, stop], return_when=asyncio.FIRST_COMPLETED)
            loops = (receiver, computer, watcher, encoder)
            failure = next((t.exception() for t in loops if t.done() and not t.cancelled() and t.exception()), None)
            self.stop("failed" if failure else "stopping", 1 if failure else 0)
            await self.leave(computer, reason=f"worker failed: {failure!r}" if failure else self.exit_reason)
        finally:
            self._finished.set()
            stop.cancel()
            watcher.cancel()
            await asyncio.gather(receiver, encoder, *([serving] if serving else []), return_exceptions=True)
            self.session.close()
            if self._auth is not None:
                self._auth.stop()
            self._executor.shutdown(wait=False, cancel_futures=True)
            log.info(
                "worker_stopped", reason=self.exit_reason, exit_status=self.exit_status, batches_done=self.batches_done,
                loads=self.loads, abandoned=self.abandoned_compute,
            )  # fmt: skip
        if failure is not None:
            raise failure

    async def leave(self, computer: asyncio.Task[None], reason: str) -> None:
        """Hand back queued work now, finish the batch in hand if it fits the grace time, say goodbye."""
        deadline = time.monotonic() + self.config.grace_s
        returned = [w.batch_id for w in self._take_queued() if w.batch_id is not None]
        in_hand = list(self._in_hand)
        if in_hand and not self._fits(in_hand, deadline):
            returned += [w.batch_id for w in in_hand if w.batch_id is not None]
            in_hand = []
        await self.session.send_if_connected(Release(batch_ids=returned, leaving=True))
        log.info("worker_leaving", reason=reason, returned=len(returned), finishing=len(in_hand))
        if in_hand:
            await asyncio.wait([computer], timeout=max(0.0, deadline - time.monotonic() - 0.5))
            unfinished = [w.batch_id for w in in_hand if w.batch_id is not None]
            if not computer.done() and unfinished:  # it overran its estimate
                await self.session.send_if_connected(Release(batch_ids=unfinished, leaving=True))
        elif not self._in_hand:
            await asyncio.wait([computer], timeout=1.0)  # idle: the loop sees the stop within its poll
        self.abandoned_compute = bool(self._in_hand)
        await self.session.send_if_connected(Disconnect(reason=reason))

    def _fits(self, in_hand: list[_Work], deadline: float) -> bool:
        """Whether the orders in hand will likely finish before the grace time runs out."""
        if any(isinstance(work.order, LoadContext) for work in in_hand):
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
                self._accept(message)
                await self._top_up_credit()
            elif isinstance(message, Drained):
                if self.config.exit_when_drained:
                    log.info("broker_drained", completed_jobs=message.completed_jobs)
                    self.stop("drained")
            elif isinstance(message, Sources):
                wanted = self._sources_wanted.pop(message.files, None)
                if wanted is not None and not wanted.done():
                    wanted.set_result(message)
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
            elif message is not None:
                log.warning("unexpected_message", kind=type(message).__name__)

    async def watch_loop(self) -> None:
        """End the worker on its own: idle for too long, or a broker silent past the deadline."""
        deadline, idle_timeout = self.config.broker_deadline_s, self.config.idle_timeout_s
        while not self._stopping.is_set():
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            if not self.idle or self.session.silent_s > self.config.heartbeats.dead_after_s:
                self._idle_since = now  # idle means: the broker is there and has nothing for us
            if deadline is not None and self.session.silent_s > deadline:
                log.error("broker_unreachable", broker=self.config.broker, silent_s=round(self.session.silent_s, 1))
                self.stop(f"broker not heard for {deadline:g} s", EXIT_BROKER_UNREACHABLE)
            elif idle_timeout is not None and now - self._idle_since > idle_timeout:
                log.info("worker_idle", idle_s=round(now - self._idle_since, 1))
                self.stop(f"idle for {idle_timeout:g} s")

    def _accept(self, order: LoadContext | Assign) -> None:
        """Queue an order; a batch for a resident context goes to the encode loop at once."""
        work = _Work(order, self.session.generation)
        if isinstance(order, Assign):
            self.window.arrived(len(order.batch.claims))
            if self._resident(order) is not None:
                work.encoding = asyncio.get_running_loop().create_future()
                work.encoding.add_done_callback(_retrieve_exception)  # a batch dropped unscored must not warn
                self._to_encode.append(work)
                self._encode_wanted.set()
        self._work.put(work)

    def _resident(self, order: Assign) -> LoadedContext | None:
        held = self.contexts.get(order.batch.context.context_id)
        return held.loaded if held is not None else None

    async def encode_loop(self) -> None:
        """Tokenize arriving batches on the tokenizer thread while the device computes: the queued batches of
        one context and template per call, so batches of one claim do not cost a call each."""
        while not self._finished.is_set():
            if not self._to_encode:
                self._encode_wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._encode_wanted.wait(), 0.2)
                continue
            first = self._to_encode.popleft()
            run, others, claims = [first], [], first.claims
            while self._to_encode and claims < ENCODE_RUN_CLAIMS:  # other templates keep their places
                work = self._to_encode.popleft()
                if _same_run(work, first):
                    run.append(work)
                    claims += work.claims
                else:
                    others.append(work)
            self._to_encode.extendleft(reversed(others))
            await self._encode_run(run)

    async def _encode_run(self, run: list[_Work]) -> None:
        """Fill each work's ``encoding`` with its tokens; a run that fails is retried batch by batch, so a
        bad batch (a prompt too long) fails alone."""
        first = run[0].order
        assert isinstance(first, Assign)
        loaded = self._resident(first)
        if loaded is None:  # evicted meanwhile: the batch is tokenized when scored
            _settle(run, None)
            return
        texts = [claim.text for work in run for claim in work.order.batch.claims]  # type: ignore[union-attr]
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer, encode_claims, loaded, first.batch.template, texts
            )
        except Exception as exc:
            if len(run) == 1:
                _settle(run, exc)
            else:
                for work in run:
                    await self._encode_run([work])
            return
        for work, piece in zip(run, encoded.split([work.claims for work in run]), strict=True):
            _settle([work], piece)

    async def _encoded(self, loaded: LoadedContext, work: _Work) -> EncodedClaims:
        """The batch's tokens: from the encode loop, or tokenized now on the tokenizer thread."""
        assert isinstance(work.order, Assign)
        encoded = await work.encoding if work.encoding is not None else None
        if encoded is None:
            texts = [claim.text for claim in work.order.batch.claims]
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer, encode_claims, loaded, work.order.batch.template, texts
            )
        return encoded

    async def compute_loop(self) -> None:
        while not self._stopping.is_set():
            work = await self._work.get(timeout_s=0.2)
            if work is None:
                continue
            self._in_hand, self._in_hand_since = [work], time.monotonic()
            try:
                if isinstance(work.order, LoadContext):
                    await self.load(work.order)
                else:
                    self._in_hand += self._coalesce(work)
                    await self.score(self._in_hand)
            finally:
                self._in_hand = []
            await self._top_up_credit()

    def _coalesce(self, first: _Work) -> list[_Work]:
        """Queued batches to score with ``first``: same context, template and connection, up to a run's
        worth of claims. Only for a resident context: partial and agnostic modes build the model per batch,
        which is what those modes measure."""
        assert isinstance(first.order, Assign)
        if self._resident(first.order) is None:
            return []

        def belongs(work: _Work) -> bool:
            return work.generation == first.generation and _same_run(work, first)

        def barrier(work: _Work) -> bool:
            return isinstance(work.order, LoadContext)

        return self._work.take_run(belongs, barrier, self.window.run_claims, first.claims)

    async def load(self, order: LoadContext) -> bool:
        """Make the context ready in this run's mode: files in the node cache (partial, full) and the
        model on the device (full). Tells the broker ContextLoaded or ContextFailed."""
        context_id = order.context.context_id
        if order.manifest is not None:
            self._manifests[context_id] = order.manifest
        for evicted in order.evict:
            self.drop_context(evicted)
        if context_id in self.contexts:
            return True
        while len(self.contexts) >= self.config.max_contexts:  # on-demand loads respect the limit too
            self.drop_context(next(iter(self.contexts)))
        log.info(
            "context_loading", context_id=context_id, model=order.context.model, mode=self.config.context_mode.value
        )
        started = time.perf_counter()
        try:
            held = await self.prepare(order.context, order.manifest)
        except Exception as exc:
            if order.manifest is not None:
                self._unpin_unless_used(order.manifest.digest)
            self._failed_contexts.add(context_id)
            log.error("context_load_failed", context_id=context_id, error=str(exc))
            await self.session.send(ContextFailed(context_id=context_id, error=str(exc)))
            return False
        self.contexts[context_id] = held
        self._failed_contexts.discard(context_id)
        self.loads += 1
        seconds = time.perf_counter() - started
        log.info("context_loaded", context_id=context_id, seconds=round(seconds, 3), resident=held.loaded is not None)
        await self.session.send(ContextLoaded(context_id=context_id, seconds=seconds))
        return True

    async def prepare(self, spec: ContextSpec, manifest: Manifest | None) -> HeldContext:
        """Fetch the files (unless agnostic) and load the model (if full)."""
        files_dir = None
        fit_dtype(spec.dtype, self.device_info)  # a dtype this device cannot run fails the context, in every mode
        if manifest is not None:
            manifest.validate()  # its paths become files and links in the cache: checked here too
        if manifest is not None and self.config.context_mode is not ContextMode.AGNOSTIC:
            files_dir = await self.fetch_files(spec, manifest)
        loaded = None
        if self.config.context_mode is ContextMode.FULL:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            loop = asyncio.get_running_loop()
            with stage_bars(self.config.progress) as bars:
                task = bars.add_task(f"loading {spec.model}", total=len(LOAD_STAGES) - 1, stage="")

                def on_stage(stage: str) -> None:  # on the executor's thread; rich's updates take a lock
                    bars.update(task, completed=LOAD_STAGES.index(stage), stage=stage)

                loaded = await loop.run_in_executor(
                    self._executor,
                    functools.partial(
                        load_context, spec, self.device, files_dir, device_info=self.device_info, on_stage=on_stage
                    ),
                )
        return HeldContext(spec=spec, manifest=manifest, files_dir=files_dir, loaded=loaded)

    async def fetch_files(self, spec: ContextSpec, manifest: Manifest) -> Path:
        """The context's files in the node cache, fetched from peers or the origin if missing; pinned there
        while this worker holds the context. The broker hears where the bytes came from."""
        digest = manifest.digest
        evicted = await asyncio.to_thread(self.cache.make_room, manifest)
        if evicted:
            if self.file_server is not None:
                self.file_server.forget_files()
            await self.session.send(FilesDropped(files=evicted))
        self.cache.pin(manifest)
        try:
            with byte_bars(self.config.progress) as bars:
                task = bars.add_task(f"model files of {spec.model}", total=manifest.total_bytes)
                files_dir, stats = await self.fetcher.fetch(spec, manifest, lambda n: bars.advance(task, n))
        except BaseException:
            self._unpin_unless_used(digest)
            raise
        self.log_fetch(digest, stats)
        await self.session.send(
            FilesHeld(
                files=digest, origin_bytes=stats.origin_bytes, peer_bytes=stats.peer_bytes,
                cached_bytes=stats.cached_bytes, seconds=stats.seconds,
            )
        )  # fmt: skip
        return files_dir

    def log_fetch(self, digest: str, stats: FetchStats) -> None:
        log.info(
            "files_ready", files=digest, origin_bytes=stats.origin_bytes, peer_bytes=stats.peer_bytes,
            cached_bytes=stats.cached_bytes, corrupt_pieces=stats.corrupt_pieces, peers_failed=stats.peers_failed,
            by_peer=dict(stats.by_peer), seconds=round(stats.seconds, 3),
            mb_per_s=round((stats.origin_bytes + stats.peer_bytes) / max(stats.seconds, 1e-9) / 1e6, 1),
        )  # fmt: skip

    async def find_sources(self, digest: str, exclude: list[str]) -> Sources:
        """Ask the broker whom to fetch ``digest`` from; ask again if no answer comes in a while."""
        while True:
            wanted = asyncio.get_running_loop().create_future()
            self._sources_wanted[digest] = wanted
            await self.session.send(FindSources(files=digest, exclude=exclude))
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(wanted, SOURCES_RETRY_S)
            log.info("sources_retry", files=digest)

    def drop_context(self, context_id: str) -> None:
        """Free a context: the model leaves the device; its files stay cached (unpinned)."""
        held = self.contexts.pop(context_id, None)
        if held is None:
            return
        if held.manifest is not None:
            self._unpin_unless_used(held.manifest.digest)
        del held
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("context_evicted", context_id=context_id)

    def _unpin_unless_used(self, digest: str) -> None:
        """Let the node cache evict these files, unless another context held here uses them."""
        if not any(h.manifest is not None and h.manifest.digest == digest for h in self.contexts.values()):
            self.cache.unpin(digest)

    async def score(self, group: list[_Work]) -> None:
        """Score a run of batches of one context and template (a single batch in partial and agnostic
        modes), and send a result or a failure for each."""
        first = group[0].order
        assert isinstance(first, Assign)
        context_id = first.batch.context.context_id
        if context_id in self._failed_contexts:
            return  # the broker requeued it when it heard the context failed here
        reload = LoadContext(context=first.batch.context, manifest=self._manifests.get(context_id))
        if context_id not in self.contexts and not await self.load(reload):
            return
        held = self.contexts[context_id]
        self.contexts.move_to_end(context_id)
        if held.manifest is not None:
            self.cache.touch(held.manifest.digest)
        started = time.time()
        if held.loaded is not None:
            outcomes = await self._score_resident(held.loaded, group)
        else:
            outcomes = [await self._score_per_batch(held, work) for work in group]
        finished = time.time()
        dtype = held.loaded.dtype if held.loaded is not None else fit_dtype(held.spec.dtype, self.device_info)
        for work, outcome in zip(group, outcomes, strict=True):
            assert isinstance(work.order, Assign)
            batch = work.order.batch
            if isinstance(outcome, Exception):
                log.warning("batch_failed", batch_id=batch.batch_id, context_id=context_id, error=str(outcome))
                await self.session.send(BatchFailed(batch_id=batch.batch_id, error=str(outcome)))
                continue
            result = BatchResult(
                batch_id=batch.batch_id, job_id=batch.job_id, context_id=context_id, model=batch.context.model,
                template_id=batch.template_id, worker_id=self.worker_id, device=self.device_info.describe(),
                dtype=dtype, submitted_at=batch.submitted_at, started_at=started, finished_at=finished,
                verdicts=[
                    Verdict(claim_id=claim.claim_id, verdict=verdict, scores=scores, gold_label=claim.gold_label)
                    for claim, (verdict, scores) in zip(batch.claims, outcome, strict=True)
                ],
            )  # fmt: skip
            # Sent even if the connection changed meanwhile: the broker takes it if the batch is still open.
            await self.session.send(Completed(result=result))
        self.batches_done += len(group)
        seconds = finished - started
        self.batch_seconds = seconds if self.batches_done == len(group) else 0.8 * self.batch_seconds + 0.2 * seconds
        log.debug("batches_done", batches=len(group), claims=sum(w.claims for w in group), seconds=round(seconds, 4))

    async def _score_resident(self, loaded: LoadedContext, group: list[_Work]) -> list[Scored | Exception]:
        """A run of batches scored as one on the resident model: tokenized on the tokenizer thread (most
        already were, while the previous run computed), then one call on the compute thread. If that call
        fails, each batch is scored alone, so one bad batch fails only itself."""
        loop = asyncio.get_running_loop()
        encoded: list[EncodedClaims | Exception] = []
        for work in group:
            try:
                encoded.append(await self._encoded(loaded, work))
            except Exception as exc:
                encoded.append(exc)
        ready = [e for e in encoded if isinstance(e, EncodedClaims)]
        if not ready:
            return list(encoded)
        self.window.run_claims = max(MIN_RUN_CLAIMS, rows_per_pass(loaded, ready[0]))
        try:
            scored = await loop.run_in_executor(self._executor, score_encoded, loaded, EncodedClaims.concat(ready))
            parts: list[Scored | Exception] = []
            offset = 0
            for part in ready:
                parts.append(scored[offset : offset + len(part)])
                offset += len(part)
        except Exception as exc:
            if len(ready) == 1:
                parts = [exc]
            else:
                parts = [await self._score_alone(loaded, part) for part in ready]
        taken = iter(parts)
        return [e if isinstance(e, Exception) else next(taken) for e in encoded]

    async def _score_alone(self, loaded: LoadedContext, encoded: EncodedClaims) -> Scored | Exception:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, score_encoded, loaded, encoded)
        except Exception as exc:
            return exc

    async def _score_per_batch(self, held: HeldContext, work: _Work) -> Scored | Exception:
        """Partial and agnostic modes: the model is built for this batch alone, on the compute thread."""
        assert isinstance(work.order, Assign)
        batch = work.order.batch
        texts = [claim.text for claim in batch.claims]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._load_and_score, held, batch.template, texts)
        except Exception as exc:
            return exc

    def _load_and_score(self, held: HeldContext, template: str, texts: list[str]) -> list[tuple[str, list[float]]]:
        """Partial and agnostic modes: build the model for this batch only (from the node cache, or from the
        origin), score, and free it. Runs on the compute thread."""
        with contextlib.ExitStack() as stack:
            hub_cache = None
            if held.files_dir is None and not os.path.isdir(held.spec.model):  # agnostic from the hub
                hub_cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pervade-agnostic-")))
            context = load_context(
                held.spec, self.device, held.files_dir, hub_cache_dir=hub_cache, device_info=self.device_info
            )
            try:
                log.debug(
                    "batch_context_loaded",
                    seconds=round(context.load_seconds, 4),
                    from_cache=held.files_dir is not None,
                )
                return score_claims(context, template, texts)
            finally:
                del context
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    async def _top_up_credit(self, send: Callable[[Pull], Awaitable[None]] | None = None) -> None:
        """Ask for more batches when the window (``gpuworker/intake.py``) runs short, unless leaving."""
        if self._stopping.is_set():
            return
        grant = self.window.top_up(held=len(self._work) + len(self._in_hand))
        if grant:
            await (send or self.session.send)(Pull(credit=grant))


def _retrieve_exception(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def _same_run(work: _Work, first: _Work) -> bool:
    """Whether ``work`` may be tokenized and scored in one call with ``first``: same context and template."""
    a, b = work.order, first.order
    return (
        isinstance(a, Assign)
        and isinstance(b, Assign)
        and a.batch.template == b.batch.template
        and a.batch.context.context_id == b.batch.context.context_id
    )


def _settle(run: list[_Work], outcome: EncodedClaims | BaseException | None) -> None:
    for work in run:
        if work.encoding is not None and not work.encoding.done():
            if isinstance(outcome, BaseException):
                work.encoding.set_exception(outcome)
            else:
                work.encoding.set_result(outcome)


async def run_worker(config: WorkerConfig) -> int:
    """Run a worker until a leave signal (``LEAVE_SIGNALS``) or until it ends on its own; returns its exit
    status. If it stopped with the device still busy, exit at once: the thread cannot be interrupted, and
    waiting for it would overrun the batch system's grace time."""
    worker = Worker(config)
    loop = asyncio.get_running_loop()
    for sig in LEAVE_SIGNALS:
        loop.add_signal_handler(sig, functools.partial(worker.stop, f"signal {signal.Signals(sig).name}"))
    await worker.run()
    if worker.abandoned_compute:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(worker.exit_status)
    return worker.exit_status

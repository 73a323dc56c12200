"""The broker: one asyncio process, one ROUTER socket, every peer (producers, workers, sinks) on it.

Shaped like the ZeroMQ Guide's Majordomo broker: ``serve`` reads frames, ``handle`` decodes and routes
each message to a small verb method (``on_submit``, ``on_pull``, ...), ``dispatch`` matches queued
batches with worker credit through the affinity policy, ``purge_dead_peers`` and ``send_heartbeats`` keep
the peer lists true, and ``send`` is the one place that builds envelopes.

Handlers are synchronous and never block. They change state in the store (``broker/store.py``) and queue
replies in an outbox; once per turn of the loop, ``flush`` commits the store and only then sends the
outbox. So every reply a peer sees (Accepted, Assign, Deliver, JobDone) describes state already on disk,
and a broker killed at any moment restarts without contradicting what its peers were told. No message,
however malformed, escapes ``handle``.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.broker.metrics import METRICS_REFRESH_S, MetricsExporter
from pervade.broker.policy import choose_context
from pervade.broker.records import PeerRecord, ProducerRecord, SinkRecord, WorkerRecord
from pervade.broker.sources import Answer, FileSources
from pervade.broker.status import build_snapshot
from pervade.broker.store import BatchStatus, BrokerStore, JobRecord, StoredBatch, content_digest, state_error
from pervade.constants import DEFAULT_BROKER_BIND, DEFAULT_MAX_MESSAGE_BYTES
from pervade.context import ContextSpec
from pervade.errors import ConfigError, ProtocolError
from pervade.keys import AuthorizedKeys, ServerKeys
from pervade.manifest import Manifest
from pervade.protocol import (
    AbortJob,
    Accepted,
    Assign,
    Batch,
    BatchFailed,
    BatchFailure,
    BatchResult,
    Completed,
    ContextFailed,
    ContextLoaded,
    DeclareContext,
    Deliver,
    DeliverFailure,
    Disconnect,
    Drained,
    EndJob,
    Error,
    FilesDropped,
    FilesHeld,
    FindSources,
    Heartbeat,
    JobDone,
    JobEnded,
    LoadContext,
    Message,
    ProducerReady,
    Pull,
    Refused,
    Rejected,
    Release,
    SinkAck,
    SinkReady,
    StatusReply,
    StatusRequest,
    StatusSnapshot,
    Submit,
    WorkerReady,
    completed_batch_id,
    decode,
    encode,
    kind_of,
)
from pervade.rates import RateMeter
from pervade.session import Heartbeats
from pervade.transport import is_loopback, router_socket

log = structlog.get_logger("broker")

#: What the broker tells a peer it does not know (it restarted, or declared the peer dead).
REGISTER_AGAIN = "unknown peer: register again"
#: Errors kept per job for JobDone (all of them are in the failures files).
MAX_JOB_ERRORS = 20
#: Completed batches handed to sinks per turn of the loop.
DELIVER_PER_TURN = 1000
#: A peer's time this far ahead of the broker's, or a result finished this long ago, is a clock set wrong:
#: the broker keeps the result and moves its times onto its own clock (a result can arrive late, after a
#: reconnection, but not from the future, and not a day late).
MAX_CLOCK_AHEAD_S = 60.0
MAX_RESULT_AGE_S = 86_400.0

COUNTERS = (
    "invalid_messages",  # frames that were not valid messages, or that a handler refused
    "unknown_peer_messages",  # messages from peers not registered (answered with Disconnect)
    "duplicate_submissions",  # batches submitted again (a restarted producer): acknowledged, not queued
    "duplicate_results",  # results for batches already done: a duplicate execution, suppressed
    "late_results_accepted",  # results from a worker the batch was no longer assigned to, accepted
    "requeues",  # batches put back in a queue after a worker failed or died
    "released",  # batches handed back by a stopping worker
    "redeliveries",  # deliveries to sinks that left before acknowledging them
    "workers_declared_dead",  # workers that missed their heartbeats
    "sinks_declared_dead",
    "batches_failed",  # batches given up on after max_attempts
    "files_fetched",  # contexts' files fetched into a worker's node cache
    "origin_bytes",  # model-file bytes workers read from the origin (shared file system, hub)
    "peer_bytes",  # model-file bytes workers fetched from peers
    "cached_bytes",  # model-file bytes workers found in their node cache
    "claims_completed",  # claims of the batches workers completed (each batch counted once)
    "context_loads",  # contexts workers reported loaded
    "context_load_failures",  # contexts workers reported they could not load
    "status_requests",  # snapshots served (pervade status, sinks' progress bars)
    "conflicting_submissions",  # batches refused: a known id with other content, or new to an ended job
    "jobs_found_incomplete",  # end_job that named batches the broker does not hold (lost state): resubmitted
    "jobs_aborted",  # jobs their producer abandoned midway (bad input): queued batches recorded failed
    "results_refused",  # results that could not be taken; their batch is requeued and the worker told
    "clock_skew_corrected",  # results and batches whose times came from a clock set wrong, moved to the broker's
    "registrations_refused",  # workers or sinks refused: their name is held by another live process
    "state_damage_detected",  # opens of a state whose write-ahead log had lost commits
)


@dataclass(frozen=True)
class BrokerConfig:
    """How the broker runs. Every field has a default that suits a small cluster."""

    #: ZeroMQ endpoint to bind; ``tcp://127.0.0.1:*`` picks a free port (see ``endpoint_file``).
    bind: str = DEFAULT_BROKER_BIND
    #: Where to write the endpoint actually bound, for launchers that asked for a free port.
    endpoint_file: Path | None = None
    #: Frames larger than this make libzmq drop the sender's connection.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: A batch that fails this many times (or whose worker dies this many times) is recorded as failed.
    max_attempts: int = 3
    #: Queued batches per host at which an idle worker leaves its context for another (see policy.py).
    rebalance_backlog: int = 8
    #: Downloads of model files the broker sends to one worker at once (see broker/sources.py).
    max_uploads_per_peer: int = 4
    #: Peers a bootstrapping worker fetches from in parallel.
    max_sources: int = 4
    #: Directory of the durable state; None keeps it in a temporary directory that dies with the broker.
    state_dir: Path | None = None
    #: fsync every commit (survives a power failure of the node, not only a killed broker).
    fsync: bool = False
    #: Heartbeat interval and liveness; clients should use the same values.
    heartbeats: Heartbeats = field(default_factory=Heartbeats)
    #: How often the store's write-ahead log is checkpointed (on a thread).
    checkpoint_interval_s: float = 1.0
    #: How often the broker logs its counters.
    stats_interval_s: float = 10.0
    #: CURVE keys (``pervade keys init``): the broker's key pair and ``authorized/`` client keys. None: plain
    #: TCP, allowed on a loopback address only, unless ``insecure``.
    keys_dir: Path | None = None
    #: Listen on a network address without keys (anyone who can reach it may submit, pull and read).
    insecure: bool = False
    #: Seconds the run must have been over (every job complete, no producer preparing one) before workers
    #: are told ``drained``; checked on each heartbeat.
    drain_grace_s: float = 10.0
    #: Serve Prometheus metrics over HTTP on this port (0: a free one; None: no metrics). Plain HTTP: the
    #: metrics hold counts, worker names and model names, never claims or verdicts (docs/monitoring.md).
    metrics_port: int | None = None
    #: Interface the metrics server listens on; loopback unless a scraper on another host needs it.
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.rebalance_backlog < 1:
            raise ConfigError("rebalance_backlog must be at least 1")
        if self.max_uploads_per_peer < 1 or self.max_sources < 1:
            raise ConfigError("max_uploads_per_peer and max_sources must be at least 1")
        if self.checkpoint_interval_s <= 0 or self.stats_interval_s <= 0:
            raise ConfigError("checkpoint and stats intervals must be positive")
        if self.drain_grace_s < 0:
            raise ConfigError("drain_grace_s must be 0 or more")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a TCP port (0-65535), got {self.metrics_port}")
        if self.keys_dir is None and not self.insecure and not is_loopback(self.bind):
            raise ConfigError(
                f"refusing to listen on {self.bind} without keys: anyone who can reach it could submit claims, "
                "take work and read verdicts. Create keys with `pervade keys init DIR` and pass --keys DIR "
                "(or set PERVADE_KEYS), or pass --insecure on a network you trust"
            )


class Broker:
    """Queues claim batches per context, hands them to workers by affinity, routes results to sinks."""

    def __init__(self, config: BrokerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self.store: BrokerStore | None = None
        self.endpoint = ""
        self.workers: dict[bytes, WorkerRecord] = {}
        self.sinks: dict[bytes, SinkRecord] = {}
        self.producers: dict[bytes, ProducerRecord] = {}
        self._auth: AsyncioAuthenticator | None = None
        self.metrics: MetricsExporter | None = None
        #: When the run was first seen over, and whether workers were told (see send_drained_if_over).
        self._over_since: float | None = None
        self._drained_sent = False
        self.jobs: dict[str, JobRecord] = {}
        self.specs: dict[str, ContextSpec] = {}
        #: Manifests declared by producers, by digest.
        self.manifests: dict[str, Manifest] = {}
        self.files = FileSources(max_uploads_per_peer=config.max_uploads_per_peer, max_sources=config.max_sources)
        #: Contexts no live worker could load, with the error; cleared when a new worker joins.
        self.failed_contexts: dict[str, str] = {}
        #: Workers that died loading a context since a batch of it last completed.
        self.load_deaths: dict[str, int] = {}
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        #: Claims completed per second, over the last half minute (pervade status, metrics).
        self.throughput = RateMeter()
        self.started_at = time.time()
        self._saved_counters: dict[str, int] = {}
        self._outbox: deque[tuple[bytes, Message, Callable[[], None] | None]] = deque()
        self._next_sink = 0
        self._turn = 0  # where dispatch starts among the workers
        self._stopping = asyncio.Event()
        #: Set once ``serve`` has committed its last state and closed.
        self.closed = asyncio.Event()
        self._handlers: dict[type[Message], Callable[[bytes, Message], None]] = {
            ProducerReady: self.on_producer_ready,
            Submit: self.on_submit,
            DeclareContext: self.on_declare_context,
            EndJob: self.on_end_job,
            AbortJob: self.on_abort_job,
            WorkerReady: self.on_worker_ready,
            Pull: self.on_pull,
            ContextLoaded: self.on_context_loaded,
            ContextFailed: self.on_context_failed,
            Completed: self.on_completed,
            BatchFailed: self.on_batch_failed,
            Release: self.on_release,
            FindSources: self.on_find_sources,
            FilesHeld: self.on_files_held,
            FilesDropped: self.on_files_dropped,
            SinkReady: self.on_sink_ready,
            SinkAck: self.on_sink_ack,
            Disconnect: self.on_disconnect,
            StatusRequest: self.on_status_request,
            Heartbeat: self.on_heartbeat,
            Error: self.on_error,
        }
        #: Messages only a peer registered in that role may send; others may come from anyone (a
        #: registration, or a fact worth keeping from a peer the broker has forgotten: a result, an ack).
        self._role_of: dict[type[Message], dict[bytes, PeerRecord]] = {
            Submit: self.producers, EndJob: self.producers, AbortJob: self.producers, DeclareContext: self.producers,
            Pull: self.workers, ContextLoaded: self.workers, ContextFailed: self.workers,
            BatchFailed: self.workers, Release: self.workers,
            FindSources: self.workers, FilesHeld: self.workers, FilesDropped: self.workers,
        }  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Open the state (recovering what a previous broker left), bind; returns the endpoint bound."""
        self.store = BrokerStore.open(self.config.state_dir, fsync=self.config.fsync)
        requeued, redeliver = self.store.recover()
        self.jobs = self.store.jobs()
        self.specs = self.store.contexts()
        self.manifests = self.store.manifests()
        self.counters.update(self.store.meta("counters", {}))  # type: ignore[arg-type]
        if self.config.state_dir is not None:
            log.info(
                "broker_state_opened", path=str(self.store.path), jobs=len(self.jobs), queued=self.queued_total(),
                requeued=requeued, to_redeliver=redeliver,
            )  # fmt: skip
        if self.store.damage is not None:
            self.counters["state_damage_detected"] += 1
            log.error("state_damaged", path=str(self.store.path), detail=self.store.damage)
        try:
            keys = self.start_authenticator(self.config.keys_dir) if self.config.keys_dir is not None else None
            self._sock = router_socket(self._ctx, self.config.bind, self.config.max_message_bytes, keys)
        except zmq.ZMQError as exc:
            self.store.close()
            self.store = None
            raise ConfigError(f"cannot listen on {self.config.bind}: {exc}") from None
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.store.note_endpoint(self.endpoint)
        if self.config.endpoint_file:
            tmp = self.config.endpoint_file.with_suffix(".tmp")
            tmp.write_text(self.endpoint)
            tmp.replace(self.config.endpoint_file)  # readers never see a half-written endpoint
        log.info("broker_listening", endpoint=self.endpoint, curve=keys is not None)
        if self.config.metrics_port is not None:
            try:
                self.metrics = MetricsExporter(self.config.metrics_host, self.config.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {self.config.metrics_host}:{self.config.metrics_port}: {exc}"
                ) from None
            self.metrics.update(self.status())
        return self.endpoint

    def start_authenticator(self, keys_dir: Path) -> ServerKeys:
        """CURVE: admit only clients whose public key is in the keys directory's ``authorized/`` (read
        again as it changes, so keys are granted and revoked without a restart)."""
        keys = ServerKeys.load(keys_dir)
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=AuthorizedKeys(keys.authorized))
        return keys

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        """Serve until ``stop`` is called (or SIGTERM/SIGINT when installed by ``run_broker``)."""
        if self._sock is None:
            self.start()
        assert self._sock is not None and self.store is not None
        beat = self.config.heartbeats.interval_s
        poll_ms = max(1, int(min(0.2, beat / 2) * 1000))
        now = time.monotonic()
        next_beat, next_stats = now + beat, now + self.config.stats_interval_s
        next_checkpoint = now + self.config.checkpoint_interval_s
        next_metrics = now + METRICS_REFRESH_S
        checkpointing: asyncio.Future[bool] | None = None
        try:
            while not self._stopping.is_set():
                if await self._sock.poll(poll_ms, zmq.POLLIN):
                    # Drain what is ready, then dispatch once: fewer policy passes, one commit under load.
                    for _ in range(1000):
                        try:
                            frames = await self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.handle(frames)
                    self.dispatch()
                now = time.monotonic()
                if now >= next_beat:
                    self.purge_dead_peers(now)
                    self.send_heartbeats()
                    self.send_drained_if_over(now)
                    next_beat = now + beat
                if self.sinks and self.store.status_counts[BatchStatus.DONE]:
                    self.deliver_held()
                self.flush()
                if checkpointing is not None and checkpointing.done():
                    if not checkpointing.cancelled() and checkpointing.exception() is None and checkpointing.result():
                        self.store.restart_log()
                    elif not checkpointing.cancelled() and checkpointing.exception() is not None:
                        log.error("checkpoint_failed", error=str(checkpointing.exception()))
                    checkpointing = None
                if now >= next_checkpoint and checkpointing is None:
                    checkpointing = asyncio.ensure_future(asyncio.to_thread(self.store.checkpoint))
                    next_checkpoint = now + self.config.checkpoint_interval_s
                if now >= next_stats:
                    self.log_stats()
                    next_stats = now + self.config.stats_interval_s
                if self.metrics is not None and now >= next_metrics:
                    self.metrics.update(self.status())
                    next_metrics = now + METRICS_REFRESH_S
        finally:
            if checkpointing is not None:
                await asyncio.gather(checkpointing, return_exceptions=True)
            self.flush()
            self.log_stats()
            self._sock.close()
            self._sock = None
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self.store.close()
            self.store = None
            self.closed.set()

    # --- envelopes -------------------------------------------------------------------------------

    def send(self, identity: bytes, message: Message, on_fail: Callable[[], None] | None = None) -> None:
        """Queue a message; ``flush`` sends it once the state it describes is committed. ``on_fail`` runs
        if the peer turns out to be gone or not keeping up."""
        self._outbox.append((identity, message, on_fail))

    def flush(self) -> None:
        """Commit the store, then send what this turn queued (so no peer hears of uncommitted state)."""
        assert self.store is not None
        if self.counters != self._saved_counters:
            self.store.save_meta("counters", self.counters)
            self._saved_counters = dict(self.counters)
        self.store.commit()
        while self._outbox:
            identity, message, on_fail = self._outbox.popleft()
            if not self._send_now(identity, message) and on_fail is not None:
                on_fail()
        self.store.commit()  # what failed sends undid

    def _send_now(self, identity: bytes, message: Message) -> bool:
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
            try:
                message = decode(body)
            except ProtocolError as exc:
                batch_id = completed_batch_id(body)
                if batch_id is None:
                    raise
                self.refuse_result(identity, batch_id, str(exc))
                raise ProtocolError(f"the result of batch {batch_id!r} was refused: {exc}") from None
            handler = self._handlers.get(type(message))
            if handler is None:
                raise ProtocolError(f"a broker does not accept {kind_of(message)!r} messages")
            if not self.admit(identity, message):
                return
            handler(identity, message)
        except ProtocolError as exc:
            self.counters["invalid_messages"] += 1
            log.warning("rejected_message", peer=identity.decode(errors="replace"), error=str(exc))
            self.send(identity, Error(reason=str(exc)))
        except Exception as exc:  # a bug must cost one message, not the broker
            self.counters["invalid_messages"] += 1
            log.exception("handler_failed", peer=identity.decode(errors="replace"))
            self.send(identity, Error(reason="internal broker error", detail=repr(exc)))

    def admit(self, identity: bytes, message: Message) -> bool:
        """Note that the peer is alive; refuse a message its role may not send, and tell a peer the
        broker does not know to register again."""
        peer = self.peer(identity)
        if peer is not None:
            peer.last_seen = time.monotonic()
        role = self._role_of.get(type(message))
        if role is None and not isinstance(message, Heartbeat):
            return True
        if role is not None and identity in role or role is None and peer is not None:
            return True
        if peer is not None:
            raise ProtocolError(f"a peer registered as {type(peer).__name__} cannot send {kind_of(message)!r}")
        self.counters["unknown_peer_messages"] += 1
        log.debug("unknown_peer", peer=identity.decode(errors="replace"), kind=kind_of(message))
        self.send(identity, Disconnect(reason=REGISTER_AGAIN))
        return False

    def refuse_if_name_taken(
        self, identity: bytes, name: str, instance: str, peers: dict[bytes, PeerRecord], role: str
    ) -> bool:
        """Refuse a registration under a name a live peer of another process holds. A holder silent for
        longer than the liveness is dying (its registration goes), and the same process on a new connection
        (same ``instance``) replaces its own record."""
        now = time.monotonic()
        holder = next((p for p in peers.values() if p.name == name and p.identity != identity), None)
        if holder is None or not instance or holder.instance in ("", instance):
            return False
        if now - holder.last_seen > self.config.heartbeats.dead_after_s:
            return False
        self.counters["registrations_refused"] += 1
        log.error(f"{role}_name_in_use", name=name, holder=holder.identity.decode(errors="replace"))
        beats = self.config.heartbeats
        retry_after = max(0.0, holder.last_seen + beats.dead_after_s - now) + beats.interval_s
        reason = (
            f"{role} id {name!r} is in use by another live {role}; give this one another --{role}-id, or stop the other"
        )
        self.send(identity, Refused(reason=reason, retry_after_s=min(retry_after, 3600.0)))
        return True

    def peer(self, identity: bytes) -> PeerRecord | None:
        return self.workers.get(identity) or self.sinks.get(identity) or self.producers.get(identity)

    # --- producers -------------------------------------------------------------------------------

    def on_producer_ready(self, identity: bytes, message: ProducerReady) -> None:
        self.producers[identity] = ProducerRecord(identity=identity, name=message.producer_id)

    def job(self, job_id: str, producer: bytes) -> JobRecord:
        job = self.jobs.get(job_id)
        if job is None:
            job = self.jobs[job_id] = JobRecord(job_id=job_id)
        # Every producer of the job hears JobDone: the same sweep run twice at once is one job (its id names
        # its content), and each of its producers waits for it.
        job.producers.add(producer)
        return job

    def on_submit(self, identity: bytes, message: Submit) -> None:
        assert self.store is not None
        batch = message.batch
        job = self.job(batch.job_id, identity)
        known = self.store.get(batch.batch_id)
        if known is not None:
            if known.content is not None and known.content != content_digest(batch):
                reason = (
                    f"batch id {batch.batch_id} was submitted before with other claims or another template: "
                    "a changed sweep needs a new job id"
                )
                self.refuse_submission(identity, batch, reason)
                return
            # A resend (the producer restarted, or lost our answer): acknowledged, never queued twice.
            self.counters["duplicate_submissions"] += 1
            self.send(identity, Accepted(batch_id=batch.batch_id, duplicate=True))
            return
        if job.ended:
            why = f"aborted ({job.aborted})" if job.aborted else "ended"
            reason = (
                f"job {batch.job_id} has {why} and does not hold this batch (a sweep that changed under the same "
                "job id?)"
            )
            self.refuse_submission(identity, batch, reason)
            return
        if batch.context.files is not None and batch.context.files not in self.manifests:
            reason = f"the manifest of context {batch.context.context_id} was not declared (declare_context first)"
            self.send(identity, Rejected(batch_id=batch.batch_id, reason=reason))
            return
        failure = self.failed_contexts.get(batch.context.context_id)
        if failure is not None:
            self.send(identity, Rejected(batch_id=batch.batch_id, reason=f"no worker can load this context: {failure}"))
            return
        if batch.context.context_id not in self.specs:
            self.specs[batch.context.context_id] = batch.context
            self.store.save_context(batch.context)
        if not self.plausible_time(batch.submitted_at):
            self.counters["clock_skew_corrected"] += 1
            log.warning(
                "producer_clock_skewed", batch_id=batch.batch_id, skew_s=round(time.time() - batch.submitted_at)
            )
            batch = msgspec.structs.replace(batch, submitted_at=time.time())
        self.store.add(batch)
        self._drained_sent = False  # new work: the run is not over
        job.add(batch.batch_id, len(batch.claims))
        self.store.save_job(job)
        self.send(identity, Accepted(batch_id=batch.batch_id))

    def refuse_submission(self, identity: bytes, batch: Batch, reason: str) -> None:
        self.counters["conflicting_submissions"] += 1
        log.error("submission_refused", batch_id=batch.batch_id, reason=reason)
        self.send(identity, Rejected(batch_id=batch.batch_id, reason=reason))

    @staticmethod
    def plausible_time(at: float) -> bool:
        """Whether a peer's timestamp can be true on the broker's clock (see MAX_CLOCK_AHEAD_S)."""
        now = time.time()
        return now - MAX_RESULT_AGE_S <= at <= now + MAX_CLOCK_AHEAD_S

    def on_declare_context(self, identity: bytes, message: DeclareContext) -> None:
        """Keep a context's manifest, so workers told to load it know its files. Idempotent."""
        assert self.store is not None
        manifest = message.manifest
        if message.context.files != manifest.digest:
            raise ProtocolError("declare_context: the manifest's digest is not the context's files")
        if manifest.digest in self.manifests:
            return
        try:
            manifest.validate()
        except ConfigError as exc:
            raise ProtocolError(f"declare_context: {exc}") from None
        self.manifests[manifest.digest] = manifest
        self.store.save_manifest(manifest)
        log.info(
            "context_declared",
            context_id=message.context.context_id,
            files=len(manifest.files),
            bytes=manifest.total_bytes,
        )

    def on_end_job(self, identity: bytes, message: EndJob) -> None:
        """End the job if the broker holds exactly the batches the producer counted; otherwise say what it
        holds (an error: state was lost or replaced, or a job id reused) and keep the job open for the
        producer's resubmission. Every EndJob is answered: a re-run or a reconnected producer asks again."""
        assert self.store is not None
        job = self.job(message.job_id, identity)
        held = job.holds()
        agreed = (held.batches, held.pairs) == (message.batches, message.pairs) and (
            not message.digest or job.digest is None or message.digest == held.digest
        )
        self.send(identity, job_ended(job, agreed))
        if not agreed:
            self.counters["jobs_found_incomplete"] += 1
            log.error(
                "end_job_count_differs", job_id=job.job_id, producer_batches=message.batches,
                broker_batches=held.batches,
                producer_pairs=message.pairs, broker_pairs=held.pairs, same_ids=message.digest == held.digest,
                hint="the broker lost batches (damaged or replaced state), or the job id was reused: resubmitted",
            )  # fmt: skip
            return
        if not job.ended:
            job.ended = True
            self.store.save_job(job)
        self.report_if_complete(job, again=True)

    def on_abort_job(self, identity: bytes, message: AbortJob) -> None:
        """The producer cannot finish the job: end it with what is here, record its queued batches failed,
        so it completes (with errors) and nobody waits for it."""
        assert self.store is not None
        job = self.job(message.job_id, identity)
        if not job.ended:
            job.ended, job.aborted = True, message.reason
            self.counters["jobs_aborted"] += 1
            log.error("job_aborted", job_id=job.job_id, reason=message.reason, batches=job.batches)
            for batch_id in self.store.queued_ids_of_job(job.job_id):
                row = self.store.get(batch_id)
                assert row is not None
                self.fail(row, f"job aborted by its producer: {message.reason}")
            self.store.save_job(job)
        self.send(identity, job_ended(job, agreed=True))
        self.report_if_complete(job, again=True)

    def report_if_complete(self, job: JobRecord, again: bool = False, to_producer: bool = True) -> None:
        assert self.store is not None
        if not job.complete or (job.done_reported and not again):
            return
        first = not job.done_reported
        if first:
            job.done_reported = True
            self.store.save_job(job)
            log.info("job_done", job_id=job.job_id, written=job.written, failed=job.failed)
        errors = ([f"job aborted by its producer: {job.aborted}"] if job.aborted else []) + job.errors
        done = JobDone(
            job_id=job.job_id,
            batches=job.batches,
            pairs=job.pairs,
            failed_batches=job.failed,
            errors=errors[:MAX_JOB_ERRORS],
            open_jobs=sum(not j.done_reported for j in self.jobs.values()),
            batches_written=job.written,
            pairs_written=job.pairs_written,
            pairs_failed=job.pairs_failed,
        )
        if to_producer:
            for producer in sorted(job.producers & self.producers.keys()):
                self.send(producer, done)
        if first or not to_producer:
            for sink in self.sinks.values():  # sinks run with --until-done wait for this
                self.send(sink.identity, done)

    def run_is_over(self) -> bool:
        """Every job complete, nothing queued, and no connected producer still preparing a job (hashing a
        model, reading claims) that has not submitted yet."""
        if not self.jobs or self.queued_total() or any(not job.done_reported for job in self.jobs.values()):
            return False
        finished = set().union(*(job.producers for job in self.jobs.values()))
        return all(identity in finished for identity in self.producers)

    def send_drained_if_over(self, now: float) -> None:
        """Tell the workers once the run has been over for ``drain_grace_s``, so batch jobs end instead of
        holding GPUs idle. The grace lets a script's next sweep connect without losing the workers; new
        work re-arms it. A worker joining after the run waits for work (or its idle timeout)."""
        if not self.run_is_over():
            self._over_since = None
            return
        if self._drained_sent:
            return
        self._over_since = self._over_since if self._over_since is not None else now
        if now - self._over_since < self.config.drain_grace_s:
            return
        self._drained_sent = True
        drained = Drained(completed_jobs=len(self.jobs))
        for worker in self.workers.values():
            self.send(worker.identity, drained)
        log.info("drained", completed_jobs=len(self.jobs), workers=len(self.workers))

    # --- workers ---------------------------------------------------------------------------------

    def on_worker_ready(self, identity: bytes, message: WorkerReady) -> None:
        # The same worker on a new connection (it lost us, or we restarted): its old record goes, and
        # what it held is requeued at once rather than after a heartbeat timeout. Another live process
        # under the same name is refused: two would replace each other's registration for ever.
        if self.refuse_if_name_taken(identity, message.worker_id, message.instance, self.workers, "worker"):
            return
        stale = [w for w in self.workers.values() if w.name == message.worker_id or w.identity == identity]
        for old in stale:
            self.drop_worker(old, "registered again", count_attempts=False)
        worker = WorkerRecord(
            identity=identity,
            name=message.worker_id,
            instance=message.instance,
            host=message.host,
            device=message.device,
            max_contexts=message.max_contexts,
            file_endpoint=message.file_endpoint,
        )
        worker.contexts.update(dict.fromkeys(message.contexts))
        worker.loaded.update(message.contexts)
        self.workers[identity] = worker
        self.failed_contexts.clear()  # new capacity: contexts that failed elsewhere may load here
        self.answer_sources(self.files.held(identity, message.file_endpoint, message.files))
        log.info(
            "worker_joined", worker_id=message.worker_id, host=message.host, device=message.device.describe(),
            contexts=message.contexts,
        )  # fmt: skip

    def drop_worker(self, worker: WorkerRecord, reason: str, count_attempts: bool) -> None:
        """Forget a worker and requeue what it held. When it died (``count_attempts``), the death counts
        as a failed attempt for the batch in hand only, and only if its model had loaded: a batch that kills
        every worker it touches must not be retried forever, but the batches merely waiting behind it, or
        behind a model load, did nothing wrong. A death during a load counts against the context."""
        assert self.store is not None
        self.workers.pop(worker.identity, None)
        self.answer_sources(self.files.forget(worker.identity))
        in_hand = next(iter(worker.in_flight), None)
        requeued = 0
        for batch_id in reversed(worker.in_flight):  # each goes to the front: keep their order
            row = self.store.get(batch_id)
            if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != worker.identity:
                continue
            requeued += 1
            if count_attempts and batch_id == in_hand and row.context_id in worker.loaded:
                self.retry_or_fail(row, f"worker {worker.name} {reason} while running it")
            else:
                self.store.requeue(row, count_attempt=False)
                self.counters["requeues"] += 1
        worker.in_flight.clear()
        if count_attempts and not worker.leaving:  # preempted while loading is not the model's fault
            for context_id in set(worker.contexts) - worker.loaded:
                self.note_load_death(context_id, worker.name)
        log.info(
            "worker_left", worker_id=worker.name, reason=reason, requeued=requeued, batches_done=worker.batches_done
        )

    def note_load_death(self, context_id: str, worker_name: str) -> None:
        """A worker died while loading this context. After ``max_attempts`` such deaths with no batch of
        the context completed in between (a model that kills whoever loads it), the context fails."""
        deaths = self.load_deaths[context_id] = self.load_deaths.get(context_id, 0) + 1
        log.warning("worker_died_loading", context_id=context_id, worker_id=worker_name, deaths=deaths)
        if deaths >= self.config.max_attempts:
            del self.load_deaths[context_id]
            self.fail_context(context_id, f"{deaths} workers died while loading it")

    def on_pull(self, identity: bytes, message: Pull) -> None:
        worker = self.workers[identity]
        if not worker.leaving:
            worker.credit += message.credit

    def on_context_loaded(self, identity: bytes, message: ContextLoaded) -> None:
        worker = self.workers[identity]
        worker.loaded.add(message.context_id)
        self.counters["context_loads"] += 1
        log.info(
            "context_loaded", worker_id=worker.name, context_id=message.context_id, seconds=round(message.seconds, 3)
        )

    def on_context_failed(self, identity: bytes, message: ContextFailed) -> None:
        assert self.store is not None
        worker = self.workers[identity]
        context_id = message.context_id
        worker.contexts.pop(context_id, None)
        worker.loaded.discard(context_id)
        worker.refused.add(context_id)
        self.counters["context_load_failures"] += 1
        log.error("context_failed", worker_id=worker.name, context_id=context_id, error=message.error)
        spec = self.specs.get(context_id)
        if spec is not None and spec.files is not None:
            self.answer_sources(self.files.abandon(identity, spec.files))
        for batch_id in list(worker.in_flight):
            row = self.store.get(batch_id)
            if row is None or row.context_id != context_id or row.worker != identity:
                continue
            worker.in_flight.pop(batch_id, None)
            worker.credit += 1  # the worker will never answer these, so their credit comes back
            # Not the batch's fault, and never tried: no attempt is charged. A context that loads nowhere
            # fails its batches below, once every worker has refused it.
            self.store.requeue(row, count_attempt=False)
            self.counters["requeues"] += 1
        if all(context_id in w.refused for w in self.workers.values()):
            self.fail_context(context_id, message.error)

    def fail_context(self, context_id: str, error: str) -> None:
        """No live worker can load this context: fail its queued batches rather than loop forever,
        and refuse new ones until another worker joins."""
        assert self.store is not None
        self.failed_contexts[context_id] = error
        for batch_id in self.store.queued_ids(context_id):
            row = self.store.get(batch_id)
            assert row is not None
            self.fail(row, f"no worker could load context {context_id}: {error}")

    def on_completed(self, identity: bytes, message: Completed) -> None:
        """Accept the first result of a batch, from whichever worker: a late reply from a worker declared
        dead is as good as any. Every later one is a duplicate execution, suppressed."""
        assert self.store is not None
        result = message.result
        worker = self.workers.get(identity)
        if worker is not None:
            worker.in_flight.pop(result.batch_id, None)
        row = self.store.get(result.batch_id)
        if row is None:
            raise ProtocolError(f"result for unknown batch {result.batch_id!r}")
        if row.status not in (BatchStatus.QUEUED, BatchStatus.ASSIGNED):
            self.counters["duplicate_results"] += 1
            log.info("duplicate_result_suppressed", batch_id=result.batch_id, worker_id=result.worker_id)
        elif (problem := self.mismatch(row, result)) is not None:
            self.refuse_result(identity, row.batch_id, problem)
            raise ProtocolError(problem)
        else:
            result = self.on_broker_clock(result, worker)
            if row.worker != identity:
                self.counters["late_results_accepted"] += 1
                holder = self.workers.get(row.worker or b"")
                if holder is not None:
                    holder.in_flight.pop(row.batch_id, None)  # its own answer will be a duplicate
            self.store.complete(row, result)
            self.load_deaths.pop(row.context_id, None)  # the context works: earlier load deaths were bad luck
            claims = len(result.verdicts)
            self.throughput.add(claims)
            self.counters["claims_completed"] += claims
            if worker is not None:
                worker.batches_done += 1
                worker.claims.add(claims)
            self.deliver(row.batch_id, result)
        if worker is None:
            self.send(identity, Disconnect(reason=REGISTER_AGAIN))

    def refuse_result(self, identity: bytes, batch_id: str | None, reason: str) -> None:
        """A result the broker cannot take: the batch must not stay assigned to a worker that believes it
        answered. Requeued (or failed after its attempts); the caller tells the worker why."""
        assert self.store is not None
        row = self.store.get(batch_id) if batch_id is not None else None
        if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != identity:
            return
        self.counters["results_refused"] += 1
        worker = self.workers.get(identity)
        if worker is not None:
            worker.in_flight.pop(row.batch_id, None)
        log.error("result_refused", batch_id=row.batch_id, worker_id=worker.name if worker else None, reason=reason)
        self.retry_or_fail(row, f"its result was refused: {reason}")

    def on_broker_clock(self, result: BatchResult, worker: WorkerRecord | None) -> BatchResult:
        """A result timed by a clock set wrong is kept, its times moved onto the broker's clock (its
        duration kept), and the skew noted once per worker, so the output's timeline stays true."""
        if self.plausible_time(result.finished_at) and result.started_at <= result.finished_at:
            return result
        now = time.time()
        duration = result.finished_at - result.started_at
        duration = duration if 0 <= duration <= MAX_RESULT_AGE_S else 0.0
        self.counters["clock_skew_corrected"] += 1
        if worker is None or not worker.clock_skewed:
            log.warning(
                "worker_clock_skewed", worker_id=result.worker_id, skew_s=round(now - result.finished_at, 1),
                hint="the worker's clock is wrong: its results are kept, timed on the broker's clock",
            )  # fmt: skip
            if worker is not None:
                worker.clock_skewed = True
        return msgspec.structs.replace(result, started_at=now - duration, finished_at=now)

    def mismatch(self, row: StoredBatch, result: BatchResult) -> str | None:
        """Why ``result`` cannot be the answer to the stored batch, or None when it can."""
        assert self.store is not None
        batch = self.store.batch(row.batch_id)
        if (result.job_id, result.context_id, result.template_id) != (batch.job_id, row.context_id, batch.template_id):
            return f"result for {row.batch_id!r} names another job, context or template"
        if [v.claim_id for v in result.verdicts] != [c.claim_id for c in batch.claims]:
            return f"result for {row.batch_id!r} does not answer exactly the batch's claims"
        return None

    def on_batch_failed(self, identity: bytes, message: BatchFailed) -> None:
        assert self.store is not None
        worker = self.workers[identity]
        row = self.store.get(message.batch_id)
        if row is None or row.status is not BatchStatus.ASSIGNED or row.worker != identity:
            log.info("stale_batch_failed_ignored", batch_id=message.batch_id, worker_id=worker.name)
            return
        worker.in_flight.pop(message.batch_id, None)
        log.warning("batch_failed", batch_id=message.batch_id, worker_id=worker.name, error=message.error)
        self.retry_or_fail(row, message.error)

    def on_release(self, identity: bytes, message: Release) -> None:
        assert self.store is not None
        worker = self.workers[identity]
        for batch_id in message.batch_ids:
            row = self.store.get(batch_id)
            if row is not None and row.status is BatchStatus.ASSIGNED and row.worker == identity:
                self.store.requeue(row, count_attempt=False)
                worker.in_flight.pop(batch_id, None)
                self.counters["released"] += 1
        if message.leaving and not worker.leaving:
            worker.leaving, worker.credit = True, 0
            self.files.retire(identity)
            log.info("worker_leaving", worker_id=worker.name, released=len(message.batch_ids))

    # --- model files -----------------------------------------------------------------------------

    def on_find_sources(self, identity: bytes, message: FindSources) -> None:
        answer = self.files.find(identity, message.files, message.exclude)
        if answer is not None:
            self.send(identity, answer)
        else:
            log.info("files_request_waiting", worker_id=self.workers[identity].name, files=message.files[:12])
        self.answer_sources(self.files.wake())

    def on_files_held(self, identity: bytes, message: FilesHeld) -> None:
        worker = self.workers[identity]
        self.counters["files_fetched"] += 1
        self.counters["origin_bytes"] += message.origin_bytes
        self.counters["peer_bytes"] += message.peer_bytes
        self.counters["cached_bytes"] += message.cached_bytes
        log.info(
            "files_held", worker_id=worker.name, files=message.files[:12], origin_bytes=message.origin_bytes,
            peer_bytes=message.peer_bytes, cached_bytes=message.cached_bytes, seconds=round(message.seconds, 3),
        )  # fmt: skip
        self.answer_sources(self.files.held(identity, worker.file_endpoint, [message.files]))

    def on_files_dropped(self, identity: bytes, message: FilesDropped) -> None:
        self.files.dropped(identity, message.files)

    def answer_sources(self, answers: list[Answer]) -> None:
        for identity, sources in answers:
            if identity in self.workers:
                self.send(identity, sources)

    def retry_or_fail(self, row: StoredBatch, error: str) -> None:
        assert self.store is not None
        if row.attempts >= self.config.max_attempts:
            self.fail(row, error)
        else:
            self.store.requeue(row, count_attempt=True)
            self.counters["requeues"] += 1

    def fail(self, row: StoredBatch, error: str) -> None:
        """Give up on a batch: its failure goes to a sink to be recorded, like a result."""
        assert self.store is not None
        error = f"{error} (attempts: {row.attempts})"
        self.store.fail(row, error)
        self.counters["batches_failed"] += 1
        log.error("batch_given_up", batch_id=row.batch_id, error=error)
        self.deliver(row.batch_id)

    # --- sinks -----------------------------------------------------------------------------------

    def on_sink_ready(self, identity: bytes, message: SinkReady) -> None:
        if self.refuse_if_name_taken(identity, message.sink_id, message.instance, self.sinks, "sink"):
            return
        stale = [s for s in self.sinks.values() if s.name == message.sink_id or s.identity == identity]
        for old in stale:
            self.drop_sink(old, "registered again")
        self.sinks[identity] = SinkRecord(identity=identity, name=message.sink_id, instance=message.instance)
        log.info("sink_joined", sink_id=message.sink_id)
        finished = [job for job in self.jobs.values() if job.done_reported]
        if finished and len(finished) == len(self.jobs):  # it may have missed the last job_done
            self.report_if_complete(finished[-1], again=True, to_producer=False)

    def drop_sink(self, sink: SinkRecord, reason: str) -> None:
        """Forget a sink; what it had not acknowledged is delivered again (to it or another sink)."""
        assert self.store is not None
        self.sinks.pop(sink.identity, None)
        for batch_id in sorted(sink.unacked):
            row = self.store.get(batch_id)
            if row is not None and row.status is BatchStatus.DELIVERED and row.sink == sink.identity:
                self.store.undeliver(row)
                self.counters["redeliveries"] += 1
        log.info("sink_left", sink_id=sink.name, reason=reason, unacked=len(sink.unacked))
        sink.unacked.clear()

    def deliver_held(self) -> None:
        """Deliver outcomes held back (no sink, a failed send, a sink that left)."""
        assert self.store is not None
        for batch_id in self.store.done_ids(DELIVER_PER_TURN):
            self.deliver(batch_id)

    def deliver(self, batch_id: str, result: BatchResult | None = None) -> None:
        """Hand a done batch (verdicts or failure) to a sink, round robin; without sinks it waits.
        ``result``: the verdicts just stored, if at hand (saves reading them back)."""
        assert self.store is not None
        if not self.sinks:
            return
        row = self.store.get(batch_id)
        assert row is not None and row.status is BatchStatus.DONE
        sinks = list(self.sinks.values())
        sink = sinks[self._next_sink % len(sinks)]
        self._next_sink += 1
        message = self.delivery_for(row, result)
        self.store.deliver(row, sink.identity)
        sink.unacked.add(batch_id)
        self.send(sink.identity, message, on_fail=lambda: self.undeliver(batch_id, sink))

    def delivery_for(self, row: StoredBatch, result: BatchResult | None = None) -> Deliver | DeliverFailure:
        assert self.store is not None
        redelivery = row.deliveries > 0
        if row.error is None:
            return Deliver(result=result or self.store.result(row.batch_id), redelivery=redelivery)
        batch = self.store.batch(row.batch_id)
        failure = BatchFailure(
            batch_id=row.batch_id, job_id=row.job_id, context_id=row.context_id, model=batch.context.model,
            template_id=batch.template_id, claim_ids=[c.claim_id for c in batch.claims], error=row.error,
            attempts=row.attempts,
        )  # fmt: skip
        return DeliverFailure(failure=failure, redelivery=redelivery)

    def undeliver(self, batch_id: str, sink: SinkRecord) -> None:
        assert self.store is not None
        row = self.store.get(batch_id)
        if row is not None and row.status is BatchStatus.DELIVERED and row.sink == sink.identity:
            self.store.undeliver(row)
            sink.unacked.discard(batch_id)

    def on_sink_ack(self, identity: bytes, message: SinkAck) -> None:
        """Durable in a sink's output. Accepted from any sink, even one the broker has since forgotten:
        the rows are on disk either way."""
        assert self.store is not None
        touched: dict[str, JobRecord] = {}
        for batch_id in message.batch_ids:
            row = self.store.get(batch_id)
            if row is None or row.status not in (BatchStatus.DELIVERED, BatchStatus.DONE):
                if row is None or row.status is not BatchStatus.WRITTEN:
                    log.warning("unexpected_sink_ack", batch_id=batch_id, status=row and row.status.value)
                continue
            holder = self.sinks.get(row.sink or b"")
            if holder is not None:
                holder.unacked.discard(batch_id)
            self.store.written(row)
            job = self.jobs[row.job_id]
            if row.failed:
                job.failed += 1
                job.pairs_failed += row.pairs
                if len(job.errors) < MAX_JOB_ERRORS:
                    job.errors.append(f"{batch_id}: {row.error}")
            else:
                job.written += 1
                job.pairs_written += row.pairs
            touched[job.job_id] = job
        for job in touched.values():
            self.store.save_job(job)
            self.report_if_complete(job)
        if identity not in self.sinks:
            self.send(identity, Disconnect(reason=REGISTER_AGAIN))

    # --- any peer --------------------------------------------------------------------------------

    def on_disconnect(self, identity: bytes, message: Disconnect) -> None:
        if identity in self.workers:
            worker = self.workers[identity]
            # A leaving worker released what it would not finish; a worker that failed is charged.
            self.drop_worker(worker, f"disconnected ({message.reason})", count_attempts=not worker.leaving)
        elif identity in self.sinks:
            self.drop_sink(self.sinks[identity], f"disconnected ({message.reason})")
        else:
            self.producers.pop(identity, None)

    def on_status_request(self, identity: bytes, message: StatusRequest) -> None:
        """Anyone past the socket's authentication may read the run's status; no registration needed."""
        self.counters["status_requests"] += 1
        self.send(identity, StatusReply(snapshot=self.status()))

    def status(self) -> StatusSnapshot:
        """The run as ``pervade status`` shows it (broker/status.py)."""
        assert self.store is not None
        return build_snapshot(
            endpoint=self.endpoint,
            started_at=self.started_at,
            workers=list(self.workers.values()),
            specs=self.specs,
            queued=self.store.queued,
            jobs=list(self.jobs.values()),
            claims_per_s=self.throughput.rate(),
            batches={status.value: n for status, n in self.store.status_counts.items()},
            counters=self.counters,
            sinks=len(self.sinks),
            producers=len(self.producers),
        )

    def on_heartbeat(self, identity: bytes, message: Heartbeat) -> None:
        pass  # ``admit`` noted the peer alive

    def on_error(self, identity: bytes, message: Error) -> None:
        log.warning("peer_reported_error", peer=identity.decode(errors="replace"), reason=message.reason)

    def purge_dead_peers(self, now: float) -> None:
        """Peers silent for longer than the heartbeat liveness are dead: requeue what they held."""
        dead_after = self.config.heartbeats.dead_after_s
        for worker in [w for w in self.workers.values() if now - w.last_seen > dead_after]:
            self.counters["workers_declared_dead"] += 1
            log.warning("worker_declared_dead", worker_id=worker.name, silent_s=round(now - worker.last_seen, 1))
            self.drop_worker(worker, "died", count_attempts=True)
        for sink in [s for s in self.sinks.values() if now - s.last_seen > dead_after]:
            self.counters["sinks_declared_dead"] += 1
            self.drop_sink(sink, "missed heartbeats")
        for producer in [p for p in self.producers.values() if now - p.last_seen > dead_after]:
            del self.producers[producer.identity]

    def send_heartbeats(self) -> None:
        for peers in (self.workers, self.sinks, self.producers):
            for identity in peers:
                self.send(identity, Heartbeat())

    # --- scheduling ------------------------------------------------------------------------------

    def queued_total(self) -> int:
        assert self.store is not None
        return sum(self.store.queued.values())

    def hosts(self) -> Counter[str]:
        return Counter(context_id for worker in self.workers.values() for context_id in worker.contexts)

    def dispatch(self) -> None:
        """Match queued batches with worker credit, by affinity (see broker/policy.py), one batch per worker
        in turn, starting each call one worker further along. Workers ask for deep windows when batches are
        small (gpuworker/intake.py): filling the first worker's window before the next would leave the
        others idle on a short queue, and batches trickling in one at a time would all go to one worker."""
        assert self.store is not None
        if not self.store.queued or not self.workers:
            return
        hosts = self.hosts()
        free_hosts = Counter(
            c for w in self.workers.values() if w.credit > 0 and not w.leaving for c in w.contexts
        )  # a stale count only delays a move by one turn
        ready = [w for w in self._workers_in_turn() if w.credit > 0 and not w.leaving]
        while ready and self.store.queued:
            served = []
            for worker in ready:
                choice = choose_context(
                    held=worker.contexts,
                    pending=self.store.queued,
                    hosts=hosts,
                    refused=worker.refused,
                    rebalance_backlog=self.config.rebalance_backlog,
                    free_hosts=free_hosts,
                )
                if choice is None:
                    continue
                if choice.load:
                    hosts.subtract(self.tell_to_load(worker, choice.context_id))
                    hosts[choice.context_id] += 1
                row = self.store.next_queued(choice.context_id)
                assert row is not None
                self.assign(worker, row)
                if worker.credit > 0 and not worker.leaving:
                    served.append(worker)
                if not self.store.queued:
                    break
            ready = served

    def _workers_in_turn(self) -> list[WorkerRecord]:
        """The workers, starting one further along at each call (round robin across calls)."""
        workers = list(self.workers.values())
        self._turn = (self._turn + 1) % len(workers)
        return workers[self._turn :] + workers[: self._turn]

    def tell_to_load(self, worker: WorkerRecord, context_id: str) -> list[str]:
        """Send LoadContext (evicting the oldest contexts if the worker is full); returns the evicted."""
        evict = list(worker.contexts)[: max(0, len(worker.contexts) + 1 - worker.max_contexts)]
        spec = self.specs[context_id]
        manifest = self.manifests.get(spec.files) if spec.files is not None else None
        self.send(worker.identity, LoadContext(context=spec, manifest=manifest, evict=evict))
        for evicted in evict:
            worker.contexts.pop(evicted, None)
            worker.loaded.discard(evicted)
        worker.contexts[context_id] = None
        log.info("told_to_load", worker_id=worker.name, context_id=context_id, evict=evict)
        return evict

    def assign(self, worker: WorkerRecord, row: StoredBatch) -> None:
        """Send a batch to a worker; if the send fails the batch goes back to the front of its queue and
        the worker keeps its credit (it never saw the batch)."""
        assert self.store is not None
        batch = self.store.batch(row.batch_id)
        self.store.assign(row, worker.identity)
        worker.credit -= 1
        worker.in_flight[row.batch_id] = None
        self.send(worker.identity, Assign(batch=batch), on_fail=lambda: self.unassign(row.batch_id, worker))

    def unassign(self, batch_id: str, worker: WorkerRecord) -> None:
        assert self.store is not None
        row = self.store.get(batch_id)
        if row is not None and row.status is BatchStatus.ASSIGNED and row.worker == worker.identity:
            self.store.requeue(row, count_attempt=False)
            worker.in_flight.pop(batch_id, None)
            worker.credit += 1

    def log_stats(self) -> None:
        assert self.store is not None
        log.info(
            "broker_stats",
            workers=len(self.workers),
            sinks=len(self.sinks),
            producers=len(self.producers),
            queued=self.queued_total(),
            batches={status.value: n for status, n in self.store.status_counts.items() if n},
            **self.counters,
        )


def job_ended(job: JobRecord, agreed: bool) -> JobEnded:
    """The answer to an EndJob or AbortJob: what the broker holds of the job."""
    held = job.holds()
    return JobEnded(job_id=job.job_id, batches=held.batches, pairs=held.pairs, digest=held.digest, agreed=agreed)


async def run_broker(config: BrokerConfig) -> None:
    """Run a broker until SIGTERM or SIGINT. A state database that breaks under it is a StateError that
    says what to do, not a traceback."""
    broker = Broker(config)
    broker.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.stop)
    assert broker.store is not None  # open from start() until serve() ends
    path = broker.store.path
    try:
        await broker.serve()
    except sqlite3.Error as exc:
        raise state_error(path, exc) from None

"""The broker: one asyncio process, one ROUTER socket, every peer (producers, workers, sinks) on it.

Shaped like the ZeroMQ Guide's Majordomo broker, grown up into one small module per job, in the order a
claim goes through them:

- ``router.py`` decodes each envelope, admits its peer and runs the verb its message names;
- ``producers.py`` (submit, end or abort a job), ``scheduler.py`` (queued batches to workers by affinity,
  with ``policy.py``), ``workers.py`` (a worker's verbs; ``results.py`` checks what it answers),
  ``outcomes.py`` (a batch requeued, retried, failed or complete), ``sinks.py`` (outcomes delivered to
  sinks, and their acknowledgements), ``job_reports.py`` (JobDone); ``files.py`` answers workers fetching
  model files (with ``sources.py``);
- ``liveness.py`` purges dead peers, sends heartbeats, tells workers the run is over;
- ``outbox.py`` commits, then sends; ``state.py`` is what the verbs share; ``parts.py`` wires them;
- ``keyguard.py`` (with keys) names the key that sent each message, and cuts off a key that is revoked.

This module opens the state, binds the socket, builds the parts and runs the loop.

Verbs are synchronous and never block. They change state in the store (``broker/store.py``) and queue
replies in the outbox; once per turn of the loop, ``flush`` commits the store and only then sends the
outbox. So every reply a peer sees (Accepted, Assign, Deliver, JobDone) describes state already on disk,
and a broker killed at any moment restarts without contradicting what its peers were told. No message,
however malformed, escapes the router.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable

import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.broker.config import BrokerConfig
from pervade.broker.constants import RECEIVE_PER_TURN
from pervade.broker.keyguard import KeyChanges, KeyGuard
from pervade.broker.metrics import METRICS_REFRESH_S, MetricsExporter
from pervade.broker.outbox import socket_sender
from pervade.broker.parts import BrokerParts, build_parts
from pervade.broker.records import ProducerRecord, SinkRecord, WorkerRecord
from pervade.broker.state import BrokerState
from pervade.broker.store import BatchStatus, BrokerStore, JobRecord, state_error
from pervade.collector import collect_garbage_rarely
from pervade.context import ContextSpec
from pervade.errors import ConfigError
from pervade.keyring import KeyHolder, KeyRing
from pervade.keys import ServerKeys
from pervade.protocol import Message, StatusSnapshot
from pervade.transport import router_socket, start_authenticator

log = structlog.get_logger("broker")


class Broker:
    """Queues claim batches per context, hands them to workers by affinity, routes results to sinks.

    What launchers and tests hold: ``start`` opens the state and binds, ``serve`` runs the loop until
    ``stop``. The running broker (``BrokerServer``) exists from ``start`` on; the attributes below read it.
    """

    def __init__(self, config: BrokerConfig, ctx: zmq.asyncio.Context | None = None) -> None:
        self.config = config
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self.endpoint = ""
        self._server: BrokerServer | None = None
        self._stopping = asyncio.Event()
        #: Set once ``serve`` has committed its last state and closed.
        self.closed = asyncio.Event()

    def start(self, state: BrokerState | None = None) -> str:
        """Open the state (recovering what a previous broker left), unless ``state`` is given already open
        (``run_broker`` opens it on a thread: recovery reads the whole store); bind; returns the endpoint."""
        self._server = BrokerServer.open(self.config, self._ctx, state)
        self.endpoint = self._server.endpoint
        return self.endpoint

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self) -> None:
        """Serve until ``stop`` is called (or SIGTERM/SIGINT when installed by ``run_broker``)."""
        if self._server is None:
            self.start()
        try:
            await self.server.serve(self._stopping)
        finally:
            self.closed.set()

    @property
    def server(self) -> BrokerServer:
        if self._server is None:
            raise RuntimeError("the broker is not started: call start() first")
        return self._server

    # --- what tests, benchmarks and launchers read -----------------------------------------------

    @property
    def state(self) -> BrokerState:
        return self.server.parts.state

    @property
    def store(self) -> BrokerStore:
        return self.state.store

    @property
    def counters(self) -> Counter[str]:
        return self.state.counters

    @property
    def jobs(self) -> dict[str, JobRecord]:
        return self.state.jobs

    @property
    def specs(self) -> dict[str, ContextSpec]:
        return self.state.specs

    @property
    def workers(self) -> dict[bytes, WorkerRecord]:
        return self.state.workers

    @property
    def sinks(self) -> dict[bytes, SinkRecord]:
        return self.state.sinks

    @property
    def producers(self) -> dict[bytes, ProducerRecord]:
        return self.state.producers

    @property
    def _sock(self) -> zmq.asyncio.Socket:
        return self.server.sock

    def queued_total(self) -> int:
        return self.state.queued_total()

    def status(self) -> StatusSnapshot:
        """The run as ``pervade status`` shows it (broker/status.py)."""
        return self.state.snapshot(self.endpoint)

    def send(self, identity: bytes, message: Message, on_fail: Callable[[], None] | None = None) -> None:
        """Queue a message for the next turn's flush (after its commit)."""
        self.server.parts.outbox.post(identity, message, on_fail)

    def handle(self, frames: list[bytes]) -> None:
        """Run one envelope as if it had arrived on the socket."""
        self.server.parts.router.handle(frames)


class BrokerServer:
    """A broker with its state open and its socket bound: serves until told to stop, then closes both."""

    def __init__(
        self,
        config: BrokerConfig,
        parts: BrokerParts,
        sock: zmq.asyncio.Socket,
        endpoint: str,
        auth: AsyncioAuthenticator | None,
        guard: KeyGuard | None,
        metrics: MetricsExporter | None,
    ) -> None:
        self.config = config
        self.parts = parts
        self.sock = sock
        self.endpoint = endpoint
        self.auth = auth  # None: no keys (plain TCP)
        self.guard = guard  # None: no keys
        self.metrics = metrics  # None: no --metrics-port
        #: The ROUTER as a plain socket, for reads that never wait (the loop awaits ``sock.poll``).
        self.plain = zmq.Socket.shadow(sock.underlying)

    @classmethod
    def open(cls, config: BrokerConfig, ctx: zmq.asyncio.Context, state: BrokerState | None = None) -> BrokerServer:
        """Open the state (recovering what a previous broker left) unless given, bind, build the parts. A
        failed bind releases the state."""
        state = open_state(config) if state is None else state
        try:
            sock, auth, ring = listen(ctx, config)
        except zmq.ZMQError as exc:
            state.store.close()
            raise ConfigError(f"cannot listen on {config.bind}: {exc}") from None
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        state.store.note_endpoint(endpoint)
        if config.endpoint_file:
            tmp = config.endpoint_file.with_suffix(".tmp")
            tmp.write_text(endpoint)
            tmp.replace(config.endpoint_file)  # readers never see a half-written endpoint
        log.info("broker_listening", endpoint=endpoint, curve=auth is not None)
        parts = build_parts(state, socket_sender(sock), endpoint)
        metrics = None
        if config.metrics_port is not None:
            try:
                metrics = MetricsExporter(config.metrics_host, config.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}"
                ) from None
            metrics.update(state.snapshot(endpoint))
        guard = None
        if ring is not None:
            guard, state.worker_keys = KeyGuard(ring, state.counters), frozenset()
        return cls(config, parts, sock, endpoint, auth, guard, metrics)

    async def serve(self, stopping: asyncio.Event) -> None:
        """Turns of the loop until ``stopping`` is set: take what arrived, dispatch, keep peers live,
        deliver, then commit and send (``Outbox.flush``). Closes the socket and the store when done."""
        parts, store = self.parts, self.parts.state.store
        beat = self.config.heartbeats.interval_s
        poll_ms = max(1, int(min(0.2, beat / 2) * 1000))
        now = time.monotonic()
        next_beat, next_stats = now + beat, now + self.config.stats_interval_s
        next_metrics = now + METRICS_REFRESH_S
        checkpoints = Checkpoints(store, self.config.checkpoint_interval_s)
        try:
            while not stopping.is_set():
                if await self.sock.poll(poll_ms, zmq.POLLIN):
                    self.receive()
                    parts.scheduler.dispatch()
                now = time.monotonic()
                if self.guard is not None:
                    self.apply(self.guard.step(now))
                if now >= next_beat:
                    parts.liveness.purge_dead_peers(now)
                    parts.liveness.send_heartbeats()
                    parts.liveness.send_drained_if_over(now)
                    next_beat = now + beat
                if parts.state.sinks and store.status_counts[BatchStatus.DONE]:
                    parts.sinks.deliver_held()
                parts.sinks.roll_now_if_nothing_more(now)
                parts.outbox.flush()
                checkpoints.step(now)
                if now >= next_stats:
                    parts.liveness.log_stats()
                    next_stats = now + self.config.stats_interval_s
                if self.metrics is not None and now >= next_metrics:
                    self.metrics.update(parts.state.snapshot(self.endpoint))
                    next_metrics = now + METRICS_REFRESH_S
        finally:
            await checkpoints.finish()
            if self.guard is not None:
                await self.guard.finish()
            parts.outbox.flush()
            parts.liveness.log_stats()
            self.close()

    def receive(self) -> None:
        """Drain what is ready (up to ``RECEIVE_PER_TURN`` messages, grouped or not), so one dispatch and one
        commit serve them all. With keys, each message is handled as the key that sent it, and one from a key
        not admitted is dropped. Reads go through a plain socket sharing the ROUTER (``self.plain``): a read
        that never waits needs no future."""
        router, guard, plain = self.parts.router, self.guard, self.plain
        taken = 0
        while taken < RECEIVE_PER_TURN:
            try:
                frames = plain.recv_multipart(zmq.NOBLOCK, copy=guard is None)
            except zmq.Again:
                break
            if guard is None:
                taken += router.handle(frames)
            elif (sender := guard.sender(frames[0])) is not None:
                taken += router.handle([frame.bytes for frame in frames], sender)
            else:
                taken += 1

    def apply(self, changes: KeyChanges) -> None:
        """What a reading of ``authorized/`` changed: revoked keys cut off; new worker keys told to workers."""
        for key in changes.revoked:
            self.revoke(key)
        if changes.worker_keys is not None:
            self.parts.workers.vouch_for(changes.worker_keys)

    def revoke(self, key: KeyHolder) -> None:
        """``key`` is no longer admitted: drop its peers (what they held goes back to work) and cut its
        connections, so nothing it sends is acted on and it cannot stay connected."""
        dropped = self.parts.liveness.drop_peers_of(key)
        cut = self.guard.cut(key.public) if self.guard is not None else 0
        self.parts.state.counters["keys_revoked"] += 1
        log.warning("key_revoked", key=str(key), peers_dropped=dropped, connections_cut=cut)

    def close(self) -> None:
        self.sock.close()
        if self.auth is not None:
            self.auth.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.parts.state.store.close()


class Checkpoints:
    """The store's write-ahead log copied into its database every ``interval_s``, on a thread (it blocks);
    the log restarted on the loop, between commits, once it has grown too long."""

    def __init__(self, store: BrokerStore, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._next = time.monotonic() + interval_s
        self._running: asyncio.Future[bool] | None = None  # the checkpoint in progress, if any

    def step(self, now: float) -> None:
        running = self._running
        if running is not None and running.done():
            if not running.cancelled() and running.exception() is None and running.result():
                self._store.restart_log()
            elif not running.cancelled() and running.exception() is not None:
                log.error("checkpoint_failed", error=str(running.exception()))
            self._running = None
        if now >= self._next and self._running is None:
            self._running = asyncio.ensure_future(asyncio.to_thread(self._store.checkpoint))
            self._next = now + self._interval_s

    async def finish(self) -> None:
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)


def open_state(config: BrokerConfig) -> BrokerState:
    """The state directory opened, what a previous broker left recovered (the batches it had in flight to
    workers are queued in the state already, as the database never holds an assignment; ``requeued`` counts
    the assigned rows an older broker wrote; delivered ones are to deliver again), and a damaged write-ahead
    log reported."""
    store = BrokerStore.open(config.state_dir, fsync=config.fsync)
    requeued, redeliver = store.recover()
    state = BrokerState(config, store)
    if config.state_dir is not None:
        log.info(
            "broker_state_opened", path=str(store.path), jobs=len(state.jobs), queued=state.queued_total(),
            requeued=requeued, to_redeliver=redeliver,
        )  # fmt: skip
    if store.damage is not None:
        log.error("state_damaged", path=str(store.path), detail=store.damage)
    return state


def listen(
    ctx: zmq.asyncio.Context, config: BrokerConfig
) -> tuple[zmq.asyncio.Socket, AsyncioAuthenticator | None, KeyRing | None]:
    """The broker's ROUTER socket, bound; with keys, a CURVE server whose authenticator admits only clients
    whose public key is in the keys directory's ``authorized/``, each as its role (read again as it changes,
    so keys are granted and revoked without a restart), and that ring of keys."""
    if config.keys_dir is None:
        return router_socket(ctx, config.bind, config.max_message_bytes), None, None
    keys = ServerKeys.load(config.keys_dir)
    ring = KeyRing(keys.authorized)
    auth = start_authenticator(ctx, ring)
    try:
        return router_socket(ctx, config.bind, config.max_message_bytes, keys), auth, ring
    except zmq.ZMQError:
        auth.stop()
        raise


async def run_broker(config: BrokerConfig) -> None:
    """Run a broker until SIGTERM or SIGINT. A state database that breaks under it is a StateError that
    says what to do, not a traceback."""
    broker = Broker(config)
    broker.start(await asyncio.to_thread(open_state, config))  # recovery reads the store: not on the loop
    collect_garbage_rarely()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.stop)
    path = broker.store.path
    try:
        await broker.serve()
    except sqlite3.Error as exc:
        raise state_error(path, exc) from None

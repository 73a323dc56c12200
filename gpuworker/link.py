"""The worker's link to the broker: registration, the receive loop that files the orders, credit, and sends.

One broker session (``pervade/session.py``) serves the whole worker. ``receive_loop`` files every LoadContext
and Assign into the local queue as it arrives (and keeps the heartbeats going); the compute loop
(``gpuworker/runner.py``) takes them in order. The worker grants credit for ``prefetch + 1`` batches at least
(``CreditWindow``, ``gpuworker/intake.py``), so the next batch is already on the worker when the current one
finishes: the device never waits on the network.

Reconnection. When the session reconnects (the broker restarted, or declared this worker dead), work queued
from the old connection is dropped (the broker requeues it), the contexts still resident are announced again
(in the registration), and the batch in hand, once finished, is sent on the new connection: the broker takes
it if nobody else has answered that batch yet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
import zmq.asyncio

from pervade.gpuworker.config import WorkerConfig
from pervade.gpuworker.intake import CreditWindow, WorkQueue
from pervade.gpuworker.lifecycle import Lifecycle
from pervade.gpuworker.orders import BatchWork, InHand, LoadOrder, Order
from pervade.protocol import (
    Assign,
    Drained,
    Error,
    FindSources,
    LoadContext,
    Message,
    PeerKeys,
    Pull,
    Release,
    Sources,
    WorkerReady,
)
from pervade.session import BrokerSession

log = structlog.get_logger("gpuworker")

#: Seconds a worker waits for the broker's answer to FindSources before asking again (the broker may have
#: restarted; it answers at once when it can, or the moment a source frees up).
SOURCES_RETRY_S = 30.0

#: Builds the worker's registration (who it is, what it holds) for each new connection.
Describe = Callable[[], Awaitable[WorkerReady]]


class BrokerLink:
    """Everything the worker says to and hears from the broker, and the orders it holds from it."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        config: WorkerConfig,
        lifecycle: Lifecycle,
        in_hand: InHand,
        describe: Describe,
        tokenize_ahead: Callable[[BatchWork], None],
        peer_keys_heard: Callable[[list[str]], None] = lambda keys: None,
    ) -> None:
        self.config = config
        self.lifecycle = lifecycle
        #: Orders received and not yet taken by the compute loop, oldest first.
        self.queue: WorkQueue[Order] = WorkQueue(lambda order: order.claims)
        self.window = CreditWindow(min_batches=config.prefetch + 1)
        self._in_hand = in_hand
        self._describe = describe
        self._tokenize_ahead = tokenize_ahead
        #: Told the worker keys the broker admits (``PeerKeys``): whom the file service admits.
        self._peer_keys_heard = peer_keys_heard
        self._sources_wanted: dict[str, asyncio.Future[Sources]] = {}
        self.session = BrokerSession(
            ctx,
            config.broker,
            "worker",
            self._register,
            config.heartbeats,
            stopping=lifecycle.finished,
            keys=config.keys,
        )

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing in hand."""
        return not self._in_hand.orders and not len(self.queue)

    async def open(self) -> None:
        await self.session.open()

    def close(self) -> None:
        self.session.close()

    async def send(self, message: Message) -> bool:
        """Send once registered (a result is sent even if the connection changed since its batch came: the
        broker takes it if the batch is still open)."""
        return await self.session.send(message)

    async def send_group(self, messages: list[Message]) -> bool:
        """Send ``messages`` together, in order, once registered (results of a run: one send)."""
        return await self.session.send_group(messages)

    def take_queued(self) -> list[Order]:
        """Every queued order, taken out of the queue."""
        return self.queue.drain()

    async def _register(self, session: BrokerSession) -> None:
        stale = self.take_queued()
        if stale:
            log.info("dropped_stale_work", orders=len(stale))  # the broker requeues what it sent us
        await session.send_registration(await self._describe())
        self.window.reset()  # a new connection: the broker knows of no credit
        if not self.lifecycle.stopping.is_set():
            await self.top_up_credit(session.send_registration)

    async def receive_loop(self) -> None:
        while not self.lifecycle.finished.is_set():
            message = await self.session.receive(timeout_s=0.2)
            if isinstance(message, (LoadContext, Assign)):
                if self.lifecycle.stopping.is_set():
                    if isinstance(message, Assign):  # sent before the broker heard we are leaving
                        await self.session.send(Release(batch_ids=[message.batch.batch_id], leaving=True))
                    continue
                self._file(message)
                await self.top_up_credit()
            elif isinstance(message, Drained):
                if self.config.exit_when_drained:
                    log.info("broker_drained", completed_jobs=message.completed_jobs)
                    self.lifecycle.stop("drained")
            elif isinstance(message, Sources):
                wanted = self._sources_wanted.pop(message.files, None)
                if wanted is not None and not wanted.done():
                    wanted.set_result(message)
            elif isinstance(message, PeerKeys):
                self._peer_keys_heard(message.keys)
            elif isinstance(message, Error):
                log.error("broker_error", reason=message.reason, detail=message.detail)
            elif message is not None:
                log.warning("unexpected_message", kind=type(message).__name__)

    def _file(self, message: LoadContext | Assign) -> None:
        """Queue an order; a batch is offered to the encoder at once (it tokenizes ahead for a resident context)."""
        generation = self.session.generation
        if isinstance(message, LoadContext):
            self.queue.put(LoadOrder(message, generation))
            return
        work = BatchWork(message, generation)
        self.window.arrived(work.claims, work.batches)
        self._tokenize_ahead(work)
        self.queue.put(work)

    async def top_up_credit(self, send: Callable[[Pull], Awaitable[object]] | None = None) -> None:
        """Ask for more batches when the window (``gpuworker/intake.py``) runs short, unless leaving."""
        if (pull := self.pull_due()) is not None:
            await (send or self.session.send)(pull)

    def pull_with_answers(self, answered: int) -> Pull | None:
        """``pull_due`` for a run's answers (``answered`` batches in hand), or None while reconnecting: the
        grant would count against the old connection's window, and the new one asks for its own when it
        registers."""
        return self.pull_due(answered) if self.session.registered else None

    def pull_due(self, answered: int = 0) -> Pull | None:
        """The credit to ask for now, when the window runs short (None while leaving, or when it does not).
        ``answered``: batches in hand whose answers go with it, no longer held (a slice counts its members).
        Counted as granted: send it."""
        if self.lifecycle.stopping.is_set():
            return None
        held = sum(order.batches for order in self.queue) + sum(order.batches for order in self._in_hand.orders)
        grant = self.window.top_up(held=held - answered)
        return Pull(credit=grant) if grant else None

    async def find_sources(self, digest: str, exclude: list[str]) -> Sources:
        """Ask the broker whom to fetch ``digest`` from; ask again if no answer comes in a while."""
        while True:
            wanted = asyncio.get_running_loop().create_future()
            self._sources_wanted[digest] = wanted
            await self.session.send(FindSources(files=digest, exclude=exclude))
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(wanted, SOURCES_RETRY_S)
            log.info("sources_retry", files=digest)

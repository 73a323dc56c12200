"""How a worker ends: told to (a signal), or on its own; and how it leaves without losing work.

Preemption. On SIGTERM (what Slurm and HTCondor send before SIGKILL; Grid Engine's ``-notify`` sends SIGUSR1
before a suspension and SIGUSR2 before a kill, handled alike) the worker stops taking work, hands its queued
batches straight back (``Release``), finishes the batch in hand if it can within ``grace_s`` (judged from how
long batches have taken), else hands that back too, says goodbye and exits. A forward pass cannot be
interrupted, so a worker that gives up on one exits without waiting for it.

Ending on its own. A worker in a batch job must not hold a GPU idle: with ``exit_when_drained`` it leaves
when the broker says the last open job is done (``Drained``, heard by ``gpuworker/link.py``); with
``idle_timeout_s`` it leaves after that long without work from a live broker; with ``broker_deadline_s`` it
gives up on a broker not heard for that long (one not up yet, or gone for good), and exits with status
``EXIT_BROKER_UNREACHABLE`` (3).
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import time
from collections.abc import Callable

import structlog

from pervade.constants import EXIT_BROKER_UNREACHABLE, LEAVE_SIGNALS
from pervade.gpuworker.config import WorkerConfig
from pervade.gpuworker.orders import InHand, LoadOrder, Order, batch_ids
from pervade.protocol import Disconnect, Release
from pervade.session import BrokerSession

log = structlog.get_logger("gpuworker")

#: How often the worker checks its idle timeout and broker deadline.
WATCH_INTERVAL_S = 0.5


class Lifecycle:
    """Whether the worker is stopping, why, and with which exit status."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        #: Set by ``stop`` (a signal, an ending of its own, a failed loop): take no more work.
        self.stopping = asyncio.Event()
        #: Set once the goodbye is sent: the receive and encode loops may end.
        self.finished = asyncio.Event()
        #: Why the worker stopped, and the exit status that says it.
        self.exit_reason = ""
        self.exit_status = 0
        #: True when the worker stopped while the device was still busy (see ``exit_now_if_abandoned``).
        self.abandoned_compute = False
        self._idle_since = time.monotonic()

    def stop(self, reason: str = "signal", status: int = 0) -> None:
        """Leave gracefully; the first reason given is the one reported."""
        if not self.stopping.is_set():
            self.exit_reason, self.exit_status = reason, status
        self.stopping.set()

    def handle_leave_signals(self) -> None:
        """Leave gracefully on each of ``LEAVE_SIGNALS`` (SIGTERM, SIGINT, Grid Engine's SIGUSR1/2)."""
        loop = asyncio.get_running_loop()
        for sig in LEAVE_SIGNALS:
            loop.add_signal_handler(sig, functools.partial(self.stop, f"signal {signal.Signals(sig).name}"))

    def exit_now_if_abandoned(self) -> None:
        """If the worker stopped with the device still busy, exit at once: the thread cannot be interrupted,
        and waiting for it would overrun the batch system's grace time."""
        if self.abandoned_compute:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exit_status)

    async def watch(self, session: BrokerSession, is_idle: Callable[[], bool]) -> None:
        """End the worker on its own: idle for too long, or a broker silent past the deadline."""
        deadline, idle_timeout = self.config.broker_deadline_s, self.config.idle_timeout_s
        while not self.stopping.is_set():
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.monotonic()
            if not is_idle() or session.silent_s > self.config.heartbeats.dead_after_s:
                self._idle_since = now  # idle means: the broker is there and has nothing for us
            if deadline is not None and session.silent_s > deadline:
                log.error("broker_unreachable", broker=self.config.broker, silent_s=round(session.silent_s, 1))
                self.stop(f"broker not heard for {deadline:g} s", EXIT_BROKER_UNREACHABLE)
            elif idle_timeout is not None and now - self._idle_since > idle_timeout:
                log.info("worker_idle", idle_s=round(now - self._idle_since, 1))
                self.stop(f"idle for {idle_timeout:g} s")

    async def leave(
        self,
        session: BrokerSession,
        queued: list[Order],
        in_hand: InHand,
        batch_seconds: float,
        computer: asyncio.Task[None],
        reason: str,
    ) -> None:
        """Hand back the ``queued`` orders now, finish the ones in hand if they fit the grace time (judged by
        ``batch_seconds``, the mean time a batch took), say goodbye."""
        deadline = time.monotonic() + self.config.grace_s
        returned = batch_ids(queued)
        finishing = list(in_hand.orders)
        if finishing and not _fits(finishing, in_hand.since + max(batch_seconds, 0.0) * 1.5, deadline):
            returned += batch_ids(finishing)
            finishing = []
        await session.send_if_connected(Release(batch_ids=returned, leaving=True))
        log.info("worker_leaving", reason=reason, returned=len(returned), finishing=len(finishing))
        if finishing:
            await asyncio.wait([computer], timeout=max(0.0, deadline - time.monotonic() - 0.5))
            unfinished = batch_ids(finishing)
            if not computer.done() and unfinished:  # it overran its estimate
                await session.send_if_connected(Release(batch_ids=unfinished, leaving=True))
        elif not in_hand.orders:
            await asyncio.wait([computer], timeout=1.0)  # idle: the loop sees the stop within its poll
        self.abandoned_compute = bool(in_hand.orders)
        await session.send_if_connected(Disconnect(reason=reason))


def _fits(in_hand: list[Order], expected_end: float, deadline: float) -> bool:
    """Whether the orders in hand will likely finish (at ``expected_end``) before the grace time runs out."""
    if any(isinstance(order, LoadOrder) for order in in_hand):
        return False  # a load takes minutes on a real cluster, and no batch waits on it
    return expected_end < deadline - 1.0

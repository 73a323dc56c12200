"""A client's session with the broker: heartbeats, liveness and reconnection (the zguide's Paranoid Pirate).

Every client (worker, sink, producer) talks to the broker through a ``BrokerSession``. It

- sends a Heartbeat whenever it has sent nothing for ``interval_s`` (any message counts as one);
- declares the broker dead after ``interval_s * liveness`` seconds without hearing from it, and reconnects
  after a back-off that doubles from ``reconnect_min_s`` to ``reconnect_max_s``;
- reconnects at once when the broker answers ``Disconnect`` (it does not know this peer: it restarted, or
  declared the peer dead);
- when the broker answers ``Refused`` (another live process holds this peer's name), waits a liveness
  period (the holder may be a dying predecessor) and registers again; refused ``MAX_REFUSALS`` times in a
  row, it raises RegistrationRefused, which ends the role with the broker's reason;
- reconnects on a NEW socket with a NEW identity every time (two peers with one identity lose messages,
  libzmq #4503), and then calls the role's ``register`` callback, which announces the role again (a worker
  lists the contexts it still holds, a producer resends what was not acknowledged).

Sends made while the session is between connections wait until it is registered again, so a role never
sends on a dead socket or before its registration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

from pervade.errors import ConfigError, RegistrationRefused
from pervade.keys import ClientKeys
from pervade.options import LIVENESS_SECTION, POSITIVE, at_least, check_options, option
from pervade.protocol import Disconnect, Heartbeat, Message, Refused, encode, encode_group, kind_of
from pervade.transport import BrokerConnection

log = structlog.get_logger("session")

#: Registrations refused in a row (the name stays held by a live process) before a client gives up.
MAX_REFUSALS = 3


@dataclass(frozen=True)
class Heartbeats:
    """Liveness settings. The broker and its clients should use the same values (the defaults match)."""

    #: Seconds between heartbeats; any message counts as one.
    interval_s: float = option(
        2.0,
        "seconds between heartbeats",
        flag="--heartbeat-interval",
        metavar="SECONDS",
        check=POSITIVE,
        group=LIVENESS_SECTION,
    )
    #: Missed intervals after which the other side is declared dead.
    liveness: int = option(
        3,
        "missed heartbeats after which the other side is declared dead",
        flag="--heartbeat-liveness",
        metavar="N",
        check=at_least(1),
        group=LIVENESS_SECTION,
    )
    #: First wait before reconnecting to a silent broker; doubled on each failed attempt...
    reconnect_min_s: float = 1.0
    #: ...up to this.
    reconnect_max_s: float = 32.0

    def __post_init__(self) -> None:
        check_options(self)
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("reconnect back-off must satisfy 0 < min <= max")

    @property
    def dead_after_s(self) -> float:
        return self.interval_s * self.liveness


class BrokerSession:
    """One client's connection to the broker, kept alive across broker restarts and network failures."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        role: str,
        register: Callable[[BrokerSession], Awaitable[None]],
        heartbeats: Heartbeats | None = None,
        stopping: asyncio.Event | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        self._ctx = ctx
        self.endpoint = endpoint
        self.role = role
        self.keys = keys  # CURVE: the broker's public key and this client's key pair (None: plain TCP)
        self.heartbeats = heartbeats or Heartbeats()
        self._register = register
        self._stopping = stopping or asyncio.Event()
        self._conn: BrokerConnection | None = None
        self._registered = asyncio.Event()
        self._backoff = self.heartbeats.reconnect_min_s
        self._healthy = False  # heard the broker since the last (re)connection
        self._send_refused = False  # the last send timed out (logged once until one succeeds)
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._heard_at = time.monotonic()  # last word from the broker (or the start), across reconnections
        #: Incremented on every new connection; work received on an older one is stale.
        self.generation = 0
        self.reconnects = 0
        self._refusals = 0  # registrations refused in a row

    @property
    def identity(self) -> str:
        return self._conn.identity if self._conn else ""

    async def open(self) -> None:
        """Connect and register. The broker need not be up yet: messages wait in the socket."""
        self._heard_at = time.monotonic()
        await self._connect()

    @property
    def registered(self) -> bool:
        """Registered with the broker now: a send goes out at once, on this connection."""
        return self._registered.is_set()

    @property
    def silent_s(self) -> float:
        """Seconds since the broker was last heard (or since ``open``), whatever the reconnections."""
        return time.monotonic() - self._heard_at

    def close(self) -> None:
        self._registered.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def send(self, message: Message) -> bool:
        """Send once registered; False (not sent) if the role stops while the session is reconnecting."""
        return await self.send_frames(encode(message))

    async def send_group(self, messages: list[Message]) -> bool:
        """Send ``messages`` together (one ZeroMQ message, or as few as the group limits allow), in order, once
        registered; False (not sent) if the role stops while the session is reconnecting."""
        for frames in encode_group(messages):
            if not await self.send_frames(frames):
                return False
        return True

    async def send_frames(self, frames: list[bytes]) -> bool:
        if not self._registered.is_set():
            waiter = asyncio.ensure_future(self._registered.wait())
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            stop.cancel()
            if not self._registered.is_set():
                return False
        await self._send_now(frames)
        return True

    async def keep_alive(self) -> None:
        """Send a heartbeat if one is due (``receive`` does; a role busy in a long operation between its
        receives calls this, so the broker does not declare it dead)."""
        if self._registered.is_set() and time.monotonic() - self._last_sent >= self.heartbeats.interval_s:
            await self._send_now(encode(Heartbeat()))

    async def send_if_connected(self, message: Message) -> bool:
        """Send now if registered, else drop it (a goodbye is not worth waiting for a reconnection)."""
        if not self._registered.is_set():
            return False
        await self._send_now(encode(message))
        return True

    async def _send_now(self, frames: list[bytes]) -> None:
        """Send on the current connection. A send the connection cannot take (no pipe: the broker refused
        the handshake, or is unreachable) is dropped after SEND_TIMEOUT_MS, never awaited for ever: every
        message that matters is sent again after a reconnection (resends, redeliveries, requeues)."""
        assert self._conn is not None
        try:
            await self._conn.send_frames(frames)
        except zmq.Again:
            if self._healthy or not self._send_refused:
                log.warning("broker_send_timed_out", role=self.role, endpoint=self.endpoint,
                            hint="is the broker up, and are this client's keys admitted (--keys)?")  # fmt: skip
            self._send_refused = True
            self._healthy = False
            return
        self._send_refused = False
        self._last_sent = time.monotonic()

    async def receive(self, timeout_s: float) -> Message | None:
        """The next message for the role, or None after ``timeout_s``. Heartbeats are consumed here,
        heartbeats are sent when due, and a silent or forgetful broker is reconnected to."""
        deadline = time.monotonic() + timeout_s
        while not self._stopping.is_set():
            await self.keep_alive()
            now = time.monotonic()
            wait = min(
                deadline - now,
                self._last_sent + self.heartbeats.interval_s - now,
                self._last_heard + self.heartbeats.dead_after_s - now,
            )
            assert self._conn is not None
            message = await self._conn.receive(timeout_s=max(wait, 0.0))
            if message is None:
                # Only once nothing is waiting to be read: a role busy for a while (a sink publishing a
                # large file) finds the broker's messages queued, not a dead broker.
                silent = time.monotonic() - self._last_heard
                if silent >= self.heartbeats.dead_after_s:
                    await self.reconnect(f"no word from the broker for {silent:.1f} s", wait=True)
                    continue
                if time.monotonic() >= deadline:
                    return None
                continue
            self._last_heard = self._heard_at = time.monotonic()
            if isinstance(message, Refused):
                await self._refused(message)
                continue
            if isinstance(message, Disconnect):
                await self.reconnect(f"the broker asked: {message.reason}", wait=not self._healthy)
                continue
            self._refusals = 0
            self._healthy = True
            self._backoff = self.heartbeats.reconnect_min_s
            if not isinstance(message, Heartbeat):
                return message
        return None

    async def _refused(self, refusal: Refused) -> None:
        """The broker refused our registration: wait until it would declare a silent holder dead (it may
        be our own predecessor, just killed), then try again, a few times; then give up with its reason."""
        self._refusals += 1
        log.error("registration_refused", role=self.role, reason=refusal.reason, attempt=self._refusals)
        if self._refusals >= MAX_REFUSALS:
            self.close()
            raise RegistrationRefused(f"the broker refused this {self.role}: {refusal.reason}")
        delay = max(refusal.retry_after_s, self.heartbeats.dead_after_s + self.heartbeats.interval_s)
        await self.reconnect("registration refused", wait=True, delay=delay)

    async def reconnect(self, reason: str, wait: bool, delay: float | None = None) -> None:
        """Drop the socket, wait the back-off (or ``delay``) if asked, and connect afresh under a new
        identity."""
        self.close()
        if delay is None:
            delay = self._backoff if wait else 0.0
        log.warning("broker_reconnecting", role=self.role, reason=reason, after_s=round(delay, 2))
        if wait:
            self._backoff = min(self._backoff * 2, self.heartbeats.reconnect_max_s)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                pass
        self.reconnects += 1
        if not self._stopping.is_set():
            await self._connect()

    async def _connect(self) -> None:
        self._conn = BrokerConnection.open(self._ctx, self.endpoint, self.role, self.keys)
        self.generation += 1
        self._healthy = False
        self._last_heard = self._last_sent = time.monotonic()  # the new connection gets a full grace period
        await self._register(self)
        self._registered.set()
        log.info("broker_connected", role=self.role, identity=self.identity, generation=self.generation)

    async def send_registration(self, message: Message) -> None:
        """For ``register`` callbacks: send before the session counts as registered."""
        log.debug("registering", role=self.role, kind=kind_of(message))
        await self._send_now(encode(message))

    async def send_frames_registration(self, frames: list[bytes]) -> None:
        """For ``register`` callbacks: send frames already encoded (a resend) before registration ends."""
        await self._send_now(frames)

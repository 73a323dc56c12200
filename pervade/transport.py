"""ZeroMQ sockets set up the way this project needs them, and message send/receive on top.

Pitfalls this module exists to handle once (see docs/architecture.md):
- a ROUTER silently drops messages to unknown peers: ``ROUTER_MANDATORY`` makes that an error we log;
- ``LINGER`` defaults to infinite, so a process with unsent messages would hang at exit: we bound it;
- cancelling a pending async ``recv`` can lose a message (pyzmq #1925): ``receive`` polls with a timeout
  and only then reads without blocking, so nothing is ever cancelled mid-read;
- two peers with one routing id silently lose messages (libzmq #4503): every DEALER gets a fresh identity.

Every socket of the project is built here: the broker's ROUTER and its clients' DEALERs, and a worker's file
service (a ROUTER) and the DEALERs its peers download through. CURVE authentication starts here too.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field

import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.constants import DEFAULT_MAX_MESSAGE_BYTES, SEND_TIMEOUT_MS, SOCKET_LINGER_MS
from pervade.keys import ClientKeys, ServerKeys
from pervade.protocol import Message, decode_group, encode

log = structlog.get_logger(__name__)


def new_identity(role: str) -> str:
    """A routing identity that no earlier incarnation of this peer can have used."""
    return f"{role}-{uuid.uuid4().hex[:12]}"


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable from this host only: tcp on a loopback address, ipc or inproc."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return transport == "tcp" and (host in ("localhost", "::1") or host.startswith("127."))


def router_socket(
    ctx: zmq.asyncio.Context,
    bind: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keys: ServerKeys | None = None,
) -> zmq.asyncio.Socket:
    """The broker's ROUTER, bound to ``bind`` (``tcp://host:*`` picks a free port); a CURVE server when
    ``keys`` are given (the context's authenticator decides whom it admits)."""
    sock = ctx.socket(zmq.ROUTER)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, SOCKET_LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.bind(bind)
    return sock


def dealer_socket(
    ctx: zmq.asyncio.Context, connect: str, identity: str, keys: ClientKeys | None = None
) -> zmq.asyncio.Socket:
    """A DEALER connected to the broker under ``identity``; a CURVE client of it when ``keys`` are given."""
    sock = ctx.socket(zmq.DEALER)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, SOCKET_LINGER_MS)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)  # a send raises zmq.Again rather than wait for ever
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(connect)
    return sock


#: Bytes a file-service request may take: requests are small, anything bigger is not ours.
MAX_FILE_REQUEST_BYTES = 64 * 1024


def start_authenticator(ctx: zmq.asyncio.Context, credentials_provider: object) -> AsyncioAuthenticator:
    """Start CURVE authentication on ``ctx``: every CURVE server socket of the context then admits exactly the
    clients ``credentials_provider`` (``callback(domain, key) -> bool``) accepts. Stop it when the context ends."""
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=credentials_provider)
    return auth


def file_server_socket(
    ctx: zmq.asyncio.Context, bind_host: str, keys: ClientKeys | None, max_pending: int
) -> tuple[zmq.asyncio.Socket, int]:
    """A worker's file service: a ROUTER on a free port of ``bind_host`` (returned with the port), a CURVE
    server with the worker's own key pair when ``keys`` are given. ``max_pending`` bounds the replies a slow
    reader can leave queued."""
    sock = ctx.socket(zmq.ROUTER)
    if keys is not None:
        keys.apply_server(sock)
    sock.setsockopt(zmq.LINGER, SOCKET_LINGER_MS)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FILE_REQUEST_BYTES)
    sock.setsockopt(zmq.SNDHWM, max_pending)
    port = sock.bind_to_random_port(f"tcp://{bind_host}")
    return sock, port


def peer_socket(ctx: zmq.asyncio.Context, endpoint: str, keys: ClientKeys | None) -> zmq.asyncio.Socket:
    """A DEALER to a peer's file service, under a fresh identity; a CURVE client of it when ``keys`` are given.
    No linger: a download given up on must not hold the process at exit. Raises ``zmq.ZMQError`` for an
    endpoint libzmq cannot parse (a peer announced a bad one): the caller treats that as a failed peer."""
    sock = ctx.socket(zmq.DEALER)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, new_identity("fetch").encode())
    sock.connect(endpoint)
    return sock


@dataclass
class BrokerConnection:
    """A DEALER's conversation with the broker: send messages, receive validated messages (a group from the
    broker is handed out one message at a time, in order)."""

    socket: zmq.asyncio.Socket
    identity: str
    #: Messages of a group already read and not yet handed out.
    pending: deque[Message] = field(default_factory=deque)

    @classmethod
    def open(
        cls, ctx: zmq.asyncio.Context, endpoint: str, role: str, keys: ClientKeys | None = None
    ) -> BrokerConnection:
        identity = new_identity(role)
        return cls(dealer_socket(ctx, endpoint, identity, keys), identity)

    async def send(self, message: Message) -> None:
        await self.send_frames(encode(message))

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send frames already built by ``encode`` or ``group_frames`` (a caller that checked them first need
        not encode twice)."""
        await self.socket.send_multipart(frames)

    async def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next valid message, or None when ``timeout_s`` passes first. Invalid frames are logged
        and skipped: a broken message from the broker must not kill a client either."""
        timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
        while not self.pending:
            if not await self.socket.poll(timeout_ms, zmq.POLLIN):
                return None
            messages, errors = decode_group(await self.socket.recv_multipart(zmq.NOBLOCK))
            for error in errors:
                log.error("dropped_invalid_message", error=error)
            self.pending.extend(messages)
        return self.pending.popleft()

    def close(self) -> None:
        self.socket.close()

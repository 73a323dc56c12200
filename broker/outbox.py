"""The outbox: every message the broker sends goes through here, and none leaves before the state it
describes is committed.

Verbs ``post`` messages during a turn of the loop; ``flush``, once per turn, commits the store and only
then sends them. So every reply a peer sees (Accepted, Assign, Deliver, JobDone) describes state already
on disk, and a broker killed at any moment restarts without contradicting what its peers were told.

The outbox does not know the socket: it sends through a ``Send`` callable (``socket_sender`` on the
broker's ROUTER socket, the one place that builds envelopes; a list in tests).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import structlog
import zmq
import zmq.asyncio

from pervade.broker.state import BrokerState
from pervade.protocol import MAX_ACCEPTED_MORE, Accepted, Message, encode_group, message_count

log = structlog.get_logger("broker")

#: Sends the frames of one ZeroMQ message (a group: header and bodies) to one peer now; False when the peer
#: is gone or not keeping up.
Send = Callable[[bytes, list[bytes]], bool]


class Outbox:
    """Messages queued during a turn, sent after the commit."""

    def __init__(self, state: BrokerState, send: Send) -> None:
        self._state = state
        self._send = send
        self._queued: deque[tuple[bytes, Message, Callable[[], None] | None]] = deque()
        self._saved_counters: dict[str, int] = {}
        #: The last message queued for each peer this turn.
        self._last: dict[bytes, Message] = {}

    def post(self, identity: bytes, message: Message, on_fail: Callable[[], None] | None = None) -> None:
        """Queue a message; ``flush`` sends it once the state it describes is committed. ``on_fail`` runs
        if the peer turns out to be gone or not keeping up. A new batch's ``Accepted`` right after another
        for the same peer joins it (``more``): one message for a turn's acceptances, where one each cost the
        broker and the producer more than the rest of a one-claim batch's submission."""
        last = self._last.get(identity)
        if (
            type(message) is Accepted
            and type(last) is Accepted
            and not message.duplicate
            and not message.more
            and not last.duplicate
            and len(last.more) < MAX_ACCEPTED_MORE
        ):
            last.more.append(message.batch_id)  # the queued message's own list: not sent before the flush
            return
        self._last[identity] = message
        self._queued.append((identity, message, on_fail))

    @property
    def queued(self) -> list[tuple[bytes, Message]]:
        """What the next ``flush`` will send, in order."""
        return [(identity, message) for identity, message, _ in self._queued]

    def flush(self) -> None:
        """Commit the store, then send what this turn queued (so no peer hears of uncommitted state): each
        peer's messages of the turn travel together, in order, as few ZeroMQ messages as the group limits
        allow. No timer holds anything back: a turn ends when nothing more is waiting to be read."""
        store, counters = self._state.store, self._state.counters
        if counters != self._saved_counters:
            store.save_meta("counters", counters)
            self._saved_counters = dict(counters)
        store.commit()
        self._last.clear()
        per_peer: dict[bytes, list[tuple[Message, Callable[[], None] | None]]] = {}
        while self._queued:
            identity, message, on_fail = self._queued.popleft()
            per_peer.setdefault(identity, []).append((message, on_fail))
        for identity, posted in per_peer.items():
            start = 0
            for frames in encode_group([message for message, _ in posted]):
                end = start + message_count(frames)
                if not self._send(identity, frames):
                    for _, on_fail in posted[start:end]:
                        if on_fail is not None:
                            on_fail()
                start = end
        store.commit()  # what failed sends undid


def socket_sender(sock: zmq.asyncio.Socket) -> Send:
    """Send on the broker's ROUTER socket without blocking; a peer gone or not keeping up is logged and
    reported (False), never raised. Sends go through a plain (synchronous) socket sharing the ROUTER: a
    non-blocking send needs no future, and the asyncio socket's per-send bookkeeping was a third of the
    broker's time at batch size 1."""
    plain = zmq.Socket.shadow(sock.underlying)
    # Flags as plain ints: send_multipart combines enum flags for every frame, a third of its cost.
    more, last = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)

    def send(identity: bytes, frames: list[bytes]) -> bool:
        try:
            plain.send(identity, more)  # a ROUTER queues a message whole or not at all: the first frame decides
            for frame in frames[:-1]:
                plain.send(frame, more)
            plain.send(frames[-1], last)
        except zmq.ZMQError as error:
            log.warning("send_failed", peer=identity.decode(errors="replace"), messages=message_count(frames),
                        error=str(error))  # fmt: skip
            return False
        return True

    return send

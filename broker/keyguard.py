"""Who sent each message, by the CURVE key of its connection; and a revoked key cut off at once.

ZeroMQ's authentication (ZAP) labels every message of a CURVE connection with the client's public key, its
``User-Id``. ``KeyGuard.sender`` looks that key up in the admitted keys (``pervade/keyring.py``) for every
message: a key that is not admitted (any more) gets nothing acted on. The admission itself happens once, at
the handshake; so a key removed from ``authorized/`` would keep the connections it already holds. The guard
re-reads the directory every ``WATCH_INTERVAL_S`` on a thread (``step``), and for every key that went:

- the broker drops the peers registered with it (``Liveness.drop_peers_of``: a worker's batches requeued);
- ``cut`` shuts down the TCP connections that key's messages came in on. libzmq has no call to close one
  peer's connection, but it reports the file descriptor a message was read from (``ZMQ_SRCFD``); shutting
  that socket down makes libzmq's I/O thread see the connection end and close it. The client reconnects, and
  its handshake is refused. A descriptor is noted with its socket's inode, which no other open socket has,
  and only shut down while it still leads to that socket: a number reused by a later connection (another
  key's, or the same key's after a reconnection, re-noted by its next message) is never mistaken for it.

Each reading also tells whether the admitted worker keys changed: the workers' file services admit the worker
keys the broker vouches for (``PeerKeys``), so a node holding only its own key pair serves its peers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog
import zmq

from pervade.keyring import KeyHolder, KeyListing, KeyRing, Role

log = structlog.get_logger("broker")

#: Seconds between readings of ``authorized/``: a revoked key is cut off within about this, plus a read.
WATCH_INTERVAL_S = 0.5


def socket_inode(fd: int) -> int | None:
    """The inode of the socket open as ``fd`` (None when ``fd`` is not an open socket): unique among open
    sockets, so it tells a connection from a later one under the same descriptor number."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return status.st_ino if stat.S_ISSOCK(status.st_mode) else None


@dataclass(frozen=True)
class KeyChanges:
    """What one reading of ``authorized/`` changed."""

    #: Keys no longer admitted as they were (removed, or moved to another role or name).
    revoked: list[KeyHolder] = field(default_factory=list)
    #: The admitted worker keys, when they changed (None when they did not).
    worker_keys: frozenset[str] | None = None


class KeyGuard:
    def __init__(self, ring: KeyRing, counters: Counter[str]) -> None:
        self.ring = ring
        self.counters = counters
        #: The admitted keys as of the last ``step`` that compared readings.
        self._known: Mapping[str, KeyHolder] = ring.listing.holders
        self._worker_keys: frozenset[str] = frozenset()
        self._problems: frozenset[str] = frozenset()
        #: Descriptor a key's messages came in on -> (that key, its socket's inode).
        self._connections: dict[int, tuple[str, int]] = {}
        #: Keys whose refused messages were logged (each is logged once, counted always).
        self._logged: set[str] = set()
        self._reading: asyncio.Future[KeyListing] | None = None
        self._next_read = 0.0

    def sender(self, frame: zmq.Frame) -> KeyHolder | None:
        """Who sent the message ``frame`` is part of, or None when its key is not admitted now (counted and
        logged; the caller drops the message unread)."""
        try:
            public = frame.get("User-Id")
        except zmq.ZMQError:  # no User-Id: not a CURVE connection (cannot happen on a keyed socket)
            public = ""
        holder = self.ring.holder(public)
        if holder is None:
            self.counters["unadmitted_messages"] += 1
            if public not in self._logged:
                self._logged.add(public)
                log.warning("unadmitted_key_message_dropped", public_key=public[:8])
            return None
        self._note_connection(frame, public)
        return holder

    def _note_connection(self, frame: zmq.Frame, public: str) -> None:
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:  # libzmq built without it: revocation still drops every message, without a cut
            return
        inode = socket_inode(fd)  # one fstat a message: a reconnection may reuse the descriptor number
        if inode is not None:
            self._connections[fd] = (public, inode)

    def cut(self, public: str) -> int:
        """Shut down every connection ``public``'s messages came in on; how many were cut."""
        cut = 0
        for fd, (key, inode) in list(self._connections.items()):
            if key != public:
                continue
            del self._connections[fd]
            if socket_inode(fd) != inode:
                continue  # closed already, and the number perhaps reused: not this key's connection
            try:
                with socket.socket(fileno=os.dup(fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
                cut += 1
            except OSError:
                continue
        return cut

    def step(self, now: float) -> KeyChanges:
        """Start a reading of ``authorized/`` when one is due (on a thread); when one has finished, what it
        changed."""
        changes = KeyChanges()
        reading = self._reading
        if reading is not None and reading.done():
            self._reading = None
            if reading.exception() is not None:
                log.error("authorized_keys_unreadable", error=str(reading.exception()))
            else:
                changes = self._compare(reading.result())
        if self._reading is None and now >= self._next_read:
            self._reading = asyncio.ensure_future(asyncio.to_thread(self.ring.refresh))
            self._next_read = now + WATCH_INTERVAL_S
        return changes

    def _compare(self, listing: KeyListing) -> KeyChanges:
        revoked = [holder for public, holder in self._known.items() if listing.holders.get(public) != holder]
        self._known = listing.holders
        for problem in sorted(set(listing.problems) - self._problems):
            log.error("authorized_key_refused", problem=problem)
        self._problems = frozenset(listing.problems)
        worker_keys = listing.of_role(Role.WORKER)
        changed = worker_keys != self._worker_keys
        self._worker_keys = worker_keys
        return KeyChanges(revoked=revoked, worker_keys=worker_keys if changed else None)

    async def finish(self) -> None:
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

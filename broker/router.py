"""The router: decode an envelope, admit its peer, run the verb its message names.

On a broker with keys, every message comes with the key that sent it (``pervade/keyring.py``; the server
learns it from the connection's CURVE authentication): a message outside that key's role (``pervade/roles.py``)
is refused before anything acts on it, registrations included. Then admission notes the peer alive, refuses a
message its registered role may not send, tells a peer the broker does not know to register again
(``Disconnect``), and refuses a worker or sink registering under a name another live process holds. No
message, however malformed, escapes ``handle``: bad input is logged, counted and answered with an ``Error``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from pervade.broker.constants import REGISTER_AGAIN
from pervade.broker.outbox import Outbox
from pervade.broker.records import PeerRecord
from pervade.broker.results import Results
from pervade.broker.state import BrokerState
from pervade.errors import ProtocolError
from pervade.keyring import KeyHolder, Role
from pervade.protocol import (
    Completed,
    Disconnect,
    Error,
    Heartbeat,
    Message,
    ProgressReply,
    ProgressRequest,
    Refused,
    SinkReady,
    StatusReply,
    StatusRequest,
    WorkerReady,
    bodies,
    completed_batch_id,
    decode_body,
    kind_of,
)
from pervade.roles import may_send, registered_only

log = structlog.get_logger("broker")

#: A verb: runs one message from one peer (its routing identity).
Verb = Callable[[bytes, Any], None]


class Router:
    def __init__(
        self, state: BrokerState, outbox: Outbox, results: Results, verbs: Mapping[type[Message], Verb], endpoint: str
    ) -> None:
        self.state = state
        self.outbox = outbox
        self.results = results
        self.endpoint = endpoint
        self._verbs: dict[type[Message], Verb] = {
            **verbs, StatusRequest: self.on_status_request, ProgressRequest: self.on_progress_request,
            Heartbeat: self.on_heartbeat, Error: self.on_error,
        }  # fmt: skip
        #: Messages only a peer registered in that role may send (``pervade/roles.py``); others may come from
        #: anyone (a registration, or a fact worth keeping from a peer the broker has forgotten).
        registered: dict[Role, Mapping[bytes, PeerRecord]] = {
            Role.WORKER: state.workers, Role.PRODUCER: state.producers, Role.SINK: state.sinks,
        }  # fmt: skip
        self._role_of: dict[type[Message], Mapping[bytes, PeerRecord]] = {
            kind: peers for role, peers in registered.items() for kind in registered_only(role)
        }
        #: (key, kind) refusals already logged: a hostile client repeating one is counted, not logged again.
        self._refusals_logged: set[tuple[str, str]] = set()

    def handle(self, frames: list[bytes], sender: KeyHolder | None = None) -> int:
        """Decode one envelope, a group of messages, and run each one's verb in order, as ``sender`` (the key
        that sent it; None on a broker without keys). Bad input is logged and answered, never raised: a
        message that does not decode is refused alone, the rest of its group still runs. Returns what the
        envelope counts towards ``RECEIVE_PER_TURN``: its messages, and at least its frames."""
        counters = self.state.counters
        if len(frames) < 2:
            counters["invalid_messages"] += 1
            log.warning("dropped_invalid_envelope", frames=len(frames))
            return 1
        identity = frames[0]
        read = max(1, len(frames) - 2)  # every frame counts towards a turn's reads, even one that holds nothing
        try:
            group = bodies(frames[1:])
        except ProtocolError as exc:
            counters["invalid_messages"] += 1
            log.warning("rejected_message", peer=identity.decode(errors="replace"), error=str(exc))
            self.outbox.post(identity, Error(reason=str(exc)))
            return read
        except Exception as exc:  # a bug must cost one envelope, not the broker
            counters["invalid_messages"] += 1
            log.exception("envelope_unreadable", peer=identity.decode(errors="replace"))
            self.outbox.post(identity, Error(reason="internal broker error", detail=repr(exc)))
            return read
        for body in group:
            self.handle_body(identity, body, sender)
        return max(read, len(group))

    def handle_body(self, identity: bytes, body: bytes, sender: KeyHolder | None) -> None:
        """Decode one message of a group and run its verb."""
        counters = self.state.counters
        try:
            message = self.decode(identity, body, sender)
            verb = self._verbs.get(type(message))
            if verb is None:
                raise ProtocolError(f"a broker does not accept {kind_of(message)!r} messages")
            if sender is not None and not may_send(sender.role, type(message)):
                self.refuse_outside_role(identity, sender, message)
                return
            if not self.admit(identity, message, sender):
                return
            self.state.sender = sender
            try:
                verb(identity, message)
            finally:
                self.state.sender = None
        except ProtocolError as exc:
            counters["invalid_messages"] += 1
            log.warning("rejected_message", peer=identity.decode(errors="replace"), error=str(exc))
            self.outbox.post(identity, Error(reason=str(exc)))
        except Exception as exc:  # a bug must cost one message, not the broker
            counters["invalid_messages"] += 1
            log.exception("handler_failed", peer=identity.decode(errors="replace"))
            self.outbox.post(identity, Error(reason="internal broker error", detail=repr(exc)))

    def decode(self, identity: bytes, body: bytes, sender: KeyHolder | None) -> Message:
        """The message, or ProtocolError. A result that does not decode still names its batch: the batch is
        refused (requeued) rather than left assigned to a worker that believes it answered (only when a
        worker key sent it: no other key's garbage acts on a batch)."""
        try:
            return decode_body(body)
        except ProtocolError as exc:
            batch_id = completed_batch_id(body)
            if batch_id is None or sender is not None and not may_send(sender.role, Completed):
                raise
            self.results.refuse(identity, batch_id, str(exc))
            raise ProtocolError(f"the result of batch {batch_id!r} was refused: {exc}") from None

    def refuse_outside_role(self, identity: bytes, key: KeyHolder, message: Message) -> None:
        """A message the sending key's role may not send: nothing acts on it; the sender is told, and the
        operator reads which key tried (logged once per key and kind, counted every time)."""
        kind = kind_of(message)
        self.state.counters["role_refusals"] += 1
        if (key.public, kind) not in self._refusals_logged:
            self._refusals_logged.add((key.public, kind))
            log.error("message_outside_role", key=str(key), kind=kind, peer=identity.decode(errors="replace"))
        self.outbox.post(identity, Error(reason=f"the {key.role} key {key.name!r} may not send {kind!r}"))

    def admit(self, identity: bytes, message: Message, sender: KeyHolder | None = None) -> bool:
        """Note that the peer is alive; refuse a message its role may not send, one under a peer's identity
        from another key than the one it registered with, a registration under a name another live process
        holds, and tell a peer the broker does not know to register again."""
        peer = self.state.peer(identity)
        if peer is not None and peer.key is not None and sender is not None and sender.public != peer.key.public:
            # An identity is unique among live connections, but a record outlives its connection until the
            # liveness runs out: another key taking the identity then must not beat, leave or act for it.
            raise ProtocolError(f"this identity is registered under another key than {sender}'s")
        if peer is not None:
            peer.last_seen = time.monotonic()
        if isinstance(message, WorkerReady):
            workers = self.state.workers
            return not self.refuse_if_name_taken(
                identity, message.worker_id, message.instance, sender, workers, "worker"
            )
        if isinstance(message, SinkReady):
            sinks = self.state.sinks
            return not self.refuse_if_name_taken(identity, message.sink_id, message.instance, sender, sinks, "sink")
        role = self._role_of.get(type(message))
        if role is None and not isinstance(message, Heartbeat):
            return True
        if role is not None and identity in role or role is None and peer is not None:
            return True
        if peer is not None:
            raise ProtocolError(f"a peer registered as {type(peer).__name__} cannot send {kind_of(message)!r}")
        self.state.counters["unknown_peer_messages"] += 1
        log.debug("unknown_peer", peer=identity.decode(errors="replace"), kind=kind_of(message))
        self.outbox.post(identity, Disconnect(reason=REGISTER_AGAIN))
        return False

    def refuse_if_name_taken(
        self,
        identity: bytes,
        name: str,
        instance: str,
        key: KeyHolder | None,
        peers: Mapping[bytes, PeerRecord],
        role: str,
    ) -> bool:
        """Refuse a registration under a name a live peer of another process holds. A holder silent for
        longer than the liveness is dying (its registration goes), and the same process on a new connection
        (same ``instance``) replaces its own record. Names are a key's own: a peer of another key never
        holds, takes or replaces one (status tells them apart by key)."""
        now = time.monotonic()
        holder = next((p for p in peers.values() if p.name == name and p.key == key and p.identity != identity), None)
        if holder is None or not instance or holder.instance in ("", instance):
            return False
        beats = self.state.config.heartbeats
        if now - holder.last_seen > beats.dead_after_s:
            return False
        self.state.counters["registrations_refused"] += 1
        log.error(f"{role}_name_in_use", name=name, holder=holder.identity.decode(errors="replace"))
        retry_after = max(0.0, holder.last_seen + beats.dead_after_s - now) + beats.interval_s
        reason = (
            f"{role} id {name!r} is in use by another live {role}; give this one another --{role}-id, or stop the other"
        )
        self.outbox.post(identity, Refused(reason=reason, retry_after_s=min(retry_after, 3600.0)))
        return True

    # --- verbs any peer may send -----------------------------------------------------------------

    def on_status_request(self, identity: bytes, message: StatusRequest) -> None:
        """Anyone past the socket's authentication may read the run's status; no registration needed."""
        self.state.counters["status_requests"] += 1
        self.outbox.post(identity, StatusReply(snapshot=self.state.snapshot(self.endpoint)))

    def on_progress_request(self, identity: bytes, message: ProgressRequest) -> None:
        """The jobs' progress alone (a sink's bar), read like the status: no registration needed."""
        self.state.counters["progress_requests"] += 1
        self.outbox.post(identity, ProgressReply(progress=self.state.progress()))

    def on_heartbeat(self, identity: bytes, message: Heartbeat) -> None:
        pass  # ``admit`` noted the peer alive

    def on_error(self, identity: bytes, message: Error) -> None:
        log.warning("peer_reported_error", peer=identity.decode(errors="replace"), reason=message.reason)

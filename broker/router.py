"""The router: decode an envelope, admit its peer, run the verb its message names.

Admission notes the peer alive, refuses a message its role may not send, tells a peer the broker does not
know to register again (``Disconnect``), and refuses a worker or sink registering under a name another live
process holds. No message, however malformed, escapes ``handle``: bad input is logged, counted and
answered with an ``Error``.
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
from pervade.protocol import (
    AbortJob,
    BatchFailed,
    ContextFailed,
    ContextLoaded,
    DeclareContext,
    Disconnect,
    EndJob,
    Error,
    FilesDropped,
    FilesHeld,
    FindSources,
    Heartbeat,
    Message,
    Pull,
    Refused,
    Release,
    SinkReady,
    StatusReply,
    StatusRequest,
    Submit,
    WorkerReady,
    completed_batch_id,
    decode,
    kind_of,
)

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
            **verbs, StatusRequest: self.on_status_request, Heartbeat: self.on_heartbeat, Error: self.on_error,
        }  # fmt: skip
        #: Messages only a peer registered in that role may send; others may come from anyone (a
        #: registration, or a fact worth keeping from a peer the broker has forgotten: a result, an ack).
        self._role_of: dict[type[Message], Mapping[bytes, PeerRecord]] = {
            Submit: state.producers, EndJob: state.producers, AbortJob: state.producers,
            DeclareContext: state.producers,
            Pull: state.workers, ContextLoaded: state.workers, ContextFailed: state.workers,
            BatchFailed: state.workers, Release: state.workers,
            FindSources: state.workers, FilesHeld: state.workers, FilesDropped: state.workers,
        }  # fmt: skip

    def handle(self, frames: list[bytes]) -> None:
        """Decode one envelope and run its verb. Bad input is logged and answered, never raised."""
        counters = self.state.counters
        if len(frames) < 2:
            counters["invalid_messages"] += 1
            log.warning("dropped_invalid_envelope", frames=len(frames))
            return
        identity, body = frames[0], frames[1:]
        try:
            message = self.decode(identity, body)
            verb = self._verbs.get(type(message))
            if verb is None:
                raise ProtocolError(f"a broker does not accept {kind_of(message)!r} messages")
            if not self.admit(identity, message):
                return
            verb(identity, message)
        except ProtocolError as exc:
            counters["invalid_messages"] += 1
            log.warning("rejected_message", peer=identity.decode(errors="replace"), error=str(exc))
            self.outbox.post(identity, Error(reason=str(exc)))
        except Exception as exc:  # a bug must cost one message, not the broker
            counters["invalid_messages"] += 1
            log.exception("handler_failed", peer=identity.decode(errors="replace"))
            self.outbox.post(identity, Error(reason="internal broker error", detail=repr(exc)))

    def decode(self, identity: bytes, body: list[bytes]) -> Message:
        """The message, or ProtocolError. A result that does not decode still names its batch: the batch is
        refused (requeued) rather than left assigned to a worker that believes it answered."""
        try:
            return decode(body)
        except ProtocolError as exc:
            batch_id = completed_batch_id(body)
            if batch_id is None:
                raise
            self.results.refuse(identity, batch_id, str(exc))
            raise ProtocolError(f"the result of batch {batch_id!r} was refused: {exc}") from None

    def admit(self, identity: bytes, message: Message) -> bool:
        """Note that the peer is alive; refuse a message its role may not send, a registration under a name
        another live process holds, and tell a peer the broker does not know to register again."""
        peer = self.state.peer(identity)
        if peer is not None:
            peer.last_seen = time.monotonic()
        if isinstance(message, WorkerReady):
            workers = self.state.workers
            return not self.refuse_if_name_taken(identity, message.worker_id, message.instance, workers, "worker")
        if isinstance(message, SinkReady):
            return not self.refuse_if_name_taken(identity, message.sink_id, message.instance, self.state.sinks, "sink")
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
        self, identity: bytes, name: str, instance: str, peers: Mapping[bytes, PeerRecord], role: str
    ) -> bool:
        """Refuse a registration under a name a live peer of another process holds. A holder silent for
        longer than the liveness is dying (its registration goes), and the same process on a new connection
        (same ``instance``) replaces its own record."""
        now = time.monotonic()
        holder = next((p for p in peers.values() if p.name == name and p.identity != identity), None)
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

    def on_heartbeat(self, identity: bytes, message: Heartbeat) -> None:
        pass  # ``admit`` noted the peer alive

    def on_error(self, identity: bytes, message: Error) -> None:
        log.warning("peer_reported_error", peer=identity.decode(errors="replace"), reason=message.reason)

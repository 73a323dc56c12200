"""The messages each client role may send the broker: the broker refuses the rest, by the key that sent them.

A key's role is where the operator listed it (``pervade/keyring.py``); this table is what the role allows.
Reading the run's status is open to every role (a sink's progress bar, a producer waiting for its job);
a monitor key can do nothing else. docs/protocol.md has the same table by message, docs/security.md why.
"""

from __future__ import annotations

from collections.abc import Mapping

from pervade.keyring import Role
from pervade.protocol import (
    AbortJob,
    BatchFailed,
    Completed,
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
    ProducerReady,
    ProgressRequest,
    Pull,
    Release,
    SinkAck,
    SinkReady,
    StatusRequest,
    Submit,
    WorkerReady,
)

#: What any registered client sends besides its role's own verbs: liveness, goodbye, a report of a bad
#: message, and the status and progress views.
_ANY_CLIENT: frozenset[type[Message]] = frozenset({Heartbeat, Disconnect, Error, StatusRequest, ProgressRequest})

SENDS: Mapping[Role, frozenset[type[Message]]] = {
    Role.WORKER: _ANY_CLIENT | {
        WorkerReady, Pull, ContextLoaded, ContextFailed, Completed, BatchFailed, Release,
        FindSources, FilesHeld, FilesDropped,
    },
    Role.PRODUCER: _ANY_CLIENT | {ProducerReady, Submit, DeclareContext, EndJob, AbortJob},
    Role.SINK: _ANY_CLIENT | {SinkReady, SinkAck},
    Role.MONITOR: frozenset({StatusRequest, ProgressRequest}),
}  # fmt: skip


#: The message each role registers with.
REGISTRATIONS: Mapping[Role, type[Message]] = {
    Role.WORKER: WorkerReady, Role.PRODUCER: ProducerReady, Role.SINK: SinkReady,
}  # fmt: skip
#: Facts the broker keeps whoever sends them, even a peer it has forgotten (it restarted, or declared the
#: peer dead): a result, and an acknowledgement that rows are written.
KEPT_FROM_ANYONE: frozenset[type[Message]] = frozenset({Completed, SinkAck})


def may_send(role: Role, kind: type[Message]) -> bool:
    """Whether a key of ``role`` may send a message of type ``kind`` to the broker."""
    return kind in SENDS[role]


def registered_only(role: Role) -> frozenset[type[Message]]:
    """What only a peer registered in ``role`` may send: the role's own verbs, less its registration and the
    facts kept from anyone."""
    return SENDS[role] - _ANY_CLIENT - {REGISTRATIONS[role]} - KEPT_FROM_ANYONE

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
    Pull,
    Release,
    SinkAck,
    SinkReady,
    StatusRequest,
    Submit,
    WorkerReady,
)

#: What any registered client sends besides its role's own verbs: liveness, goodbye, a report of a bad
#: message, and the status view.
_ANY_CLIENT: frozenset[type[Message]] = frozenset({Heartbeat, Disconnect, Error, StatusRequest})

SENDS: Mapping[Role, frozenset[type[Message]]] = {
    Role.WORKER: _ANY_CLIENT | {
        WorkerReady, Pull, ContextLoaded, ContextFailed, Completed, BatchFailed, Release,
        FindSources, FilesHeld, FilesDropped,
    },
    Role.PRODUCER: _ANY_CLIENT | {ProducerReady, Submit, DeclareContext, EndJob, AbortJob},
    Role.SINK: _ANY_CLIENT | {SinkReady, SinkAck},
    Role.MONITOR: frozenset({StatusRequest}),
}  # fmt: skip


def may_send(role: Role, kind: type[Message]) -> bool:
    """Whether a key of ``role`` may send a message of type ``kind`` to the broker."""
    return kind in SENDS[role]

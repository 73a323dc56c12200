"""Bad input never takes a component down: a live broker fuzzed with thousands of frames, then a real job.

The broker is a real process (``python -m pervade broker``) with a 64 KiB message limit. Hypothesis drives
plain synchronous DEALER sockets, one per identity, that throw at it: random frames; the right header
followed by random bytes; msgpack maps of every real message ``kind`` with random fields; valid messages
mutated, truncated or with a byte flipped; wrong protocol versions; extra frames; valid messages built from
random field values (so the fuzz reaches the handlers, not only the decoder: fake producers submit batches,
fake workers register and take batches they never answer, fake sinks take deliveries they never
acknowledge, results arrive for batches just submitted); and, now and then, a frame larger than the limit
(libzmq then cuts that peer off, and its DEALER reconnects by itself). Replies are drained and ignored.

Then the broker must still be running, and a normal job (a worker, a sink and a producer, all real processes)
must complete with exactly one row per (claim, template), each with the verdict a plain reference loop
computes. The broker's JSON log must show that the fuzz reached it, and that no exception ever escaped a
handler (``handler_failed``).

Every process uses short heartbeats, so the fake peers the fuzz registered are declared dead (and what they
held requeued) within a second of the fuzz ending. The batches the fuzz submitted name models at absolute
paths that do not exist: the real worker, told to load one, fails at once (a hub id would be retried over
the network for a minute), and the broker fails those batches and moves on to the real job.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from zmq.utils.monitor import recv_monitor_message

from pervade.constants import LABELS, PROTOCOL_HEADER
from pervade.context import DTYPES, ContextSpec
from pervade.errors import ProtocolError
from pervade.jobs.local import ProcessGroup, read_events, wait_for_endpoint
from pervade.keyring import Role
from pervade.keys import ClientKeys, init_keys
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.producer.templates import dump_templates, load_templates
from pervade.protocol import (
    ALL_MESSAGES,
    MIN_MESSAGE_BYTES,
    Accepted,
    Assign,
    Batch,
    BatchFailed,
    BatchResult,
    Claim,
    Completed,
    ContextFailed,
    ContextLoaded,
    Deliver,
    DeliverFailure,
    DeviceInfo,
    Disconnect,
    EndJob,
    Error,
    Heartbeat,
    JobDone,
    LoadContext,
    Message,
    ProducerReady,
    Pull,
    Rejected,
    Release,
    RollNow,
    SinkAck,
    SinkReady,
    Submit,
    Verdict,
    WorkerReady,
    bodies,
    decode_body,
    encode,
)
from pervade.roles import SENDS
from pervade.sinks.failures import read_failures
from pervade.sinks.summary import read_verdicts
from tests.reference import reference_verdicts

#: The broker's frame limit: the smallest it accepts, so that oversized frames are cheap to send.
MAX_MESSAGE_BYTES = MIN_MESSAGE_BYTES
#: Every process beats every 0.2 s and is declared dead after 3 missed beats.
HEARTBEATS = ("--heartbeat-interval", "0.2", "--heartbeat-liveness", "3")
#: Hypothesis examples; each sends a few frames (several thousand in all).
EXAMPLES = 2000
#: Every this many examples, one oversized frame.
OVERSIZE_EVERY = 50
#: A send blocking this long means the broker stopped reading: the test fails rather than hangs.
SEND_TIMEOUT_MS = 10_000
#: Probes a peer sends, a second apart, before concluding the broker stopped answering (``FuzzPeers.barrier``).
BARRIER_ATTEMPTS = 30
#: The normal job run after the fuzz.
CLAIMS = 60
TEMPLATES = ("direct", "chat_yes_no_calibrated")
JOB_TIMEOUT_S = 120

#: The fuzz's DEALER identities (one not UTF-8, as a broker may meet any bytes) ...
IDENTITIES = (b"fuzz-peer-0", b"fuzz-peer-1", b"fuzz-peer-2", b"fuzz-peer-3", b"\xfe\xff-fuzz-peer-4")
#: ... and the one that sends the oversized frames (so no other peer loses frames to its disconnections).
OVERSIZED_IDENTITY = b"fuzz-oversized"

#: Models the fuzz's batches name: absolute paths that do not exist, so a worker fails to load them at once.
FUZZ_MODELS = ("/nonexistent/pervade-fuzz/model-a", "/nonexistent/pervade-fuzz/model-b")
FUZZ_REVISIONS = (None, "main")
FUZZ_DTYPES = (*DTYPES, "int3")
FUZZ_CONTEXT_IDS = tuple(
    ContextSpec(model=m, revision=r, dtype=d).context_id
    for m in FUZZ_MODELS
    for r in FUZZ_REVISIONS
    for d in FUZZ_DTYPES
)
KINDS = tuple(cls.__struct_config__.tag for cls in ALL_MESSAGES)
#: Every field name of every message and nested structure, so random maps hit the real fields.
FIELDS = tuple(
    sorted(
        {name for cls in ALL_MESSAGES for name in cls.__struct_fields__}
        | {
            name
            for cls in (Batch, Claim, BatchResult, Verdict, DeviceInfo, ContextSpec)
            for name in cls.__struct_fields__
        }
    )
)


# --- strategies: values ---------------------------------------------------------------------------


def names(prefix: str, pool: int, valid: bool = False) -> SearchStrategy[str]:
    """Ids: mostly a few shared names, so that messages refer to each other (a result to a batch just
    submitted, an ack to a delivery, a worker registering again); sometimes new ones; unless ``valid``,
    sometimes any text, which may be empty or too long and is then refused by the decoder."""
    shared = st.sampled_from([f"{prefix}-{i}" for i in range(pool)])
    fresh = st.text(max_size=12).map(lambda s: f"{prefix}-{s}")
    return shared | fresh if valid else st.one_of(shared, fresh, st.text(max_size=300))


#: Integers msgpack can hold.
msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
#: Any msgpack value: scalars of every type (ext types too), nested in lists and maps.
msgpack_values: SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        msgpack_ints,
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=20),
        st.sampled_from(KINDS),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=12)),
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8) | msgpack_ints, inner, max_size=4)
    ),
    max_leaves=12,
)

#: msgpack encodings no ``packb`` produces: timestamps (ext -1) valid and not, a reserved byte, and
#: containers and strings announcing 4 GiB that never come (a decoder must not trust such lengths).
RAW_MSGPACK = (
    b"\xd6\xff\x00\x00\x00\x00",
    b"\xd7\xff" + b"\xff" * 8,
    b"\xc7\x03\xff\x01\x02\x03",
    b"\xc1",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
)

timestamps = st.floats(min_value=0) | st.floats()  # non-negative (up to infinity), or any float at all
labels = st.sampled_from(LABELS) | st.text(max_size=70)
contexts = st.builds(
    ContextSpec,
    model=st.sampled_from(FUZZ_MODELS),
    revision=st.sampled_from(FUZZ_REVISIONS),
    dtype=st.sampled_from(FUZZ_DTYPES),
)
context_ids = st.sampled_from(FUZZ_CONTEXT_IDS) | names("ctx", 2)
claims = st.builds(Claim, claim_id=names("claim", 6), text=st.text(min_size=1, max_size=40), gold_label=st.none() | labels)
batches = st.builds(
    Batch,
    batch_id=names("batch", 12),
    job_id=names("job", 3),
    context=contexts,
    template_id=names("template", 3),
    template=st.text(max_size=40),
    claims=st.lists(claims, max_size=4),
    submitted_at=timestamps,
)
score_lists = st.lists(st.floats(), min_size=len(LABELS), max_size=len(LABELS)) | st.lists(st.floats(), max_size=5)
verdicts = st.builds(
    Verdict, claim_id=names("claim", 6), verdict=labels, scores=score_lists, gold_label=st.none() | labels
)
results = st.builds(
    BatchResult,
    batch_id=names("batch", 12),
    job_id=names("job", 3),
    context_id=context_ids,
    model=st.sampled_from(FUZZ_MODELS) | st.text(max_size=20),
    template_id=names("template", 3),
    worker_id=names("worker", 3),
    device=st.text(max_size=12),
    submitted_at=timestamps,
    started_at=timestamps,
    finished_at=timestamps,
    verdicts=st.lists(verdicts, max_size=4),
)
devices = st.builds(
    DeviceInfo,
    kind=st.sampled_from(["cpu", "cuda"]) | st.text(max_size=8),
    name=st.text(max_size=16),
    memory_bytes=msgpack_ints,
    compute_capability=st.none() | st.text(max_size=8),
)


# --- strategies: messages -------------------------------------------------------------------------

#: Messages a broker accepts, built from random field values (sometimes out of the protocol's bounds).
accepted_messages: SearchStrategy[Message] = st.one_of(
    st.builds(ProducerReady, producer_id=names("producer", 3)),
    st.builds(Submit, batch=batches),
    st.builds(EndJob, job_id=names("job", 3), batches=st.integers(-1, 20), pairs=st.integers(-1, 100)),
    st.builds(
        WorkerReady,
        worker_id=names("worker", 3),
        host=st.text(max_size=12),
        pid=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        device=devices,
        contexts=st.lists(context_ids, max_size=3),
        max_contexts=st.integers(0, 65),
    ),
    st.builds(Pull, credit=st.integers(0, 1025)),
    st.builds(ContextLoaded, context_id=context_ids, seconds=st.floats()),
    st.builds(ContextFailed, context_id=context_ids, error=st.text(max_size=40)),
    st.builds(Completed, result=results),
    st.builds(BatchFailed, batch_id=names("batch", 12), error=st.text(max_size=40)),
    st.builds(Release, batch_ids=st.lists(names("batch", 12), max_size=4), leaving=st.booleans()),
    st.builds(SinkReady, sink_id=names("sink", 3)),
    st.builds(SinkAck, batch_ids=st.lists(names("batch", 12), max_size=4)),
    st.builds(Disconnect, reason=st.text(max_size=20)),
    st.just(Heartbeat()),
    st.builds(Error, reason=st.text(max_size=20), detail=st.text(max_size=20)),
)


def body(message: Message) -> bytes:
    return encode(message)[1]


def _encodable(message: Message) -> bool:
    """Whether msgpack can carry the message (``from_type`` draws integers of any size)."""
    try:
        body(message)
    except OverflowError:
        return False
    return True


#: Messages only a broker sends: a broker receiving one refuses it, whatever its fields.
refused_messages: SearchStrategy[Message] = st.one_of(
    *(st.from_type(cls) for cls in (Accepted, Rejected, JobDone, LoadContext, Assign, Deliver, DeliverFailure, RollNow))
).filter(_encodable)
messages = accepted_messages | refused_messages


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """The path (keys and indexes) to every part of a decoded msgpack tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _replaced(node: Any, path: tuple, value: Any, delete: bool) -> Any:
    """A copy of ``node`` with the part at ``path`` replaced by ``value``, or deleted."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(node) if isinstance(node, dict) else list(node)
    if not rest and delete:
        del copy[head]
    else:
        copy[head] = _replaced(node[head], rest, value, delete)
    return copy


def _mutations(message: Message) -> SearchStrategy[bytes]:
    """``message`` with one field (at any depth) replaced by a random value, or removed."""
    tree = msgspec.to_builtins(message)
    return st.tuples(st.sampled_from(list(_paths(tree))), msgpack_values, st.booleans()).map(
        lambda change: msgpack.packb(_replaced(tree, *change))
    )


def _raw_map(kind: object, pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack map written by hand: its kind, then pairs that may repeat keys or hold raw encodings."""
    entries = [(msgpack.packb("kind"), msgpack.packb(kind)), *pairs]
    return bytes([0x80 | len(entries)]) + b"".join(key + value for key, value in entries)


def _flipped(data: bytes, position: int, value: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([value]) + data[position + 1 :]


#: Headers of other protocols and versions.
wrong_headers = st.sampled_from(
    [b"pervade/0", b"pervade/3", b"pervade/4", b"pervade/50", b"pervade/5\x00", b"PERVADE/5", b"pervade", b""]
) | st.binary(max_size=40).filter(lambda header: header != PROTOCOL_HEADER)


@dataclass(frozen=True)
class Send:
    """Frames for one of the fuzz's peers (an index in ``IDENTITIES``) to send. ``refused``: the broker
    must refuse them whatever its state (which ``rejected_message`` log lines must then account for)."""

    peer: int
    frames: list[bytes]
    refused: bool


def sends(frames: SearchStrategy[list[bytes]], refused: bool) -> SearchStrategy[list[Send]]:
    """One send of ``frames`` from a random peer."""
    return st.builds(lambda peer, f: [Send(peer, f, refused)], st.integers(0, len(IDENTITIES) - 1), frames)


#: Submission, start and finish times: like a real clock's, or any non-negative float (up to infinity).
valid_times = st.lists(st.floats(min_value=0, max_value=4e9), min_size=3, max_size=3) | st.lists(
    st.floats(min_value=0), min_size=3, max_size=3
)


def valid_batches(submitted_at: float) -> SearchStrategy[Batch]:
    """Batches the decoder takes (ids, labels and claims in bounds): mostly new batches of new jobs (not
    duplicates, nor batches of a job that has ended)."""
    return st.builds(
        Batch,
        batch_id=st.uuids().map(lambda u: f"answered-batch-{u.hex[:16]}"),
        job_id=st.uuids().map(lambda u: f"answered-job-{u.hex[:16]}"),
        context=contexts,
        template_id=names("template", 3, valid=True),
        template=st.text(max_size=40),
        claims=st.lists(
            st.builds(
                Claim,
                claim_id=names("claim", 6, valid=True),
                text=st.text(min_size=1, max_size=40),
                gold_label=st.none() | st.sampled_from(LABELS) | st.text(max_size=64),
            ),
            min_size=1,
            max_size=4,
        ),
        submitted_at=st.just(submitted_at),
    )


@st.composite
def answered_batch(draw: st.DrawFn) -> list[Send]:
    """A producer submits a batch, then a result for it and the job's end, in order on one connection.
    The broker takes a result from any peer, so this reaches acceptance, storage and delivery to sinks
    (the real sink too, later), with values no real worker would send: any label, NaN and infinite scores,
    timestamps far in the future."""
    peer = draw(st.integers(0, len(IDENTITIES) - 1))
    submitted_at, started_at, finished_at = draw(valid_times)
    batch = draw(valid_batches(submitted_at))
    result = BatchResult(
        batch_id=batch.batch_id,
        job_id=batch.job_id,
        context_id=batch.context.context_id,
        model=batch.context.model,
        template_id=batch.template_id,
        worker_id=draw(names("worker", 3, valid=True)),
        device=draw(st.text(max_size=12)),
        submitted_at=submitted_at,
        started_at=started_at,
        finished_at=finished_at,
        verdicts=[
            Verdict(
                claim_id=c.claim_id,
                verdict=draw(st.sampled_from(LABELS) | st.text(max_size=64)),
                scores=draw(st.lists(st.floats(), min_size=len(LABELS), max_size=len(LABELS))),
                gold_label=c.gold_label,
            )
            for c in batch.claims
        ],
    )
    flow = [
        ProducerReady(producer_id=draw(names("producer", 3, valid=True))),
        Submit(batch=batch),
        Completed(result=result),
        EndJob(job_id=batch.job_id, batches=1, pairs=len(batch.claims)),
    ]
    return [Send(peer, encode(message), refused=False) for message in flow]


@st.composite
def busy_worker(draw: st.DrawFn) -> list[Send]:
    """A worker registers and grants credit: it will be handed batches (and contexts to load) that it
    never answers, until the broker declares it dead and requeues them."""
    peer = draw(st.integers(0, len(IDENTITIES) - 1))
    ready = WorkerReady(
        worker_id=draw(names("worker", 3)),
        host="fuzz",
        pid=1,
        device=draw(devices),
        contexts=draw(st.lists(st.sampled_from(FUZZ_CONTEXT_IDS), max_size=2)),
    )
    pull = Pull(credit=draw(st.integers(1, 8)))
    return [Send(peer, encode(ready), refused=False), Send(peer, encode(pull), refused=False)]


#: One step of the fuzz: a single send of some kind, or a short flow of valid messages from one peer.
steps: SearchStrategy[list[Send]] = st.one_of(
    # Any number of random frames.
    sends(st.lists(st.binary(max_size=64), min_size=1, max_size=4), refused=True),
    # The header, then random bytes.
    sends(st.binary(max_size=200).map(lambda b: [PROTOCOL_HEADER, b]), refused=True),
    # The header, then any msgpack value (a map or not).
    sends(msgpack_values.map(lambda v: [PROTOCOL_HEADER, msgpack.packb(v)]), refused=False),
    # The header, then a map with a real kind and random values for the real fields of that kind.
    sends(
        st.sampled_from(ALL_MESSAGES)
        .flatmap(
            lambda cls: st.fixed_dictionaries(
                {"kind": st.just(cls.__struct_config__.tag)},
                optional=dict.fromkeys(cls.__struct_fields__, msgpack_values),
            )
        )
        .map(lambda m: [PROTOCOL_HEADER, msgpack.packb(m)]),
        refused=False,
    ),
    # The header, then a hand-written map: any kind, repeated keys, raw encodings.
    sends(
        st.builds(
            _raw_map,
            st.sampled_from(KINDS) | msgpack_values,
            st.lists(
                st.tuples(
                    (st.sampled_from(("kind", *FIELDS)) | msgpack_values).map(msgpack.packb),
                    st.sampled_from(RAW_MSGPACK) | msgpack_values.map(msgpack.packb),
                ),
                max_size=5,
            ),
        ).map(lambda b: [PROTOCOL_HEADER, b]),
        refused=False,
    ),
    # Valid messages with one field replaced or removed.
    sends(messages.flatmap(_mutations).map(lambda b: [PROTOCOL_HEADER, b]), refused=False),
    # Valid messages cut short ...
    sends(
        st.builds(lambda m, n: [PROTOCOL_HEADER, body(m)[: n % len(body(m))]], messages, st.integers(min_value=0)),
        refused=True,
    ),
    # ... or with one byte changed.
    sends(
        st.builds(
            lambda m, n, v: [PROTOCOL_HEADER, _flipped(body(m), n, v)],
            messages,
            st.integers(min_value=0),
            st.integers(0, 255),
        ),
        refused=False,
    ),
    # Valid messages under another protocol version.
    sends(st.builds(lambda h, m: [h, body(m)], wrong_headers, messages), refused=True),
    # Valid messages with frames after them.
    sends(
        st.builds(
            lambda m, extra: [*encode(m), *extra], messages, st.lists(st.binary(max_size=16), min_size=1, max_size=2)
        ),
        refused=True,
    ),
    # Messages as they should be, from random field values: many, so the handlers' logic is reached.
    sends(accepted_messages.map(encode), refused=False),
    sends(accepted_messages.map(encode), refused=False),
    sends(refused_messages.map(encode), refused=True),
    answered_batch(),
    busy_worker(),
)


# --- the fuzz's peers -----------------------------------------------------------------------------


@dataclass
class FuzzReport:
    examples: int = 0
    frames: int = 0
    #: Frames the broker must have refused whatever its state.
    refused: int = 0
    oversized: int = 0
    #: Times the broker cut the oversized sender off.
    disconnects: int = 0
    #: With CURVE: messages of a known kind sent under a key whose role may not send them.
    misrouted: int = 0


#: With CURVE, one send in this many goes out under a key whose role may not send it (refused by role).
MISROUTE_EVERY = 7
#: The roles whose keys the fuzz holds (a monitor key may only ask for status: nothing to fuzz).
FUZZ_ROLES = (Role.WORKER, Role.PRODUCER, Role.SINK)
#: The message kinds each of those roles may send (``pervade.roles.SENDS``).
ROLE_KINDS = {role: {kind.__struct_config__.tag for kind in SENDS[role]} for role in FUZZ_ROLES}


def kind_in(frames: list[bytes]) -> str | None:
    """The ``kind`` a message's body names, if it is a msgpack map that names one."""
    try:
        body = msgpack.unpackb(frames[-1], strict_map_key=False) if frames else None
    except Exception:  # any garbage: the fuzz's frames are meant to be unreadable
        return None
    kind = body.get("kind") if isinstance(body, dict) else None
    return kind if isinstance(kind, str) else None


class FuzzPeers:
    """Plain (synchronous) DEALERs on the broker: one per identity in ``IDENTITIES``, and one that sends the
    oversized frames. Sends never wait for an answer; ``drain`` reads and drops whatever came back.

    With CURVE, the fuzzers hold the run's keys (the worst case: an insider's garbage), one per role, and each
    identity has a DEALER under each role's key: a message goes out under a key whose role may send it, so the
    fuzz still reaches every verb, except every ``MISROUTE_EVERY``-th, which goes out under another role's key
    (and must be refused). Garbage that names no kind goes out under each role's key in turn."""

    def __init__(self, endpoint: str, keys: Mapping[Role, ClientKeys] | None = None) -> None:
        self.ctx = zmq.Context()
        self.keys = keys
        roles: tuple[Role | None, ...] = FUZZ_ROLES if keys is not None else (None,)
        self.peers = [
            {role: self._dealer(endpoint, identity if role is None else identity + f"/{role}".encode(), role)
             for role in roles}
            for identity in IDENTITIES
        ]  # fmt: skip
        self.oversized = self._dealer(endpoint, OVERSIZED_IDENTITY, Role.PRODUCER if keys is not None else None)
        self.monitor = self.oversized.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sends = 0
        #: Sends of a known kind that went out under a key whose role may not send it.
        self.misrouted = 0

    def _dealer(self, endpoint: str, identity: bytes, role: Role | None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        if self.keys is not None and role is not None:
            self.keys[role].apply(sock)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        sock.setsockopt(zmq.RCVHWM, 0)  # never make the broker drop an answer (the barrier waits for one)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # back at once after being cut off for an oversized frame
        sock.connect(endpoint)
        return sock

    @property
    def sockets(self) -> list[zmq.Socket]:
        return [*(sock for peer in self.peers for sock in peer.values()), self.oversized]

    def send(self, send: Send) -> None:
        self.sends += 1
        self._socket_for(send).send_multipart(send.frames)  # raises zmq.Again if the broker stopped reading

    def _socket_for(self, send: Send) -> zmq.Socket:
        sockets = self.peers[send.peer]
        if None in sockets:
            return sockets[None]
        kind = kind_in(send.frames)
        allowed = [role for role in FUZZ_ROLES if kind in ROLE_KINDS[role]]
        if not allowed:
            return sockets[FUZZ_ROLES[self.sends % len(FUZZ_ROLES)]]
        if self.sends % MISROUTE_EVERY == 0 and len(allowed) < len(FUZZ_ROLES):  # heartbeats: any role's
            self.misrouted += 1
            return sockets[next(r for r in FUZZ_ROLES if r not in allowed)]
        return sockets[allowed[self.sends % len(allowed)]]

    def send_oversized(self, extra: int) -> None:
        self.oversized.send_multipart([PROTOCOL_HEADER, bytes(MAX_MESSAGE_BYTES + extra)])

    def drain(self) -> None:
        for sock in self.sockets:
            while sock.poll(0, zmq.POLLIN):
                sock.recv_multipart(zmq.NOBLOCK)

    def barrier(self) -> None:
        """Return once the broker has handled everything sent so far. The broker handles each peer's frames
        in order, so each peer sends a probe with a header of its own and waits for the Error answering it.
        The oversized sender's probe may be lost with a connection the broker cuts: probes are sent again."""
        for n, sock in enumerate(self.sockets):
            token = f"fuzz-barrier-{n}"
            for _attempt in range(BARRIER_ATTEMPTS):
                sock.send_multipart([token.encode(), b""])
                if self._answered(sock, token, timeout_ms=1000):
                    break
            else:
                identity = sock.getsockopt(zmq.IDENTITY)
                raise AssertionError(f"the broker never answered {identity!r} within {BARRIER_ATTEMPTS} s")

    @staticmethod
    def _answered(sock: zmq.Socket, token: str, timeout_ms: int) -> bool:
        """Whether an Error naming ``token`` arrives within ``timeout_ms`` (other messages are dropped)."""
        while sock.poll(timeout_ms, zmq.POLLIN):
            for body in bodies(sock.recv_multipart(zmq.NOBLOCK)):
                try:
                    message = decode_body(body)
                except ProtocolError:
                    continue
                if isinstance(message, Error) and token in message.reason:
                    return True
        return False

    def disconnects(self) -> int:
        count = 0
        while self.monitor.poll(0, zmq.POLLIN):
            if recv_monitor_message(self.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                count += 1
        return count

    def close(self) -> None:
        self.oversized.disable_monitor()
        self.monitor.close(linger=0)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


def fuzz(endpoint: str, keys: Mapping[Role, ClientKeys] | None = None) -> FuzzReport:
    """Throw ``EXAMPLES`` hypothesis examples at the broker, then wait until it has handled them all."""
    report = FuzzReport()
    peers = FuzzPeers(endpoint, keys)
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,  # the same frames on every run
            database=None,
            # No shrinking: the broker's state carries over from example to example, so a failing one
            # would not fail again alone (and the broker's log says what went wrong, not the example).
            phases=[Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(st.lists(steps, min_size=1, max_size=3), st.integers(1, 4096))
        def throw(example: list[list[Send]], oversize_by: int) -> None:
            report.examples += 1
            for step in example:
                for send in step:
                    peers.send(send)
                    report.frames += 1
                    report.refused += send.refused
            if report.examples % OVERSIZE_EVERY == 0:
                peers.send_oversized(oversize_by)
                report.oversized += 1
            peers.drain()

        throw()
        peers.barrier()
        report.disconnects = peers.disconnects()
        report.misrouted = peers.misrouted
    finally:
        peers.close()
    return report


# --- the test -------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
async def test_a_fuzzed_broker_stays_up_and_still_runs_a_job_correctly(
    tmp_path: Path, tiny_model: Path, fever_claims: Path, curve: bool
) -> None:
    log_dir, out_dir = tmp_path / "logs", tmp_path / "out"
    log_dir.mkdir()
    keys: tuple[str, ...] = ()
    client_keys = None
    if curve:  # the same fuzz through CURVE: frames arrive decrypted, so the broker must refuse them the same
        init_keys(tmp_path / "keys")
        keys = ("--keys", str(tmp_path / "keys"))
        client_keys = {role: ClientKeys.load(tmp_path / "keys", role) for role in FUZZ_ROLES}
    templates_file = tmp_path / "templates.json"
    all_templates = load_templates()
    templates_file.write_text(dump_templates({t: all_templates[t] for t in TEMPLATES}))
    procs = ProcessGroup(log_dir)  # every process logs JSON lines to log_dir/NAME.log
    try:
        broker = await procs.start(
            "broker", "broker", "--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(tmp_path / "endpoint"),
            "--max-message-bytes", str(MAX_MESSAGE_BYTES), *HEARTBEATS, *keys,
        )  # fmt: skip
        endpoint = await wait_for_endpoint(tmp_path / "endpoint", broker)

        report = await asyncio.to_thread(fuzz, endpoint, client_keys)
        assert broker.returncode is None, f"the broker died under the fuzz:\n{procs.tail('broker', 40)}"
        assert report.frames >= 3000 and report.oversized > 0
        assert report.disconnects > 0, "the broker never cut off the peer sending oversized frames"

        # A normal job, with real processes, on the broker that was just fuzzed.
        await procs.start("sink", "sink", "--broker", endpoint, "--out", str(out_dir), *HEARTBEATS, *keys)
        await procs.start("worker", "worker", "--broker", endpoint, "--device", "cpu", "--threads", "1",
                          "--worker-id", "worker-after-fuzz", *HEARTBEATS, *keys)  # fmt: skip
        producer = await procs.start(
            "producer", "produce", "--broker", endpoint, "--model", str(tiny_model), "--claims", str(fever_claims),
            "--limit", str(CLAIMS), "--templates", str(templates_file), "--batch-size", "16", "--wait",
            "--timeout", str(JOB_TIMEOUT_S), *HEARTBEATS, *keys,
        )  # fmt: skip
        first = await asyncio.wait_for(procs.first_exit(["producer", "broker", "sink", "worker"]), JOB_TIMEOUT_S + 30)
        assert first == "producer", f"{first} exited during the job:\n{procs.tail(first, 40)}"
        assert producer.returncode == 0, procs.tail("producer", 40)
        for name in ("broker", "sink", "worker"):
            assert procs.children[name].returncode is None, f"{name} died:\n{procs.tail(name, 40)}"
    finally:
        await procs.stop(["producer", "sink", "worker", "broker"])
    assert broker.returncode == 0, f"the broker did not stop cleanly:\n{procs.tail('broker', 40)}"

    # The job's output: exactly one row per (claim, template), each with the reference loop's verdict.
    (submitted,) = [e for e in read_events(log_dir / "producer.log") if e["event"] == "job_submitted"]
    job_id = submitted["job_id"]
    rows = [r for r in read_verdicts(out_dir).to_pylist() if r["job_id"] == job_id]
    claims = list(read_claims(ClaimsSource(str(fever_claims), limit=CLAIMS)))
    templates = json.loads(templates_file.read_text())
    expected = reference_verdicts(tiny_model, templates, claims)
    keys = Counter((r["claim_id"], r["template_id"]) for r in rows)
    assert max(keys.values()) == 1, "a pair was written twice"
    assert set(keys) == set(expected), "pairs missing or unexpected"
    for r in rows:
        verdict, scores = expected[(r["claim_id"], r["template_id"])]
        assert r["verdict"] in LABELS
        assert r["verdict"] == verdict, (r["claim_id"], r["template_id"], r["verdict"], verdict, scores)
        assert [r["score_supports"], r["score_refutes"], r["score_not_enough_info"]] == pytest.approx(scores, abs=1e-3)
    assert not [f for f in read_failures(out_dir) if f["job_id"] == job_id], "the job had failed pairs"

    # The broker's log: the fuzz reached it, and no exception ever escaped a handler.
    events = read_events(log_dir / "broker.log")
    counts = Counter(e["event"] for e in events)
    escaped = [e for e in events if e["event"] == "handler_failed"]
    first_escaped = json.dumps(escaped[:1], indent=1)
    assert not escaped, f"{len(escaped)} exceptions escaped the broker's handlers; the first:\n{first_escaped}"
    assert counts["rejected_message"] >= report.refused, "frames the broker must refuse were not all refused"
    assert counts["worker_joined"] > 1 and counts["sink_joined"] > 1, "valid messages never reached the handlers"
    final_stats = [e for e in events if e["event"] == "broker_stats"][-1]
    assert final_stats["invalid_messages"] >= counts["rejected_message"]
    assert final_stats["late_results_accepted"] > 0, "no result from the fuzz was ever accepted"
    if curve:  # each message went out under a key of a role that may send it, but for the misrouted ones
        assert report.misrouted > 100 and 0 < final_stats["role_refusals"] <= report.misrouted

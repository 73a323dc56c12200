"""The wire protocol: every message pervade sends, defined once, encoded with msgpack.

A message travels as two frames: the protocol header (``PROTOCOL_HEADER``, which carries the version) and
one msgpack map whose ``kind`` field names the message. A DEALER peer sends ``[header, body]``; the broker's
ROUTER sees ``[identity, header, body]``. ``encode`` and ``decode`` are the only places frames are built
or read. docs/protocol.md is the table of these messages: who sends each, and what the receiver does.

Decoding validates types and bounds; anything that does not fit raises ``ProtocolError`` with the reason,
so a receiver can log it, answer ``Error`` where it can, and carry on.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from pervade.constants import LABELS, PROTOCOL_HEADER
from pervade.context import ContextSpec
from pervade.errors import ProtocolError

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Label = Annotated[str, msgspec.Meta(max_length=64)]
#: Unix seconds, up to the end of year 9999: what a Parquet microsecond timestamp holds (found by the fuzz
#: test: an infinite time once crashed every sink it was delivered to).
Timestamp = Annotated[float, msgspec.Meta(ge=0, le=253402300799.0)]


class _Part(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the structures nested inside messages."""


class Claim(_Part):
    """One claim to verify. ``gold_label`` is the dataset's label, or None when unknown."""

    claim_id: Id
    text: str
    gold_label: Label | None = None


class Batch(_Part):
    """Claims to score under one prompt template with one model. The unit of scheduling."""

    batch_id: Id
    job_id: Id
    context: ContextSpec
    template_id: Id
    template: str
    claims: Annotated[list[Claim], msgspec.Meta(min_length=1)]
    submitted_at: Timestamp


class DeviceInfo(_Part):
    """What a worker computes on. ``kind`` is "cuda" or "cpu"; memory in bytes (0 if unknown)."""

    kind: str
    name: str
    memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    compute_capability: str | None = None

    def describe(self) -> str:
        return self.name if self.kind == "cpu" else f"{self.kind}:{self.name}"


class Verdict(_Part):
    """The verdict for one claim, with the label scores in ``LABELS`` order (next-token logits)."""

    claim_id: Id
    verdict: Label
    scores: Annotated[list[float], msgspec.Meta(min_length=len(LABELS), max_length=len(LABELS))]
    gold_label: Label | None = None


class BatchResult(_Part):
    """A worker's answer to one batch, forwarded by the broker to a sink."""

    batch_id: Id
    job_id: Id
    context_id: Id
    model: str
    template_id: Id
    worker_id: Id
    device: str
    submitted_at: Timestamp
    started_at: Timestamp
    finished_at: Timestamp
    verdicts: list[Verdict]


class BatchFailure(_Part):
    """A batch given up on after repeated failures, forwarded by the broker to a sink to be recorded."""

    batch_id: Id
    job_id: Id
    context_id: Id
    model: str
    template_id: Id
    claim_ids: list[Id]
    error: str
    attempts: int


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, tag_field="kind"):
    """Base of every message; the class's tag is the message's ``kind`` on the wire."""


# --- producer <-> broker -------------------------------------------------------------------------


class Submit(Message, tag="submit"):
    """Producer asks the broker to queue a batch. Answered by Accepted or Rejected."""

    batch: Batch


class Accepted(Message, tag="accepted"):
    """Broker has queued the batch (or already had it: ``duplicate``)."""

    batch_id: Id
    duplicate: bool = False


class Rejected(Message, tag="rejected"):
    """Broker refused the batch; ``reason`` says why."""

    batch_id: str
    reason: str


class EndJob(Message, tag="end_job"):
    """Producer has submitted every batch of the job: there are ``batches`` batches, ``pairs`` pairs."""

    job_id: Id
    batches: Annotated[int, msgspec.Meta(ge=0)]
    pairs: Annotated[int, msgspec.Meta(ge=0)]


class ProducerReady(Message, tag="producer_ready"):
    """A producer registers (first message on every new connection)."""

    producer_id: Id


class JobDone(Message, tag="job_done"):
    """Broker to producer (and to every sink): every batch of the job is durably written by a sink, as
    verdicts or as a recorded failure. ``open_jobs`` counts the jobs the broker still has unfinished."""

    job_id: Id
    batches: int
    pairs: int
    failed_batches: int = 0
    errors: list[str] = []
    open_jobs: int = 0


# --- worker <-> broker ---------------------------------------------------------------------------


class WorkerReady(Message, tag="worker_ready"):
    """Worker registers: who it is, what it computes on, which contexts it holds, how many fit."""

    worker_id: Id
    host: str
    pid: int
    device: DeviceInfo
    contexts: list[Id] = []
    max_contexts: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class Pull(Message, tag="pull"):
    """Worker grants the broker ``credit`` more batches (its prefetch window)."""

    credit: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class LoadContext(Message, tag="load_context"):
    """Broker tells a worker to load this context (first dropping ``evict``); batches of it follow."""

    context: ContextSpec
    evict: list[Id] = []


class ContextLoaded(Message, tag="context_loaded"):
    """Worker holds the context now; loading took ``seconds``."""

    context_id: Id
    seconds: float


class ContextFailed(Message, tag="context_failed"):
    """Worker could not load the context."""

    context_id: Id
    error: str


class Assign(Message, tag="assign"):
    """Broker hands a batch to a worker (consumes one credit)."""

    batch: Batch


class Completed(Message, tag="completed"):
    """Worker's verdicts for an assigned batch."""

    result: BatchResult


class BatchFailed(Message, tag="batch_failed"):
    """Worker could not score an assigned batch."""

    batch_id: Id
    error: str


class Release(Message, tag="release"):
    """Worker hands back assigned batches it will not run (it was told to stop): the broker requeues them
    at once, not counted as failed attempts. With ``leaving`` it also gets no more work."""

    batch_ids: list[Id]
    leaving: bool = False


class Disconnect(Message, tag="disconnect"):
    """Peer to broker: it is leaving; the broker requeues whatever it held. Broker to peer: it does not
    know the peer (it restarted, or declared the peer dead); the peer reconnects and registers again."""

    reason: str = ""


# --- sink <-> broker -----------------------------------------------------------------------------


class SinkReady(Message, tag="sink_ready"):
    """A sink registers to receive results."""

    sink_id: Id


class Deliver(Message, tag="deliver"):
    """Broker hands a batch's results to a sink. ``redelivery``: an earlier delivery was never
    acknowledged, so the rows may already be in the output (the sink checks before writing)."""

    result: BatchResult
    redelivery: bool = False


class DeliverFailure(Message, tag="deliver_failure"):
    """Broker hands a failed batch to a sink, to be recorded beside the output."""

    failure: BatchFailure
    redelivery: bool = False


class SinkAck(Message, tag="sink_ack"):
    """Sink has written these batches durably: verdict rows in a final Parquet file, or failures in an
    fsynced failures file."""

    batch_ids: list[Id]


# --- any -----------------------------------------------------------------------------------------


class Heartbeat(Message, tag="heartbeat"):
    """Liveness, either way."""


class Error(Message, tag="error"):
    """The receiver could not act on a message it got; ``reason`` says why."""

    reason: str
    detail: str = ""


AnyMessage = Union[
    ProducerReady, Submit, Accepted, Rejected, EndJob, JobDone,
    WorkerReady, Pull, LoadContext, ContextLoaded, ContextFailed, Assign, Completed, BatchFailed, Release,
    Disconnect, SinkReady, Deliver, DeliverFailure, SinkAck,
    Heartbeat, Error,
]  # fmt: skip

ALL_MESSAGES: tuple[type[Message], ...] = AnyMessage.__args__  # type: ignore[attr-defined]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> list[bytes]:
    """The frames a DEALER sends for ``message`` (the ROUTER side prepends the peer's identity)."""
    return [PROTOCOL_HEADER, _encoder.encode(message)]


def decode(frames: list[bytes]) -> Message:
    """Decode ``[header, body]`` into a message, or raise ProtocolError saying what is wrong."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (header, body), got {len(frames)}")
    header, body = frames
    if header != PROTOCOL_HEADER:
        shown = bytes(header[:32]).decode("utf-8", "replace")
        raise ProtocolError(f"unsupported protocol header {shown!r}; this peer speaks {PROTOCOL_HEADER.decode()}")
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is a DecodeError; a string
        raise ProtocolError(f"invalid message: {exc}") from None  # of invalid UTF-8 raises the other


def kind_of(message: Message) -> str:
    """The message's ``kind`` as it appears on the wire."""
    return type(message).__struct_config__.tag  # type: ignore[return-value]

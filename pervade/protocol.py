"""The wire protocol: every message pervade sends, defined once, encoded with msgpack.

A ZeroMQ message carries a group of messages: the protocol header (``PROTOCOL_HEADER``, which carries the
version), then frames, each one message (a msgpack map whose ``kind`` field names it) or several (a msgpack
array of such maps, as senders pack a group). A DEALER peer sends ``[header, group]``; the broker's ROUTER
sees ``[identity, header, group]``. Grouping is how every hop
amortises its per-message cost (one send, one wake-up, one turn of the broker's loop for many batches) while
each message keeps its own meaning, validation and answer: a body that does not decode costs itself alone.
``encode``, ``encode_group``, ``bodies`` and ``decode_body`` are the only places frames are built or read. docs/protocol.md is the table of these messages: who sends each, and what the receiver does.

Decoding validates types and bounds; anything that does not fit raises ``ProtocolError`` with the reason,
so a receiver can log it, answer ``Error`` where it can, and carry on.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple, Union

import msgspec

from pervade.constants import LABELS, PROTOCOL_HEADER
from pervade.context import ContextSpec
from pervade.errors import ProtocolError
from pervade.manifest import Manifest, RelativePath
from pervade.prompts import PromptTemplate, as_template

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Label = Annotated[str, msgspec.Meta(max_length=64)]
#: Unix seconds from year 1 to the end of year 9999: what a Parquet microsecond timestamp (and a Python
#: datetime) holds. An infinite time once crashed every sink it was delivered to (found by the fuzz test);
#: a time before 1970 is only a clock set wrong, which the broker notes and corrects (docs/reliability.md).
Timestamp = Annotated[float, msgspec.Meta(ge=-62135596800.0, le=253402300799.0)]
#: A set of batch ids, as ``pervade.batchset.BatchSet`` digests it (32 hex digits), or "" when not given.
SetDigest = Annotated[str, msgspec.Meta(max_length=32, pattern="^([0-9a-f]{32})?$")]
Count = Annotated[int, msgspec.Meta(ge=0)]
#: A manifest's digest (sha256, hex): names a set of model files.
FilesDigest = Annotated[str, msgspec.Meta(min_length=64, max_length=64, pattern="^[0-9a-f]{64}$")]
Endpoint = Annotated[str, msgspec.Meta(max_length=512)]
ByteCount = Annotated[int, msgspec.Meta(ge=0)]
#: A client key's name (pervade/keyring.py), or "" where the broker has no keys.
KeyName = Annotated[str, msgspec.Meta(max_length=64)]
#: One score per label, in ``LABELS`` order; None for a label the template leaves out.
LabelScores = Annotated[list[float | None], msgspec.Meta(min_length=len(LABELS), max_length=len(LABELS))]
#: A CURVE public key, Z85 (40 characters).
PublicKey = Annotated[str, msgspec.Meta(min_length=40, max_length=40)]


class _Part(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the structures nested inside messages."""


class Claim(_Part):
    """One claim to verify. ``gold_label`` is the dataset's label, or None when unknown."""

    claim_id: Id
    text: Annotated[str, msgspec.Meta(min_length=1)]
    gold_label: Label | None = None


class Member(_Part):
    """A producer's batch inside a slice: its id and how many of the slice's claims, in order, are its."""

    batch_id: Id
    claims: Annotated[int, msgspec.Meta(ge=1)]


def member_spans(members: list[Member]) -> list[tuple[int, int]]:
    """Each member's claims in its slice, as (start, end) offsets, in order."""
    spans, start = [], 0
    for member in members:
        spans.append((start, start + member.claims))
        start += member.claims
    return spans


#: Between a split batch's root id and the claims a part holds: ``ROOT~START-STOP`` (claim offsets in the root).
PART_MARK = "~"


class PartOf(NamedTuple):
    """What a split batch's part id names: its root batch, and the root's claims it holds, [start, stop)."""

    root: str
    start: int
    stop: int


def part_id(root: str, start: int, stop: int) -> str:
    """The id of the part of ``root`` holding its claims [start, stop) (broker/outcomes.py splits)."""
    return f"{root}{PART_MARK}{start}-{stop}"


def part_of(batch_id: str) -> PartOf | None:
    """The root and claims a part id names, or None for an id that is not a part's. A producer's batch id
    never has this form (the broker refuses one that has), so the sink may read rows' ids this way."""
    root, mark, span = batch_id.rpartition(PART_MARK)
    if not mark or not root:
        return None
    start, dash, stop = span.partition("-")
    if not dash or not start.isdigit() or not stop.isdigit() or not start.isascii() or not stop.isascii():
        return None
    first, end = int(start), int(stop)
    return PartOf(root, first, end) if first < end else None


#: Batches one ``Accepted`` names at most besides its first (``more``).
MAX_ACCEPTED_MORE = 4096


class Batch(_Part):
    """Claims to score under one prompt template with one model. The unit of scheduling.

    A *slice* is a batch the broker made of small batches a producer submitted together (same job, context,
    template and ``submitted_at``): it travels, is assigned, answered and delivered as one, and ``members`` names the
    producer's batches it holds, in claim order. A producer never sets ``members``."""

    batch_id: Id
    job_id: Id
    context: ContextSpec
    template_id: Id
    #: The template in full; a bare text (from an earlier producer) is a plain template with the default answers.
    template: PromptTemplate | str
    claims: Annotated[list[Claim], msgspec.Meta(min_length=1)]
    submitted_at: Timestamp
    members: list[Member] = []

    @property
    def prompt(self) -> PromptTemplate:
        """The template in its full form."""
        return as_template(self.template)


class DeviceInfo(_Part):
    """What a worker computes on. ``kind`` is "cuda" or "cpu"; memory in bytes (0 if unknown)."""

    kind: str
    name: str
    memory_bytes: Annotated[int, msgspec.Meta(ge=0)] = 0
    compute_capability: str | None = None

    def describe(self) -> str:
        return self.name if self.kind == "cpu" else f"{self.kind}:{self.name}"


class Verdict(_Part):
    """The verdict for one claim, with the label scores in ``LABELS`` order: the log-probability of each label's
    whole answer text after the prompt, None for a label the template leaves out."""

    claim_id: Id
    verdict: Label
    scores: LabelScores
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
    #: The dtype the weights were computed in (a context in ``auto`` resolves per device).
    dtype: str = ""
    #: A calibrating template's content-free scores (``pervade.prompts``), subtracted from each claim's scores
    #: before its verdict was chosen; None when the template does not calibrate.
    calibration: LabelScores | None = None
    #: The name of the CURVE key that sent this result (``authorized/worker/NAME.key``), set by the broker
    #: from the connection's authentication, never taken from the worker; "" on a broker without keys.
    worker_key: KeyName = ""


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


class Message(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, omit_defaults=True, tag_field="kind"):
    """Base of every message; the class's tag is the message's ``kind`` on the wire."""


# --- producer <-> broker -------------------------------------------------------------------------


class Submit(Message, tag="submit"):
    """Producer asks the broker to queue a batch. Answered by Accepted or Rejected."""

    batch: Batch


class Accepted(Message, tag="accepted"):
    """Broker has queued the batch (or already had it: ``duplicate``), and the batches of ``more`` after it,
    in order (new ones all: a turn's acceptances for one producer travel as one message)."""

    batch_id: Id
    duplicate: bool = False
    more: Annotated[list[Id], msgspec.Meta(max_length=MAX_ACCEPTED_MORE)] = []


class Rejected(Message, tag="rejected"):
    """Broker refused the batch; ``reason`` says why."""

    batch_id: str
    reason: str


class EndJob(Message, tag="end_job"):
    """Producer has submitted every batch of the job: the broker accepted ``batches`` batches of ``pairs``
    pairs, whose ids digest to ``digest`` (``pervade.batchset``; "" leaves the ids unchecked). Answered by
    JobEnded."""

    job_id: Id
    batches: Count
    pairs: Count
    digest: SetDigest = ""


class JobEnded(Message, tag="job_ended"):
    """Broker's answer to EndJob and AbortJob: what it holds of the job. ``agreed``: it holds exactly what
    the producer counted, and the job is ended. Otherwise the job stays open and the producer submits its
    batches again (the broker lost some: damaged or replaced state) or fails with the count missing."""

    job_id: Id
    batches: Count
    pairs: Count
    digest: SetDigest
    agreed: bool


class AbortJob(Message, tag="abort_job"):
    """Producer cannot finish submitting the job (its input turned out bad midway): the broker ends it
    with the batches it holds, records its queued batches as failed with ``reason``, and reports it done
    with errors, so no producer or sink waits for it. Answered by JobEnded."""

    job_id: Id
    reason: str


class ProducerReady(Message, tag="producer_ready"):
    """A producer registers (first message on every new connection)."""

    producer_id: Id


class DeclareContext(Message, tag="declare_context"):
    """Producer gives the broker a context's manifest, before the batches that need it (and again on
    every new connection). ``manifest``'s digest must be ``context.files``."""

    context: ContextSpec
    manifest: Manifest


class JobDone(Message, tag="job_done"):
    """Broker to producer (and to every sink): every batch of the job is durably written by a sink, as
    verdicts or as a recorded failure. ``open_jobs`` counts the jobs the broker still has unfinished."""

    job_id: Id
    batches: int
    pairs: int
    failed_batches: int = 0
    errors: list[str] = []
    open_jobs: int = 0
    #: Of ``batches`` and ``pairs``: written as verdicts, and (pairs) recorded failed. The producer checks
    #: them against its own count before it reports success.
    batches_written: Count = 0
    pairs_written: Count = 0
    pairs_failed: Count = 0


# --- worker <-> broker ---------------------------------------------------------------------------


class WorkerReady(Message, tag="worker_ready"):
    """Worker registers: who it is, what it computes on, which contexts it holds, how many fit."""

    worker_id: Id
    host: str
    pid: int
    device: DeviceInfo
    contexts: list[Id] = []
    max_contexts: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    #: Where the worker serves model files to peers ("" when it does not).
    file_endpoint: Endpoint = ""
    #: Manifests whose files are complete in the worker's node cache.
    files: Annotated[list[FilesDigest], msgspec.Meta(max_length=4096)] = []
    #: A random token per process: the same worker on a new connection sends the same one, a second
    #: process under the same ``worker_id`` another (refused while the first is alive).
    instance: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Pull(Message, tag="pull"):
    """Worker grants the broker ``credit`` more batches (its prefetch window)."""

    credit: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class LoadContext(Message, tag="load_context"):
    """Broker tells a worker to load this context (first dropping ``evict``); batches of it follow.
    ``manifest`` lists its files (None for a context without one: loaded from the origin directly)."""

    context: ContextSpec
    manifest: Manifest | None = None
    evict: list[Id] = []


class ContextLoaded(Message, tag="context_loaded"):
    """Worker holds the context now; loading took ``seconds``."""

    context_id: Id
    seconds: float


class FindSources(Message, tag="find_sources"):
    """Worker asks who can serve it the files of a manifest, leaving out peers that failed it."""

    files: FilesDigest
    exclude: Annotated[list[Endpoint], msgspec.Meta(max_length=1024)] = []


class Sources(Message, tag="sources"):
    """Broker's answer to FindSources: peers to fetch from (least busy first), and whether the worker
    should read the origin itself (no peer has the files and nobody else is reading the origin)."""

    files: FilesDigest
    peers: list[Endpoint] = []
    origin: bool = False
    #: Each peer's public key, in the order of ``peers``, as the broker saw it authenticate: the server key
    #: to fetch from it with. Empty on a broker without keys (peers then share the run's worker key).
    peer_keys: list[PublicKey] = []


class PeerKeys(Message, tag="peer_keys"):
    """Broker tells a worker the worker keys it admits now (public, Z85): the keys the worker's file service
    admits besides its own, so workers holding keys of their own serve each other. Sent on registration and
    whenever the admitted worker keys change (a key added, or revoked); only by a broker with keys."""

    keys: Annotated[list[PublicKey], msgspec.Meta(max_length=100_000)]


class FilesHeld(Message, tag="files_held"):
    """Worker has every file of a manifest in its cache now (and serves them); how many bytes came from
    the origin, from peers, and were already in the cache."""

    files: FilesDigest
    origin_bytes: ByteCount = 0
    peer_bytes: ByteCount = 0
    cached_bytes: ByteCount = 0
    seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class FilesDropped(Message, tag="files_dropped"):
    """Worker evicted these manifests from its cache: it no longer serves them."""

    files: list[FilesDigest]


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


class Drained(Message, tag="drained"):
    """Broker to workers: the last open job is complete and nothing is queued. Workers started with
    ``--exit-when-drained`` (batch jobs) leave, so no GPU is held idle."""

    completed_jobs: Annotated[int, msgspec.Meta(ge=0)] = 0


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
    """A sink registers to receive results. ``instance``: as in WorkerReady."""

    sink_id: Id
    instance: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Deliver(Message, tag="deliver"):
    """Broker hands a batch's results to a sink. ``redelivery``: an earlier delivery was never
    acknowledged, so the rows may already be in the output (the sink checks before writing)."""

    result: BatchResult
    redelivery: bool = False
    #: A slice's producer batches, in claim order: each row names its own batch (empty for a plain batch).
    members: list[Member] = []


class DeliverFailure(Message, tag="deliver_failure"):
    """Broker hands a failed batch to a sink, to be recorded beside the output."""

    failure: BatchFailure
    redelivery: bool = False


class RollNow(Message, tag="roll_now"):
    """Broker to a sink it delivered to: no batch is queued, running or left to deliver, and every job of what
    the sink was delivered is ended, so nothing more is on its way. The sink makes what it holds durable now
    (and acknowledges it) instead of waiting ``idle_roll_seconds`` for a delivery that will not come: a job
    ends that much sooner."""


class SinkAck(Message, tag="sink_ack"):
    """Sink has written these batches durably: verdict rows in a final Parquet file, or failures in an
    fsynced failures file."""

    batch_ids: list[Id]


# --- anyone (an authenticated client) <-> broker: the status view -----------------------------------


class StatusRequest(Message, tag="status"):
    """Any client asks for a snapshot of the run (``pervade status``, a sink's progress bar). Needs no
    registration: whoever passed the socket's authentication may read it."""


class WorkerStatus(_Part):
    """One live worker as the broker sees it."""

    worker_id: str
    host: str
    device: str
    #: loading (a context not loaded yet), busy (batches in hand), idle, or leaving (preempted).
    state: str
    #: The contexts it holds or is loading, as ``model`` names.
    contexts: list[str]
    batches_done: int
    claims_done: int
    #: Claims per second over the last ``RATE_WINDOW_S`` seconds.
    claims_per_s: float
    #: Seconds since the broker last heard from it.
    last_seen_s: float
    in_flight: int
    credit: int
    #: The name of the key it registered with ("" on a broker without keys).
    key: str = ""


class ContextStatus(_Part):
    """One context's queue."""

    context_id: str
    model: str
    dtype: str
    queued_batches: int
    #: Workers holding it, and those of them that have finished loading it.
    workers: int
    loaded_workers: int


class JobStatus(_Part):
    """One job's progress; ``pairs_done`` are durably written or recorded failed."""

    job_id: str
    pairs: int
    pairs_done: int
    pairs_failed: int
    batches: int
    ended: bool
    done: bool


class StatusSnapshot(_Part):
    """The whole run at one moment, in the order ``pervade status`` shows it."""

    endpoint: str
    taken_at: float
    uptime_s: float
    workers: list[WorkerStatus]
    contexts: list[ContextStatus]
    #: Open jobs, then the most recently finished ones (``STATUS_FINISHED_JOBS``).
    jobs: list[JobStatus]
    #: Over every job the broker knows.
    pairs_total: int
    pairs_done: int
    claims_per_s: float
    #: Seconds until the open jobs are done at the current rate; None when nothing is moving.
    eta_s: float | None
    #: Batches per status (queued, assigned, done, delivered, written).
    batches: dict[str, int]
    #: The broker's counters (requeues, batches_failed, peer_bytes, ...; docs/monitoring.md).
    counters: dict[str, int]
    sinks: int
    producers: int


class StatusReply(Message, tag="status_reply"):
    """The broker's answer to StatusRequest."""

    snapshot: StatusSnapshot


class ProgressRequest(Message, tag="progress"):
    """A client asks how far the jobs are, and nothing else (a sink's progress bar): the answer grows with
    the jobs, where a StatusSnapshot also lists every worker (77 ms and 2 MB at 10,000 workers,
    bench/monitoring_cost.py). Needs no
    registration, like StatusRequest."""


class RunProgress(_Part):
    """The jobs' progress at one moment: what a progress bar draws."""

    taken_at: float
    #: Open jobs, then the most recently finished ones (``STATUS_FINISHED_JOBS``), as in a StatusSnapshot.
    jobs: list[JobStatus]
    claims_per_s: float
    #: Seconds until the open jobs are done at the current rate; None when nothing is moving.
    eta_s: float | None


class ProgressReply(Message, tag="progress_reply"):
    """The broker's answer to ProgressRequest."""

    progress: RunProgress


# --- any -----------------------------------------------------------------------------------------


class Heartbeat(Message, tag="heartbeat"):
    """Liveness, either way."""


class Error(Message, tag="error"):
    """The receiver could not act on a message it got; ``reason`` says why."""

    reason: str
    detail: str = ""


class Refused(Message, tag="refused"):
    """Broker to a client whose registration it refuses: its name is held by another live process (two
    workers under one ``--worker-id``). The client tries again after ``retry_after_s`` (when the broker
    would declare a silent holder dead: it may be a predecessor that just died), and gives up with
    ``reason`` if it is still refused."""

    reason: str
    retry_after_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


AnyMessage = Union[
    ProducerReady, Submit, Accepted, Rejected, EndJob, JobEnded, AbortJob, JobDone, DeclareContext,
    WorkerReady, Pull, LoadContext, ContextLoaded, ContextFailed, Assign, Completed, BatchFailed, Release,
    Drained, FindSources, Sources, PeerKeys, FilesHeld, FilesDropped,
    Disconnect, SinkReady, Deliver, DeliverFailure, RollNow, SinkAck,
    StatusRequest, StatusReply, ProgressRequest, ProgressReply,
    Heartbeat, Error, Refused,
]  # fmt: skip

ALL_MESSAGES: tuple[type[Message], ...] = AnyMessage.__args__  # type: ignore[attr-defined]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


#: Messages one ZeroMQ message may carry (a group); a receiver refuses more, unread.
MAX_GROUP_MESSAGES = 4096
#: Bytes a sender puts in one group before it starts another (a single larger message travels alone). A
#: group is one frame: a broker refuses a ``--max-message-bytes`` below ``MIN_MESSAGE_BYTES``, so grouping
#: never makes a peer's frame too big.
GROUP_BYTES = 256 * 1024
#: The smallest frame limit a broker accepts: a group's frame, with room to spare.
MIN_MESSAGE_BYTES = 2 * GROUP_BYTES


def encode(message: Message) -> list[bytes]:
    """The frames a DEALER sends for ``message`` alone (the ROUTER side prepends the peer's identity)."""
    return [PROTOCOL_HEADER, _encoder.encode(message)]


def encode_body(message: Message) -> bytes:
    """One message's frame, to be sent in a group (``group_frames``)."""
    return _encoder.encode(message)


def group_frames(bodies: list[bytes]) -> list[list[bytes]]:
    """Bodies (``encode_body``) packed into as few ZeroMQ messages as ``MAX_GROUP_MESSAGES`` and
    ``GROUP_BYTES`` allow, in order: the frames of each message to send."""
    groups: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for body in bodies:
        if current and (len(current) >= MAX_GROUP_MESSAGES or size + len(body) > GROUP_BYTES):
            groups.append(_packed(current))
            current, size = [], 0
        current.append(body)
        size += len(body)
    if current:
        groups.append(_packed(current))
    return groups


def _packed(bodies: list[bytes]) -> list[bytes]:
    """``[header, group]``: the bodies as one frame, a msgpack array of them (each body is a msgpack value,
    so the array is its length's header and the bodies one after the other: nothing is encoded again). One
    frame, not one per message: each frame was a send and a receive of its own, 9% of a broker's time at batch
    size 1 (docs/benchmarks.md). A message alone travels as itself."""
    if len(bodies) == 1:
        return [PROTOCOL_HEADER, bodies[0]]
    count = len(bodies)
    header = bytes((0x90 | count,)) if count < 16 else b"\xdc" + count.to_bytes(2, "big")  # MAX_GROUP_MESSAGES < 2**16
    return [PROTOCOL_HEADER, header + b"".join(bodies)]


def encode_group(messages: list[Message]) -> list[list[bytes]]:
    """``messages`` as the ZeroMQ messages that carry them, in order (usually one)."""
    return group_frames([_encoder.encode(message) for message in messages])


def bodies(frames: list[bytes]) -> list[bytes]:
    """The message bodies of ``[header, frame, ...]``, each frame one message (a msgpack map) or a group of
    them (an array), or ProtocolError when the frames are not a group of this protocol's version, hold more
    than ``MAX_GROUP_MESSAGES``, or a group that is not msgpack (then none of it is read). A body is only
    split off here (``msgspec.Raw``, a view of the frame), not decoded: ``decode_body`` decodes each alone."""
    if len(frames) < 2:
        raise ProtocolError(f"expected a header and 1 to {MAX_GROUP_MESSAGES} messages, got {len(frames)} frames")
    header = frames[0]
    if header != PROTOCOL_HEADER:
        shown = bytes(header[:32]).decode("utf-8", "replace")
        raise ProtocolError(f"unsupported protocol header {shown!r}; this peer speaks {PROTOCOL_HEADER.decode()}")
    if len(frames) > MAX_GROUP_MESSAGES + 1:  # each frame holds a message at least: refused before any is read
        raise ProtocolError(f"a group of {len(frames) - 1} messages or more; at most {MAX_GROUP_MESSAGES} are read")
    count = message_count(frames)
    if count > MAX_GROUP_MESSAGES:
        raise ProtocolError(f"a group of {count} messages; at most {MAX_GROUP_MESSAGES} are read")
    found: list[bytes] = []
    for frame in frames[1:]:
        if _group_length(frame) is None:
            found.append(frame)
            continue
        try:
            found.extend(_split_group.decode(frame))
        except (msgspec.DecodeError, RecursionError) as exc:  # splitting walks nested values: deep ones recurse
            raise ProtocolError(f"a group of messages that is not msgpack: {exc}") from None
    return found


def message_count(frames: list[bytes]) -> int:
    """How many messages ``[header, frame, ...]`` (as ``encode_group`` built it) carries, read from its frames'
    headers alone."""
    return sum(_group_length(frame) or 1 for frame in frames[1:])


#: A frame holding a group of messages, split into each message's bytes.
_split_group = msgspec.msgpack.Decoder(list[msgspec.Raw])


def _group_length(frame: bytes) -> int | None:
    """How many messages a frame says it holds when it is a group (a msgpack array), or None: one message."""
    if not frame:
        return None
    first = frame[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(frame) >= 3:
        return int.from_bytes(frame[1:3], "big")
    if first == 0xDD and len(frame) >= 5:
        return int.from_bytes(frame[1:5], "big")
    return None


def decode_body(body: bytes) -> Message:
    """One message's frame decoded and validated, or ProtocolError saying what is wrong."""
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is a DecodeError; a string
        raise ProtocolError(f"invalid message: {exc}") from None  # of invalid UTF-8 raises the other


def decode_group(frames: list[bytes]) -> tuple[list[Message], list[str]]:
    """Every valid message of a group, and what was wrong with each one that was not: a bad message costs
    itself, the rest of its group is read. A group whose header is wrong is one error and no messages."""
    try:
        found = bodies(frames)
    except ProtocolError as exc:
        return [], [str(exc)]
    messages: list[Message] = []
    errors: list[str] = []
    for body in found:
        try:
            messages.append(decode_body(body))
        except ProtocolError as exc:
            errors.append(str(exc))
    return messages, errors


def decode(frames: list[bytes]) -> Message:
    """Decode ``[header, body]`` (one message alone) into a message, or raise ProtocolError saying what is
    wrong."""
    found = bodies(frames)
    if len(found) != 1:
        raise ProtocolError(f"expected one message, got a group of {len(found)}")
    return decode_body(found[0])


def completed_batch_id(frame: bytes) -> str | None:
    """The batch a ``completed`` message that failed to decode answers, when its body still says: the broker
    then requeues that batch and tells the worker why, instead of leaving it assigned for ever."""
    try:
        body = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    result = body.get("result") if isinstance(body, dict) and body.get("kind") == "completed" else None
    batch_id = result.get("batch_id") if isinstance(result, dict) else None
    return batch_id if isinstance(batch_id, str) else None


# --- worker <-> worker: the peer file service -----------------------------------------------------
# Not on the broker's socket: each worker serves its files on a ROUTER of its own. A chunk's bytes travel
# as a third raw frame, so they are never copied into or out of msgpack.


class FetchChunk(Message, tag="fetch_chunk"):
    """Downloader asks a peer for ``length`` bytes at ``offset`` of a file listed in manifest ``files``."""

    files: FilesDigest
    path: RelativePath
    offset: ByteCount
    length: Annotated[int, msgspec.Meta(ge=1)]


class ChunkData(Message, tag="chunk_data"):
    """Peer's answer to FetchChunk; the bytes follow in the next frame."""

    files: FilesDigest
    path: RelativePath
    offset: ByteCount


class FetchRefused(Message, tag="fetch_refused"):
    """Peer will not serve this request: ``busy`` (too many downloaders now: try another peer) or not at
    all (not a file it holds)."""

    files: str
    path: str
    offset: int
    reason: str
    busy: bool = False


PeerFileMessage = Union[FetchChunk, ChunkData, FetchRefused]
_peer_decoder = msgspec.msgpack.Decoder(PeerFileMessage)


def encode_chunk(reply: ChunkData, data: bytes | memoryview) -> list[bytes | memoryview]:
    return [PROTOCOL_HEADER, _encoder.encode(reply), data]


def decode_peer(frames: list[bytes]) -> tuple[Message, bytes | None]:
    """Decode a peer file-service message: ``[header, body]``, or ``[header, body, data]`` for ChunkData."""
    if len(frames) not in (2, 3) or frames[0] != PROTOCOL_HEADER:
        raise ProtocolError(f"not a pervade peer message ({len(frames)} frames)")
    try:
        message = _peer_decoder.decode(frames[1])
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid peer message: {exc}") from None
    data = frames[2] if len(frames) == 3 else None
    if isinstance(message, ChunkData) != (data is not None):
        raise ProtocolError("a chunk_data message comes with exactly one data frame, and nothing else does")
    return message, data


def kind_of(message: Message) -> str:
    """The message's ``kind`` as it appears on the wire."""
    return type(message).__struct_config__.tag  # type: ignore[return-value]

"""The broker's durable state: jobs, contexts and every batch with its status, in SQLite (WAL mode).

Queued work lives here, not in the broker's memory, so a broker holding millions of queued claims stays
small: RAM holds peers, jobs, counters, the batches in flight (as many as workers and sinks hold) and the
first ``QUEUE_READ_AHEAD`` batches of each queue. The broker changes state through the methods below, which
never commit; the broker commits once per turn of its loop, *before* it sends the replies that turn made
(``broker/outbox.py``). So anything a peer was told (Accepted, a delivery, JobDone) is already on disk, and
a broker killed at any moment restarts from a state its peers never saw contradicted.

Durability: ``synchronous=NORMAL`` (the default) survives the broker process being killed at any point,
which is what preemption and crashes do; ``fsync=True`` (``synchronous=FULL``) also survives a power
failure of the login node, at a cost in latency. Checkpoints of the write-ahead log run on a thread
(``checkpoint``), never in the event loop.

A batch moves through these statuses (``BatchStatus``):

    queued -> assigned -> done -> delivered -> written
       ^          |         ^          |
       +----------+         +----------+
     requeued (worker      redelivered (sink gone
     died, failed, or      before acknowledging)
     released it)
                  |
                  +-> split (a failed batch of several claims: its halves are queued as new batches, its
                      "parts"; the producer's batch they came from, their ``root``, is written once every part
                      is written or recorded failed)

Small batches of one job, context, template and submission time queued in one turn form a *slice* (``add``): one row, with the
claims of all of them, which the broker assigns, completes, delivers and marks written as one batch. Each
producer batch in it (a *member*) keeps its id and content digest in the ``members`` table, so it is found
by ``submitted`` like any batch; a slice is cut at dispatch (``carve``) and, if it fails, dissolved back into
its members, each queued as a batch of its own (``dissolve``). Its status counts count its members.

An assignment lives in memory only: the database keeps an assigned batch as queued, with the attempts
before the one in hand (``_durable``), as a broker restarted after a crash would requeue it anyway. So
assigning a batch writes nothing, and its read-ahead skips the batches in flight.

``done`` means the outcome is known: verdicts (``result``) or, after repeated failures, an ``error``. Either
goes to a sink and is ``written`` once the sink acknowledges it durable; then the claims and verdicts are
dropped from the store, and only the batch id and a digest of its content stay, so a resubmission is
recognised, and one under the same id with other content refused.

The state directory belongs to one broker at a time (``broker/statelock.py``). A database that is not one,
or is damaged, raises StateError saying what to do. A write-ahead log that lost commits (``broker/wal.py``)
leaves a state that is older than what peers were told, and may mix old pages with checkpointed new ones:
it is never trusted. The damaged files are moved into ``DIR/damaged-TIME/``, the broker starts from an empty
state, and says so (``damage``); its producers resubmit their jobs, and sinks skip what is already written.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import json
import operator
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
from msgspec.structs import astuple, replace

from pervade.batchset import BatchSet, id_hash
from pervade.broker.seen import SeenIds
from pervade.broker.statelock import StateLock
from pervade.broker.wal import scan_log
from pervade.context import ContextSpec
from pervade.errors import StateError
from pervade.manifest import Manifest
from pervade.protocol import Batch, BatchResult, Member, member_spans

STORE_FILE = "broker.sqlite3"
#: Once the write-ahead log holds more than this, the broker finishes a checkpoint between two of its own
#: commits, so the log starts again from the beginning instead of growing through a long burst of writes.
WAL_LIMIT_BYTES = 64 * 1024 * 1024
#: Batches of a context's queue read ahead in one query (with their claims): the scheduler then takes them
#: from memory. A small bound, so a queue of millions stays on disk.
QUEUE_READ_AHEAD = 256
#: A slice holds at most about this many bytes of claims, so an ``Assign`` stays far below any peer's message
#: bound (its claims at most the broker's ``--slice-claims``).
SLICE_BYTES = 64 * 1024
#: A slice's id: ``slice~TOKEN~SEQ``, the token drawn once per state, so no id repeats after a reset.
SLICE_PREFIX = "slice~"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    context_id TEXT PRIMARY KEY,
    spec BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY,
    manifest BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY,            -- arrival order
    batch_id TEXT NOT NULL UNIQUE,
    job_id TEXT NOT NULL,
    context_id TEXT NOT NULL,
    status TEXT NOT NULL,
    queue_key INTEGER NOT NULL,         -- order in its context's queue; requeued batches go in front
    attempts INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    worker BLOB,
    sink BLOB,
    payload BLOB,                       -- unused: an older broker kept the Batch here (moved to payloads)
    result BLOB,                        -- the BatchResult (msgpack), until written
    error TEXT,
    pairs INTEGER NOT NULL DEFAULT 0,   -- claims in the batch (kept after the payload is dropped)
    content TEXT,                       -- digest of what the batch computes (content_digest), kept too
    root TEXT,                          -- a part of a split batch: the producer's batch it came from
    settled INTEGER NOT NULL DEFAULT 0, -- a split batch: pairs of its parts written or recorded failed
    members INTEGER NOT NULL DEFAULT 0  -- a slice: the producer's batches it holds (0: a batch of its own)
);
-- The claims of each batch not yet written, apart from its row: a row changes status four times or more, and
-- SQLite rewrites a row whole, with every overflow page of a large blob in it.
CREATE TABLE IF NOT EXISTS payloads (
    seq INTEGER PRIMARY KEY,            -- the batch's seq
    payload BLOB NOT NULL               -- the Batch (msgpack), dropped once written
);
-- The producer's batches queued inside a slice (``BrokerStore.add``): a resubmission is recognised by them.
CREATE TABLE IF NOT EXISTS members (
    batch_id TEXT PRIMARY KEY,          -- the producer's batch
    slice TEXT NOT NULL,                -- the slice it was queued in (carved or dissolved since, perhaps)
    content TEXT NOT NULL               -- its content_digest
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_queued ON batches (context_id, queue_key) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS batches_done ON batches (seq) WHERE status = 'done';
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class BatchStatus(enum.StrEnum):  # a str: hashed in C, and the store counts statuses at every change
    QUEUED = "queued"  # waiting in its context's queue
    ASSIGNED = "assigned"  # sent to a worker, no answer yet
    DONE = "done"  # outcome known (verdicts or a final error), not yet with a sink
    DELIVERED = "delivered"  # sent to a sink, not yet durable
    WRITTEN = "written"  # a sink acknowledged it durably written
    SPLIT = "split"  # it failed and its claims were split into two parts, queued as batches of their own


class StoredBatch(msgspec.Struct, frozen=True, gc=False):
    """A batch's bookkeeping row (without its claims or verdicts). A struct: a change of status copies it
    (``msgspec.structs.replace``) several times per batch."""

    batch_id: str
    job_id: str
    context_id: str
    status: BatchStatus
    attempts: int
    deliveries: int
    worker: bytes | None
    sink: bytes | None
    error: str | None
    pairs: int = 0
    #: ``content_digest`` of the batch (None for batches stored by an older broker).
    content: str | None = None
    #: A part of a split batch: the id of the producer's batch it came from (None for that batch itself).
    root: str | None = None
    #: A producer's batch that was split: pairs of its parts already written or recorded failed.
    settled: int = 0
    #: A slice (``BrokerStore.add``): how many producer batches it holds; 0 for a batch of its own.
    members: int = 0
    #: Its row's key (arrival order): a change is written by it, not by a search of the batch ids' index.
    seq: int = 0

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def weight(self) -> int:
        """Producer batches the row stands for: what the status counts count."""
        return self.members or 1


def content_digest(batch: Batch) -> str:
    """What a batch computes (its job, its context's id, template and claims; not when it was submitted, nor
    where the model lies: a producer resuming a job on another node may name a copy of the same files at
    another path), so the same batch id sent with other content is told apart from a resend."""
    key = _encoder.encode((batch.job_id, batch.context.context_id, batch.template_id, batch.template, batch.claims))
    return hashlib.sha256(key).hexdigest()[:32]


def same_content(digest: str, batch: Batch) -> bool:
    """Whether ``batch`` computes what ``digest`` (a stored ``content_digest``) says. A broker before this
    one digested the whole context, path included: a resend of a batch it stored is recognised too."""
    if digest == content_digest(batch):
        return True
    key = _encoder.encode((batch.job_id, batch.context, batch.template_id, batch.template, batch.claims))
    return digest == hashlib.sha256(key).hexdigest()[:32]


@dataclass
class JobRecord:
    """A job (one sweep from one producer). Small, so every job is also kept in memory."""

    job_id: str
    #: The producers' connections that submitted or ended it: each hears JobDone (in memory only; after a
    #: broker restart every producer connects anew and sends its EndJob again).
    producers: set[bytes] = field(default_factory=set)
    batches: int = 0
    pairs: int = 0
    ended: bool = False
    written: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    done_reported: bool = False
    #: Pairs of the batches written, and of those recorded failed (what ``pervade status`` counts done).
    pairs_written: int = 0
    pairs_failed: int = 0
    #: ``pervade.batchset``'s digest of the job's batch ids, as a number (None: stored by an older broker, not
    #: kept). Saved as ``digest``, in hex.
    ids_xor: int | None = 0
    #: Why the producer aborted the job (its input turned out bad midway), if it did.
    aborted: str | None = None

    @property
    def complete(self) -> bool:
        return self.ended and self.written + self.failed >= self.batches

    @property
    def digest(self) -> str | None:
        return None if self.ids_xor is None else BatchSet(digest_value=self.ids_xor).digest

    def holds(self) -> BatchSet:
        """The batches the broker holds for this job, as a producer counts them."""
        return BatchSet(self.batches, self.pairs, digest_value=self.ids_xor or 0)

    def add(self, batch_id: str, pairs: int) -> None:
        """Count a batch the broker now holds (once per batch: at every submission, so kept to a few
        operations)."""
        self.batches += 1
        self.pairs += pairs
        if self.ids_xor is not None:
            self.ids_xor ^= id_hash(batch_id)


def _job_json(job: JobRecord) -> str:
    record = {k: v for k, v in job.__dict__.items() if k not in ("producers", "ids_xor")}
    return json.dumps({**record, "digest": job.digest})


def _job_record(text: str) -> JobRecord:
    record = json.loads(text)
    record.pop("producer", None)  # an older broker kept the last producer's connection
    digest = record.pop("digest", None)  # an older broker kept no digest: counts are checked alone
    return JobRecord(**record, ids_xor=None if digest is None else int(digest or "0", 16))


#: The row's columns: the fields of ``StoredBatch``, of the same names, in its order.
_ROW = ", ".join(StoredBatch.__struct_fields__)
_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(Batch)
_result_decoder = msgspec.msgpack.Decoder(BatchResult)
_spec_decoder = msgspec.msgpack.Decoder(ContextSpec)
_manifest_decoder = msgspec.msgpack.Decoder(Manifest)


#: Before every queue key (keys go below zero as batches are requeued in front).
_FRONT = -(2**63)


@dataclass(frozen=True)
class Submitted:
    """A producer's batch id the store holds (``BrokerStore.submitted``)."""

    #: Its ``content_digest`` (None: stored by an older broker, or the id is a slice's).
    content: str | None
    #: The slice it was queued in, if any (its own row, once carved off alone or dissolved, comes first);
    #: for a slice's own id: itself.
    slice_id: str | None
    #: The id is the broker's name of a slice, not a producer's batch.
    is_slice: bool = False


@dataclass
class _QueueHead:
    """The front of one context's queue, read ahead: rows in queue order, each with its batch (decoded or
    not yet). Exact by construction: a batch that leaves the queue at the front is popped, one that leaves
    from elsewhere drops the whole head (read again when next needed), requeued ones go in front and new
    ones at the back while the head is the whole queue. Every queued batch up to ``after_key`` is in it, so
    the next read starts after that key: the batches in flight, which the database keeps as queued
    (``_durable``), are not read again each time."""

    entries: deque[tuple[StoredBatch, Batch | bytes]]
    #: The head holds the context's whole queue (its last read found fewer than ``QUEUE_READ_AHEAD``).
    whole: bool
    #: The largest queue key read into the head (or added to it while whole).
    after_key: int = _FRONT


class BrokerStore:
    """SQLite-backed state. Not thread-safe: only the broker's event loop calls it (``checkpoint`` aside).

    A turn's changes are kept in memory and written together at ``commit`` (each changed row once, as it is
    then), and the rows a turn needs are read from memory where it can: every row changed since
    the last commit, and every batch in flight (assigned, delivered: as many as workers hold and sinks have
    not yet acknowledged), with the claims of the assigned ones and the read-ahead front of each queue.
    Anything else is read from the database, after the changes still in memory are written to it."""

    def __init__(
        self, path: Path, fsync: bool = False, temporary_dir: Path | None = None, lock: StateLock | None = None
    ) -> None:
        self.path = path
        self._temporary_dir = temporary_dir
        self._lock = lock
        #: What was found wrong with the state when it was opened (commits a damaged log lost), or None.
        self.damage: str | None = None
        #: Rows changed since the last commit and rows in flight, as the database will hold them.
        self._rows: dict[str, StoredBatch] = {}
        #: The claims of the batches in flight to workers (a result is checked against them).
        self._batches: dict[str, Batch] = {}
        #: Batches whose rows changed since the last commit: evicted from memory at the commit unless in flight.
        self._changed: list[str] = []
        #: Rows changed since the last flush, each written once, as it is then: the batches queued since (with
        #: the columns their rows do not carry: claims, queue position, verdicts), and the other rows changed
        #: since (with such columns a change set).
        self._inserted: dict[str, dict[str, object]] = {}
        self._updated: dict[str, dict[str, object]] = {}
        #: For each row in ``_updated``: what the database holds for it (``_durable`` of the row as it was at
        #: its first change since the flush), so a change it would not see (an assignment) is not written.
        self._stored_as: dict[str, StoredBatch] = {}
        self._heads: dict[str, _QueueHead] = {}
        #: The slice (or batch) queued last, while more batches may still join it: until the next flush.
        self._open_slice: str | None = None
        #: Producer batches queued inside a slice since the last flush: id -> (slice id, content digest).
        self._members_unwritten: dict[str, tuple[str, str]] = {}
        wal = path.with_name(path.name + "-wal")
        log_scan = scan_log(wal)
        try:
            # Opened (and recovered) on a thread by run_broker, then used only by the broker's loop: one
            # thread at a time, so the same-thread check would only refuse the hand-over.
            self._db = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Before anything is written: how many log frames SQLite accepted (a checkpoint reports it).
            _, replayed, _ = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            lost = log_scan.lost_commits(replayed) if log_scan is not None and replayed >= 0 else 0
            if lost:
                # Never trusted (``open`` sets it aside): keep the log as found for a post-mortem, before a
                # write could reuse it or closing the database deletes it, and read or write nothing more.
                shutil.copyfile(wal, self._evidence)
                self.damage = (
                    f"the write-ahead log {wal.name} is damaged: {lost} commit(s) after frame {replayed} were lost"
                )
                return
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints run on a thread: see checkpoint()
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")  # a restarted log is cut back to this
            self._db.execute("PRAGMA cache_size=-16384")  # 16 MiB of page cache, whatever the queue holds
            self._db.executescript(_SCHEMA)
            self._upgrade()
            self._db.commit()
            self._checkpointer: sqlite3.Connection | None = None
            #: Batches per status, and queued batches per context, kept in step with every change.
            self.status_counts: Counter[BatchStatus] = Counter()
            self.queued: Counter[str] = Counter()
            self._min_key = self._max_key = self._max_seq = 0
            #: Jobs changed since the last commit: written once, at the commit, however many batches of the
            #: job the turn touched (a job's record was written once per batch, a third of a small batch's
            #: cost).
            self._dirty_jobs: dict[str, JobRecord] = {}
            self._load_counts()
            #: Every batch id the database holds may be in it, and no other: a new id costs no query.
            self._seen = SeenIds(batch_id for (batch_id,) in self._db.execute("SELECT batch_id FROM batches"))
            for (member_id,) in self._db.execute("SELECT batch_id FROM members"):
                self._seen.add(member_id)
            token = self.meta("slice_token")
            if token is None:
                token = secrets.token_hex(4)
                self.save_meta("slice_token", token)
                self._db.commit()
            self._slice_prefix = f"{SLICE_PREFIX}{token}~"
        except sqlite3.Error as exc:
            with contextlib.suppress(Exception):
                self._db.close()
            if _malformed(exc) and log_scan is not None and log_scan.body_bytes:
                # Malformed once a log was replayed: frames of the log that were already checkpointed into
                # the file were lost from it, so the file mixes old pages with new. The same case as a log
                # that lost commits: never trusted, set aside by ``open``.
                if wal.exists():
                    shutil.copyfile(wal, self._evidence)
                self.damage = f"the database {path.name} is malformed after replaying its write-ahead log ({exc})"
                return
            self.release()
            raise state_error(path, exc) from None

    @classmethod
    def open(cls, state_dir: Path | None, fsync: bool = False) -> BrokerStore:
        """The store in ``state_dir`` (created if missing, locked for this broker), or in a temporary
        directory removed at close."""
        if state_dir is None:
            temporary = Path(tempfile.mkdtemp(prefix="pervade-broker-"))
            return cls(temporary / STORE_FILE, fsync=fsync, temporary_dir=temporary)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create the state directory {state_dir}: {exc.strerror or exc}") from None
        lock = StateLock.acquire(state_dir)  # before the database is opened: a refused broker touches nothing
        store = cls(state_dir / STORE_FILE, fsync=fsync, lock=lock)
        if store.damage is None:
            return store
        aside = store._set_aside()
        fresh = cls(state_dir / STORE_FILE, fsync=fsync, lock=lock)
        fresh.damage = (
            f"{store.damage}. The damaged state was moved to {aside} and the broker starts from an empty state: "
            "producers resubmit their jobs (pervade produce --wait checks every pair), sinks skip what is written"
        )
        return fresh

    @property
    def _evidence(self) -> Path:
        return self.path.with_name(self.path.name + "-wal.damaged")

    def _set_aside(self) -> Path:
        """Move the database and its log (as found at open) out of the way, keeping the lock; returns where
        they went."""
        self._db.close()
        aside = self.path.parent / time.strftime("damaged-%Y%m%dT%H%M%S")
        aside.mkdir(exist_ok=True)
        self.path.rename(aside / self.path.name)
        if self._evidence.exists():  # the log as found (gone when SQLite itself gave up on it)
            self._evidence.rename(aside / (self.path.name + "-wal"))
        for leftover in (self.path.with_name(self.path.name + suffix) for suffix in ("-wal", "-shm")):
            leftover.unlink(missing_ok=True)
        return aside

    def note_endpoint(self, endpoint: str) -> None:
        """Record where this broker listens in its lock, for a second broker that is refused."""
        if self._lock is not None:
            self._lock.note(endpoint)

    def close(self) -> None:
        self.commit()
        self._db.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._temporary_dir is not None:
            shutil.rmtree(self._temporary_dir, ignore_errors=True)
            self._temporary_dir = None

    def commit(self) -> None:
        """Write the batches and jobs changed since the last commit, and commit everything."""
        self._flush()
        if self._dirty_jobs:
            rows = [(job.job_id, _job_json(job)) for job in self._dirty_jobs.values()]
            self._db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?)", rows)
            self._dirty_jobs.clear()
        self._db.commit()
        for batch_id in self._changed:  # what is no longer in flight is read from the database from now on
            row = self._rows.get(batch_id)
            if row is not None and row.status not in _IN_FLIGHT:
                del self._rows[batch_id]
            if row is None or row.status is not BatchStatus.ASSIGNED:
                self._batches.pop(batch_id, None)
        self._changed.clear()

    def _flush(self) -> None:
        """Write the rows changed in memory since the last flush (not committed): before any read of the
        database that they could change. Each row is written once, as it is now, however often it changed: an
        INSERT for a batch queued since, an UPDATE for any other, one ``executemany`` for each shape of
        statement."""
        inserted, self._inserted = self._inserted, {}  # a statement that fails is not run again at the next flush
        updated, self._updated = self._updated, {}
        stored_as, self._stored_as = self._stored_as, {}
        members, self._members_unwritten = self._members_unwritten, {}
        self._open_slice = None  # what is written no longer grows
        rows = self._rows
        if inserted:
            self._db.executemany(_INSERT, [
                (*astuple(_durable(rows[batch_id])), extra["queue_key"], extra.get("result"))
                for batch_id, extra in inserted.items()
            ])  # fmt: skip
            # Encoded now, once: a slice grew until this flush.
            claims = [
                (rows[batch_id].seq, _encoder.encode(extra["payload"])) for batch_id, extra in inserted.items()
                if extra["payload"] is not None
            ]  # fmt: skip
            self._db.executemany("INSERT INTO payloads VALUES (?, ?)", claims)
        if members:
            self._db.executemany(
                "INSERT INTO members VALUES (?, ?, ?)",
                [(member_id, slice_id, content) for member_id, (slice_id, content) in members.items()],
            )
        by_shape: dict[tuple[str, ...], list[tuple]] = {}
        dropped, replaced = [], []
        written = []
        for batch_id, extra in updated.items():
            row = _durable(rows[batch_id])
            stored = stored_as[batch_id]
            if not extra and row == stored:  # assigned, or copied: the database keeps it queued
                continue
            if extra == _DROP_CONTENT and row == replace(stored, status=_WRITTEN, sink=None):
                written.append(row.seq)  # nothing else changed: written by ranges of seqs, below
                continue
            if "payload" in extra:  # the claims are in their own table: dropped, or a carved slice's rest
                payload = extra.pop("payload")
                if payload is None:
                    dropped.append((row.seq,))
                else:
                    replaced.append((_encoder.encode(payload), row.seq))
            by_shape.setdefault(tuple(extra), []).append((*_changing(row), *extra.values(), row.seq))
        for shape, values in by_shape.items():
            self._db.executemany(_update_statement(shape), values)
        if dropped:
            self._db.executemany("DELETE FROM payloads WHERE seq = ?", dropped)
        if replaced:
            self._db.executemany("UPDATE payloads SET payload = ? WHERE seq = ?", replaced)
        if written:
            # A sink acknowledges its file's batches together, most of them neighbours in arrival order: a
            # statement per run of seqs, not per row (SQLite's per-statement cost was most of a written batch's).
            runs = _runs(sorted(written))
            self._db.executemany(_WRITTEN_RUN, runs)
            self._db.executemany("DELETE FROM payloads WHERE seq BETWEEN ? AND ?", runs)

    def checkpoint(self) -> bool:
        """Copy the write-ahead log into the database file. Blocking: call on a thread (it has its own
        connection), never from the event loop; PASSIVE never blocks the broker's writes. Returns True
        when the log has grown past ``WAL_LIMIT_BYTES``: then call ``restart_log``."""
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(self.path, check_same_thread=False)
        _, log_frames, _ = self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        page_size = self._checkpointer.execute("PRAGMA page_size").fetchone()[0]
        return log_frames * page_size > WAL_LIMIT_BYTES

    def restart_log(self) -> None:
        """Finish the checkpoint on the broker's own connection, between its commits: no write races it,
        so it completes, and the next write starts the log afresh. Quick: the thread already copied all
        but the last few commits."""
        self.commit()
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _upgrade(self) -> None:
        """State written by an older broker lacks ``pairs`` and ``content`` (added, as 0 and NULL for the
        batches already there), and keeps claims in the batch's row (moved to ``payloads``, once)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(batches)")}
        if self.meta("payloads_apart") is None:
            self._db.execute("INSERT INTO payloads SELECT seq, payload FROM batches WHERE payload IS NOT NULL")
            self._db.execute("UPDATE batches SET payload = NULL WHERE payload IS NOT NULL")
            self.save_meta("payloads_apart", True)
        if "pairs" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN pairs INTEGER NOT NULL DEFAULT 0")
        if "content" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN content TEXT")
        if "root" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN root TEXT")
            self._db.execute("ALTER TABLE batches ADD COLUMN settled INTEGER NOT NULL DEFAULT 0")
        if "members" not in columns:
            self._db.execute("ALTER TABLE batches ADD COLUMN members INTEGER NOT NULL DEFAULT 0")

    def _load_counts(self) -> None:
        # A slice counts the producer batches it holds; once dissolved, nothing (they count as themselves).
        weight = "sum(CASE WHEN status = 'split' AND members > 0 THEN 0 ELSE max(members, 1) END)"
        for status, count in self._db.execute(f"SELECT status, {weight} FROM batches GROUP BY status"):
            self.status_counts[BatchStatus(status)] = count
        query = f"SELECT context_id, {weight} FROM batches WHERE status = 'queued' GROUP BY context_id"
        self.queued.update(dict(self._db.execute(query).fetchall()))
        query = "SELECT coalesce(min(queue_key), 0), coalesce(max(queue_key), 0), coalesce(max(seq), 0) FROM batches"
        self._min_key, self._max_key, self._max_seq = self._db.execute(query).fetchone()

    # --- recovery --------------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """After a restart no worker or sink of the old broker is known: batches they held are queued (the
        database never held their assignments, ``_durable``; a state written by an older broker may, and
        those go back to the front of their queues, not counted as attempts: the broker failed, not the
        batch), and deliveries never acknowledged will be redelivered. Returns (requeued, to_redeliver)."""
        self._flush()
        base = self._min_key - 1 - (self._db.execute("SELECT coalesce(max(seq), 0) FROM batches").fetchone()[0])
        requeued = self._db.execute(
            "UPDATE batches SET status = 'queued', worker = NULL, attempts = max(attempts - 1, 0),"
            " queue_key = ? + seq WHERE status = 'assigned'",
            (base,),
        ).rowcount
        redeliver = self._db.execute(
            "UPDATE batches SET status = 'done', sink = NULL WHERE status = 'delivered'"
        ).rowcount
        self._db.commit()
        self.status_counts.clear()
        self.queued.clear()
        self._rows.clear()
        self._batches.clear()
        self._changed.clear()
        self._heads.clear()
        self._load_counts()
        return requeued, redeliver

    # --- contexts and jobs -----------------------------------------------------------------------

    def save_context(self, spec: ContextSpec) -> None:
        self._db.execute("INSERT OR IGNORE INTO contexts VALUES (?, ?)", (spec.context_id, _encoder.encode(spec)))

    def contexts(self) -> dict[str, ContextSpec]:
        return {
            cid: _spec_decoder.decode(spec) for cid, spec in self._db.execute("SELECT context_id, spec FROM contexts")
        }

    def save_manifest(self, manifest: Manifest) -> None:
        self._db.execute("INSERT OR IGNORE INTO manifests VALUES (?, ?)", (manifest.digest, _encoder.encode(manifest)))

    def manifests(self) -> dict[str, Manifest]:
        return {d: _manifest_decoder.decode(m) for d, m in self._db.execute("SELECT digest, manifest FROM manifests")}

    def save_job(self, job: JobRecord) -> None:
        """Save the job with the next commit (in the same transaction as the batches that changed it)."""
        self._dirty_jobs[job.job_id] = job

    def jobs(self) -> dict[str, JobRecord]:
        jobs = {}
        for job_id, text in self._db.execute("SELECT job_id, record FROM jobs"):
            jobs[job_id] = _job_record(text)
        return jobs

    def save_meta(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: object = None) -> object:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # --- batches: reading ------------------------------------------------------------------------

    def get(self, batch_id: str) -> StoredBatch | None:
        row = self._rows.get(batch_id)
        if row is not None:
            return row
        if batch_id not in self._seen:  # surely new (most submissions): no query
            return None
        # Not changed since the last commit (a changed row is in memory until then): the database has it.
        found = self._db.execute(f"SELECT {_ROW} FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if found is None else _stored(found)

    def batch(self, batch_id: str) -> Batch:
        held = self._batches.get(batch_id)
        if held is not None:
            return held
        self._flush()
        query = "SELECT payload FROM payloads WHERE seq = (SELECT seq FROM batches WHERE batch_id = ?)"
        (payload,) = self._db.execute(query, (batch_id,)).fetchone()
        return _batch_decoder.decode(payload)

    def result(self, batch_id: str) -> BatchResult:
        self._flush()
        (result,) = self._db.execute("SELECT result FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        return _result_decoder.decode(result)

    def next_queued(self, context_id: str) -> StoredBatch | None:
        found = self.next_queued_batch(context_id)
        return None if found is None else found[0]

    def next_queued_batch(self, context_id: str) -> tuple[StoredBatch, Batch] | None:
        """The front of a context's queue, its row and its batch (read ahead, ``QUEUE_READ_AHEAD`` at a time)."""
        if not self.queued.get(context_id):
            return None
        head = self._heads.get(context_id)
        if head is None or not head.entries:
            # A head that held the whole queue and ran out while batches are counted queued is not trusted:
            # read from the front.
            after_key = head.after_key if head is not None and not head.whole else _FRONT
            head = self._heads[context_id] = self._read_head(context_id, after_key)
            if not head.entries:
                return None
        row, batch = head.entries[0]
        if isinstance(batch, bytes):
            batch = _batch_decoder.decode(batch)
            head.entries[0] = (row, batch)
        self._batches[row.batch_id] = batch  # an assignment keeps it; a commit forgets it otherwise
        self._changed.append(row.batch_id)
        return row, batch

    def _read_head(self, context_id: str, after_key: int) -> _QueueHead:
        """The queue's next batches after ``after_key``, ``QUEUE_READ_AHEAD`` at a time. The database keeps
        batches in flight as queued (``_durable``): those are skipped, page after page if need be (only a
        read from the front meets them, when a batch left the middle of the queue)."""
        self._flush()
        entries: deque[tuple[StoredBatch, Batch | bytes]] = deque()
        rows = self._rows
        while True:
            found = self._db.execute(
                f"SELECT {_ROW}, queue_key, payloads.payload FROM batches JOIN payloads USING (seq)"
                " WHERE status = 'queued' AND context_id = ? AND queue_key > ? ORDER BY queue_key LIMIT ?",
                (context_id, after_key, QUEUE_READ_AHEAD),
            ).fetchall()
            for row in found:
                held = rows.get(row[0])
                if held is None:
                    entries.append((_stored(row[:-2]), row[-1]))
                elif held.status is _QUEUED:
                    entries.append((held, row[-1]))
            if found:
                after_key = found[-1][-2]
            if entries or len(found) < QUEUE_READ_AHEAD:
                return _QueueHead(entries, whole=len(found) < QUEUE_READ_AHEAD, after_key=after_key)

    def get_with_batch(self, batch_id: str) -> tuple[StoredBatch, Batch | None] | None:
        """A batch's row and, while the store still holds it (until written), the batch."""
        row = self.get(batch_id)
        if row is None:
            return None
        if row.status in (BatchStatus.WRITTEN, BatchStatus.SPLIT):
            return row, None
        return row, self.batch(batch_id)

    def queued_ids(self, context_id: str) -> list[str]:
        self._flush()
        query = "SELECT batch_id FROM batches WHERE status = 'queued' AND context_id = ? ORDER BY queue_key"
        return self._still_queued(r[0] for r in self._db.execute(query, (context_id,)))

    def queued_ids_of_job(self, job_id: str) -> list[str]:
        """A job's queued batches (a scan: only an aborted job asks)."""
        self._flush()
        query = "SELECT batch_id FROM batches WHERE status = 'queued' AND job_id = ? ORDER BY seq"
        return self._still_queued(r[0] for r in self._db.execute(query, (job_id,)))

    def _still_queued(self, batch_ids: Iterable[str]) -> list[str]:
        """Of batches the database holds as queued, those not in flight (``_durable``)."""
        rows = self._rows
        return [batch_id for batch_id in batch_ids if (row := rows.get(batch_id)) is None or row.status is _QUEUED]

    def done_ids(self, limit: int) -> list[str]:
        """Batches with a known outcome not yet with a sink, oldest first."""
        self._flush()
        query = "SELECT batch_id FROM batches WHERE status = 'done' ORDER BY seq LIMIT ?"
        return [r[0] for r in self._db.execute(query, (limit,))]

    # --- batches: changing -----------------------------------------------------------------------

    def add(self, batch: Batch, context_id: str | None = None, slice_claims: int = 0) -> None:
        """Queue a new batch at the back of its context's queue (``context_id``: its context's id, when the
        caller has it at hand).

        A small batch that follows one of the same job, context, template and submission time (a producer
        stamps a trip's batches with one) queued since the last flush joins it in a *slice*: one row, one
        assignment, one result and one delivery for many producer batches, up to ``slice_claims`` claims (0:
        none). A producer's batch of one claim would otherwise cost every hop a row, a message and a commit of
        its own (issue 21: the broker's cost per batch is the pipeline's
        bound at batch size 1). The slice closes at the flush, before anything reads it back, so a turn's
        submissions slice and nothing waits for more to come. Each producer batch keeps its id, its content
        digest (the ``members`` table: a resubmission is recognised) and its own row in the output."""
        context_id = context_id or batch.context.context_id
        if slice_claims and self._join_open_slice(batch, context_id, slice_claims):
            return
        if not self.queued.get(context_id):  # an empty queue is read ahead whole: no query to find the batch
            self._heads[context_id] = _QueueHead(deque(), whole=True)
        self._max_key += 1
        stored = self._insert(batch, context_id, self._max_key, root=None)
        self._open_slice = batch.batch_id
        head = self._heads.get(context_id)
        if head is not None and head.whole:  # else it is behind what the head holds, read when reached
            if len(head.entries) < QUEUE_READ_AHEAD:
                head.entries.append((stored, batch))
                head.after_key = self._max_key
            else:
                head.whole = False

    def _insert(self, batch: Batch, context_id: str, queue_key: int, root: str | None) -> StoredBatch:
        """A new queued row for ``batch`` (a slice when it names members)."""
        members = len(batch.members)
        content = None if members else content_digest(batch)
        self._max_seq += 1
        row = StoredBatch(batch.batch_id, batch.job_id, context_id, BatchStatus.QUEUED, 0, 0, None, None, None,
                          len(batch.claims), content, root, members=members, seq=self._max_seq)  # fmt: skip
        self._inserted[batch.batch_id] = {
            "queue_key": queue_key,
            "payload": batch,  # encoded at the flush
            "bytes": _claim_bytes(batch),
        }
        self._rows[batch.batch_id] = row
        self._seen.add(batch.batch_id)
        self._changed.append(batch.batch_id)
        self._count(None, BatchStatus.QUEUED, context_id, row.weight)
        return row

    def carve(self, row: StoredBatch, batch: Batch, batches: int) -> tuple[StoredBatch, Batch]:
        """Cut the first ``batches`` producer batches off the slice at the front of its queue (``row`` and
        ``batch``, as ``next_queued_batch`` gave them), as a row of their own in front of the rest: a worker is
        given its share of the queue and its credit's worth, no more (``Scheduler.dispatch``), and a small job
        still spreads over the idle workers. Returns the front part (a slice, or a batch alone)."""
        if batches >= row.members:
            return row, batch
        front_members = batch.members[:batches]
        cut = member_spans(front_members)[-1][1]
        if batches == 1:
            front = msgspec.structs.replace(batch, batch_id=front_members[0].batch_id, members=[],
                                            claims=batch.claims[:cut])  # fmt: skip
        else:
            front_id = f"{self._slice_prefix}{self._max_seq + 1}"  # the seq _insert gives it
            if front_id in self._seen:  # a producer's batch took the name: the slice goes whole
                return row, batch
            front = msgspec.structs.replace(batch, batch_id=front_id, members=front_members, claims=batch.claims[:cut])
        rest = msgspec.structs.replace(batch, members=batch.members[batches:], claims=batch.claims[cut:])
        kept = {"payload": rest, "pairs": len(rest.claims), "members": len(rest.members)}
        rest_row = self._move(row, kept, pairs=len(rest.claims), members=len(rest.members))
        self.status_counts[_QUEUED] -= len(front_members)  # counted again by the front part's insert
        self.queued[row.context_id] -= len(front_members)  # (the rest holds one at least: never zero here)
        self._min_key -= 1
        front_row = self._insert(front, row.context_id, self._min_key, root=None)
        self._batches[front.batch_id], self._batches[rest.batch_id] = front, rest  # as next_queued_batch keeps
        self._open_slice = None
        head = self._heads.get(row.context_id)
        if head is not None and head.entries and head.entries[0][0].batch_id == row.batch_id:
            head.entries[0] = (rest_row, rest)
            head.entries.appendleft((front_row, front))
        else:  # not read ahead as the front (never, from dispatch): read the head again when needed
            self._heads.pop(row.context_id, None)
        return front_row, front

    def _join_open_slice(self, batch: Batch, context_id: str, slice_claims: int) -> bool:
        """Add ``batch`` to the slice queued last, when it may join it; False when it may not."""
        open_id = self._open_slice
        if open_id is None:
            return False
        extra = self._inserted.get(open_id)
        row = self._rows.get(open_id)
        if extra is None or row is None or row.status is not _QUEUED or row.root is not None:
            return False
        held: Batch = extra["payload"]  # type: ignore[assignment]
        size = _claim_bytes(batch)
        if (
            row.pairs + len(batch.claims) > slice_claims
            or extra["bytes"] + size > SLICE_BYTES  # type: ignore[operator]
            or row.context_id != context_id
            or held.job_id != batch.job_id
            or held.template_id != batch.template_id
            or held.template != batch.template
            or held.submitted_at != batch.submitted_at  # one time per slice: each row of the output keeps its own
        ):
            return False
        if not row.members:  # the open batch becomes a slice: renamed before anything outside the store saw it
            slice_id = f"{self._slice_prefix}{row.seq}"
            if slice_id in self._seen:  # a producer's batch took the name: no slice
                return False
            first = held
            held = msgspec.structs.replace(
                first, batch_id=slice_id, claims=list(first.claims), members=[Member(first.batch_id, len(first.claims))]
            )
            extra["payload"] = held
            del self._inserted[open_id], self._rows[open_id]
            self._inserted[slice_id] = extra
            self._members_unwritten[first.batch_id] = (slice_id, row.content or "")
            row = replace(row, batch_id=slice_id, content=None, members=1)
            self._seen.add(slice_id)
            self._open_slice = open_id = slice_id
            self._changed.append(slice_id)
        content = content_digest(batch)
        held.claims.extend(batch.claims)  # the slice's own lists (copied above): nobody else holds them
        held.members.append(Member(batch.batch_id, len(batch.claims)))
        extra["bytes"] += size  # type: ignore[operator]
        row = self._rows[open_id] = replace(row, pairs=row.pairs + len(batch.claims), members=row.members + 1)
        self._members_unwritten[batch.batch_id] = (open_id, content)
        self._seen.add(batch.batch_id)
        self._count(None, _QUEUED, context_id)
        head = self._heads.get(context_id)
        if head is not None and head.entries and head.entries[-1][0].seq == row.seq:
            head.entries[-1] = (row, held)
        return True

    def submitted(self, batch_id: str) -> Submitted | None:
        """What the store holds under a producer's batch id: a batch of its own, or a member of a slice (its
        content digest, and the slice it was queued in). None for an id never submitted."""
        row = self.get(batch_id)
        if row is not None:
            return Submitted(row.content, None if not row.members else row.batch_id, is_slice=bool(row.members))
        member = self._members_unwritten.get(batch_id)
        if member is None and batch_id in self._seen:
            member = self._db.execute("SELECT slice, content FROM members WHERE batch_id = ?", (batch_id,)).fetchone()
        return None if member is None else Submitted(member[1], member[0])

    def taken(self, batch_id: str) -> bool:
        """Whether the id names anything the store holds: a batch, a slice, or a batch inside a slice."""
        return self.submitted(batch_id) is not None

    def assign(self, row: StoredBatch, worker: bytes, count_attempt: bool = True) -> None:
        """Hand the batch to ``worker``: an attempt, unless it is a copy of one already running elsewhere."""
        attempts = self._current(row).attempts + (1 if count_attempt else 0)
        self._move(row, status=BatchStatus.ASSIGNED, worker=worker, attempts=attempts)

    def requeue(self, row: StoredBatch, count_attempt: bool) -> None:
        """Back to the front of its queue. An attempt that was not the batch's fault is not counted."""
        self._min_key -= 1
        attempts = self._current(row).attempts
        attempts = attempts if count_attempt else max(attempts - 1, 0)
        moved = self._move(row, {"queue_key": self._min_key}, status=BatchStatus.QUEUED, worker=None,
                           attempts=attempts)  # fmt: skip
        head = self._heads.get(moved.context_id)
        if head is not None:  # its key is now the queue's smallest: the front
            batch = self._batches.get(moved.batch_id)
            if batch is None:
                del self._heads[moved.context_id]
            else:
                head.entries.appendleft((moved, batch))

    def complete(self, row: StoredBatch, result: BatchResult) -> StoredBatch:
        """Keep the batch's verdicts; returns its row as it is now."""
        return self._move(row, {"result": _encoder.encode(result)}, status=BatchStatus.DONE, worker=None)

    def split(self, row: StoredBatch, parts: list[Batch]) -> None:
        """Replace a failed batch by ``parts`` (its claims in pieces), queued at the front in their order;
        the batch keeps only its bookkeeping. Each part names the producer's batch it came from (``root``)."""
        taken = [part.batch_id for part in parts if self.taken(part.batch_id)]
        if taken:  # checked before any change: an insert that fails at the commit would fail the whole turn
            raise StateError(f"cannot split batch {row.batch_id}: the state already holds {', '.join(taken)}")
        split = self._move(row, _DROP_CONTENT, status=BatchStatus.SPLIT, worker=None)
        self._queue_in_front(parts, split.context_id, root=split.root or split.batch_id)

    def dissolve(self, row: StoredBatch) -> list[StoredBatch]:
        """Replace a slice by the producer's batches it holds, each queued at the front again as a batch of its
        own (in order, with no attempt counted), so a failure is pinned on a batch, not on its neighbours. The
        slice keeps only its bookkeeping (``split``, counted towards no job nor status). Returns the batches'
        rows."""
        batch = self.batch(row.batch_id)
        dissolved = self._move(row, _DROP_CONTENT, status=BatchStatus.SPLIT, worker=None)
        self.status_counts[BatchStatus.SPLIT] -= dissolved.weight  # its batches count as themselves below
        parts = [
            msgspec.structs.replace(batch, batch_id=member.batch_id, claims=batch.claims[start:end], members=[])
            for member, (start, end) in zip(batch.members, member_spans(batch.members), strict=True)
        ]
        self._open_slice = None
        return self._queue_in_front(parts, dissolved.context_id, root=None)

    def _queue_in_front(self, batches: list[Batch], context_id: str, root: str | None) -> list[StoredBatch]:
        """Queue ``batches`` at the front of their context's queue, in their order; returns their rows."""
        head = self._heads.get(context_id)
        rows = []
        for batch in reversed(batches):
            self._min_key -= 1
            stored = self._insert(batch, context_id, self._min_key, root=root)
            rows.append(stored)
            if head is not None:
                head.entries.appendleft((stored, batch))
        return rows[::-1]

    def settle_part(self, part: StoredBatch) -> StoredBatch:
        """A part of a split batch is written (verdicts or failure): count its pairs towards its root, which is
        written itself once every pair is (keeping the first failure of its parts as its error). Returns the
        root as it is now."""
        root = self.get(part.root or "")
        if root is None:
            raise StateError(f"batch {part.batch_id} is part of {part.root}, which the state does not hold")
        failure = f"{part.batch_id}: {part.error}" if part.error is not None else None
        settled, error = root.settled + part.pairs, root.error or failure
        if settled < root.pairs:
            return self._move(root, settled=settled, error=error)
        return self._move(root, settled=settled, error=error, status=BatchStatus.WRITTEN, sink=None)

    def fail(self, row: StoredBatch, error: str) -> None:
        self._move(row, status=BatchStatus.DONE, worker=None, error=error)

    def deliver(self, row: StoredBatch, sink: bytes) -> None:
        deliveries = self._current(row).deliveries + 1
        self._move(row, status=BatchStatus.DELIVERED, sink=sink, deliveries=deliveries)

    def undeliver(self, row: StoredBatch) -> None:
        self._move(row, status=BatchStatus.DONE, sink=None)

    def written(self, row: StoredBatch) -> None:
        """Durable in a sink's output: the claims and verdicts are no longer needed here."""
        self._move(row, _DROP_CONTENT, status=BatchStatus.WRITTEN, sink=None)

    def _current(self, row: StoredBatch) -> StoredBatch:
        """The row as the store holds it now (a caller's copy may predate a change made since)."""
        return self._rows.get(row.batch_id, row)

    def _move(self, row: StoredBatch, columns: dict[str, object] | None = None, **changes: object) -> StoredBatch:
        """Change a batch's row: ``changes`` are its new fields, and ``columns`` sets columns the row does not
        carry (claims, verdicts, queue position). The row in memory is the one truth until the flush writes it.
        Returns the row as it is now."""
        current = self._current(row)
        moved = replace(current, **changes)
        batch_id = moved.batch_id
        self._rows[batch_id] = moved
        self._changed.append(batch_id)
        unwritten = self._inserted.get(batch_id)
        if unwritten is None:
            unwritten = self._updated.get(batch_id)
            if unwritten is None:  # its first change since the flush: the database holds it as it was
                unwritten = self._updated[batch_id] = {}
                self._stored_as[batch_id] = _durable(current)
        if columns:
            unwritten.update(columns)
        if current.status is _QUEUED and moved.status is not _QUEUED:
            self._left_queue(moved)
        self._count(current.status, moved.status, moved.context_id, moved.weight)
        return moved

    def _left_queue(self, row: StoredBatch) -> None:
        head = self._heads.get(row.context_id)
        if head is None:
            return
        if head.entries and head.entries[0][0].batch_id == row.batch_id:
            head.entries.popleft()
        else:  # from the middle of the queue (a job aborted, a context failed): read the head again when needed
            del self._heads[row.context_id]

    def _count(self, old: BatchStatus | None, new: BatchStatus, context_id: str, weight: int = 1) -> None:
        """Move ``weight`` producer batches (a slice's members, or 1) from status ``old`` to ``new``."""
        counts, queued = self.status_counts, self.queued
        if old is not None:
            counts[old] -= weight
            if old is _QUEUED:
                left = queued[context_id] - weight
                if left:
                    queued[context_id] = left
                else:
                    del queued[context_id]
        counts[new] += weight
        if new is _QUEUED:
            queued[context_id] += weight


#: Read at every change of a batch: a module constant is a faster read than an Enum class's attribute.
_QUEUED = BatchStatus.QUEUED
_ASSIGNED = BatchStatus.ASSIGNED
_WRITTEN = BatchStatus.WRITTEN


def _claim_bytes(batch: Batch) -> int:
    """About the bytes a batch's claims take in a message (what bounds a slice)."""
    return sum(len(claim.text) + len(claim.claim_id) + 16 for claim in batch.claims)


def _durable(row: StoredBatch) -> StoredBatch:
    """A row as the database keeps it. An assignment is not written: it dies with the broker, whose successor
    would requeue the batch without counting the attempt (``recover``), so the database keeps an assigned
    batch as that: queued, with the attempts before this one (one write fewer per batch)."""
    if row.status is not _ASSIGNED:
        return row
    return replace(row, status=_QUEUED, worker=None, attempts=max(row.attempts - 1, 0))


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ``seqs`` as runs of consecutive numbers, (first, last) each."""
    runs = []
    first = last = seqs[0]
    for seq in seqs[1:]:
        if seq != last + 1:
            runs.append((first, last))
            first = seq
        last = seq
    runs.append((first, last))
    return runs


#: Statuses of a batch a peer holds: their rows stay in memory, bounded by workers' and sinks' windows. (A done
#: batch is delivered in the turn it completes when a sink is there; without one, it waits on disk.)
_IN_FLIGHT = frozenset({BatchStatus.ASSIGNED, BatchStatus.DELIVERED})


#: What a written or split batch drops: its claims and verdicts (the row stays, with its digest).
_DROP_CONTENT: dict[str, object] = {"payload": None, "result": None}
#: Batches written with no other change since the last flush, a run of seqs at a time (``_flush``).
_WRITTEN_RUN = "UPDATE batches SET status = 'written', sink = NULL, result = NULL WHERE seq BETWEEN ? AND ?"
#: A row's fields that change after it is inserted, in the order of ``_update_statement``'s values.
_CHANGING = ("status", "attempts", "deliveries", "worker", "sink", "error", "settled")
_changing = operator.attrgetter(*_CHANGING)
#: A new batch: its row's fields, then the columns the row does not carry.
_INSERTED = (*StoredBatch.__struct_fields__, "queue_key", "result")
_INSERT = f"INSERT INTO batches ({', '.join(_INSERTED)}) VALUES ({', '.join('?' * len(_INSERTED))})"


@functools.cache
def _update_statement(columns: tuple[str, ...]) -> str:
    """The UPDATE of a row's changing fields and of ``columns`` (values in that order, then the row's seq)."""
    assignments = ", ".join(f"{column} = ?" for column in (*_CHANGING, *columns))
    return f"UPDATE batches SET {assignments} WHERE seq = ?"


def _stored(row: tuple) -> StoredBatch:
    return StoredBatch(row[0], row[1], row[2], _STATUS_OF[row[3]], *row[4:])


#: A status by its value: a dict read, where calling the Enum costs a microsecond for every row read ahead.
_STATUS_OF = {status.value: status for status in BatchStatus}


#: SQLite's primary result codes that mean the file itself is bad (https://www.sqlite.org/rescode.html).
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26


def _malformed(error: sqlite3.Error) -> bool:
    """Whether SQLite found the file itself bad (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``)."""
    return ((getattr(error, "sqlite_errorcode", None) or 0) & 0xFF) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def state_error(path: Path, error: sqlite3.Error) -> StateError:
    """The error a broker reports for a state database SQLite cannot use, with what to do about it: a
    damaged file is set aside, anything else (a full disk, permissions) fixed, keeping the state."""
    if _malformed(error):
        return StateError(
            f"the broker's state database {path} is damaged or not a pervade state ({error}). Move the state "
            f"directory aside (mv {path.parent} {path.parent}.damaged) and start the broker with an empty "
            "--state: running producers (pervade produce --wait) resubmit what it held, and sinks skip what is "
            "already written"
        )
    name = getattr(error, "sqlite_errorname", None) or type(error).__name__
    return StateError(
        f"the broker's state database {path} cannot be written or read ({error}, {name}): fix the cause (free "
        "disk space, permissions) and start the broker again on the same --state; nothing it holds is lost"
    )

"""Publishing into an output directory that several sinks share, so that each batch is in it exactly once.

A batch can reach two sinks: the broker redelivers what a sink had not acknowledged when that sink was
declared dead (stalled, say, by a swapping node or SIGSTOP) or when the broker lost its state, and the first
sink may still wake up and write it. So a sink publishes a file only under the directory's commit lock
(``flock`` on ``.OUT.partial/commit.lock``; the kernel, or the NFS lock manager, releases it if the sink
dies): it rereads what other sinks published, drops from its file the batches already there (rewriting
the file, a rare path), renames the file into place, and notes its batches before it lets go. Failure
records are appended under the same lock with the same check. Whoever publishes a batch second finds it and
skips it, whatever the timing, so no batch is written twice; and both may acknowledge it, since it is
durable either way.

What other sinks published is read from two places: the output directory itself (``sinks/written.py``),
and the lock file, to which every publication appends its batch ids. On a network file system a directory
listing may be cached for a while, but taking a lock revalidates the locked file's contents: the lock file
is the record every sink is sure to see.

Under the same lock, files an earlier version wrote there (without the columns added since) are upgraded to
today's schema before anything is published beside them (``sinks/parquet.py``), so the directory holds one
schema and every reader reads it whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from pervade.errors import ConfigError
from pervade.procs import process_alive
from pervade.sinks.coverage import covering_ids
from pervade.sinks.failures import FailureLog, fsync_directory
from pervade.sinks.schema import upgraded_copy
from pervade.sinks.staging import StagedFile, staged_owner, staging_dir_for
from pervade.sinks.written import WrittenIndex

log = structlog.get_logger("sinks")

LOCK_FILE = "commit.lock"


@dataclass(frozen=True)
class Published:
    """What publishing a staged file came to."""

    #: Batches now durable in the output (every batch of the file, those another sink wrote first included).
    batch_ids: list[str]
    #: Rows this file added, and the batches it did not write because another sink had.
    rows: int
    skipped: int
    path: Path | None


class OutputDirectory:
    """The output directory of a run: its staging directory, its commit lock, and the batches in it.

    Blocking I/O and a blocking lock: an asyncio caller runs ``publish`` and ``record_failures`` on a thread.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the output directory {self.out_dir}: {exc.strerror or exc}") from None
        self.staging_dir = staging_dir_for(self.out_dir)
        self.index = WrittenIndex(self.out_dir)
        self._lock_path = self.staging_dir / LOCK_FILE
        #: Bytes of the lock file's ledger already read, and who published last (named when we must wait).
        self._ledger_read = 0
        self._last_publisher = ""

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """Hold the commit lock, with what every sink published read in; yields the lock file's descriptor."""
        self.staging_dir.mkdir(exist_ok=True)  # an operator may have removed it as a leftover
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                started = time.monotonic()
                log.warning("waiting_for_commit_lock", lock=str(self._lock_path), last_publisher=self._last_publisher)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
                log.info("commit_lock_taken", waited_s=round(time.monotonic() - started, 3))
            self._read_ledger(descriptor)
            self.index.refresh()
            self._upgrade_outdated()
            yield descriptor
        finally:
            os.close(descriptor)  # releases the lock

    def _upgrade_outdated(self) -> None:
        """Rewrite, with today's schema, the files of an earlier version found in the output (under the lock:
        no other sink publishes or upgrades meanwhile; readers see the old file or the new one, whole). One
        that cannot be written now (a full disk) is tried again next time; one that cannot be read is left."""
        for path in sorted(self.index.outdated):
            try:
                staged = upgraded_copy(path, self.staging_dir)
                if staged is not None:
                    os.replace(staged.path, staged.final)
                    fsync_directory(self.out_dir)
                    log.info("output_file_upgraded", path=str(path), rows=staged.rows)
            except FileNotFoundError:
                pass  # removed by its owner meanwhile: nothing to upgrade
            except OSError as exc:
                log.warning("output_file_upgrade_failed", path=str(path), error=str(exc), retry=True)
                continue
            except (pa.ArrowException, ValueError) as exc:
                log.warning("output_file_upgrade_failed", path=str(path), error=str(exc), retry=False)
            self.index.outdated.discard(path)

    def _read_ledger(self, descriptor: int) -> None:
        """Batch ids other sinks appended to the lock file since we last read it (complete lines only)."""
        size = os.fstat(descriptor).st_size
        if size <= self._ledger_read:
            return
        data = os.pread(descriptor, size - self._ledger_read, self._ledger_read)
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode("utf-8", "replace").splitlines()
        publishers = [line for line in lines if line.startswith("# ")]
        if publishers:
            self._last_publisher = publishers[-1][2:]
        self.index.add([line for line in lines if line and not line.startswith("# ")])
        self._ledger_read += len(complete)

    def _note_published(self, descriptor: int, batch_ids: list[str]) -> None:
        """Append batch ids to the lock file (after what they name is durable), for every sink to read."""
        if not batch_ids:
            return
        end = os.fstat(descriptor).st_size
        torn = end > 0 and os.pread(descriptor, 1, end - 1) != b"\n"  # a sink killed mid-append
        who = f"# {os.getpid()}@{socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        text = ("\n" if torn else "") + "\n".join([who, *batch_ids]) + "\n"
        os.pwrite(descriptor, text.encode(), end)
        os.fsync(descriptor)
        self._ledger_read = end + len(text.encode())  # ours: no need to read it back

    def publish(self, staged: StagedFile) -> Published:
        """Move a staged file into the output directory, minus any batch another sink published first."""
        with self._locked() as ledger:
            already, overlapping = self._published_before(staged.batch_ids)
            rows, path = staged.rows, staged.final
            if overlapping:  # another's parts of the same batch: their claims' rows are dropped from ours
                rows, emptied = _rewrite_without(staged.path, already, self._claims_held_for(overlapping))
                already |= emptied
            elif already and len(already) < len(staged.batch_ids):
                rows, _ = _rewrite_without(staged.path, already)
            if len(already) == len(staged.batch_ids):
                staged.path.unlink()
                rows, path = 0, None
            else:
                os.replace(staged.path, staged.final)
                fsync_directory(self.out_dir)  # the rename itself must survive a crash
                self.index.add(staged.batch_ids)
                self._note_published(ledger, [b for b in staged.batch_ids if b not in already])
        if already:
            log.warning(
                "batches_written_by_another_sink", skipped=len(already), kept=len(staged.batch_ids) - len(already)
            )
        return Published(staged.batch_ids, rows, len(already), path)

    def _published_before(self, batch_ids: list[str]) -> tuple[set[str], dict[str, list[str]]]:
        """Of ``batch_ids``: those whose claims the output holds all of already, and, for those it may hold
        some of (another id of the same split batch, ``sinks/coverage.py``), the ids that hold them."""
        already: set[str] = set()
        overlapping: dict[str, list[str]] = {}
        for batch_id in batch_ids:
            covering = covering_ids(batch_id, self.index, self.index.parts)
            if covering is None:
                already.add(batch_id)
            elif covering:
                overlapping[batch_id] = covering
        return already, overlapping

    def _claims_held_for(self, overlapping: dict[str, list[str]]) -> dict[str, set[str]]:
        """For each batch ``overlapping`` names, the claim ids the output holds under the ids it lists (a
        claim id is a batch's own: the same claim is in another template's batch too)."""
        held = self.index.claims_under(set().union(*overlapping.values()))
        return {batch_id: set().union(*(held[other] for other in others)) for batch_id, others in overlapping.items()}

    def record_failures(self, failures: FailureLog) -> list[str]:
        """Append the pending failures, except batches already recorded or written by any sink, and the claims
        of a batch that another's parts of it hold."""
        if not failures.pending:
            return []
        with self._locked() as ledger:
            already, overlapping = self._published_before(list(failures.pending))
            if overlapping:
                for batch_id, claims in self._claims_held_for(overlapping).items():
                    failure = failures.pending[batch_id]
                    kept = [claim_id for claim_id in failure.claim_ids if claim_id not in claims]
                    if kept:
                        failures.pending[batch_id] = msgspec.structs.replace(failure, claim_ids=kept)
                    else:
                        already.add(batch_id)
            fresh = [b for b in failures.pending if b not in already]
            recorded = failures.flush(already)
            self.index.add(recorded)
            self._note_published(ledger, fresh)
        return recorded

    def clean_staging(self) -> int:
        """Remove the unfinished files of sinks of this host that died; returns how many."""
        removed = 0
        host = socket.gethostname()
        for path in self.staging_dir.glob("*.partial"):
            owner = staged_owner(path.name)
            if owner is not None and owner[1] == host and owner[0] != os.getpid() and not process_alive(owner[0]):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _rewrite_without(
    path: Path, batch_ids: set[str], claims_of: dict[str, set[str]] | None = None
) -> tuple[int, set[str]]:
    """Rewrite a staged file without the rows of ``batch_ids``, nor the rows of each batch of ``claims_of``
    for its claims there; returns the rows kept, and the batches of ``claims_of`` left with none."""
    table = pq.read_table(path)
    dropped = pc.is_in(table["batch_id"], value_set=pa.array(sorted(batch_ids), pa.string()))
    if claims_of:
        # (batch id, claim id) as one key, the batch id's length first: ids may hold any character.
        pairs = sorted(f"{len(b)}:{b}:{claim_id}" for b, claims in claims_of.items() for claim_id in claims)
        lengths = pc.cast(pc.utf8_length(table["batch_id"]), pa.string())
        keys = pc.binary_join_element_wise(lengths, table["batch_id"], table["claim_id"], ":")
        dropped = pc.or_(dropped, pc.is_in(keys, value_set=pa.array(pairs, pa.string())))
    kept = table.filter(pc.invert(dropped))
    rewritten = path.with_name("rewrite-" + path.name)  # a staging name too: cleaned if we die here
    pq.write_table(kept, rewritten, compression="zstd")
    with open(rewritten, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(rewritten, path)
    left = set(pc.unique(kept["batch_id"]).to_pylist())
    return kept.num_rows, set(claims_of or ()) - left

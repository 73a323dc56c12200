"""Publishing into an output directory that several sinks share, so that each batch is in it exactly once.

A batch can reach two sinks: the broker redelivers what a sink had not acknowledged when that sink was
declared dead (stalled, say, by a swapping node or SIGSTOP) or when the broker lost its state, and the first
sink may still wake up and write it. So a sink publishes a file only under the directory's commit lock
(``flock`` on ``.OUT.partial/commit.lock``; the kernel, or the NFS lock manager, releases it if the sink
dies): it rereads what other sinks published (``sinks/written.py``), drops from its file the batches
already there (rewriting the file, a rare path), and renames the file into place before it lets go. Failure
records are appended under the same lock with the same check. Whoever publishes a batch second finds it and
skips it, whatever the timing, so no batch is written twice; and both may acknowledge it, since it is
durable either way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from pervade.errors import ConfigError
from pervade.procs import process_alive
from sinks.failures import FailureLog, fsync_directory
from sinks.parquet import StagedFile, staged_owner, staging_dir_for
from sinks.written import WrittenIndex

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

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def publish(self, staged: StagedFile) -> Published:
        """Move a staged file into the output directory, minus any batch another sink published first."""
        with self._locked():
            self.index.refresh()
            already = {b for b in staged.batch_ids if b in self.index}
            rows, path = staged.rows, staged.final
            if len(already) == len(staged.batch_ids):
                staged.path.unlink()
                rows, path = 0, None
            else:
                if already:
                    rows = _rewrite_without(staged.path, already)
                os.replace(staged.path, staged.final)
                fsync_directory(self.out_dir)  # the rename itself must survive a crash
                self.index.add(staged.batch_ids)
        if already:
            log.warning(
                "batches_written_by_another_sink", skipped=len(already), kept=len(staged.batch_ids) - len(already)
            )
        return Published(staged.batch_ids, rows, len(already), path)

    def record_failures(self, failures: FailureLog) -> list[str]:
        """Append the pending failures, except batches already recorded or written by any sink."""
        if not failures.pending:
            return []
        with self._locked():
            self.index.refresh()
            recorded = failures.flush(self.index)
            self.index.add(recorded)
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


def _rewrite_without(path: Path, batch_ids: set[str]) -> int:
    """Rewrite a staged file without the rows of ``batch_ids``; returns the rows kept."""
    table = pq.read_table(path)
    kept = table.filter(pc.invert(pc.is_in(table["batch_id"], value_set=pa.array(sorted(batch_ids)))))
    rewritten = path.with_name("rewrite-" + path.name)  # a staging name too: cleaned if we die here
    pq.write_table(kept, rewritten, compression="zstd")
    with open(rewritten, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(rewritten, path)
    return kept.num_rows

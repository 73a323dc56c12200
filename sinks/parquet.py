"""Writing verdicts to Parquet: one row per (claim, template, context), files staged, then published whole.

A file is written in a staging directory beside the output directory (``.OUT.partial/``, on the same file
system), row groups as they fill, and ``seal`` closes and fsyncs it there. ``sinks/commit.py`` then moves it
into the output directory, under the directory's commit lock. The output directory therefore only ever holds
complete Parquet files, which matters because some readers (polars) read every file under a directory,
hidden or not: nothing else may be put there, not even a hidden folder.

The columns are ``sinks/schema.py``'s, which also upgrades files an earlier version wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pervade.prompts import SCORING
from pervade.protocol import BatchResult, Member
from pervade.sinks.schema import CALIBRATION_COLUMNS, SCHEMA, SCORE_COLUMNS
from pervade.sinks.staging import StagedFile, staged_name

if TYPE_CHECKING:
    from pervade.sinks.commit import OutputDirectory, Published

_PER_BATCH = ("template_id", "context_id", "model", "worker_id", "device", "dtype", "batch_id", "job_id")
_TIMES = ("submitted_at", "started_at", "finished_at")


def _micros(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


#: A result's calibration columns when its template does not calibrate.
_NOT_CALIBRATED = (None,) * len(CALIBRATION_COLUMNS)


@dataclass
class _Columns:
    """Results buffered whole, and turned into columns once per row group, a pass per column. Appending each
    result's values column by column cost a batch of one claim 4 us, more than the rest of its way through the
    sink. The fields of a result (its batch's) are converted once per result, and Arrow repeats them for each
    of its rows (``take``)."""

    results: list[BatchResult] = field(default_factory=list)
    rows: int = 0
    #: Each row's batch id, where a result of a slice named its producer batches (None: every row's batch id
    #: is its result's).
    row_batch_ids: list[str] | None = None

    def add(self, result: BatchResult, members: list[Member] | None = None) -> None:
        if members or self.row_batch_ids is not None:
            if self.row_batch_ids is None:
                self.row_batch_ids = [r.batch_id for r in self.results for _ in r.verdicts]
            if members:
                self.row_batch_ids += [m.batch_id for m in members for _ in range(m.claims)]
            else:
                self.row_batch_ids += [result.batch_id] * len(result.verdicts)
        self.results.append(result)
        self.rows += len(result.verdicts)

    def to_table(self) -> pa.Table:
        results = self.results
        verdicts = [verdict for result in results for verdict in result.verdicts]
        owner = pa.array([index for index, result in enumerate(results) for _ in result.verdicts], pa.int32())
        per_result: dict[str, list] = {name: list(map(attrgetter(name), results)) for name in _PER_BATCH}
        per_result["worker_key"] = [result.worker_key or None for result in results]  # "": a broker without keys
        for name in _TIMES:
            per_result[name] = list(map(_micros, map(attrgetter(name), results)))
        calibrations = [result.calibration or _NOT_CALIBRATED for result in results]
        for position, name in enumerate(CALIBRATION_COLUMNS):
            per_result[name] = [calibration[position] for calibration in calibrations]
        columns: dict[str, list | pa.Array] = {
            name: pa.array(values, SCHEMA.field(name).type).take(owner) for name, values in per_result.items()
        }
        if self.row_batch_ids is not None:
            columns["batch_id"] = self.row_batch_ids
        for name in ("claim_id", "gold_label", "verdict"):
            columns[name] = list(map(attrgetter(name), verdicts))
        for position, name in enumerate(SCORE_COLUMNS):  # the protocol checks there is one score per label
            columns[name] = [verdict.scores[position] for verdict in verdicts]
        columns["score_kind"] = [SCORING] * len(verdicts)
        return pa.Table.from_pydict({name: columns[name] for name in SCHEMA.names}, schema=SCHEMA)


class RollingParquetWriter:
    """Appends batch results; writes row groups as they fill; ``roll`` finishes the current file in the
    staging directory (``seal``) and publishes it into the output directory.

    Blocking I/O: an asyncio caller runs ``flush``, ``roll``, ``seal`` and ``discard`` on a thread.
    """

    def __init__(self, output: OutputDirectory, name_prefix: str, row_group_rows: int = 10_000) -> None:
        self.output = output
        self.out_dir = output.out_dir
        self.staging_dir = output.staging_dir
        self.name_prefix = name_prefix
        self.row_group_rows = row_group_rows
        self._buffer = _Columns()
        self._writer: pq.ParquetWriter | None = None
        self._partial: Path | None = None
        self._sequence = 0
        #: Batches in the current file, in arrival order (a dict: membership is checked per delivery).
        self.batches_in_file: dict[str, None] = {}
        self.rows_in_file = 0

    @property
    def buffered_rows(self) -> int:
        return self._buffer.rows

    def add(self, result: BatchResult, members: list[Member] | None = None) -> None:
        """Buffer a result's rows: each under its batch, or, for a slice, under the producer batch of
        ``members`` it belongs to (they cover the verdicts in order)."""
        self._buffer.add(result, members)
        if members:
            for member in members:
                self.batches_in_file[member.batch_id] = None
        else:
            self.batches_in_file[result.batch_id] = None
        self.rows_in_file += len(result.verdicts)

    def _final_path(self) -> Path:
        return self.out_dir / f"{self.name_prefix}-{self._sequence:05d}.parquet"

    def flush(self) -> None:
        """Write the buffered rows as a row group of the current (still partial) file."""
        if not self._buffer.rows:
            return
        if self._writer is None:
            self.staging_dir.mkdir(exist_ok=True)  # an operator may have removed it as a leftover
            self._partial = self.staging_dir / staged_name(self._final_path().name)
            self._writer = pq.ParquetWriter(self._partial, SCHEMA, compression="zstd")
        self._writer.write_table(self._buffer.to_table(), row_group_size=self.row_group_rows)
        self._buffer = _Columns()

    def seal(self) -> StagedFile | None:
        """Close the current file and fsync it in the staging directory; None when it holds nothing."""
        self.flush()
        if self._writer is None:
            return None
        assert self._partial is not None
        self._writer.close()
        with open(self._partial, "rb") as handle:
            os.fsync(handle.fileno())
        staged = StagedFile(self._partial, self._final_path(), list(self.batches_in_file), self.rows_in_file)
        self._writer, self._partial = None, None
        self.batches_in_file, self.rows_in_file = {}, 0
        self._sequence += 1
        return staged

    def roll(self) -> Published | None:
        """Seal the current file and publish it (``OutputDirectory.publish``); None when it held nothing.
        If publishing fails, the sealed file is removed: its batches were never acknowledged."""
        staged = self.seal()
        if staged is None:
            return None
        try:
            return self.output.publish(staged)
        except BaseException:
            staged.path.unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        """Drop the current file and every buffered row (a write failed: the broker delivers them again)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass  # the write that failed may fail again on close: the file goes either way
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)
        self._writer, self._partial, self._buffer = None, None, _Columns()
        self.batches_in_file, self.rows_in_file = {}, 0
        self._sequence += 1  # never reuse a name a half-written file may have had


def read_verdicts(out_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """Every row written to ``out_dir`` (partial files are hidden and skipped; a file of an earlier version not
    upgraded yet reads with ``worker_key`` null)."""
    dataset = ds.dataset(str(out_dir), format="parquet", schema=SCHEMA)
    return dataset.to_table(columns=columns)

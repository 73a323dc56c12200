"""Writing verdicts to Parquet: one row per (claim, template, context), files rolled and renamed atomically.

A file is written in a staging directory beside the output directory (``.OUT.partial/``, on the same file
system) and moved into the output directory only once closed and fsynced. The output directory therefore
only ever holds complete Parquet files, which matters because some readers (polars) read every file under a
directory, hidden or not. The batches in a moved file are durable: that is the moment the sink acknowledges
them to the broker. Row groups are written as they fill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pervade.protocol import BatchResult

_TIME = pa.timestamp("us", tz="UTC")

#: The output schema (documented in docs/output.md).
SCHEMA = pa.schema(
    [
        pa.field("claim_id", pa.string(), nullable=False),
        pa.field("template_id", pa.string(), nullable=False),
        pa.field("context_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("gold_label", pa.string()),
        pa.field("verdict", pa.string(), nullable=False),
        pa.field("score_supports", pa.float32(), nullable=False),
        pa.field("score_refutes", pa.float32(), nullable=False),
        pa.field("score_not_enough_info", pa.float32(), nullable=False),
        pa.field("worker_id", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("submitted_at", _TIME, nullable=False),
        pa.field("started_at", _TIME, nullable=False),
        pa.field("finished_at", _TIME, nullable=False),
    ]
)

_PER_BATCH = ("template_id", "context_id", "model", "worker_id", "device", "dtype", "batch_id", "job_id")
_TIMES = ("submitted_at", "started_at", "finished_at")


def _micros(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


@dataclass
class _Columns:
    """Rows buffered column by column (cheap to append, one conversion per row group)."""

    data: dict[str, list] = field(default_factory=lambda: {name: [] for name in SCHEMA.names})
    rows: int = 0

    def add(self, result: BatchResult) -> None:
        n = len(result.verdicts)
        times = {name: _micros(getattr(result, name)) for name in _TIMES}  # before any column grows
        for name in _PER_BATCH:
            self.data[name].extend([getattr(result, name)] * n)
        for name, micros in times.items():
            self.data[name].extend([micros] * n)
        for verdict in result.verdicts:
            self.data["claim_id"].append(verdict.claim_id)
            self.data["gold_label"].append(verdict.gold_label)
            self.data["verdict"].append(verdict.verdict)
            supports, refutes, nei = verdict.scores
            self.data["score_supports"].append(supports)
            self.data["score_refutes"].append(refutes)
            self.data["score_not_enough_info"].append(nei)
        self.rows += n

    def to_table(self) -> pa.Table:
        return pa.Table.from_pydict(self.data, schema=SCHEMA)


def staging_dir_for(out_dir: Path) -> Path:
    """Where files are written before they are complete: ``.NAME.partial`` beside ``out_dir``, or, when
    ``out_dir`` is a mount point (a rename across file systems would not be atomic), a hidden folder in it."""
    out_dir = out_dir.resolve()
    staging = out_dir.parent / f".{out_dir.name}.partial"
    try:
        staging.mkdir(exist_ok=True)
        if staging.stat().st_dev == out_dir.stat().st_dev:
            return staging
        staging.rmdir()
    except OSError:
        pass
    staging = out_dir / ".partial"
    staging.mkdir(exist_ok=True)
    return staging


class RollingParquetWriter:
    """Appends batch results; writes row groups as they fill; ``roll`` makes the current file final.

    Blocking I/O: an asyncio caller runs ``flush`` and ``roll`` on a thread.
    """

    def __init__(self, out_dir: Path, name_prefix: str, row_group_rows: int = 10_000) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir = staging_dir_for(self.out_dir)
        self.name_prefix = name_prefix
        self.row_group_rows = row_group_rows
        self._buffer = _Columns()
        self._writer: pq.ParquetWriter | None = None
        self._partial: Path | None = None
        self._sequence = 0
        #: Batches in the current file, in arrival order (a dict: membership is checked per delivery).
        self.batches_in_file: dict[str, None] = {}
        self.rows_in_file = 0
        self.files_written: list[Path] = []

    @property
    def buffered_rows(self) -> int:
        return self._buffer.rows

    def add(self, result: BatchResult) -> None:
        self._buffer.add(result)
        self.batches_in_file[result.batch_id] = None
        self.rows_in_file += len(result.verdicts)

    def flush(self) -> None:
        """Write the buffered rows as a row group of the current (still partial) file."""
        if not self._buffer.rows:
            return
        if self._writer is None:
            self._partial = self.staging_dir / f"{self.name_prefix}-{self._sequence:05d}.parquet.partial"
            self._writer = pq.ParquetWriter(self._partial, SCHEMA, compression="zstd")
        self._writer.write_table(self._buffer.to_table(), row_group_size=self.row_group_rows)
        self._buffer = _Columns()

    def roll(self) -> list[str]:
        """Close the current file and give it its final name; returns the batch ids now durable."""
        self.flush()
        if self._writer is None:
            return []
        assert self._partial is not None
        self._writer.close()
        final = self.out_dir / f"{self.name_prefix}-{self._sequence:05d}.parquet"
        with open(self._partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._partial, final)
        directory = os.open(self.out_dir, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself must survive a crash
        finally:
            os.close(directory)
        durable, self.batches_in_file = list(self.batches_in_file), {}
        self._writer, self._partial = None, None
        self._sequence += 1
        self.rows_in_file = 0
        self.files_written.append(final)
        return durable

    def close(self) -> list[str]:
        """Roll what is left, and remove the staging directory if nothing else uses it."""
        durable = self.roll()
        try:
            self.staging_dir.rmdir()
        except OSError:
            pass  # another sink writing to the same directory still uses it
        return durable


def read_verdicts(out_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """Every row written to ``out_dir`` (partial files are hidden and skipped)."""
    dataset = ds.dataset(str(out_dir), format="parquet", schema=SCHEMA)
    return dataset.to_table(columns=columns)

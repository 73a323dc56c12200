"""The verdict table's columns (docs/output.md), and files of an earlier version brought up to them.

A file written by an earlier version lacks the columns added since (``ADDED_COLUMNS``). So that a directory
never mixes schemas (polars refuses such a directory; pandas and duckdb silently drop the new columns of
every file when the first file lacks them), a sink upgrades such files, under the commit lock, before it
publishes into their directory: ``upgraded_copy`` writes the file again with today's schema, and
``sinks/commit.py`` moves it over the old one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pervade.sinks.staging import StagedFile, staged_name

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
        pa.field("score_supports", pa.float32()),
        pa.field("score_refutes", pa.float32()),
        pa.field("score_not_enough_info", pa.float32()),
        pa.field("calibration_supports", pa.float32()),
        pa.field("calibration_refutes", pa.float32()),
        pa.field("calibration_not_enough_info", pa.float32()),
        pa.field("score_kind", pa.string(), nullable=False),
        pa.field("worker_id", pa.string(), nullable=False),
        pa.field("worker_key", pa.string()),
        pa.field("device", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("job_id", pa.string(), nullable=False),
        pa.field("submitted_at", _TIME, nullable=False),
        pa.field("started_at", _TIME, nullable=False),
        pa.field("finished_at", _TIME, nullable=False),
    ]
)

#: Each label's score (``pervade.prompts``: the log-probability of its answer; null for a label the template
#: leaves out), and a calibrating template's content-free scores (null when it does not calibrate), in
#: ``LABELS`` order. A calibrated verdict is the label whose score less its calibration is highest.
SCORE_COLUMNS = ("score_supports", "score_refutes", "score_not_enough_info")
CALIBRATION_COLUMNS = ("calibration_supports", "calibration_refutes", "calibration_not_enough_info")

#: How the scores of rows written before ``score_kind`` were computed: each label's first-token logit.
FIRST_TOKEN_LOGIT = "first_token_logit"

#: Columns added to the schema since the first release, and what they hold in the rows of a file written
#: before them: ``dtype`` "" (unknown, as from an older worker), ``worker_key`` null (no key recorded), no
#: calibration, and the first-token logits those versions scored.
ADDED_COLUMNS: dict[str, str | None] = {
    "dtype": "",
    "worker_key": None,
    **dict.fromkeys(CALIBRATION_COLUMNS),
    "score_kind": FIRST_TOKEN_LOGIT,
}


def is_outdated(schema: pa.Schema) -> bool:
    """Whether a file with this schema is a verdict file of an earlier version: today's columns, of today's
    types, less some of those added since. A file with any other difference is not one of ours."""
    present = [f for f in SCHEMA if f.name in schema.names]
    missing = {f.name for f in SCHEMA} - set(schema.names)
    return (
        bool(missing)
        and missing <= ADDED_COLUMNS.keys()
        and len(schema) == len(present)
        and all(schema.field(f.name).type == f.type for f in present)
    )


def upgraded_copy(path: Path, staging_dir: Path) -> StagedFile | None:
    """Write ``path``, a verdict file of an earlier version, again with today's schema, in the staging
    directory, row group by row group (its rows and their order kept; the columns added since filled as
    ``ADDED_COLUMNS`` says). The caller moves it over ``path``. None when ``path`` is not outdated (another
    sink upgraded it first). Raises OSError, or an ArrowException for a file that cannot be read."""
    with pq.ParquetFile(path) as source:
        if not is_outdated(source.schema_arrow):
            return None
        copy = staging_dir / staged_name(f"upgrade-{path.name}")  # a staging name: cleaned if we die here
        try:
            with pq.ParquetWriter(copy, SCHEMA, compression="zstd") as writer:
                for index in range(source.metadata.num_row_groups):
                    writer.write_table(_upgraded(source.read_row_group(index)))
            with open(copy, "rb") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        return StagedFile(copy, path, [], source.metadata.num_rows)


def _upgraded(old: pa.Table) -> pa.Table:
    """One row group of an earlier version's file, with today's columns (written as one row group)."""
    columns = [
        old[f.name] if f.name in old.column_names else pa.array([ADDED_COLUMNS[f.name]] * old.num_rows, f.type)
        for f in SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)

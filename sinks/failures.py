"""Failed pairs, recorded beside the output: ``OUT.failures/failures-<sink>.jsonl``, one JSON object per
(claim, template, context) that could not be scored, with the error.

Lines are appended and fsynced before the sink acknowledges their batches, so a recorded failure is as
durable as a written verdict. Each batch's lines end with a ``recorded_batch`` line; a sink killed mid-write
leaves a batch without one (and perhaps a torn line), which readers ignore: that batch was never
acknowledged, so it is delivered again and recorded whole.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Container
from pathlib import Path

from pervade.protocol import BatchFailure


def failures_dir_for(out_dir: Path) -> Path:
    """``OUT.failures`` beside the output directory, so the output holds Parquet files only."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(out_dir.name + ".failures")


class FailureLog:
    """Buffers failures; ``flush`` appends them durably and returns their batch ids.

    Blocking I/O: an asyncio caller runs ``flush`` on a thread.
    """

    def __init__(self, out_dir: Path, name: str) -> None:
        self.path = failures_dir_for(out_dir) / f"failures-{name}.jsonl"
        self.pending: dict[str, BatchFailure] = {}

    def add(self, failure: BatchFailure) -> None:
        self.pending[failure.batch_id] = failure

    def flush(self, recorded: Container[str] = ()) -> list[str]:
        """Append the pending failures durably, except those of batches already ``recorded`` (by another
        sink); returns every pending batch id, all of them durable now."""
        if not self.pending:
            return []
        lines = []
        for f in self.pending.values():
            if f.batch_id in recorded:
                continue
            for claim_id in f.claim_ids:
                record = {
                    "claim_id": claim_id, "template_id": f.template_id, "context_id": f.context_id, "model": f.model,
                    "batch_id": f.batch_id, "job_id": f.job_id, "error": f.error, "attempts": f.attempts,
                }  # fmt: skip
                lines.append(json.dumps(record) + "\n")
            # A batch counts as recorded only with this line after all of its pairs: a write cut short by
            # a crash leaves a batch without it, which readers ignore (it is delivered and written again).
            lines.append(json.dumps({"recorded_batch": f.batch_id, "pairs": len(f.claim_ids)}) + "\n")
        if not lines:
            durable, self.pending = list(self.pending), {}
            return durable
        created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            start = handle.seek(0, os.SEEK_END)
            if start > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a torn line left by a killed sink of the same name
                    lines.insert(0, "\n")
            try:
                handle.write("".join(lines).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                with contextlib.suppress(OSError):  # leave no half batch behind for the retry to double
                    handle.truncate(start)
                raise
        fsync_directory(self.path.parent)  # the file's name must survive a crash too
        if created:
            fsync_directory(self.path.parent.parent)
        durable, self.pending = list(self.pending), {}
        return durable

    def discard(self) -> None:
        """Forget the pending failures (a write failed: the broker delivers them again)."""
        self.pending = {}


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a crash."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def parse_failures(text: str) -> tuple[list[dict], set[str]]:
    """The failure records of complete batches in one failures file, and those batches' ids. A batch's
    records are the lines of it just before its ``recorded_batch`` line (since the previous one), each pair
    once: lines of a write cut short (a sink killed mid-append; the batch is recorded again whole later) and
    torn lines are left out."""
    records, recorded, segment = [], set(), []
    seen: set[tuple[str, str]] = set()
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        if "recorded_batch" in record:
            batch_id = record["recorded_batch"]
            recorded.add(batch_id)
            for r in segment:
                pair = (batch_id, r.get("claim_id"))
                if r["batch_id"] == batch_id and pair not in seen:
                    seen.add(pair)
                    records.append(r)
            segment = []
        elif "batch_id" in record:
            segment.append(record)
    return records, recorded


def read_failures(out_dir: Path) -> list[dict]:
    """Every failure recorded for ``out_dir`` (a torn last line of a killed sink is skipped)."""
    records: list[dict] = []
    seen: set[str] = set()
    directory = failures_dir_for(out_dir)
    for path in sorted(directory.glob("*.jsonl")) if directory.exists() else []:
        complete, recorded = parse_failures(path.read_text(encoding="utf-8"))
        records += [r for r in complete if r["batch_id"] not in seen]
        seen |= recorded
    return records

"""Which batches are already durable in an output directory, so that a batch delivered twice is written once.

The broker delivers at least once: a sink can write a file and die before its acknowledgement arrives (or
the broker can die before recording it), and the batch is then delivered again, to the same directory,
perhaps by another sink. Before writing a redelivered batch the sink looks here. The index is built from
the files themselves (the ``batch_id`` column of every final Parquet file, and the failures files), so it
needs no state of its own and sees what other sinks sharing the directory wrote. Reading a file's footer
also tells a file of an earlier version, which the sink upgrades before it publishes beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from pervade.sinks.coverage import PartsByRoot
from pervade.sinks.failures import failures_dir_for, parse_failures
from pervade.sinks.schema import is_outdated

log = structlog.get_logger("sinks")


class WrittenIndex:
    """Batch ids durable in ``out_dir``, and the split batches' parts among them by root (``parts``: a root
    delivered whole may be written in parts, ``sinks/coverage.py``). ``refresh`` reads only files it has not
    read yet.

    Blocking I/O: an asyncio caller runs ``refresh`` on a thread.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.batch_ids: set[str] = set()
        self.parts = PartsByRoot()
        self._read_files: set[Path] = set()
        #: Files written by an earlier version (a column added since missing): ``OutputDirectory`` upgrades them.
        self.outdated: set[Path] = set()
        self._failure_sizes: dict[Path, int] = {}

    def __contains__(self, batch_id: str) -> bool:
        return batch_id in self.batch_ids

    def add(self, batch_ids: list[str]) -> None:
        self.batch_ids.update(batch_ids)
        self.parts.note(batch_ids)

    def refresh(self) -> int:
        """Read the files written since the last refresh; returns how many batch ids were new."""
        before = len(self.batch_ids)
        for path in sorted(self.out_dir.glob("*.parquet")) if self.out_dir.exists() else []:
            if path not in self._read_files:
                try:
                    with pq.ParquetFile(path) as file:
                        schema, column = file.schema_arrow, file.read(columns=["batch_id"])["batch_id"]
                except (OSError, KeyError, pa.ArrowException) as exc:  # not a file of ours: it holds no batch
                    log.warning("unreadable_output_file", path=str(path), error=str(exc))
                else:
                    self.add(pc.unique(column).to_pylist())
                    if is_outdated(schema):
                        self.outdated.add(path)
                self._read_files.add(path)
        directory = failures_dir_for(self.out_dir)
        for path in sorted(directory.glob("*.jsonl")) if directory.exists() else []:
            size = path.stat().st_size
            if self._failure_sizes.get(path) == size:
                continue
            _, recorded = parse_failures(path.read_text(encoding="utf-8"))  # complete batches only
            self.add(list(recorded))
            self._failure_sizes[path] = size
        return len(self.batch_ids) - before

    def claims_under(self, batch_ids: Iterable[str]) -> dict[str, set[str]]:
        """The claim ids the output holds under each of ``batch_ids``, as rows or recorded failures: read from
        the files, for the rare publication that overlaps another's parts of one batch (``sinks/commit.py``)."""
        wanted = set(batch_ids)
        claims: dict[str, set[str]] = {batch_id: set() for batch_id in wanted}
        if not wanted:
            return claims
        value_set = pa.array(sorted(wanted), pa.string())
        for path in sorted(self.out_dir.glob("*.parquet")) if self.out_dir.exists() else []:
            try:
                table = pq.read_table(path, columns=["batch_id", "claim_id"])
                mine = table.filter(pc.is_in(table["batch_id"], value_set=value_set))
            except (OSError, KeyError, pa.ArrowException):  # not a file of ours: it holds no batch
                continue
            for batch_id, claim_id in zip(mine["batch_id"].to_pylist(), mine["claim_id"].to_pylist(), strict=True):
                claims[batch_id].add(claim_id)
        directory = failures_dir_for(self.out_dir)
        for path in sorted(directory.glob("*.jsonl")) if directory.exists() else []:
            records, _ = parse_failures(path.read_text(encoding="utf-8"))
            for record in records:
                if record["batch_id"] in wanted:
                    claims[record["batch_id"]].add(record["claim_id"])
        return claims

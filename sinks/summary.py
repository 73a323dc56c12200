"""Reading a run's Parquet output back: row counts and accuracy per template, from the files themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from sinks.parquet import SCHEMA


@dataclass(frozen=True)
class TemplateScore:
    template_id: str
    context_id: str
    verdicts: int
    labelled: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(frozen=True)
class OutputSummary:
    rows: int
    claims: int
    files: int
    per_template: list[TemplateScore]


def read_verdicts(out_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """Every row written to ``out_dir`` (partial files are hidden and skipped)."""
    dataset = ds.dataset(str(out_dir), format="parquet", schema=SCHEMA)
    return dataset.to_table(columns=columns)


def summarize(out_dir: Path) -> OutputSummary:
    files = sorted(Path(out_dir).glob("*.parquet"))
    if not files:
        return OutputSummary(rows=0, claims=0, files=0, per_template=[])
    table = read_verdicts(out_dir, ["claim_id", "template_id", "context_id", "gold_label", "verdict"])
    labelled = pc.is_valid(table["gold_label"])
    correct = pc.and_(labelled, pc.equal(table["gold_label"], table["verdict"]))
    scored = table.append_column("labelled", pc.cast(labelled, pa.int64())).append_column(
        "correct", pc.cast(pc.fill_null(correct, False), pa.int64())
    )
    grouped = scored.group_by(["template_id", "context_id"]).aggregate(
        [("verdict", "count"), ("labelled", "sum"), ("correct", "sum")]
    )
    per_template = sorted(
        (
            TemplateScore(
                template_id=row["template_id"],
                context_id=row["context_id"],
                verdicts=row["verdict_count"],
                labelled=row["labelled_sum"],
                correct=row["correct_sum"],
            )
            for row in grouped.to_pylist()
        ),
        key=lambda s: (s.context_id, s.template_id),
    )
    claims = len(pc.unique(table["claim_id"]))
    return OutputSummary(rows=table.num_rows, claims=claims, files=len(files), per_template=per_template)

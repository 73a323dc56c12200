"""Reading a run's Parquet output back: row counts and accuracy per template, from the files themselves (the
short summary ``pervade run`` prints; ``pervade report`` is the full one, ``sinks/report.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from pervade.sinks.parquet import read_verdicts
from pervade.sinks.report import template_results

__all__ = ["OutputSummary", "TemplateScore", "read_verdicts", "summarize"]  # read_verdicts: readers import it here


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


def summarize(out_dir: Path) -> OutputSummary:
    files = sorted(Path(out_dir).glob("*.parquet"))
    if not files:
        return OutputSummary(rows=0, claims=0, files=0, per_template=[])
    table = read_verdicts(out_dir, ["claim_id", "template_id", "context_id", "model", "gold_label", "verdict"])
    per_template = [
        TemplateScore(r.template_id, r.context_id, verdicts=r.pairs, labelled=r.labelled, correct=r.correct)
        for r in sorted(template_results(table), key=lambda r: (r.context_id, r.template_id))
    ]
    claims = len(pc.unique(table["claim_id"]))
    return OutputSummary(rows=table.num_rows, claims=claims, files=len(files), per_template=per_template)

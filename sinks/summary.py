"""Reading a run's Parquet output back: row counts and accuracy per template, from the files themselves (the
short summary ``pervade run`` prints; ``pervade report`` is the full one, ``sinks/report.py``). Each
template's accuracy comes with its 95% interval and the majority-class baseline on the same claims, so the
summary never shows an accuracy without what chance would have scored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc

from pervade.sinks.parquet import read_verdicts
from pervade.sinks.report import template_results
from pervade.sinks.scores import compare_to_baseline, wilson_interval

__all__ = [
    "OutputSummary",
    "TemplateScore",
    "read_verdicts",
    "score_table",
    "summarize",
]  # read_verdicts: readers import it here


@dataclass(frozen=True)
class TemplateScore:
    template_id: str
    context_id: str
    verdicts: int
    labelled: int
    correct: int
    #: The majority-class baseline on the same labelled pairs, and its label (None with no labelled pair).
    baseline: float | None = None
    baseline_label: str | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def accuracy_ci(self) -> tuple[float, float] | None:
        return wilson_interval(self.correct, self.labelled) if self.labelled else None

    @property
    def vs_baseline(self) -> str | None:
        """ "above baseline", "below baseline" or "within chance" (``compare_to_baseline``)."""
        interval = self.accuracy_ci
        if interval is None or self.baseline is None:
            return None
        return compare_to_baseline(interval, self.baseline)


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
        TemplateScore(
            r.template_id,
            r.context_id,
            verdicts=r.pairs,
            labelled=r.labelled,
            correct=r.correct,
            baseline=r.baseline,
            baseline_label=r.baseline_label,
        )  # fmt: skip
        for r in sorted(template_results(table), key=lambda r: (r.context_id, r.template_id))
    ]
    claims = len(pc.unique(table["claim_id"]))
    return OutputSummary(rows=table.num_rows, claims=claims, files=len(files), per_template=per_template)


def score_table(scores: list[TemplateScore]) -> list[str]:
    """The per-template lines of ``pervade run``'s summary: verdicts, accuracy with its 95% interval, the
    majority baseline on the same claims, and whether the accuracy beats it."""
    width = max([24, *(len(score.template_id) for score in scores)])  # the shipped ids run past 24 characters
    lines = [f"  {'template':<{width}} {'verdicts':>9} {'accuracy':>9} {'95% CI':>13} {'baseline':>9}  vs baseline"]
    for score in scores:
        interval = score.accuracy_ci
        accuracy = f"{score.accuracy:.3f}" if score.accuracy is not None else "n/a"
        ci = f"{interval[0]:.3f}-{interval[1]:.3f}" if interval is not None else "n/a"
        baseline = f"{score.baseline:.3f}" if score.baseline is not None else "n/a"
        lines.append(
            f"  {score.template_id:<{width}} {score.verdicts:>9} {accuracy:>9} {ci:>13} {baseline:>9}  "
            f"{score.vs_baseline or 'n/a'}"
        )
    return lines

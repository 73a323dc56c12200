"""The records a report is made of: what one (context, template) scored against the gold labels, and the
run over time. ``sinks/report.py`` computes them from the Parquet output; ``sinks/plots.py`` draws them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pervade.constants import LABELS


@dataclass(frozen=True)
class TemplateResult:
    """One (context, template): how its verdicts compare with the gold labels."""

    context_id: str
    model: str
    template_id: str
    pairs: int
    #: Pairs whose claim has a gold label, and of those the ones whose verdict equals it.
    labelled: int
    correct: int
    #: Verdict counts, in ``LABELS`` order.
    verdicts: dict[str, int]
    #: gold label -> verdict -> pairs (labelled pairs only).
    confusion: dict[str, dict[str, int]]
    #: Pairs recorded failed (OUT.failures/), not in the verdicts.
    failed_pairs: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def macro_f1(self) -> float | None:
        """Mean F1 over the three labels (a label never predicted nor gold scores 0)."""
        if not self.labelled:
            return None
        scores = []
        for label in LABELS:
            true_positive = self.confusion.get(label, {}).get(label, 0)
            predicted = sum(row.get(label, 0) for row in self.confusion.values())
            actual = sum(self.confusion.get(label, {}).values())
            scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
        return sum(scores) / len(scores)

    def to_json(self) -> dict:
        return {
            "context_id": self.context_id, "model": self.model, "template_id": self.template_id,
            "pairs": self.pairs, "labelled": self.labelled, "correct": self.correct, "accuracy": self.accuracy,
            "macro_f1": self.macro_f1, "verdicts": self.verdicts, "confusion": self.confusion,
            "failed_pairs": self.failed_pairs,
        }  # fmt: skip


@dataclass(frozen=True)
class Timeline:
    """The run over time, in equal bins from the first batch started to the last finished."""

    start: datetime
    #: Seconds from the first batch started to the last finished.
    span_s: float
    bin_s: float
    #: Claims finished per second in each bin.
    claims_per_s: list[float]
    #: Distinct workers with a batch in hand during each bin.
    workers: list[int]

    def to_json(self) -> dict:
        return {
            "start": self.start.isoformat(),
            "span_s": self.span_s,
            "bin_s": self.bin_s,
            "claims_per_s": self.claims_per_s,
            "workers": self.workers,
        }

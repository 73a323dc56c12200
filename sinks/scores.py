"""The records a report is made of: what one (context, template) scored against the gold labels, and the
run over time. ``sinks/report.py`` computes them from the Parquet output; ``sinks/plots.py`` draws them.

Whether a template beats chance is judged here, once, for the report, its plots and ``pervade run``'s summary:
its accuracy's 95% Wilson interval against the majority-class baseline on the same labelled pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from pervade.constants import LABELS

#: The two-sided 95% normal quantile (1.959964..., not the rounded 1.96).
Z_95 = 1.959964

#: How an accuracy compares with the majority-class baseline (``compare_to_baseline``).
ABOVE_BASELINE = "above baseline"
WITHIN_CHANCE = "within chance"
BELOW_BASELINE = "below baseline"

#: A template that gives one verdict to at least this share of its pairs has collapsed onto that label.
ONE_LABEL_SHARE = 0.9


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (E. B. Wilson, "Probable inference, the law of
    succession, and statistical inference", J. Amer. Statist. Assoc. 22 (1927) 209-212).

    Unlike the textbook p +- z*sqrt(p(1-p)/n), it keeps its coverage for a few hundred pairs and for an
    accuracy near 0 or 1 (0 of 10 right gives 0-27.8%, not 0-0%), and never leaves [0, 1]."""
    if trials <= 0:
        raise ValueError(f"a confidence interval needs at least one trial, not {trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in 0..{trials}, not {successes}")
    p = successes / trials
    z2_n = z * z / trials
    centre = (p + z2_n / 2) / (1 + z2_n)
    half = z * math.sqrt(p * (1 - p) / trials + z2_n / (4 * trials)) / (1 + z2_n)
    # Exact at the ends: rounding must not put 1.0 outside an interval of 10 right out of 10.
    return (0.0 if successes == 0 else max(0.0, centre - half), 1.0 if successes == trials else min(1.0, centre + half))


def compare_to_baseline(interval: tuple[float, float], baseline: float) -> str:
    """``ABOVE_BASELINE`` only when the whole interval lies above the baseline, ``BELOW_BASELINE`` when it
    lies wholly below, else ``WITHIN_CHANCE`` (the data cannot tell the template from always answering the
    most frequent label)."""
    low, high = interval
    if low > baseline:
        return ABOVE_BASELINE
    if high < baseline:
        return BELOW_BASELINE
    return WITHIN_CHANCE


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

    @property
    def accuracy_ci(self) -> tuple[float, float] | None:
        """The accuracy's 95% Wilson interval (``wilson_interval``), over the labelled pairs."""
        return wilson_interval(self.correct, self.labelled) if self.labelled else None

    @property
    def baseline_label(self) -> str | None:
        """The most frequent gold label among the labelled pairs (ties: the first in ``LABELS`` order)."""
        gold = {label: sum(row.values()) for label, row in self.confusion.items()}
        if not any(gold.values()):
            return None
        ordered = sorted(gold, key=lambda g: (g not in LABELS, LABELS.index(g) if g in LABELS else 0, g))
        return max(ordered, key=lambda g: gold[g])  # max keeps the first of equals

    @property
    def baseline(self) -> float | None:
        """The majority-class baseline: the accuracy of answering ``baseline_label`` for every labelled pair
        (the same pairs the accuracy is measured on, so the two compare directly)."""
        label = self.baseline_label
        return sum(self.confusion[label].values()) / self.labelled if label is not None else None

    @property
    def vs_baseline(self) -> str | None:
        """``compare_to_baseline`` of the accuracy's interval; None with no labelled pair."""
        interval, baseline = self.accuracy_ci, self.baseline
        return compare_to_baseline(interval, baseline) if interval is not None and baseline is not None else None

    @property
    def verdict_shares(self) -> dict[str, float]:
        """Each verdict's share of the pairs, in ``verdicts`` order."""
        return {label: count / self.pairs if self.pairs else 0.0 for label, count in self.verdicts.items()}

    @property
    def one_label(self) -> str | None:
        """The verdict given to at least ``ONE_LABEL_SHARE`` of the pairs, if any: a template that has
        collapsed onto one answer, whose accuracy then sits near that label's share of the gold labels."""
        return next((label for label, share in self.verdict_shares.items() if share >= ONE_LABEL_SHARE), None)

    def to_json(self) -> dict:
        interval = self.accuracy_ci
        return {
            "context_id": self.context_id, "model": self.model, "template_id": self.template_id,
            "pairs": self.pairs, "labelled": self.labelled, "correct": self.correct, "accuracy": self.accuracy,
            "accuracy_ci": list(interval) if interval is not None else None,
            "baseline": self.baseline, "baseline_label": self.baseline_label, "vs_baseline": self.vs_baseline,
            "macro_f1": self.macro_f1, "verdicts": self.verdicts, "verdict_shares": self.verdict_shares,
            "one_label": self.one_label, "confusion": self.confusion, "failed_pairs": self.failed_pairs,
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

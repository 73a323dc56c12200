"""``pervade report DIR``: what a sweep's Parquet output says. Per context and template: accuracy against
the gold labels with its 95% interval, the majority-class baseline on the same claims and whether the
accuracy is above it, below it or within chance, macro-F1, the confusion matrix and the verdict counts and
shares, and the best template (the Prompt-for-Fact answer, said plainly when it does not beat chance); over
time, from the timing columns: throughput and the workers with a batch in hand. Computed with pyarrow from
the files themselves; ``sinks/plots.py`` draws it, ``to_markdown`` writes it up (the same text ``pervade
report`` prints). What one template scored, and the timeline, are ``sinks/scores.py``'s records, shared
with the plots."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pervade.constants import LABELS
from pervade.errors import InputError
from pervade.prompts import SCORING
from pervade.sinks.failures import read_failures
from pervade.sinks.parquet import read_verdicts
from pervade.sinks.scores import ABOVE_BASELINE, BELOW_BASELINE, ONE_LABEL_SHARE, TemplateResult, Timeline

#: Time bins a run's timeline is cut into, and the shortest bin (a tenth of a second).
TIMELINE_BINS = 100
MIN_BIN_S = 0.1
_COLUMNS = ["claim_id", "template_id", "context_id", "model", "gold_label", "verdict", "worker_id", "batch_id",
            "started_at", "finished_at", "score_kind"]  # fmt: skip
#: How a template's rows scored by an earlier version (first-token logits) are named in a report, apart from
#: the rows of the same template id scored whole-answer.
EARLIER_SCORING = " [first-token logits]"


@dataclass
class Report:
    out_dir: Path
    files: int
    rows: int
    claims: int
    results: list[TemplateResult]
    timeline: Timeline | None
    #: Pairs written more than once (never, unless files were copied in by hand).
    duplicate_pairs: int = 0
    #: Written by ``write_report``: plots and the Markdown summary.
    written: list[Path] = field(default_factory=list)

    def best(self) -> list[TemplateResult]:
        """Per context, the template with the highest accuracy (ties: the higher macro-F1, then the id)."""
        by_context: dict[str, list[TemplateResult]] = {}
        for result in self.results:
            if result.accuracy is not None:
                by_context.setdefault(result.context_id, []).append(result)
        return [
            min(results, key=lambda r: (-(r.accuracy or 0.0), -(r.macro_f1 or 0.0), r.template_id))
            for _, results in sorted(by_context.items())
        ]

    def to_json(self) -> dict:
        return {
            "out_dir": str(self.out_dir), "files": self.files, "rows": self.rows, "claims": self.claims,
            "duplicate_pairs": self.duplicate_pairs,
            "results": [r.to_json() for r in self.results],
            "best": [{"context_id": r.context_id, "model": r.model, "template_id": r.template_id, "accuracy": r.accuracy,
                      "accuracy_ci": list(r.accuracy_ci or ()) or None, "baseline": r.baseline,
                      "baseline_label": r.baseline_label, "vs_baseline": r.vs_baseline}
                     for r in self.best()],
            "timeline": self.timeline.to_json() if self.timeline else None,
            "written": [str(p) for p in self.written],
        }  # fmt: skip


def build_report(out_dir: Path) -> Report:
    """Read every Parquet file in ``out_dir`` (and its failures) into a Report."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir} is not a directory (pass the --out directory of a run)")
    files = sorted(out_dir.glob("*.parquet"))
    if not files:
        raise InputError(f"{out_dir} holds no Parquet files: no verdicts written there yet")
    table = _apart_by_scoring(read_verdicts(out_dir, _COLUMNS))
    failed = Counter((f["context_id"], f["template_id"]) for f in read_failures(out_dir))
    keys = pc.binary_join_element_wise(table["claim_id"], table["template_id"], table["context_id"], "\x00")
    return Report(
        out_dir=out_dir,
        files=len(files),
        rows=table.num_rows,
        claims=len(pc.unique(table["claim_id"])),
        results=template_results(table, failed),
        timeline=timeline(table),
        duplicate_pairs=table.num_rows - len(pc.unique(keys)),
    )


def _apart_by_scoring(table: pa.Table) -> pa.Table:
    """Rows an earlier version scored (``score_kind`` first-token logits, or no ``score_kind`` at all) under
    their template id plus ``EARLIER_SCORING``, so that no figure pools two ways of scoring."""
    earlier = pc.fill_null(pc.not_equal(table["score_kind"], SCORING), True)
    if not pc.any(earlier).as_py():
        return table
    renamed = pc.if_else(
        earlier, pc.binary_join_element_wise(table["template_id"], EARLIER_SCORING, ""), table["template_id"]
    )
    return table.set_column(table.column_names.index("template_id"), "template_id", renamed)


def template_results(table: pa.Table, failed: Counter[tuple[str, str]] | None = None) -> list[TemplateResult]:
    """Accuracy, confusion and verdict counts per (context, template), from one grouped count."""
    failed = failed or Counter()
    gold = pc.fill_null(table["gold_label"], "")  # "" marks an unlabelled claim
    counts = (
        pa.table({name: table[name] for name in ("context_id", "model", "template_id", "verdict")} | {"gold": gold})
        .group_by(["context_id", "model", "template_id", "gold", "verdict"])
        .aggregate([([], "count_all")])
        .to_pylist()
    )
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in counts:
        groups.setdefault((row["context_id"], row["model"], row["template_id"]), []).append(row)
    results = []
    for (context_id, model, template_id), rows in sorted(groups.items()):
        verdicts = dict.fromkeys(LABELS, 0)
        confusion: dict[str, dict[str, int]] = {}
        for row in rows:
            verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + row["count_all"]
            if row["gold"]:
                confusion.setdefault(row["gold"], dict.fromkeys(LABELS, 0))[row["verdict"]] = row["count_all"]
        labelled = sum(sum(r.values()) for r in confusion.values())
        correct = sum(confusion.get(label, {}).get(label, 0) for label in confusion)
        ordered = {
            g: confusion[g]
            for g in sorted(confusion, key=lambda g: (g not in LABELS, LABELS.index(g) if g in LABELS else 0, g))
        }
        results.append(TemplateResult(
            context_id=context_id, model=model, template_id=template_id, pairs=sum(verdicts.values()),
            labelled=labelled, correct=correct, verdicts=verdicts, confusion=ordered,
            failed_pairs=failed.get((context_id, template_id), 0),
        ))  # fmt: skip
    return results


def timeline(table: pa.Table, bins: int = TIMELINE_BINS) -> Timeline | None:
    """Throughput and busy workers over time, from each batch's start and finish."""
    batches = table.group_by(["batch_id", "worker_id"]).aggregate(
        [("started_at", "min"), ("finished_at", "max"), ([], "count_all")]
    )
    if batches.num_rows == 0:
        return None
    started_us = _micros(batches["started_at_min"])
    origin_us = int(started_us.min())
    # Offsets from integer microseconds: exact before the one rounding division (as pandas computes them).
    started = (started_us - origin_us) / 1e6
    finished = (_micros(batches["finished_at_max"]) - origin_us) / 1e6
    span = max(float(finished.max()), 1e-6)
    bin_s = max(MIN_BIN_S, _round_up(span / bins))
    count = max(1, math.ceil(span / bin_s))
    last = count - 1
    claims = np.zeros(count)
    first_bin = np.minimum((started // bin_s).astype(int), last)
    last_bin = np.minimum((finished // bin_s).astype(int), last)
    np.add.at(claims, last_bin, batches["count_all"].to_numpy())
    workers = sorted(set(batches["worker_id"].to_pylist()))
    index = {w: i for i, w in enumerate(workers)}
    busy = np.zeros((len(workers), count), dtype=bool)
    for worker, lo, hi in zip(batches["worker_id"].to_pylist(), first_bin, last_bin, strict=True):
        busy[index[worker], lo : hi + 1] = True
    return Timeline(
        start=datetime.fromtimestamp(origin_us // 1_000_000, UTC) + timedelta(microseconds=origin_us % 1_000_000),
        span_s=round(span, 3),
        bin_s=bin_s,
        claims_per_s=[round(float(x), 3) for x in claims / bin_s],
        workers=[int(x) for x in busy.sum(axis=0)],
    )


def _micros(column: pa.ChunkedArray) -> np.ndarray:
    """Unix microseconds of a timestamp[us] column."""
    return pc.cast(column, pa.int64()).to_numpy()


def _round_up(seconds: float) -> float:
    """``seconds`` rounded up to 1, 2 or 5 times a power of ten (readable bin widths)."""
    magnitude = 10 ** math.floor(math.log10(seconds))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= seconds)


# --- writing it up -------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _interval(result: TemplateResult) -> str:
    """The accuracy's 95% interval as "52.1–61.2%"."""
    interval = result.accuracy_ci
    return "–" if interval is None else f"{100 * interval[0]:.1f}–{100 * interval[1]:.1f}%"


def _baseline(result: TemplateResult) -> str:
    return "–" if result.baseline is None else f"{_percent(result.baseline)} ({result.baseline_label})"


def _vs_baseline(result: TemplateResult) -> str:
    # Bold only the one reading that claims something: a template that beats chance.
    verdict = result.vs_baseline
    return "–" if verdict is None else f"**{verdict}**" if verdict == ABOVE_BASELINE else verdict


def _best_line(result: TemplateResult) -> str:
    """One context's best template, with whether it beats the majority baseline: "best" is only the highest
    accuracy among the templates tried, which may still be no better than always answering one label."""
    low, high = result.accuracy_ci or (0.0, 0.0)
    baseline = f"the majority baseline of {_percent(result.baseline)} (always {result.baseline_label})"
    if result.vs_baseline == ABOVE_BASELINE:
        verdict = f"beats {baseline}: its 95% interval starts at {_percent(low)}."
    elif result.vs_baseline == BELOW_BASELINE:
        verdict = f"**below chance**: its 95% interval ends at {_percent(high)}, under {baseline}."
    else:
        verdict = f"**not shown to beat chance**: its 95% interval contains {baseline}."
    line = (f"- **{result.template_id}** for {result.model} (`{result.context_id}`): accuracy {_percent(result.accuracy)} "
            f"(95% CI {_interval(result)}), macro-F1 {_percent(result.macro_f1)} on {result.labelled:,} labelled pairs; "
            f"{verdict}")  # fmt: skip
    if result.one_label is not None:
        line += f" It answers {result.one_label} for {_percent(result.verdict_shares[result.one_label])} of its pairs."
    return line


def to_markdown(report: Report) -> str:
    """The report as Markdown: what ``pervade report`` prints and writes to summary.md."""
    lines = [f"# Report: {report.out_dir}", ""]
    lines.append(f"{report.rows:,} verdicts on {report.claims:,} claims in {report.files} Parquet files"
                 + (f"; {report.duplicate_pairs:,} pairs written more than once" if report.duplicate_pairs else "") + ".")  # fmt: skip
    best = report.best()
    lines += ["", "## Best template", ""]
    if not best:
        lines.append("None: no claim has a gold label, so accuracy cannot be measured.")
    lines += [_best_line(result) for result in best]
    lines += ["", "## Accuracy per context and template", ""]
    lines.append(
        "Accuracy is over the labelled pairs, with its 95% Wilson interval. The majority baseline is the accuracy of "
        "always answering the most frequent gold label of the same pairs; a template is *above baseline* only when "
        "its whole interval lies above it, *below baseline* when it lies wholly below, else *within chance*. "
        "Verdicts: count (share of the pairs)."
    )
    lines.append("")
    lines.append(
        "| model | context | template | pairs | labelled | accuracy | 95% CI | majority baseline | vs baseline "
        "| macro-F1 | " + " | ".join(LABELS) + " | failed |"
    )
    lines.append("|---|---|---|---:|---:|---:|---:|---:|---|---:|" + "---:|" * len(LABELS) + "---:|")
    for r in report.results:
        shares = r.verdict_shares
        counts = " | ".join(f"{r.verdicts.get(label, 0):,} ({_percent(shares.get(label, 0.0))})" for label in LABELS)
        lines.append(f"| {r.model} | `{r.context_id}` | {r.template_id} | {r.pairs:,} | {r.labelled:,} | "
                     f"{_percent(r.accuracy)} | {_interval(r)} | {_baseline(r)} | {_vs_baseline(r)} | "
                     f"{_percent(r.macro_f1)} | {counts} | {r.failed_pairs:,} |")  # fmt: skip
    collapsed = [r for r in report.results if r.one_label is not None]
    if collapsed:
        lines += ["", f"Answering one label for at least {ONE_LABEL_SHARE:.0%} of their pairs (an accuracy near "
                  "that label's share of the gold labels, whatever the claims say): "
                  + ", ".join(f"{r.template_id} (`{r.context_id}`): {r.one_label} "
                              f"{_percent(r.verdict_shares[r.one_label])}" for r in collapsed) + "."]  # fmt: skip
    lines += ["", "## Confusion matrices (rows: gold label; columns: verdict)", ""]
    for r in report.results:
        if not r.confusion:
            continue
        lines += [f"**{r.template_id}** (`{r.context_id}`)", "", "| gold \\ verdict | " + " | ".join(LABELS) + " |",
                  "|---|" + "---:|" * len(LABELS)]  # fmt: skip
        lines += [
            f"| {gold} | " + " | ".join(f"{row.get(v, 0):,}" for v in LABELS) + " |"
            for gold, row in r.confusion.items()
        ]
        lines.append("")
    if report.timeline is not None:
        t = report.timeline
        active = [rate for rate in t.claims_per_s if rate > 0]
        over_time = (
            f"From {t.start:%Y-%m-%d %H:%M:%S} UTC for {t.span_s:,.1f} s, in bins of {t.bin_s:g} s: "
            f"{report.rows / t.span_s:,.1f} claims/s on average, {max(t.claims_per_s):,.1f} at the peak; "
            f"up to {max(t.workers)} workers with a batch in hand ({len(active)} of {len(t.claims_per_s)} bins busy)."
        )
        lines += ["## Over time", "", over_time, ""]
    images = [p for p in report.written if p.suffix == ".png"]
    if images:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    return "\n".join(lines).rstrip() + "\n"


def report_dir_for(out_dir: Path) -> Path:
    """Where the plots and summary go: beside the output, as ``OUT.report/`` (the output directory itself
    holds only Parquet files, so every reader can be pointed at it)."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(out_dir.name + ".report")


def write_report(report: Report, directory: Path, plots: bool = True) -> list[Path]:
    """Write the plots (unless ``plots`` is False) and summary.md into ``directory``; the paths written."""
    from pervade.sinks.plots import plot_accuracy, plot_timeline  # matplotlib: only when drawing

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        written.append(plot_accuracy(report.results, report.best(), directory / "accuracy.png"))
        if report.timeline is not None:
            written.append(plot_timeline(report.timeline, directory / "timeline.png"))
    report.written = [*written, directory / "summary.md"]
    (directory / "summary.md").write_text(to_markdown(report), encoding="utf-8")
    return report.written

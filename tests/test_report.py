"""``pervade report``: its numbers against a direct pandas computation on the same Parquet files, and its
plots as the PNG files a person opens."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pervade.constants import LABELS
from pervade.producer.templates import load_templates
from pervade.protocol import BatchFailure, BatchResult, Verdict
from pervade.sinks.commit import OutputDirectory
from pervade.sinks.failures import FailureLog
from pervade.sinks.parquet import RollingParquetWriter
from pervade.sinks.plots import ACCURACY_SIZE, TIMELINE_SIZE
from pervade.sinks.report import Report, report_dir_for, template_results, to_markdown, write_report
from pervade.sinks.scores import Z_95, wilson_interval
from pervade.sinks.summary import score_table, summarize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pervade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pervade", *args], capture_output=True, text=True, timeout=300, check=False
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def wilson_by_quadratic(correct: int, n: int) -> tuple[float, float]:
    """Wilson's interval as he derived it: the p for which the observed share lies exactly z standard errors
    from p, i.e. the roots of (phat - p)^2 = z^2 p (1 - p) / n, a quadratic in p (independent of the
    centre-and-half-width form the report uses)."""
    phat, z2 = correct / n, Z_95 * Z_95
    a, b, c = 1 + z2 / n, -(2 * phat + z2 / n), phat * phat
    root = math.sqrt(max(0.0, b * b - 4 * a * c))
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


def expected_vs_baseline(interval: tuple[float, float], baseline: float) -> str:
    return (
        "above baseline" if interval[0] > baseline else "below baseline" if interval[1] < baseline else "within chance"
    )


def expected_from_pandas(out_dir: Path) -> dict[tuple[str, str], dict]:
    """Accuracy and its interval, the majority baseline, macro-F1, verdict counts and confusion per (context,
    template), computed directly."""
    df = pd.read_parquet(out_dir)
    expected = {}
    for (context_id, template_id), group in df.groupby(["context_id", "template_id"]):
        labelled = group[group["gold_label"].notna()]
        confusion = pd.crosstab(labelled["gold_label"], labelled["verdict"]).reindex(columns=list(LABELS), fill_value=0)
        f1s = []
        for label in LABELS:
            tp = ((labelled["gold_label"] == label) & (labelled["verdict"] == label)).sum()
            denominator = (labelled["verdict"] == label).sum() + (labelled["gold_label"] == label).sum()
            f1s.append(2 * tp / denominator if denominator else 0.0)
        gold_shares = labelled["gold_label"].value_counts() / len(labelled) if len(labelled) else pd.Series()
        correct = int((labelled["gold_label"] == labelled["verdict"]).sum())
        interval = wilson_by_quadratic(correct, len(labelled)) if len(labelled) else None
        baseline = float(gold_shares.max()) if len(labelled) else None
        expected[(context_id, template_id)] = {
            "accuracy_ci": interval,
            "baseline": baseline,
            # Every label as frequent as the most frequent one (the report breaks a tie by LABELS order).
            "baseline_labels": set(gold_shares[gold_shares == gold_shares.max()].index) if len(labelled) else {None},
            "vs_baseline": expected_vs_baseline(interval, baseline) if interval is not None else None,
            "verdict_shares": (group["verdict"].value_counts() / len(group))
            .reindex(list(LABELS), fill_value=0.0)
            .to_dict(),
            "pairs": len(group),
            "labelled": len(labelled),
            "accuracy": (labelled["gold_label"] == labelled["verdict"]).mean() if len(labelled) else None,
            "macro_f1": float(np.mean(f1s)) if len(labelled) else None,
            "verdicts": group["verdict"].value_counts().reindex(list(LABELS), fill_value=0).to_dict(),
            "confusion": {gold: row.to_dict() for gold, row in confusion.iterrows()},
        }
    return expected


def check_against_pandas(report: dict, out_dir: Path) -> None:
    expected = expected_from_pandas(out_dir)
    got = {(r["context_id"], r["template_id"]): r for r in report["results"]}
    assert set(got) == set(expected)
    for key, want in expected.items():
        result = got[key]
        assert (result["pairs"], result["labelled"]) == (want["pairs"], want["labelled"])
        for metric in ("accuracy", "macro_f1"):
            assert result[metric] == (None if want[metric] is None else pytest.approx(want[metric], abs=1e-12)), (
                key,
                metric,
            )
        assert result["verdicts"] == want["verdicts"] and result["confusion"] == want["confusion"], key
        if want["accuracy_ci"] is None:
            assert result["accuracy_ci"] is None and result["baseline"] is None, key
        else:
            assert result["accuracy_ci"] == pytest.approx(list(want["accuracy_ci"]), abs=1e-9), key
            assert result["baseline"] == pytest.approx(want["baseline"], abs=1e-12), key
        assert result["baseline_label"] in want["baseline_labels"], key
        assert result["vs_baseline"] == want["vs_baseline"], key
        assert result["verdict_shares"] == pytest.approx(want["verdict_shares"], abs=1e-12), key
    best = {}
    for (context_id, template_id), want in sorted(expected.items()):
        if want["accuracy"] is not None and (context_id not in best or want["accuracy"] > best[context_id][1]):
            best[context_id] = (template_id, want["accuracy"])
    assert {b["context_id"]: b["template_id"] for b in report["best"]} == {c: t for c, (t, _) in best.items()}


def check_timeline(timeline: dict, out_dir: Path) -> None:
    """Claims finished per bin, and distinct workers with a batch overlapping each bin, from pandas."""
    df = pd.read_parquet(out_dir)
    batches = df.groupby(["batch_id", "worker_id"], as_index=False).agg(
        start=("started_at", "min"), end=("finished_at", "max"), claims=("claim_id", "size")
    )
    origin, bin_s, bins = batches["start"].min(), timeline["bin_s"], len(timeline["workers"])
    assert pd.Timestamp(timeline["start"]) == origin
    first = ((batches["start"] - origin).dt.total_seconds() // bin_s).clip(upper=bins - 1).astype(int)
    last = ((batches["end"] - origin).dt.total_seconds() // bin_s).clip(upper=bins - 1).astype(int)
    assert timeline["workers"] == [batches["worker_id"][(first <= i) & (last >= i)].nunique() for i in range(bins)]
    claims = batches.groupby(last)["claims"].sum().reindex(range(bins), fill_value=0)
    assert timeline["claims_per_s"] == pytest.approx((claims / bin_s).tolist())
    assert timeline["span_s"] == pytest.approx((batches["end"].max() - origin).total_seconds(), abs=1e-3)


def test_the_report_of_a_real_run_matches_pandas_and_draws_its_plots(
    tmp_path: Path, fever_claims: Path, tiny_model: Path
) -> None:
    out = tmp_path / "out"
    run = pervade("run", "--claims", str(fever_claims), "--limit", "150", "--batch-size", "8", "--out", str(out),
                  "--model", str(tiny_model))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    done = pervade("report", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    templates = len(load_templates())  # the shipped set, however many it holds
    assert report["rows"] == 150 * templates and report["claims"] == 150 and report["duplicate_pairs"] == 0
    check_against_pandas(report, out)

    check_timeline(report["timeline"], out)

    report_dir = report_dir_for(out)
    assert png_size(report_dir / "accuracy.png") == ACCURACY_SIZE
    assert png_size(report_dir / "timeline.png") == TIMELINE_SIZE
    for name in ("accuracy.png", "timeline.png"):
        pixels = matplotlib.image.imread(report_dir / name)
        assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10, f"{name} is blank"
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".parquet") == [], "the output holds only Parquet"

    text = pervade("report", str(out))
    assert text.returncode == 0 and text.stdout == (report_dir / "summary.md").read_text()
    best = report["best"][0]
    assert (
        f"**{best['template_id']}** for {best['model']}" in text.stdout and "![timeline](timeline.png)" in text.stdout
    )
    assert "| 95% CI | majority baseline | vs baseline |" in text.stdout
    assert f"the majority baseline of {100 * best['baseline']:.1f}% (always {best['baseline_label']})" in text.stdout


def result(
    context: str, template: str, batch: int, rows: list[tuple[str, str | None, str]], start: float
) -> BatchResult:
    return BatchResult(
        batch_id=f"job/{batch}/{template}/{context}", job_id="job", context_id=context, model=f"model-{context}",
        template_id=template, worker_id=f"w{batch % 2}", device="cpu", submitted_at=start, started_at=start,
        finished_at=start + 0.5,
        verdicts=[Verdict(claim_id=c, verdict=v, scores=[0.0, 0.0, 0.0], gold_label=g) for c, g, v in rows],
    )  # fmt: skip


def test_two_contexts_unlabelled_claims_and_failures(tmp_path: Path) -> None:
    """Accuracy over the labelled claims only, per context; failed pairs counted beside the verdicts."""
    out = tmp_path / "out"
    writer = RollingParquetWriter(OutputDirectory(out), "verdicts-test")
    rows = [
        ("1", "SUPPORTS", "SUPPORTS"),
        ("2", "REFUTES", "SUPPORTS"),
        ("3", None, "REFUTES"),
        ("4", "NOT ENOUGH INFO", "NOT ENOUGH INFO"),
    ]
    writer.add(result("ctx-a", "t1", 0, rows, 1000.0))
    writer.add(result("ctx-a", "t2", 1, [(c, g, "SUPPORTS") for c, g, _ in rows], 1001.0))
    writer.add(result("ctx-b", "t1", 2, [(c, g, "REFUTES") for c, g, _ in rows], 1002.0))
    writer.add(result("ctx-b", "t2", 3, [(c, None, "REFUTES") for c, _, _ in rows], 1003.0))  # no gold at all
    writer.roll()
    failures = FailureLog(out, "test")
    failures.add(BatchFailure(batch_id="job/9/t2/ctx-a", job_id="job", context_id="ctx-a", model="model-ctx-a",
                              template_id="t2", claim_ids=["5", "6"], error="boom", attempts=3))  # fmt: skip
    failures.flush()

    done = pervade("report", str(out), "--json", "--report-dir", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    check_against_pandas(report, out)
    by_key = {(r["context_id"], r["template_id"]): r for r in report["results"]}
    assert by_key[("ctx-a", "t1")]["accuracy"] == pytest.approx(2 / 3)  # the unlabelled claim left out
    assert by_key[("ctx-a", "t2")]["failed_pairs"] == 2 and by_key[("ctx-a", "t1")]["failed_pairs"] == 0
    assert by_key[("ctx-b", "t2")]["accuracy"] is None and by_key[("ctx-b", "t2")]["confusion"] == {}
    # Three labelled claims, one per label: a three-way tie, broken by LABELS order.
    assert (by_key[("ctx-a", "t1")]["baseline"], by_key[("ctx-a", "t1")]["baseline_label"]) == (
        pytest.approx(1 / 3),
        "SUPPORTS",
    )
    assert by_key[("ctx-b", "t2")]["baseline"] is None and by_key[("ctx-b", "t2")]["vs_baseline"] is None
    # pervade run's summary reads the same files into the same figures.
    scores = {(s.context_id, s.template_id): s for s in summarize(out).per_template}
    assert set(scores) == set(by_key)
    for key, score in scores.items():
        want = by_key[key]
        assert (score.labelled, score.correct, score.baseline, score.baseline_label, score.vs_baseline) == (
            want["labelled"], want["correct"], want["baseline"], want["baseline_label"], want["vs_baseline"]
        )  # fmt: skip
        assert list(score.accuracy_ci or []) == (want["accuracy_ci"] or [])
    header, *lines = score_table(list(scores.values()))
    assert header.split()[-2:] == ["vs", "baseline"] and len(lines) == 4
    # ctx-a/t1: 2 of 3 right, 95% CI 20.8-93.9%, around a one-in-three baseline.
    assert lines[0].split() == ["t1", "4", "0.667", "0.208-0.939", "0.333", "within", "chance"]
    assert lines[3].split() == ["t2", "4", "n/a", "n/a", "n/a", "n/a"]  # ctx-b/t2: no gold label at all
    assert [(b["context_id"], b["template_id"]) for b in report["best"]] == [("ctx-a", "t1"), ("ctx-b", "t1")]
    assert png_size(tmp_path / "report" / "accuracy.png") == ACCURACY_SIZE
    check_timeline(report["timeline"], out)
    assert max(report["timeline"]["workers"]) == 1  # the batches never overlap in time


def test_a_directory_without_verdicts_is_a_clear_error(tmp_path: Path) -> None:
    missing = pervade("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    empty = pervade("report", str(tmp_path))
    assert empty.returncode == 2 and "holds no Parquet files" in empty.stderr


def test_wilson_interval_matches_published_values() -> None:
    """Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in Medicine
    17:857-872, Table I, method 3 (Wilson score, no continuity correction), to its four decimals; and the
    closed forms at the ends: 0 of n gives (0, z^2 / (n + z^2)), n of n its mirror."""
    published = {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }
    for (correct, n), interval in published.items():
        assert wilson_interval(correct, n) == pytest.approx(interval, abs=5e-5), (correct, n)
    edge = Z_95**2 / (10 + Z_95**2)  # 0.2775
    assert wilson_interval(0, 10) == (0.0, pytest.approx(edge)) and edge == pytest.approx(0.2775, abs=5e-5)
    assert wilson_interval(10, 10) == (pytest.approx(1 - edge), 1.0)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=5e-5)  # symmetric about 1/2
    for correct, n in [(0, 1), (1, 1), (3, 7), (199, 200), (5_000, 10_000)]:
        assert wilson_interval(correct, n) == pytest.approx(wilson_by_quadratic(correct, n), abs=1e-12)
    with pytest.raises(ValueError, match="at least one trial"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="must lie in"):
        wilson_interval(11, 10)


#: 200 labelled claims: half SUPPORTS, so always answering SUPPORTS scores 50%.
GOLD = {"SUPPORTS": 100, "REFUTES": 60, "NOT ENOUGH INFO": 40}


def graded(context: str, template: str, right: dict[str, int], wrong_answer: str = "REFUTES") -> list[dict]:
    """Rows whose verdict equals the gold label for ``right[label]`` of each label's claims; the rest get
    ``wrong_answer`` (or SUPPORTS, where that would be right)."""
    rows = []
    for label, total in GOLD.items():
        for i in range(total):
            miss = wrong_answer if wrong_answer != label else "SUPPORTS" if label != "SUPPORTS" else "REFUTES"
            verdict = label if i < right.get(label, 0) else miss
            rows.append({"context_id": context, "model": f"model-{context}", "template_id": template,
                         "claim_id": f"{label}-{i}", "gold_label": label, "verdict": verdict})  # fmt: skip
    return rows


def test_each_template_is_read_against_its_majority_baseline(tmp_path: Path) -> None:
    """Clearly above, straddling and clearly below a 50% baseline; one template that answers SUPPORTS to
    everything scores exactly the baseline and shows as such in its verdict shares."""
    rows = [
        *graded("ctx", "above", {"SUPPORTS": 80, "REFUTES": 45, "NOT ENOUGH INFO": 25}),  # 150/200 = 75%
        *graded("ctx", "within", {"SUPPORTS": 60, "REFUTES": 30, "NOT ENOUGH INFO": 15}),  # 105/200 = 52.5%
        *graded("ctx", "below", {"SUPPORTS": 30, "REFUTES": 20, "NOT ENOUGH INFO": 10}),  # 60/200 = 30%
        *graded("ctx", "always-supports", {"SUPPORTS": 100}, wrong_answer="SUPPORTS"),  # 100/200 = the baseline
        *graded("weak", "only", {"SUPPORTS": 55, "REFUTES": 30, "NOT ENOUGH INFO": 20}),  # 105/200: best, not good
    ]  # fmt: skip
    results = template_results(pa.Table.from_pylist(rows))
    by_key = {(r.context_id, r.template_id): r for r in results}
    for r in results:
        assert (r.labelled, r.baseline, r.baseline_label) == (200, 0.5, "SUPPORTS"), r.template_id
        assert r.accuracy_ci == pytest.approx(wilson_by_quadratic(r.correct, r.labelled), abs=1e-12)
    above, within, below = by_key[("ctx", "above")], by_key[("ctx", "within")], by_key[("ctx", "below")]
    (above_low, _), (within_low, within_high), (_, below_high) = (
        r.accuracy_ci or (0.0, 0.0) for r in (above, within, below)
    )
    assert above.correct == 150 and above_low > 0.5 and above.vs_baseline == "above baseline"
    assert within.correct == 105 and within_low < 0.5 < within_high and within.vs_baseline == "within chance"
    assert below.correct == 60 and below_high < 0.5 and below.vs_baseline == "below baseline"
    collapsed = by_key[("ctx", "always-supports")]
    assert (collapsed.accuracy, collapsed.vs_baseline, collapsed.one_label) == (0.5, "within chance", "SUPPORTS")
    assert collapsed.verdict_shares == {"SUPPORTS": 1.0, "REFUTES": 0.0, "NOT ENOUGH INFO": 0.0}
    assert above.one_label is None and above.to_json()["accuracy_ci"] == list(above.accuracy_ci or ())

    report = Report(out_dir=tmp_path / "out", files=1, rows=len(rows), claims=200, results=results, timeline=None)
    assert [(b.context_id, b.template_id) for b in report.best()] == [("ctx", "above"), ("weak", "only")]
    written = write_report(report, tmp_path / "report")
    assert png_size(tmp_path / "report" / "accuracy.png") == ACCURACY_SIZE and written[-1].name == "summary.md"
    text = to_markdown(report)
    best_section = text.split("## Best template")[1].split("##")[0]
    assert "**above** for model-ctx (`ctx`): accuracy 75.0% (95% CI 68.6–80.5%)" in best_section
    assert "beats the majority baseline of 50.0% (always SUPPORTS)" in best_section
    assert "**only** for model-weak (`weak`): accuracy 52.5% (95% CI 45.6–59.3%)" in best_section
    assert "**not shown to beat chance**: its 95% interval contains the majority baseline of 50.0%" in best_section
    table = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| model-")}
    assert "| 75.0% | 68.6–80.5% | 50.0% (SUPPORTS) | **above baseline** |" in table["above"]
    assert "| 52.5% | 45.6–59.3% | 50.0% (SUPPORTS) | within chance |" in table["within"]
    assert "| 30.0% | 24.1–36.7% | 50.0% (SUPPORTS) | below baseline |" in table["below"]
    assert "| 200 (100.0%) | 0 (0.0%) | 0 (0.0%) |" in table["always-supports"]
    assert "always-supports (`ctx`): SUPPORTS 100.0%" in text

    lines = score_table(summarize(tmp_path / "no-output").per_template)
    assert lines == [lines[0]] and "baseline" in lines[0] and "vs baseline" in lines[0]

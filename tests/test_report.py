"""``pervade report``: its numbers against a direct pandas computation on the same Parquet files, and its
plots as the PNG files a person opens."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pervade.constants import LABELS
from pervade.protocol import BatchFailure, BatchResult, Verdict
from pervade.sinks.commit import OutputDirectory
from pervade.sinks.failures import FailureLog
from pervade.sinks.parquet import RollingParquetWriter
from pervade.sinks.plots import ACCURACY_SIZE, TIMELINE_SIZE
from pervade.sinks.report import report_dir_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pervade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pervade", *args], capture_output=True, text=True, timeout=300, check=False
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


def expected_from_pandas(out_dir: Path) -> dict[tuple[str, str], dict]:
    """Accuracy, macro-F1, verdict counts and confusion per (context, template), computed directly."""
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
        expected[(context_id, template_id)] = {
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


def test_the_report_of_a_real_run_matches_pandas_and_draws_its_plots(tmp_path: Path, fever_claims: Path) -> None:
    out = tmp_path / "out"
    run = pervade("run", "--claims", str(fever_claims), "--limit", "150", "--batch-size", "8", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]

    done = pervade("report", str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rows"] == 150 * 4 and report["claims"] == 150 and report["duplicate_pairs"] == 0
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
    assert [(b["context_id"], b["template_id"]) for b in report["best"]] == [("ctx-a", "t1"), ("ctx-b", "t1")]
    assert png_size(tmp_path / "report" / "accuracy.png") == ACCURACY_SIZE
    check_timeline(report["timeline"], out)
    assert max(report["timeline"]["workers"]) == 1  # the batches never overlap in time


def test_a_directory_without_verdicts_is_a_clear_error(tmp_path: Path) -> None:
    missing = pervade("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a directory" in missing.stderr
    empty = pervade("report", str(tmp_path))
    assert empty.returncode == 2 and "holds no Parquet files" in empty.stderr

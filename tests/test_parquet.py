"""The Parquet output: complete files only, the documented schema, readable by pandas, polars and duckdb."""

from __future__ import annotations

import duckdb
import msgspec
import pandas as pd
import polars as pl

from pervade.protocol import BatchResult, Verdict
from pervade.sinks.commit import OutputDirectory
from pervade.sinks.parquet import SCHEMA, RollingParquetWriter
from pervade.sinks.summary import summarize


def result(batch: int, n: int = 3, template: str = "t1") -> BatchResult:
    return BatchResult(
        batch_id=f"b{batch}", job_id="j", context_id="ctx-1", model="m", template_id=template, worker_id="w",
        device="cpu", submitted_at=1_700_000_000.0, started_at=1_700_000_001.0, finished_at=1_700_000_001.5,
        verdicts=[Verdict(claim_id=f"{batch}-{i}", verdict="SUPPORTS" if i % 2 else "REFUTES",
                          scores=[0.5, 0.25, -1.0], gold_label="SUPPORTS" if i < 2 else None) for i in range(n)],
    )  # fmt: skip


def test_the_output_directory_only_ever_holds_complete_files(tmp_path) -> None:
    out = tmp_path / "out"
    writer = RollingParquetWriter(OutputDirectory(out), "verdicts-test", row_group_rows=4)
    writer.add(result(0))
    writer.add(result(1))
    writer.flush()
    assert list(out.iterdir()) == []
    staged = [p.name for p in (tmp_path / ".out.partial").iterdir() if p.name.startswith("verdicts")]
    assert len(staged) == 1 and staged[0].startswith("verdicts-test-00000.parquet~")
    assert writer.roll().batch_ids == ["b0", "b1"]
    assert [p.name for p in out.iterdir()] == ["verdicts-test-00000.parquet"]
    writer.add(result(2))
    writer.flush()  # a second file is under way: directory readers must not see it
    assert pl.read_parquet(out).height == 6 and len(pd.read_parquet(out)) == 6
    assert writer.roll().batch_ids == ["b2"]
    assert writer.roll() is None  # nothing new: no empty file
    assert pl.read_parquet(out).height == 9


def test_rows_columns_and_readers(tmp_path) -> None:
    writer = RollingParquetWriter(OutputDirectory(tmp_path), "v", row_group_rows=2)
    for b in range(3):
        writer.add(result(b, template=f"t{b % 2}"))
        writer.flush()
    writer.roll()
    writer.add(result(3))
    writer.roll()

    frame = pd.read_parquet(tmp_path)
    assert len(frame) == 12 and list(frame.columns) == SCHEMA.names
    assert frame["claim_id"].is_unique
    row = frame.set_index("claim_id").loc["0-1"]
    assert (row.verdict, row.gold_label, row.score_supports, row.score_not_enough_info) == ("SUPPORTS", "SUPPORTS", 0.5, -1.0)
    assert frame.loc[frame.claim_id == "0-2", "gold_label"].isna().all()
    assert str(frame["finished_at"].dt.tz) == "UTC"

    assert pl.read_parquet(tmp_path / "*.parquet").height == 12
    assert duckdb.sql(f"select count(*) from '{tmp_path}/*.parquet'").fetchall() == [(12,)]
    assert duckdb.sql(f"select count(distinct batch_id) from '{tmp_path}/*.parquet'").fetchall() == [(4,)]


def test_each_row_carries_its_own_batch_s_fields_in_a_row_group_of_batches_of_every_size(tmp_path) -> None:
    writer = RollingParquetWriter(OutputDirectory(tmp_path), "v", row_group_rows=100)
    for b, n in enumerate([1, 3, 1, 2]):
        writer.add(msgspec.structs.replace(
            result(b, n=n), worker_id=f"w{b}", worker_key="k" if b % 2 else "", started_at=1_700_000_000.0 + b,
        ))  # fmt: skip
    writer.roll()
    rows = pl.read_parquet(tmp_path).to_dicts()
    assert sorted(row["claim_id"] for row in rows) == ["0-0", "1-0", "1-1", "1-2", "2-0", "3-0", "3-1"]
    for row in rows:
        b = int(row["claim_id"].split("-")[0])
        assert (row["batch_id"], row["worker_id"], row["worker_key"]) == (f"b{b}", f"w{b}", "k" if b % 2 else None)
        assert row["started_at"].timestamp() == 1_700_000_000.0 + b


def test_summary_counts_accuracy_on_labelled_rows_only(tmp_path) -> None:
    writer = RollingParquetWriter(OutputDirectory(tmp_path), "v")
    writer.add(result(0, n=4, template="a"))  # gold: S S - -   verdicts: R S R S  -> 1 of 2 labelled right
    writer.roll()
    summary = summarize(tmp_path)
    assert (summary.rows, summary.claims, summary.files) == (4, 4, 1)
    [score] = summary.per_template
    assert (score.template_id, score.verdicts, score.labelled, score.correct, score.accuracy) == ("a", 4, 2, 1, 0.5)
    assert summarize(tmp_path / "empty").rows == 0


def test_a_label_left_out_is_null_and_a_calibrated_verdict_can_be_recomputed_from_the_row(tmp_path) -> None:
    """A two-label calibrating template: its third score is null, its content-free scores are in the row, and
    the verdict is the label whose score less its calibration is highest (docs/output.md)."""
    calibrated = BatchResult(
        batch_id="b", job_id="j", context_id="ctx-1", model="m", template_id="tf", worker_id="w", device="cpu",
        submitted_at=1.0, started_at=2.0, finished_at=3.0, calibration=[-1.0, -3.0, None],
        verdicts=[Verdict(claim_id="raw-says-supports", verdict="REFUTES", scores=[-2.0, -2.5, None]),
                  Verdict(claim_id="both-say-supports", verdict="SUPPORTS", scores=[-1.0, -4.0, None])],
    )  # fmt: skip
    writer = RollingParquetWriter(OutputDirectory(tmp_path), "v")
    writer.add(calibrated)
    writer.add(result(1))
    writer.roll()
    rows = {r["claim_id"]: r for r in pl.read_parquet(tmp_path).to_dicts()}
    for claim_id in ("raw-says-supports", "both-say-supports"):
        row = rows[claim_id]
        assert row["score_not_enough_info"] is None and row["calibration_not_enough_info"] is None
        assert row["score_kind"] == "answer_logprob"
        adjusted = {
            label: row[f"score_{name}"] - row[f"calibration_{name}"]
            for label, name in (("SUPPORTS", "supports"), ("REFUTES", "refutes"))
        }
        assert row["verdict"] == max(adjusted, key=adjusted.get)
    uncalibrated = rows["1-0"]
    assert uncalibrated["calibration_supports"] is None and uncalibrated["score_supports"] == 0.5

"""Every verdict names the key that computed it, and ``pervade status`` shows each worker's key: the Parquet
``worker_key`` column (null where the broker has no keys), files of an earlier version upgraded before a sink
publishes beside them, and the key column of the status view. No processes, no sockets."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pervade.broker.records import WorkerRecord
from pervade.broker.status import build_snapshot
from pervade.keyring import KeyHolder, Role
from pervade.monitor import render, snapshot_json
from pervade.protocol import BatchResult, Verdict
from pervade.sinks.commit import OutputDirectory
from pervade.sinks.parquet import SCHEMA, RollingParquetWriter, read_verdicts
from pervade.sinks.report import build_report
from pervade.sinks.written import WrittenIndex

PUBLIC = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 public key's shape (40 characters)


def result(batch: str, worker_key: str, n: int = 3) -> BatchResult:
    return BatchResult(
        batch_id=batch, job_id="j", context_id="ctx-1", model="m", template_id="t", worker_id="w", device="cpu",
        submitted_at=1_700_000_000.0, started_at=1_700_000_001.0, finished_at=1_700_000_002.0, dtype="float32",
        verdicts=[Verdict(claim_id=f"{batch}-{i}", verdict="SUPPORTS", scores=[1.0, 0.0, 0.0]) for i in range(n)],
        worker_key=worker_key,
    )  # fmt: skip


def write(out: Path, *results: BatchResult, prefix: str = "verdicts-new") -> None:
    writer = RollingParquetWriter(OutputDirectory(out), prefix)
    for r in results:
        writer.add(r)
    assert writer.roll() is not None


def keys_by_batch(table: pa.Table) -> dict[str, set]:
    keys: dict[str, set] = {}
    for row in table.select(["batch_id", "worker_key"]).to_pylist():
        keys.setdefault(row["batch_id"], set()).add(row["worker_key"])
    return keys


def test_every_row_names_the_key_of_its_batch_and_null_without_keys(tmp_path) -> None:
    out = tmp_path / "out"
    write(out, result("b1", "node17"), result("b2", ""), result("b3", "node18", n=2))
    [path] = out.glob("*.parquet")
    assert pq.read_schema(path).field("worker_key") == pa.field("worker_key", pa.string(), nullable=True)
    assert keys_by_batch(pq.read_table(path)) == {"b1": {"node17"}, "b2": {None}, "b3": {"node18"}}
    assert keys_by_batch(read_verdicts(out)) == {"b1": {"node17"}, "b2": {None}, "b3": {"node18"}}
    frame = pl.read_parquet(out / "*.parquet")
    assert frame.filter(pl.col("worker_key") == "node17")["batch_id"].to_list() == ["b1"] * 3  # what to discard


def earlier_version_file(out: Path, dropped: tuple[str, ...]) -> Path:
    """A file as an earlier pervade wrote it: today's schema less the columns added since, two row groups."""
    write(out.with_name("today"), result("old", "", n=4))
    [today] = out.with_name("today").glob("*.parquet")
    out.mkdir()
    path = out / "verdicts-20240101T000000-old-00000.parquet"  # sorts first, as an older run's files do
    pq.write_table(pq.read_table(today).drop_columns(list(dropped)), path, row_group_size=2)
    return path


#: The columns issue 19 added (a file of issue 18's version lacks them), and those added before.
SCORING_COLUMNS = ("calibration_supports", "calibration_refutes", "calibration_not_enough_info", "score_kind")


@pytest.mark.parametrize(
    "dropped", [SCORING_COLUMNS, ("worker_key", *SCORING_COLUMNS), ("dtype", "worker_key", *SCORING_COLUMNS)]
)
def test_a_file_of_an_earlier_version_is_upgraded_before_a_sink_publishes_beside_it(tmp_path, dropped) -> None:
    out = tmp_path / "out"
    old = earlier_version_file(out, dropped)
    before = pq.read_table(old)
    # Read as it is, the old file has no key: read_verdicts fills the column with nulls.
    assert keys_by_batch(read_verdicts(out)) == {"old": {None}}

    write(out, result("new", "node17"))  # a resumed job's sink publishes into the same directory

    upgraded = pq.ParquetFile(old)
    assert upgraded.schema_arrow == SCHEMA and upgraded.metadata.num_row_groups == 2
    table = upgraded.read()
    assert table.select(before.column_names).equals(before)  # every old value kept, in order
    assert table["worker_key"].null_count == 4
    assert set(table["dtype"].to_pylist()) == ({""} if "dtype" in dropped else {"float32"})
    assert set(table["score_kind"].to_pylist()) == {"first_token_logit"} and table["calibration_supports"].null_count == 4
    # The report never pools the two ways of scoring one template id.
    results = {r.template_id: r.pairs for r in build_report(out).results}
    assert results == {"t": 3, "t [first-token logits]": 4}
    # One schema in the directory: polars reads it whole (it refuses a directory of mixed schemas).
    frame = pl.read_parquet(out / "*.parquet")
    assert frame.height == 7 and frame.filter(pl.col("worker_key") == "node17").height == 3
    assert not [p for p in (tmp_path / ".out.partial").iterdir() if "upgrade-" in p.name]


def test_files_that_are_not_an_earlier_version_are_left_alone(tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / "notes.parquet"  # has a batch_id column, but is not a verdict file of any version
    pq.write_table(pa.table({"batch_id": ["x"], "note": ["mine"]}), foreign)
    index = WrittenIndex(out)
    index.refresh()
    assert index.outdated == set() and "x" in index
    write(out, result("new", "node17"))
    assert pq.read_table(foreign).column_names == ["batch_id", "note"]


def worker(name: str, key: KeyHolder | None) -> WorkerRecord:
    return WorkerRecord(identity=name.encode(), name=name, host="gpu-node", key=key)


def test_status_shows_each_workers_key_name(tmp_path) -> None:
    workers = [worker("w-keyed", KeyHolder(Role.WORKER, "node17", PUBLIC)), worker("w-open", None)]
    snapshot = build_snapshot(
        endpoint="tcp://127.0.0.1:5555", started_at=time.time(), workers=workers, specs={}, queued={}, jobs=[],
        claims_per_s=0.0, batches={}, counters={}, sinks=0, producers=0,
    )  # fmt: skip
    assert [(w.worker_id, w.key) for w in snapshot.workers] == [("w-keyed", "node17"), ("w-open", "")]
    assert [w.get("key") for w in json.loads(snapshot_json(snapshot))["workers"]] == ["node17", None]  # "": omitted

    text = io.StringIO()
    Console(file=text, width=200).print(render(snapshot))
    cells = [
        line.replace("┃", "│").split("│")[1:3] for line in text.getvalue().splitlines() if "│" in line or "┃" in line
    ]
    rows = {first.strip(): second.strip() for first, second in cells if first.strip().startswith("w")}
    assert rows == {"worker": "key", "w-keyed": "node17", "w-open": "–"}

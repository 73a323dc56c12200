"""What watching a run costs: the broker's status snapshot (``pervade status``, the Prometheus metrics) and
the jobs' progress (a sink's progress bar, once a second) at 10 to 10,000 workers, and ``pervade report``
on a sweep's worth of Parquet rows.

    .venv/bin/python bench/monitoring_cost.py
    .venv/bin/python bench/monitoring_cost.py --workers 10 1000 --report-rows 100000

Snapshot: a real broker (its store, its records) with N registered workers, each holding a context and
two batches in hand, and 20 jobs; timed are ``Broker.status()`` (built on the broker's event loop, so its
time is time the loop does not route messages), the size of the encoded ``status_reply``, a scrape of
the metrics registry (prometheus-client's exposition, on its own thread), and the same two for the
``progress_reply`` a sink's bar asks for (``BrokerState.progress``). The broker builds one snapshot a
second for the metrics, and one per status request.

Report: R verdict rows (FEVER-like: 4 templates, one context, gold labels, batches of 32 from 8 workers
over an hour) written with the sink's own Parquet writer, then ``build_report`` and ``write_report`` (the
two PNGs and summary.md), as ``pervade report DIR`` runs them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchkit import Report
from prometheus_client import generate_latest

from pervade.broker.config import BrokerConfig
from pervade.broker.metrics import SnapshotCollector
from pervade.broker.records import WorkerRecord
from pervade.broker.server import Broker
from pervade.broker.store import JobRecord
from pervade.constants import LABELS
from pervade.context import ContextSpec
from pervade.protocol import BatchResult, DeviceInfo, ProgressReply, StatusReply, Verdict, encode
from pervade.sinks.commit import OutputDirectory
from pervade.sinks.parquet import RollingParquetWriter
from pervade.sinks.report import build_report, write_report

GPU = DeviceInfo(kind="cuda", name="NVIDIA H200", memory_bytes=141 << 30)


def broker_with(workers: int) -> Broker:
    broker = Broker(BrokerConfig(bind="tcp://127.0.0.1:*"))
    broker.start()
    spec = ContextSpec(model="HuggingFaceTB/SmolLM2-1.7B-Instruct")
    broker.specs[spec.context_id] = spec
    for n in range(workers):
        record = WorkerRecord(
            identity=f"w{n}".encode(), name=f"node{n // 4:04d}-gpu{n % 4}", host=f"node{n // 4:04d}", device=GPU
        )
        record.contexts[spec.context_id] = None
        record.loaded.add(spec.context_id)
        record.in_flight.update(dict.fromkeys([f"b{n}-0", f"b{n}-1"]))
        record.claims.add(32 * 40)
        broker.workers[record.identity] = record
    for j in range(20):
        broker.jobs[f"job-{j}"] = JobRecord(
            job_id=f"job-{j}", batches=4545, pairs=145_449, ended=True, pairs_written=j * 7000
        )
    return broker


def time_snapshot(workers: int, repeats: int) -> dict:
    broker = broker_with(workers)
    collector = SnapshotCollector()
    try:
        build, scrape, progress_build = [], [], []
        for _ in range(repeats):
            started = time.perf_counter()
            snapshot = broker.status()
            build.append(time.perf_counter() - started)
            started = time.perf_counter()
            progress = broker.state.progress()
            progress_build.append(time.perf_counter() - started)
            collector.update(snapshot)
            started = time.perf_counter()
            exposition = generate_latest(collector)
            scrape.append(time.perf_counter() - started)
        reply_bytes = len(encode(StatusReply(snapshot=snapshot))[1])
        progress_bytes = len(encode(ProgressReply(progress=progress))[1])
    finally:
        broker._sock.close()
        broker.store.close()
    return {"snapshot_ms": 1000 * statistics.median(build), "reply_kib": reply_bytes / 1024,
            "scrape_ms": 1000 * statistics.median(scrape), "metrics_kib": len(exposition) / 1024,
            "progress_ms": 1000 * statistics.median(progress_build), "progress_kib": progress_bytes / 1024}  # fmt: skip


def write_rows(out: Path, rows: int) -> None:
    rng = random.Random(0)
    writer = RollingParquetWriter(OutputDirectory(out), "verdicts-bench", row_group_rows=100_000)
    start, batch, done = 1_795_000_000.0, 0, 0
    while done < rows:
        size = min(32, rows - done)
        template = f"template_{batch % 4}"
        began = start + 3600 * done / rows
        verdicts = [Verdict(claim_id=str(done + i), verdict=rng.choice(LABELS), scores=[0.0, 0.0, 0.0],
                            gold_label=rng.choice(LABELS)) for i in range(size)]  # fmt: skip
        writer.add(BatchResult(
            batch_id=f"job/{batch:07d}/{template}", job_id="job", context_id="ctx-0123456789abcdef",
            model="HuggingFaceTB/SmolLM2-1.7B-Instruct", template_id=template, worker_id=f"w{batch % 8}",
            device="cuda:NVIDIA H200", submitted_at=began, started_at=began, finished_at=began + 0.4, verdicts=verdicts,
        ))  # fmt: skip
        done, batch = done + size, batch + 1
    writer.roll()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--report-rows", type=int, nargs="+", default=[581_796], help="default: 145,449 claims x 4 templates"
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args()

    snapshots = Report(
        "monitoring_snapshot",
        ["workers", "snapshot_ms", "reply_kib", "scrape_ms", "metrics_kib", "progress_ms", "progress_kib"],
        args.out_dir,
    )
    snapshots.header("the broker's status snapshot, a metrics scrape and a sink's progress reply, median of --repeats")
    for workers in args.workers:
        snapshots.add(workers=workers, **time_snapshot(workers, args.repeats))
    snapshots.finish(lambda ax, rows: (ax.loglog([r["workers"] for r in rows], [r["snapshot_ms"] for r in rows], "o-", label="snapshot"),
                                       ax.loglog([r["workers"] for r in rows], [r["scrape_ms"] for r in rows], "s-", label="scrape"),
                                       ax.set_xlabel("workers"), ax.set_ylabel("ms"), ax.legend()),
                     "Status snapshot and metrics scrape cost")  # fmt: skip

    reports = Report("monitoring_report", ["rows", "read_s", "write_s", "total_s"], args.out_dir)
    reports.header("pervade report: build_report (read and compute) and write_report (2 PNGs, summary.md)")
    for rows in args.report_rows:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            write_rows(out, rows)
            started = time.perf_counter()
            report = build_report(out)
            built = time.perf_counter()
            write_report(report, Path(tmp) / "report")
            finished = time.perf_counter()
        reports.add(rows=rows, read_s=built - started, write_s=finished - built, total_s=finished - started)
    reports.finish()


if __name__ == "__main__":
    main()

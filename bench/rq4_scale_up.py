"""RQ4: opportunistic scale-up. Start with one worker, add one every S seconds, and watch throughput follow.

    .venv/bin/python bench/rq4_scale_up.py
    .venv/bin/python bench/rq4_scale_up.py --max-workers 3 --add-every 5 --claims 4000

Reproduces the scale-up experiment of Phung & Thain (arXiv 2510.14024): GPUs of an opportunistic pool are
granted one by one while the sweep runs (the paper grew to 186 GPUs in 13 minutes), and each newcomer must
join the running job and become useful without stopping anyone. Three runs of one workload (``--claims``
x ``--templates``, batch ``--batch-size``), each with a broker, a sink, workers and a producer as processes
(``jobs.cluster.LocalCluster``):

- ``scale-up``: one worker connected when the producer starts; then a new worker process is started every
  ``--add-every`` S seconds (at S, 2S, ...) until ``--max-workers`` W have been started. A newcomer imports
  torch, gets the model files from a peer (its node cache is its own) and loads the model before it serves:
  the cost of joining is in the measurement.
- ``W from start``: W workers connected before the producer starts (the best case).
- ``1 only``: one worker throughout.

Every worker gets the same ``cores / W`` torch threads in every run, so a worker stands for one device and
the 1-worker run uses 1/W of the machine, as one GPU would. The clock runs from the producer's start (the
first workers already connected) to its exit with ``--wait`` (every pair durably written). Columns:
``run``, ``schedule`` (when workers were started), ``max workers``, ``wall s``, ``pairs``, ``pairs/s``,
``all serving s`` (when the last worker was connected), ``mean serving`` (workers connected, averaged over
the run), ``pairs/s/worker`` (pairs/s over mean serving: a newcomer that brings its share keeps it flat),
and ``exact`` (every (claim, template) pair exactly once). The time series go to
``rq4_scale_up_timeline.csv`` beside the table's CSV, one value a row: ``rows_per_s`` (rows finished per
``--window`` seconds, from the Parquet ``finished_at`` column), ``serving`` (workers connected, polled every
0.25 s) and ``rows_written`` (rows durably written, polled likewise); the plot shows the first two. Both
count from the producer's start, so the first seconds (the producer importing ``datasets`` and hashing the
model, about 3 s) show no rows in any run.

Caveats: this machine has few cores (2 here), so W is 2 by default: W workers of one thread each fill it,
and ``--max-workers 3`` oversubscribes it (honest, but the third worker then takes CPU from the others
instead of adding its own). Starting a worker (a torch import, about 3 s here) also takes CPU from the ones
already serving. The model is the offline random ``--size small`` model; on a cluster a newcomer's model
load takes minutes, not a second, and scale-up pays off over hours, not seconds. Other jobs on the machine
show in the figures; compare runs of one invocation.

With ``--lab`` (root only), every run goes across the hosts of a cluster lab (jobs/lab/cluster.py) with W
compute hosts: the broker, the sink and the producer on its login host, each worker on a compute host of
its own (in the order they start), and the model on the storage host's disk, read over the shared file
system through a storage link of ``--storage-mbit`` Mbit/s that all readers share. What loopback hides
then shows: a newcomer gets the model's files across the network, from a peer already serving when it can,
else from the shared file system, and every message between broker and workers crosses two shaped links.
The report is ``rq4_scale_up_lab`` (its timeline ``rq4_scale_up_lab_timeline.csv``). Caveat: the hosts
are network namespaces of this one machine, so they all share its cores (2 here); adding a host adds
network, not compute.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from benchkit import Report
from chaos import RunReport, Workload, check_output, wait_for_serving
from runs import (
    Placement,
    add_lab_args,
    add_workload_args,
    finish_runs,
    lab_line,
    load_line,
    placement_from_args,
    producer_args,
    settings_for,
    worker_args,
    workload_from_args,
)

from pervade.producer.templates import dump_templates
from pervade.sinks.summary import read_verdicts

SAMPLE_EVERY_S = 0.25
SINK_EXIT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Schedule:
    """Workers at the producer's start, then one more every ``add_every_s`` until ``max_workers``."""

    label: str
    initial: int
    max_workers: int
    add_every_s: float

    def describe(self) -> str:
        if self.initial >= self.max_workers:
            return f"{self.max_workers} at start"
        return f"{self.initial} at start, +1 every {self.add_every_s:g} s to {self.max_workers}"


@dataclass
class ScaleRun:
    schedule: Schedule
    wall_s: float = 0.0
    pairs_done: int = 0
    exact: bool = False
    #: (seconds since the producer's start, workers serving, rows durably written), every SAMPLE_EVERY_S.
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    #: Seconds since the producer's start at which each worker was started.
    starts: list[float] = field(default_factory=list)
    #: (window start s, rows finished in the window per second), from the output's finished_at.
    throughput: list[tuple[float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_done / self.wall_s if self.wall_s > 0 else 0.0

    def all_serving_s(self) -> float | None:
        """When the last worker was first seen serving."""
        return next((t for t, serving, _ in self.samples if serving >= self.schedule.max_workers), None)

    def mean_serving(self) -> float:
        """Workers serving, averaged over time (samples are evenly spaced)."""
        return sum(s for _, s, _ in self.samples) / len(self.samples) if self.samples else 0.0


def throughput_windows(out_dir: Path, t0_wall: float, window_s: float) -> list[tuple[float, float]]:
    """Rows finished per second in consecutive windows from ``t0_wall``, by the output's ``finished_at``."""
    if not any(out_dir.glob("*.parquet")):
        return []
    finished = read_verdicts(out_dir, ["finished_at"])["finished_at"].cast("int64")
    offsets = pc.divide(pc.subtract(finished, int(t0_wall * 1e6)).cast("double"), window_s * 1e6)
    counts: dict[int, int] = {}
    for offset in offsets.to_pylist():
        index = max(0, int(offset))
        counts[index] = counts.get(index, 0) + 1
    last = max(counts, default=-1)
    return [(i * window_s, counts.get(i, 0) / window_s) for i in range(last + 1)]


async def run_schedule(schedule: Schedule, workload: Workload, base: Path, threads: int, window_s: float,
                       limit_s: float, placement: Placement) -> ScaleRun:  # fmt: skip
    """One run of the workload under ``schedule``, on ``placement``: workers started on time, progress
    sampled."""
    run = ScaleRun(schedule)
    base.mkdir(parents=True, exist_ok=True)
    templates_file = base / "templates.json"
    templates_file.write_text(dump_templates(workload.templates))
    args = worker_args("full", threads)
    cluster = placement.cluster(base)
    try:
        await cluster.start_broker()
        await cluster.start_sink("--until-done")
        for _ in range(schedule.initial):
            await cluster.start_worker(*args)
        await wait_for_serving(cluster, schedule.initial)
        t0, t0_wall = time.perf_counter(), time.time()
        run.starts = [0.0] * schedule.initial
        await cluster.start_producer(*producer_args(workload, templates_file))
        producer = asyncio.create_task(cluster.procs.children["producer"].wait())
        while not producer.done():
            now = time.perf_counter() - t0
            if len(run.starts) < schedule.max_workers and now >= len(run.starts) * schedule.add_every_s:
                await cluster.start_worker(*args)
                run.starts.append(round(now, 2))
            run.samples.append((round(now, 2), len(cluster.serving_workers()), cluster.rows_written()))
            if not cluster.running("broker") or now > limit_s:
                run.problems.append(f"the broker died or no end after {limit_s:.0f} s:\n{cluster.procs.tail('broker')}")
                producer.cancel()
                break
            await asyncio.wait([producer], timeout=SAMPLE_EVERY_S)
        run.wall_s = time.perf_counter() - t0
        if producer.done() and not producer.cancelled():
            if producer.result() != 0:
                run.problems.append(
                    f"the producer exited with status {producer.result()}:\n{cluster.procs.tail('producer')}"
                )
            else:
                try:
                    await asyncio.wait_for(cluster.procs.children["sink"].wait(), SINK_EXIT_TIMEOUT_S)
                except TimeoutError:
                    run.problems.append(f"the sink had not exited {SINK_EXIT_TIMEOUT_S:.0f} s after the job")
    finally:
        await cluster.stop()
    report = RunReport(settings_for(schedule.label, schedule.max_workers, threads, limit_s), workload, base)
    check_output(report, cluster.out_dir)
    run.pairs_done, run.exact = report.pairs_done, report.exact and not run.problems
    run.problems += report.problems
    run.throughput = throughput_windows(cluster.out_dir, t0_wall, window_s)
    return run


def write_timeline(path: Path, runs: list[ScaleRun]) -> Path:
    """Every run's time series, one value a row: ``kind`` rows_per_s (finished, per window), serving (workers
    connected) or rows_written (durably written so far)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "kind", "t_s", "value"])
        for run in runs:
            writer.writerows([run.schedule.label, "rows_per_s", t, round(v, 2)] for t, v in run.throughput)
            writer.writerows([run.schedule.label, "serving", t, s] for t, s, _ in run.samples)
            writer.writerows([run.schedule.label, "rows_written", t, rows] for t, _, rows in run.samples)
    return path


def scale_up_note(scale: ScaleRun, one: ScaleRun, full: ScaleRun) -> str:
    """How much of the time that W workers from the start save over one worker the scale-up run saved."""
    saved = one.wall_s - full.wall_s
    if saved < 0.1 * one.wall_s:
        return (f"W workers from the start were not 10% faster than 1 ({full.wall_s:.1f} s vs {one.wall_s:.1f} s): "
                "the cores are saturated, so adding workers cannot help here")  # fmt: skip
    return f"scale-up saved {(one.wall_s - scale.wall_s) / saved:.0%} of the time W workers from the start save over 1"


def drawer(runs: list[ScaleRun]) -> Any:
    """Throughput over time for every run (left axis) and workers serving (right axis, dashed)."""

    def draw(axes: Any, rows: list[dict[str, Any]]) -> None:
        twin = axes.twinx()
        for index, run in enumerate(runs):
            color = f"C{index}"
            axes.step([t for t, _ in run.throughput], [v for _, v in run.throughput], where="post", color=color,
                      label=f"{run.schedule.label}: {run.wall_s:.0f} s")  # fmt: skip
            twin.step([t for t, _, _ in run.samples], [s for _, s, _ in run.samples], where="post", color=color,
                      linestyle="--", alpha=0.6)  # fmt: skip
        axes.set_xlabel("seconds since the producer started")
        axes.set_ylabel("rows finished per second (solid)")
        twin.set_ylabel("workers serving (dashed)")
        twin.set_ylim(0, max(r.schedule.max_workers for r in runs) + 1)
        axes.legend(fontsize=8, loc="lower right")

    return draw


def add_row(report: Report, run: ScaleRun) -> None:
    all_serving = run.all_serving_s()
    mean = run.mean_serving()
    report.add(
        run=run.schedule.label, schedule=run.schedule.describe(), max_workers=run.schedule.max_workers,
        wall_s=round(run.wall_s, 2), pairs=run.pairs_done, pairs_per_s=round(run.pairs_per_s, 1),
        all_serving_s="-" if all_serving is None else all_serving, mean_serving=round(mean, 2),
        pairs_per_s_per_worker=round(run.pairs_per_s / mean, 1) if mean else "-",
        exact="yes" if run.exact else "NO",
    )  # fmt: skip


def main() -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-workers", type=int, default=2, help="W, the workers at most (default: 2, the cores)")
    parser.add_argument("--add-every", type=float, default=10.0, help="S, seconds between newcomers (default: 10)")
    add_workload_args(parser, claims=3000)
    parser.add_argument("--threads-per-worker", type=int, default=None, help="default: cores / max workers")
    parser.add_argument("--window", type=float, default=2.0, help="throughput window in seconds (default: 2)")
    parser.add_argument("--runs", nargs="+", choices=["scale-up", "max", "one"], default=["scale-up", "max", "one"],
                        help="scale-up, W from start (max), 1 only (one); default: all three")  # fmt: skip
    parser.add_argument("--duration-limit", type=float, default=600.0, help="seconds a run may take (default: 600)")
    add_lab_args(parser)
    args = parser.parse_args()
    if args.max_workers < 1 or min(args.add_every, args.window, args.storage_mbit) <= 0:
        parser.error("--max-workers, --add-every, --window and --storage-mbit must be positive")
    workload, model, base = workload_from_args(args, "rq4")
    threads = args.threads_per_worker or max(1, cores // args.max_workers)
    schedules = {
        "scale-up": Schedule("scale-up", 1, args.max_workers, args.add_every),
        "max": Schedule(f"{args.max_workers} from start", args.max_workers, args.max_workers, args.add_every),
        "one": Schedule("1 only", 1, 1, args.add_every),
    }
    columns = ["run", "schedule", "max_workers", "wall_s", "pairs", "pairs_per_s", "all_serving_s", "mean_serving",
               "pairs_per_s_per_worker", "exact"]  # fmt: skip
    name = "rq4_scale_up" + ("_lab" if args.lab else "")
    report = Report(name, columns, out_dir=args.out_dir)
    report.header(
        f"RQ4 scale-up: {workload.claims_read:,} claims x {len(workload.templates)} templates = "
        f"{len(workload.expected):,} pairs, batch {args.batch_size}, every worker {threads} threads "
        f"({cores} cores), model {model.name}, on {lab_line(args, args.max_workers)}; runs in {base}",
        f"{load_line()} at the start",
    )
    runs: list[ScaleRun] = []
    with placement_from_args(args, workload, model, base, args.max_workers) as (placement, workload):
        for key in args.runs:
            schedule = schedules[key]
            print(f"# {schedule.label} ({schedule.describe()}) ...", file=sys.stderr, flush=True)
            run = asyncio.run(
                run_schedule(schedule, workload, base / key, threads, args.window, args.duration_limit, placement)
            )
            runs.append(run)
            add_row(report, run)
    by_label = {run.schedule.label: run for run in runs}
    scale, one = by_label.get("scale-up"), by_label.get("1 only")
    full = by_label.get(f"{args.max_workers} from start")
    if scale and one and full:
        report.note(scale_up_note(scale, one, full))
    report.note(f"{load_line()} at the end")
    timeline = write_timeline(args.out_dir / f"{name}_timeline.csv", runs)
    report.finish(
        drawer(runs), f"RQ4: throughput as workers join (+1 every {args.add_every:g} s, W = {args.max_workers})"
    )
    print(f"# wrote {timeline}")

    failures = {r.schedule.label: r.problems for r in runs if not r.exact}
    return finish_runs(base, failures, args.keep or args.base_dir is not None)


if __name__ == "__main__":
    sys.exit(main())

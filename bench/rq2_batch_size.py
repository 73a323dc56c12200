"""RQ2: total time against the producer's batch size, 1 to 512, in full and partial context modes.

    .venv/bin/python bench/rq2_batch_size.py
    .venv/bin/python bench/rq2_batch_size.py --claims 2000 --templates 2 --batch-sizes 1 4 16 64 256 512

The paper (Phung & Thain, arXiv 2510.14024) reports that with pervasive context the batch size the user
picks changes total time by 13.6%, where a pipeline that rebuilds the model per batch blows up 27x at small
batches. Here the same workload (``--claims`` FEVER claims x ``--templates`` templates, the offline
``--size`` model) runs through the whole pipeline (bench/runs.py: broker, sink, ``--workers`` CPU workers,
producer, all processes) once per batch size and mode:

- **full**: the model stays resident, and each worker coalesces the small batches it has prefetched into
  passes sized for its device (gpuworker/intake.py), so the batch size should hardly matter;
- **partial**: the model files are cached on the node but the model is rebuilt for every batch, the
  paper's baseline. At small batch sizes that takes very long: a run is stopped after ``--limit-s``
  seconds and its total time *projected* from the pairs it finished (marked ``projected``).

Time is the pipeline clock: first batch submitted to every pair durably written (bench/runs.py). The
sensitivity is (slowest - fastest) / fastest over the batch sizes of a mode; the issue's target for full
mode is under 5%. On a shared 2-core machine one run varies by several per cent from the next, so
``--repeats N`` runs each point N times and reports the median (and the range); the CSV is then
``rq2_batch_size_xN.csv``. The repeats go round the batch sizes (1, 2, ... 512, then 1, 2, ... again), not
one size's runs after the other's: a machine that slows down or speeds up over the minutes a sweep takes
then weighs on every size alike, instead of on the sizes that ran last.

A size may be given more than once. ``--batch-sizes 64 64 64 64 64 64 64 64 64 64 --repeats 3`` is the
sweep's control: ten points that differ in nothing, so the spread it reports is what the machine's noise
alone gives this statistic (the CSV is then ``rq2_batch_size_xN_control.csv``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys

from benchkit import Report
from runs import PipelineRun, add_workload_args, finish_runs, run_pipeline, workload_from_args

BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def total_seconds(run: PipelineRun, pairs: int) -> float:
    """The run's time, or for a run stopped at the limit, its time projected to all ``pairs``."""
    return run.pipeline_s if run.complete else run.pipeline_s * pairs / max(run.pairs, 1)


def main() -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, claims=2048, batch_sizes=BATCH_SIZES)
    parser.add_argument("--modes", nargs="+", default=["full", "partial"], choices=["full", "partial", "agnostic"])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=max(1, cores // 2), help="torch threads per worker")
    parser.add_argument("--limit-s", type=float, default=60.0, help="stop a run after this long and project")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; the median is reported (default: 1)")
    args = parser.parse_args()

    workload, model, base = workload_from_args(args, "rq2")
    name = "rq2_batch_size" if args.repeats == 1 else f"rq2_batch_size_x{args.repeats}"
    control = len(args.batch_sizes) > 1 and len(set(args.batch_sizes)) == 1
    if control:
        name += "_control"
    report = Report(name, ["mode", "batch", "runs", "pairs_done", "seconds", "min_s", "max_s", "pairs_per_s",
                           "model_loads", "projected"], out_dir=args.out_dir)  # fmt: skip
    report.header(
        f"RQ2: {workload.claims_read:,} claims x {len(workload.templates)} templates = {len(workload.expected):,} "
        f"pairs, model {model.name}, {args.workers} CPU worker(s) x {args.threads} thread(s)",
        "seconds: first batch submitted to every pair written; projected = stopped at --limit-s, "
        "extrapolated from the pairs done",
    )
    for mode in args.modes:
        runs_of: list[list[PipelineRun]] = [[] for _ in args.batch_sizes]  # by point: a size may repeat
        for repeat in range(args.repeats):
            for index, batch_size in enumerate(args.batch_sizes):
                point = dataclasses.replace(workload, batch_size=batch_size)
                runs_of[index].append(asyncio.run(
                    run_pipeline(point, base / f"{mode}-{index}-{batch_size}-{repeat}", workers=args.workers,
                                 threads=args.threads, mode=mode, limit_s=args.limit_s)
                ))  # fmt: skip
        for batch_size, runs in zip(args.batch_sizes, runs_of, strict=True):
            times = sorted(total_seconds(run, len(workload.expected)) for run in runs)
            median = statistics.median(times)
            middle = runs[len(runs) // 2]
            report.add(mode=mode, batch=batch_size, runs=len(runs), pairs_done=middle.pairs, seconds=median,
                       min_s=times[0], max_s=times[-1], pairs_per_s=len(workload.expected) / median,
                       model_loads=middle.model_loads,
                       projected="" if all(run.complete for run in runs) else "projected")  # fmt: skip
    for mode in args.modes:
        times = [r["seconds"] for r in report.rows if r["mode"] == mode]
        spread = f"{mode}: sensitivity (slowest - fastest) / fastest = {(max(times) - min(times)) / min(times):.1%}"
        if control:
            report.note(f"{spread} over {len(times)} points all at batch size {args.batch_sizes[0]}: the control, "
                        f"what the machine's noise alone gives")  # fmt: skip
        else:
            report.note(f"{spread} over batch sizes {min(args.batch_sizes)}..{max(args.batch_sizes)}; slowest/fastest "
                        f"{max(times) / min(times):.1f}x (paper: 13.6% pervasive, 27x baseline)")  # fmt: skip

    def draw(axes, rows) -> None:
        for mode in dict.fromkeys(r["mode"] for r in rows):
            mine = [r for r in rows if r["mode"] == mode]
            xs = list(range(1, len(mine) + 1)) if control else [r["batch"] for r in mine]
            axes.plot(xs, [r["seconds"] for r in mine], marker="o", label=mode)
        if not control:
            axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(f"point, all at batch size {args.batch_sizes[0]}" if control else "producer batch size (claims)")
        axes.set_ylabel("total time, s (log)")
        axes.legend()

    report.finish(draw, "RQ2: total time vs batch size")
    return finish_runs(base, {}, args.keep or args.base_dir is not None)


if __name__ == "__main__":
    sys.exit(main())

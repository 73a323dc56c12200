"""RQ3: inferences completed in a fixed time while workers are preempted, full context against partial.

    .venv/bin/python bench/rq3_preemption.py
    .venv/bin/python bench/rq3_preemption.py --duration 120 --every 0 60 30 15 --workers 2 --signal mix

Reproduces the preemption experiment of Phung & Thain (arXiv 2510.14024): in an opportunistic pool a GPU is
taken away every so often, and the question is how much work still gets done. The paper reports that
pervasive (full) context management completed 36.7% more inferences than a baseline that reloads the model,
under one preemption a minute. Here, for each context mode in ``--modes`` (default ``full`` and
``partial``, the latter being the baseline that rebuilds the model for every batch from files cached on the
node) and each preemption period T in ``--every`` (seconds; 0 = no preemption):

- a broker, a sink, ``--workers`` workers (``cores / workers`` torch threads each) and a producer run as
  processes (``jobs.cluster.LocalCluster``), over a workload larger than what can finish in the window
  (``--claims`` x ``--templates``, batch ``--batch-size``);
- the clock starts when the broker first tells a worker to load the context (every worker connected, the
  producer's first batches queued; the producer's start-up, about 3 s of imports and hashing that varies
  with the machine's load, stays out of the window). For ``--duration`` D seconds bench/chaos.py's
  ``Chaos`` preempts a serving worker every T seconds (``--schedule even``: at T, 2T, ... < D), with
  ``--signal`` (default ``term``: SIGTERM, the batch system's notice: the worker hands back its queued
  batches, finishes the one in hand within its 5 s grace, and a SIGKILL follows if it is still there 30 s
  later; ``kill``: SIGKILL at once, the broker notices from missed heartbeats; ``mix``: alternate). A
  replacement worker starts the moment the victim has exited, as the pool's next job would: it imports
  torch and, in full mode, loads the model again, which is the cost pervasive context cannot avoid;
- at D, the rows durably written (renamed into the output directory; the sink rolls files at least every
  ``--roll-seconds``) are counted: that is ``rows at D``. Then everything is stopped.

Columns: ``mode``; ``every s`` (T; 0: no preemption); ``kills`` (preemptions before D); ``rows at D``;
``pairs/s`` (rows at D / D); ``computed by D`` (rows in the final output whose ``finished_at`` is before D:
work the workers had finished, some still on its way to disk at D); ``vs none %`` (rows at D against the
same mode without preemption); ``full gain %`` (full's rows at D over partial's at the same T, minus 1:
the paper's +36.7%); ``requeues`` (the broker's count of batches put back after a worker died holding them:
SIGKILL); ``released`` (batches the preempted workers handed back as they left: SIGTERM); ``clean`` (no
(claim, template) pair written twice, none outside the workload; runs do not complete, so missing pairs
are expected).

Caveats: the model is the offline random ``--size small`` model on a CPU, rebuilt from the page cache in
tens of milliseconds, so partial pays little per batch here, and a preemption costs mostly the
replacement's torch import on the shared cores, which both modes pay. The time scale is shrunk to fit the
machine (default D = 30 s and T = 15 and 7.5 s, where the paper's pool ran for hours with one preemption a
minute), and on 2 cores a starting replacement slows the surviving worker too. Other jobs on the machine
show in the figures; compare rows within one invocation.

With ``--lab`` (root only), every run goes across the hosts of a cluster lab (jobs/lab/cluster.py): the
broker, the sink and the producer on its login host, the ``--workers`` workers one per compute host (a
replacement takes the next host in turn, so it lands where a victim ran), and the model on the storage
host's disk, read by every worker over the shared file system through a storage link of ``--storage-mbit``
Mbit/s shared by all readers. What loopback hides then shows: a replacement fetches the model's files
across the network (from a surviving peer when one has them, else the shared file system) before it
serves, and every message between broker and workers crosses two shaped links. The report is
``rq3_preemption_lab``. Caveat: the hosts are network namespaces of this one machine, so every host shares
its cores (2 here); the lab shapes the network, not the compute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from benchkit import Report
from chaos import (
    SIGNALS,
    START_TIMEOUT_S,
    Chaos,
    Kill,
    RunReport,
    RunSettings,
    Workload,
    check_output,
    wait_for_serving,
)
from runs import (
    Placement,
    add_lab_args,
    add_workload_args,
    finish_runs,
    lab_line,
    load_line,
    placement_from_args,
    producer_args,
    worker_args,
    workload_from_args,
)

from pervade.jobs.cluster import LocalCluster
from pervade.producer.templates import dump_templates
from pervade.sinks.summary import read_verdicts

SAMPLE_EVERY_S = 0.25


@dataclass(frozen=True)
class Options:
    """What every run of one invocation shares."""

    workers: int
    threads: int
    duration_s: float
    signal_mode: str
    seed: int
    heartbeat_interval_s: float
    roll_seconds: float


@dataclass
class PreemptionRun:
    mode: str
    every_s: float
    rows_at_d: int = 0
    computed_by_d: int = 0
    kills: list[Kill] = field(default_factory=list)
    requeues: int = 0
    released: int = 0
    doubled: int = 0
    extra: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.doubled == 0 and self.extra == 0 and not self.problems


def chaos_settings(mode: str, every_s: float, options: Options) -> RunSettings:
    """bench/chaos.py's settings for evenly spaced kills every ``every_s`` seconds (0: none)."""
    per_minute = 60.0 / every_s if every_s > 0 else 0.0
    label = f"{mode}-every-{every_s:g}"
    return RunSettings(label, options.workers, per_minute, options.signal_mode, "even", options.seed, options.threads,
                       options.heartbeat_interval_s, 0.0, options.duration_s)  # fmt: skip


async def watch_until(cluster: LocalCluster, t0: float, duration_s: float, pairs: int) -> str | None:
    """Wait until ``duration_s`` after ``t0``; a problem if the broker or sink died, or if the workload
    finished first (the window measured less than D)."""
    while time.perf_counter() - t0 < duration_s:
        for name in ("broker", "sink"):
            if not cluster.running(name):
                return f"the {name} exited during the run:\n{cluster.procs.tail(name)}"
        if cluster.rows_written() >= pairs:
            return "finished"
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, duration_s - (time.perf_counter() - t0))))
    return None


async def first_load_order(cluster: LocalCluster) -> None:
    """Wait until a worker is told to load the context: the first batches are queued, and the producer's
    start-up (imports, hashing the model) is over."""
    deadline = time.monotonic() + START_TIMEOUT_S
    workers = [name for name in cluster.procs.children if name.startswith("worker-")]
    while not any(cluster.events(name, "context_loading") for name in workers):
        if time.monotonic() > deadline or not cluster.running("producer"):
            raise RuntimeError(f"no worker was told to load the context:\n{cluster.procs.tail('producer')}")
        await asyncio.sleep(0.05)


def released_by(cluster: LocalCluster, kills: list[Kill]) -> int:
    """Batches the preempted workers handed back as they left (their ``worker_leaving`` events); the
    broker's own counter also counts what every worker hands back when the run is stopped."""
    return sum(int(e.get("returned", 0)) for k in kills for e in cluster.events(k.victim, "worker_leaving"))


def computed_before(out_dir: Path, deadline: float) -> int:
    """Rows in the output whose batch finished before ``deadline`` (wall-clock seconds)."""
    if not any(out_dir.glob("*.parquet")):
        return 0
    finished = read_verdicts(out_dir, ["finished_at"])["finished_at"].cast("int64")
    return int(pc.sum(pc.less(finished, int(deadline * 1e6))).as_py() or 0)


async def run_window(mode: str, every_s: float, workload: Workload, base: Path, options: Options,
                     placement: Placement) -> PreemptionRun:  # fmt: skip
    """One (mode, T) run: D seconds of the sweep under evenly spaced preemptions, on ``placement``."""
    run = PreemptionRun(mode, every_s)
    settings = chaos_settings(mode, every_s, options)
    base.mkdir(parents=True, exist_ok=True)
    templates_file = base / "templates.json"
    templates_file.write_text(dump_templates(workload.templates))
    args = worker_args(mode, options.threads)
    cluster = placement.cluster(base, heartbeat_interval_s=options.heartbeat_interval_s)
    chaos: Chaos | None = None
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", str(options.roll_seconds))
        for _ in range(options.workers):
            await cluster.start_worker(*args)
        await wait_for_serving(cluster, options.workers)
        await cluster.start_producer(*producer_args(workload, templates_file))
        await first_load_order(cluster)
        t0, t0_wall = time.perf_counter(), time.time()
        chaos = Chaos(cluster, settings, args, t0)
        chaos_task = asyncio.create_task(chaos.run())
        outcome = await watch_until(cluster, t0, options.duration_s, len(workload.expected))
        run.rows_at_d = cluster.rows_written()
        if outcome == "finished":
            run.problems.append(f"the whole workload was written before D = {options.duration_s:g} s: raise --claims")
        elif outcome is not None:
            run.problems.append(outcome)
        await chaos.finish()
        await chaos_task
    finally:
        await cluster.stop()
    if chaos is not None:
        run.kills = sorted((k for k in chaos.kills if k.at_s < options.duration_s), key=lambda k: k.at_s)
        run.problems += chaos.problems
    run.requeues = int(cluster.broker_counters().get("requeues", 0))
    run.released = released_by(cluster, run.kills)
    report = RunReport(settings, workload, base)
    check_output(report, cluster.out_dir)
    run.doubled, run.extra = report.doubled, report.extra
    if run.doubled or run.extra:
        run.problems.append(f"output not clean: {run.doubled} rows doubled, {run.extra} pairs outside the workload")
    run.computed_by_d = computed_before(cluster.out_dir, t0_wall + options.duration_s)
    return run


def percent(numerator: float, denominator: float) -> float | str:
    return round((numerator / denominator - 1) * 100, 1) if denominator else "-"


def add_rows(report: Report, runs: list[PreemptionRun], duration_s: float) -> None:
    """One row per run, with its share of the same mode's unpreempted run and full's gain over partial."""
    by_key = {(r.mode, r.every_s): r for r in runs}
    for r in runs:
        none = by_key.get((r.mode, 0.0))
        partial = by_key.get(("partial", r.every_s))
        report.add(
            mode=r.mode, every_s=r.every_s, kills=len(r.kills), rows_at_d=r.rows_at_d,
            pairs_per_s=round(r.rows_at_d / duration_s, 1), computed_by_d=r.computed_by_d,
            vs_none_pct="-" if none is None or none is r else percent(r.rows_at_d, none.rows_at_d),
            full_gain_pct=percent(r.rows_at_d, partial.rows_at_d) if r.mode == "full" and partial else "-",
            requeues=r.requeues, released=r.released,
            clean="yes" if r.clean else "NO",
        )  # fmt: skip


def draw(axes: Any, rows: list[dict[str, Any]]) -> None:
    """Rows at D per preemption period, one bar per mode, full's gain written over its bar."""
    periods = list(dict.fromkeys(f"{row['every_s']:g}" for row in rows))
    modes = list(dict.fromkeys(row["mode"] for row in rows))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        mine = {f"{row['every_s']:g}": row for row in rows if row["mode"] == mode}
        xs = [p + (index - (len(modes) - 1) / 2) * width for p in range(len(periods))]
        heights = [mine[p]["rows_at_d"] if p in mine else 0 for p in periods]
        bars = axes.bar(xs, heights, width, label=mode)
        for bar, period in zip(bars, periods, strict=True):
            gain = mine.get(period, {}).get("full_gain_pct", "-")
            if gain != "-":
                axes.annotate(f"{gain:+.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                              va="bottom", fontsize=8)  # fmt: skip
    axes.set_xticks(range(len(periods)), [f"every {p} s" if p != "0" else "no preemption" for p in periods])
    axes.set_ylabel("rows durably written in the window")
    axes.legend()


def run_all(args: argparse.Namespace, workload: Workload, base: Path, options: Options,
            placement: Placement) -> list[PreemptionRun]:  # fmt: skip
    """Every (T, mode) run, periods outermost: the two modes of one period run back to back."""
    runs: list[PreemptionRun] = []
    for every_s in args.every:
        for mode in args.modes:
            print(f"# {mode}, every {every_s:g} s ...", file=sys.stderr, flush=True)
            run_base = base / f"{mode}-every-{every_s:g}"
            run = asyncio.run(run_window(mode, every_s, workload, run_base, options, placement))
            print(f"#   {run.rows_at_d:,} rows at D, {len(run.kills)} kills", file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def main() -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, nargs="+", default=[0.0, 15.0, 7.5],
                        help="preemption periods T in seconds, 0 = none (default: 0 15 7.5)")  # fmt: skip
    parser.add_argument("--duration", type=float, default=30.0, help="window D in seconds (default: 30)")
    parser.add_argument("--modes", nargs="+", choices=["full", "partial", "agnostic"], default=["full", "partial"],
                        help="context modes (default: full partial)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="workers serving at once (default: 2)")
    signal_help = "term: SIGTERM, SIGKILL 30 s later; kill: SIGKILL; mix: alternate (default: term)"
    parser.add_argument("--signal", dest="signal_mode", choices=sorted(SIGNALS), default="term", help=signal_help)
    add_workload_args(parser, claims=9999)  # more than a window can finish
    parser.add_argument("--threads-per-worker", type=int, default=None, help="default: cores / workers")
    parser.add_argument("--seed", type=int, default=20261121, help="seed of the victims' choice")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="every process's (default: 0.5 s)")
    parser.add_argument("--roll-seconds", type=float, default=1.0, help="the sink's file roll (default: 1 s)")
    add_lab_args(parser)
    args = parser.parse_args()
    if args.workers < 1 or args.duration <= 0 or args.storage_mbit <= 0:
        parser.error("--workers, --duration and --storage-mbit must be positive")
    if any(t < 0 for t in args.every):
        parser.error("--every takes periods >= 0")

    workload, model, base = workload_from_args(args, "rq3")
    options = Options(args.workers, args.threads_per_worker or max(1, cores // args.workers), args.duration,
                      args.signal_mode, args.seed, args.heartbeat_interval, args.roll_seconds)  # fmt: skip
    columns = ["mode", "every_s", "kills", "rows_at_d", "pairs_per_s", "computed_by_d", "vs_none_pct", "full_gain_pct",
               "requeues", "released", "clean"]  # fmt: skip
    report = Report("rq3_preemption" + ("_lab" if args.lab else ""), columns, out_dir=args.out_dir)
    report.header(
        f"RQ3 preemption: {args.duration:g} s windows, {args.workers} workers x {options.threads} threads, "
        f"signal {args.signal_mode}, replacement at once; workload {workload.claims_read:,} claims x "
        f"{len(workload.templates)} templates = {len(workload.expected):,} pairs, batch {args.batch_size}, "
        f"model {model.name}, on {lab_line(args, args.workers)}; runs in {base}",
        f"{load_line()} at the start",
    )
    with placement_from_args(args, workload, model, base, args.workers) as (placement, workload):
        runs = run_all(args, workload, base, options, placement)
    # Rows by mode, each from no preemption to the most frequent.
    add_rows(report, sorted(runs, key=lambda r: (args.modes.index(r.mode), r.every_s > 0, -r.every_s)), args.duration)
    report.note(f"{load_line()} at the end")
    report.finish(draw, f"RQ3: rows written in {args.duration:g} s under preemption, by context mode")

    failures = {f"{r.mode}, every {r.every_s:g} s": r.problems for r in runs if not r.clean}
    return finish_runs(base, failures, args.keep or args.base_dir is not None)


if __name__ == "__main__":
    sys.exit(main())

"""Chaos benchmark: a sweep over FEVER claims while workers are preempted at a fixed mean rate.

    .venv/bin/python bench/chaos.py --workers 3 --kills-per-minute 6 --claims 3000 --compare-baseline
    .venv/bin/python bench/chaos.py --claims 9999 --templates 4 --kills-per-minute 20 --out chaos.csv

This reruns, on this machine, the experiment of Phung & Thain (arXiv 2510.14024) where one GPU of the pool
is preempted every minute and the job must go on. A broker (with ``--state``), one sink (``--until-done``),
``--workers`` workers and a producer (``--wait``) run as separate processes through
``jobs.cluster.LocalCluster``, exactly as ``pervade run`` starts them. The producer is started once every
worker is serving, and the clock runs from its start to its exit, that is until every (claim, template)
pair is durably written. While it runs, a seeded chaos task preempts workers:

- **When.** By default (``--schedule poisson``) kills form a Poisson process: the gaps between them are
  drawn from an exponential distribution with mean ``60 / kills-per-minute`` seconds
  (``random.Random(seed)``), counted from the producer's start. Preemptions in an opportunistic pool are
  not evenly spaced, and a Poisson process is the memoryless model of "K a minute on average"; over a run
  of a few minutes the number of kills varies a lot from seed to seed (the notes under the table give the
  rate realised). ``--schedule even`` kills exactly every ``60 / kills-per-minute`` seconds instead, the
  paper's "one GPU preempted every minute" to the letter. ``--kills-per-minute 0`` is the baseline.
- **Whom.** A random worker among those serving (running and connected to the broker, not still
  importing torch), never one already being killed. If none is serving, the kill waits for one, and the
  next gap is counted from that kill, so kills never pile up while replacements start.
- **How.** ``--signal kill`` sends SIGKILL (OOM killer, node failure: the broker finds out from missed
  heartbeats and requeues the batches the worker held), ``term`` sends SIGTERM (a batch system's
  preemption notice: the worker hands its queued batches back at once, finishes the one in hand if it fits
  its 5-second grace time, and leaves), ``mix`` (default) alternates the two, starting with SIGKILL.
- **Replacement.** ``--restart-delay`` seconds after each kill (default 0), a new worker is started, as
  the batch system's next job in an opportunistic pool would be. It imports torch and loads the model
  again, which is the cost of a preemption that pervasive context management cannot avoid.

After each run every process is stopped, and the output is checked: exactly one Parquet row for every
(claim, template) pair, none missing, none doubled, none extra. The columns of the table (one row per run):

- ``workers``, ``kills/min``, ``signal``: the run's settings (``-`` for the baseline's signal).
- ``claims x templates``: the workload; ``pairs`` is their product, the inferences to compute.
- ``wall s``: producer start to producer exit (every pair durably written).
- ``pairs done``: distinct (claim, template) pairs in the output; ``pairs/s``: pairs done / wall s.
- ``kills``: preemptions actually done (the schedule, cut off when the job ends).
- ``requeues``: batches put back in the queue because their worker died (or failed) while holding them.
- ``released``: batches handed back by a worker leaving on SIGTERM.
- ``dup. suppressed``: results that arrived for a batch already done, a duplicate execution the broker
  dropped (the broker's ``duplicate_results`` counter).
- ``late accepted``: results from a worker the batch was no longer assigned to, accepted because the batch
  was still open (a worker declared dead that was only slow, for instance).
- ``redeliveries``: results delivered again to a sink that left before acknowledging them.
- ``declared dead``: workers the broker declared dead after missed heartbeats (the SIGKILLed ones).
- ``failed``: batches the broker gave up after ``max_attempts`` (3) deaths or failures of their holders;
  their pairs are recorded in ``out.failures/``, not written, so any makes ``exact`` no. The broker charges
  a SIGKILLed worker's death to the oldest batch it held once its model had loaded, not to the prefetched
  ones behind it (broker/workers.py, ``drop_worker``).
- ``time lost s``: with ``--compare-baseline``, this run's wall time minus the baseline's (same workload,
  no kills), measured. Without it, an estimate marked ``est.``: (requeues + released) x the mean compute
  time of one batch (``finished_at - started_at`` in the output). The estimate counts recomputation only,
  not the heartbeat timeout nor the replacement's start-up, so it is a lower bound.
- ``exact``: ``yes`` when the output holds every pair exactly once; otherwise the run is reported as a
  failure with counts of missing, doubled and extra pairs, and its logs are kept.

Each run gets its own directory under ``--base-dir`` (default: a fresh temporary directory) with
``logs/ROLE.log`` (JSON lines), ``out/`` (Parquet), ``state/`` (the broker's). It is removed at the end
unless a run failed or ``--keep`` is given. ``--out FILE`` also writes one CSV row per run with every field
(and the mean batch time, model loads, exit codes of the SIGTERMed workers). The exit status is 1 when any
run was not exact, hung past ``--duration-limit`` or had a process fail.

On a small CPU machine the tiny model finishes thousands of claims in well under a minute, so to see
several kills per run use a high kill rate (``--kills-per-minute 20``) or more work (``--claims 9999
--templates 4``). Replacement workers importing torch compete for the same cores as the survivors, so the
measured time lost is larger here than on a GPU cluster, where each worker has its own device.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pervade.jobs.cluster import LocalCluster
from pervade.jobs.local import ensure_tiny_model
from pervade.producer.claims import ClaimsSource, read_claims, sample_claims_path
from pervade.producer.templates import dump_templates, load_templates
from pervade.sinks.failures import read_failures
from pervade.sinks.summary import read_verdicts

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: Seconds to wait for the first workers to serve, and for the sink to exit once the job is done.
START_TIMEOUT_S = 180.0
SINK_EXIT_TIMEOUT_S = 60.0
PROGRESS_EVERY_S = 15.0
SIGNALS = {"kill": (signal.SIGKILL,), "term": (signal.SIGTERM,), "mix": (signal.SIGKILL, signal.SIGTERM)}
#: Broker counters reported per run (broker/constants.py, COUNTERS).
REPORTED_COUNTERS = (
    "requeues", "released", "duplicate_results", "late_results_accepted", "redeliveries",
    "workers_declared_dead", "batches_failed", "duplicate_submissions",
)  # fmt: skip


@dataclass(frozen=True)
class Workload:
    """What every run computes: the same claims, templates, model and batch size."""

    claims_file: Path
    claims: int
    templates: dict[str, str]
    model: str
    batch_size: int
    #: The (claim id, template id) pairs the output must hold, each exactly once.
    expected: frozenset[tuple[str, str]]

    @property
    def claims_read(self) -> int:
        return len(self.expected) // len(self.templates)


@dataclass(frozen=True)
class RunSettings:
    label: str
    workers: int
    kills_per_minute: float
    signal_mode: str
    schedule: str
    seed: int
    threads: int
    heartbeat_interval_s: float
    restart_delay_s: float
    duration_limit_s: float


@dataclass(frozen=True)
class Kill:
    at_s: float  # since the producer's start
    victim: str
    signal: str
    exit_code: int
    replacement: str | None


@dataclass
class RunReport:
    settings: RunSettings
    workload: Workload
    base: Path
    wall_s: float = 0.0
    kills: list[Kill] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    pairs_done: int = 0
    doubled: int = 0  # rows beyond the first for a pair
    missing: int = 0
    extra: int = 0
    failed_pairs: int = 0  # pairs recorded as failed by the sink
    mean_batch_s: float | None = None
    model_loads: int = 0
    producer_code: int | None = None
    hung: bool = False
    #: Measured against a baseline run, when there is one.
    time_lost_s: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return len(self.workload.expected)

    @property
    def exact(self) -> bool:
        return not self.hung and self.doubled == 0 and self.missing == 0 and self.extra == 0

    @property
    def ok(self) -> bool:
        return self.exact and not self.problems

    @property
    def pairs_per_s(self) -> float:
        return self.pairs_done / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def recompute_estimate_s(self) -> float | None:
        """(requeues + released) x mean batch compute time: the recomputation chaos caused, a lower bound."""
        if self.mean_batch_s is None:
            return None
        return (self.counters.get("requeues", 0) + self.counters.get("released", 0)) * self.mean_batch_s

    def term_exit_codes(self) -> list[int]:
        return [k.exit_code for k in self.kills if k.signal == "SIGTERM"]


class Chaos:
    """Preempts serving workers on a schedule (Poisson or evenly spaced) and starts a replacement for each."""

    def __init__(self, cluster: LocalCluster, settings: RunSettings, worker_args: tuple[str, ...], t0: float) -> None:
        self.cluster = cluster
        self.settings = settings
        self.worker_args = worker_args
        self.t0 = t0
        self.rng = random.Random(settings.seed)
        self.signals = SIGNALS[settings.signal_mode]
        self.kills: list[Kill] = []
        self.problems: list[str] = []
        self._dying: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._done = asyncio.Event()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    async def run(self) -> None:
        """Kill until ``finish`` is called. Kills run as tasks, so a slow SIGTERM never delays the schedule."""
        if self.settings.kills_per_minute <= 0:
            return
        rate_per_s = self.settings.kills_per_minute / 60.0
        next_at = 0.0
        count = 0
        while not self._done.is_set():
            next_at += self.rng.expovariate(rate_per_s) if self.settings.schedule == "poisson" else 1 / rate_per_s
            if await self._wait_until(next_at):
                return
            victim = await self._pick_victim()
            if victim is None:
                return
            # A kill that waited for a victim restarts the clock: kills due meanwhile do not pile up and
            # fall on each replacement the moment it connects.
            next_at = max(next_at, self.elapsed())
            sig = self.signals[count % len(self.signals)]
            count += 1
            self._dying.add(victim)
            self._tasks.append(asyncio.create_task(self._kill_and_replace(victim, sig)))

    async def _wait_until(self, at_s: float) -> bool:
        """Sleep until ``at_s`` after the start; True if the job finished first."""
        try:
            await asyncio.wait_for(self._done.wait(), max(0.0, at_s - self.elapsed()))
            return True
        except TimeoutError:
            return False

    async def _pick_victim(self) -> str | None:
        while not self._done.is_set():
            candidates = sorted(set(self.cluster.serving_workers()) - self._dying)
            if candidates:
                return self.rng.choice(candidates)
            await asyncio.sleep(0.05)
        return None

    async def _kill_and_replace(self, victim: str, sig: signal.Signals) -> None:
        at = self.elapsed()
        code = await self.cluster.procs.kill(victim, sig)
        self._dying.discard(victim)
        if sig is signal.SIGTERM and code != 0:
            self.problems.append(
                f"{victim} exited with status {code} on SIGTERM instead of leaving cleanly:\n"
                f"{self.cluster.procs.tail(victim)}"
            )
        replacement = None
        job_ended = await self._wait_until(at + self.settings.restart_delay_s) or self._done.is_set()
        if not job_ended:  # the batch system's next job starts
            replacement = await self.cluster.start_worker(*self.worker_args)
        self.kills.append(Kill(round(at, 2), victim, sig.name, code, replacement))
        print(f"  [{at:7.1f} s] {sig.name} {victim} (exit {code}), replacement {replacement or '-'}", file=sys.stderr)

    async def finish(self) -> None:
        """Stop killing; wait for the kills under way (a SIGTERMed worker takes up to its grace time)."""
        self._done.set()
        await asyncio.gather(*self._tasks)


def load_workload(args: argparse.Namespace) -> Workload:
    shipped = load_templates()
    if not 1 <= args.templates <= len(shipped):
        raise SystemExit(f"--templates must be between 1 and {len(shipped)} (the shipped set)")
    templates = dict(list(shipped.items())[: args.templates])
    claims_file = Path(args.claims_file).resolve()
    claim_ids = [c.claim_id for c in read_claims(ClaimsSource(str(claims_file), limit=args.claims))]
    expected = frozenset((claim_id, template_id) for claim_id in claim_ids for template_id in templates)
    model = args.model or str(ensure_tiny_model())
    return Workload(claims_file, args.claims, templates, model, args.batch_size, expected)


async def wait_for_serving(cluster: LocalCluster, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(cluster.serving_workers()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(cluster.serving_workers())} of {count} workers serving after {START_TIMEOUT_S:.0f} s"
            )
        for name in ("broker", "sink"):
            if not cluster.running(name):
                raise RuntimeError(f"{name} exited while the workers started:\n{cluster.procs.tail(name)}")
        await asyncio.sleep(0.1)


async def run_once(settings: RunSettings, workload: Workload, base: Path) -> RunReport:
    """One run: start the cluster, produce the sweep under chaos, stop everything, check the output."""
    report = RunReport(settings, workload, base)
    templates_file = base / "templates.json"
    base.mkdir(parents=True, exist_ok=True)
    templates_file.write_text(dump_templates(workload.templates))
    worker_args = ("--device", "cpu", "--threads", str(settings.threads), "--grace-seconds", "5")
    producer_args = ("--model", workload.model, "--claims", str(workload.claims_file), "--limit", str(workload.claims),
                     "--templates", str(templates_file), "--batch-size", str(workload.batch_size),
                     "--wait")  # fmt: skip
    cluster = LocalCluster(base, heartbeat_interval_s=settings.heartbeat_interval_s)
    chaos: Chaos | None = None
    try:
        await cluster.start_broker()
        await cluster.start_sink("--until-done")
        for _ in range(settings.workers):
            await cluster.start_worker(*worker_args)
        await wait_for_serving(cluster, settings.workers)

        t0 = time.perf_counter()
        await cluster.start_producer(*producer_args)
        producer = cluster.procs.children["producer"]
        chaos = Chaos(cluster, settings, worker_args, t0)
        chaos_task = asyncio.create_task(chaos.run())
        finished = asyncio.create_task(producer.wait())
        next_progress = PROGRESS_EVERY_S
        while not finished.done():
            await asyncio.wait([finished], timeout=0.25)
            now = time.perf_counter() - t0
            if finished.done():
                break
            if not cluster.running("broker"):
                report.problems.append(f"the broker exited during the run:\n{cluster.procs.tail('broker')}")
                break
            if now > settings.duration_limit_s:
                report.hung = True
                report.problems.append(hang_diagnosis(cluster, workload, now))
                break
            if now >= next_progress:
                rows, serving = cluster.rows_written(), len(cluster.serving_workers())
                print(f"  [{now:7.1f} s] {rows}/{len(workload.expected)} rows, {serving} serving, "
                      f"{len(chaos.kills)} kills", file=sys.stderr)  # fmt: skip
                next_progress += PROGRESS_EVERY_S
        report.wall_s = time.perf_counter() - t0
        await chaos.finish()
        await chaos_task
        if finished.done():
            report.producer_code = finished.result()
            if report.producer_code != 0:
                report.problems.append(
                    f"the producer exited with status {report.producer_code}:\n{cluster.procs.tail('producer')}"
                )
            sink = cluster.procs.children["sink"]
            try:
                sink_code = await asyncio.wait_for(sink.wait(), SINK_EXIT_TIMEOUT_S)
                if sink_code != 0:
                    report.problems.append(f"the sink exited with status {sink_code}:\n{cluster.procs.tail('sink')}")
            except TimeoutError:
                report.problems.append(
                    f"the sink (--until-done) had not exited {SINK_EXIT_TIMEOUT_S:.0f} s after the job"
                )
        else:
            finished.cancel()
    finally:
        await cluster.stop()  # SIGTERM: the broker logs its final counters
    if chaos is not None:
        report.kills = sorted(chaos.kills, key=lambda k: k.at_s)
        report.problems.extend(chaos.problems)
    report.counters = {name: int(cluster.broker_counters().get(name, 0)) for name in REPORTED_COUNTERS}
    report.model_loads = sum(len(cluster.events(name, "context_loaded")) for name in cluster.procs.children
                             if name.startswith("worker-"))  # fmt: skip
    check_output(report, cluster.out_dir)
    return report


def hang_diagnosis(cluster: LocalCluster, workload: Workload, elapsed: float) -> str:
    """What the cluster looked like when the duration limit ran out."""
    stats = cluster.broker_counters()
    running = [name for name in cluster.procs.children if cluster.running(name)]
    lines = [
        f"no end after {elapsed:.0f} s (--duration-limit): {cluster.rows_written()}/{len(workload.expected)} rows "
        + f"written, serving workers {cluster.serving_workers()}, running {running}",
        f"broker's last stats: {json.dumps(stats)}",
    ]
    for name in ("producer", "sink", "broker"):
        lines += [f"--- tail of {name}.log", cluster.procs.tail(name)]
    return "\n".join(lines)


def check_output(report: RunReport, out_dir: Path) -> None:
    """Count pairs in the output against the expected set; estimate the compute time of one batch."""
    files = list(out_dir.glob("*.parquet")) if out_dir.exists() else []
    if files:
        table = read_verdicts(out_dir, ["claim_id", "template_id", "batch_id", "started_at", "finished_at"])
    else:
        table = pa.table({"claim_id": pa.array([], pa.string()), "template_id": pa.array([], pa.string())})
    counts = Counter(zip(table["claim_id"].to_pylist(), table["template_id"].to_pylist(), strict=True))
    expected = report.workload.expected
    report.pairs_done = len(counts.keys() & expected)
    report.doubled = sum(n - 1 for n in counts.values() if n > 1)
    report.missing = len(expected - counts.keys())
    report.extra = len(counts.keys() - expected)
    report.failed_pairs = len(read_failures(out_dir))
    if files and table.num_rows:
        # A worker scores a run of batches in one pass, and each batch of the pass carries the pass's times:
        # a pass's time is shared among its batches.
        batches = table.group_by("batch_id").aggregate([("started_at", "min"), ("finished_at", "max")])
        passes = batches.group_by(["started_at_min", "finished_at_max"]).aggregate([])
        seconds = pc.subtract(passes["finished_at_max"], passes["started_at_min"]).cast(pa.int64())
        report.mean_batch_s = pc.sum(seconds).as_py() / 1e6 / batches.num_rows
    if not report.exact and not report.hung:
        report.problems.append(
            f"output not exact: {report.missing} pairs missing, {report.doubled} rows doubled, {report.extra} extra "
            f"pairs ({report.failed_pairs} recorded as failed)"
        )


def fmt_time_lost(report: RunReport) -> str:
    if report.settings.kills_per_minute <= 0:
        return "-"
    if report.time_lost_s is not None:
        return f"{report.time_lost_s:+.1f}"
    estimate = report.recompute_estimate_s
    return "-" if estimate is None else f"{estimate:.2f} est."


def markdown_table(reports: list[RunReport]) -> str:
    header = ["run", "workers", "kills/min", "signal", "claims x templates", "pairs", "wall s", "pairs done",
              "pairs/s", "kills", "requeues", "released", "dup. suppressed", "late accepted", "redeliveries",
              "declared dead", "failed", "time lost s", "exact"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + [":---:"]) + "|"]
    for r in reports:
        s, c = r.settings, r.counters
        cells = [
            s.label, str(s.workers), f"{s.kills_per_minute:g}", s.signal_mode if s.kills_per_minute > 0 else "-",
            f"{r.workload.claims_read:,} x {len(r.workload.templates)}", f"{r.pairs:,}",
            f"{r.wall_s:.1f}" + (" (limit)" if r.hung else ""), f"{r.pairs_done:,}", f"{r.pairs_per_s:,.1f}",
            str(len(r.kills)), str(c["requeues"]), str(c["released"]), str(c["duplicate_results"]),
            str(c["late_results_accepted"]), str(c["redeliveries"]), str(c["workers_declared_dead"]),
            str(c["batches_failed"]), fmt_time_lost(r), "yes" if r.exact else "**no**",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_row(r: RunReport) -> dict[str, object]:
    s = r.settings
    chaos = s.kills_per_minute > 0
    estimate = r.recompute_estimate_s
    lost = r.time_lost_s if r.time_lost_s is not None else estimate if chaos else None
    return {
        "run": s.label, "workers": s.workers, "kills_per_minute": s.kills_per_minute,
        "signal": s.signal_mode if chaos else "", "schedule": s.schedule if chaos else "", "seed": s.seed,
        "threads_per_worker": s.threads, "heartbeat_interval_s": s.heartbeat_interval_s,
        "restart_delay_s": s.restart_delay_s, "claims": r.workload.claims_read,
        "templates": ";".join(r.workload.templates), "batch_size": r.workload.batch_size, "pairs": r.pairs,
        "wall_s": round(r.wall_s, 2), "pairs_done": r.pairs_done, "pairs_per_s": round(r.pairs_per_s, 2),
        "kills": len(r.kills), **{name: r.counters[name] for name in REPORTED_COUNTERS},
        "failed_pairs": r.failed_pairs, "time_lost_s": None if lost is None else round(lost, 2),
        "time_lost_measured": r.time_lost_s is not None,
        "recompute_estimate_s": None if estimate is None else round(estimate, 3),
        "mean_batch_s": None if r.mean_batch_s is None else round(r.mean_batch_s, 4), "model_loads": r.model_loads,
        "sigterm_exit_codes": ";".join(map(str, r.term_exit_codes())), "doubled_rows": r.doubled,
        "missing_pairs": r.missing, "extra_pairs": r.extra, "hung": r.hung, "exact": r.exact,
        "problems": len(r.problems),
    }  # fmt: skip


def write_csv(path: Path, reports: list[RunReport]) -> None:
    rows = [csv_row(r) for r in reports]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=3, help="workers serving at once (default: 3)")
    parser.add_argument(
        "--kills-per-minute", type=float, default=1.0, help="mean preemptions a minute; 0: baseline (default: 1)"
    )
    parser.add_argument("--claims", type=int, default=3000, help="claims read from --claims-file (default: 3000)")
    default_claims = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    parser.add_argument("--claims-file", default=str(default_claims),
                        help="claims (default: ../shared/data/fever/paper_dev.jsonl, else shipped)")  # fmt: skip
    parser.add_argument("--templates", type=int, default=2, help="the first K shipped templates (default: 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="claims per batch (default: 8)")
    parser.add_argument("--signal", dest="signal_mode", choices=sorted(SIGNALS), default="mix",
                        help="kill: SIGKILL, term: SIGTERM, mix: alternate, SIGKILL first (default: mix)")  # fmt: skip
    parser.add_argument("--schedule", choices=["poisson", "even"], default="poisson",
                        help="kill moments: a Poisson process, or evenly spaced (default: poisson)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=20261120, help="seed of the kill schedule and victims")
    parser.add_argument(
        "--duration-limit",
        type=float,
        default=900.0,
        help="seconds a run may take before it is reported as hung (default: 900)",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, default=0.5, help="heartbeat seconds of every process (default: 0.5)"
    )
    parser.add_argument(
        "--restart-delay", type=float, default=0.0, help="seconds from a kill to its replacement's start (default: 0)"
    )
    parser.add_argument("--model", default=None, help="model (default: the offline tiny model)")
    parser.add_argument(
        "--threads-per-worker", type=int, default=None, help="torch threads per worker (default: cores / workers)"
    )
    parser.add_argument(
        "--compare-baseline",
        action="store_true",
        help="first run the same workload without kills; time lost = chaos wall - baseline wall",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table as CSV here")
    parser.add_argument(
        "--base-dir",
        type=Path,
        default=None,
        help="where runs keep logs, state and output (default: a temporary directory)",
    )
    parser.add_argument("--keep", action="store_true", help="keep --base-dir even when every run passed")
    args = parser.parse_args()
    if args.workers < 1 or args.claims < 1 or args.batch_size < 1 or args.kills_per_minute < 0:
        parser.error("--workers, --claims and --batch-size must be positive, --kills-per-minute not negative")

    workload = load_workload(args)
    base = (args.base_dir or Path(tempfile.mkdtemp(prefix="pervade-chaos-"))).resolve()
    threads = args.threads_per_worker or max(1, cores // args.workers)
    plan = [("baseline", 0.0)] if args.compare_baseline and args.kills_per_minute > 0 else []
    plan.append(("chaos" if args.kills_per_minute > 0 else "baseline", args.kills_per_minute))

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {cores} cores, python {sys.version.split()[0]}")
    print(f"# claims: {workload.claims_file} ({workload.claims_read:,}), templates: {', '.join(workload.templates)}, "
          f"batch size {workload.batch_size}, model: {args.model or 'tiny (offline)'}")  # fmt: skip
    print(f"# {args.workers} workers x {threads} threads, heartbeat {args.heartbeat_interval} s, restart delay "
          f"{args.restart_delay} s, {args.schedule} kills, seed {args.seed}; runs in {base}", flush=True)  # fmt: skip
    reports: list[RunReport] = []
    for label, kills_per_minute in plan:
        settings = RunSettings(label, args.workers, kills_per_minute, args.signal_mode, args.schedule, args.seed,
                               threads, args.heartbeat_interval, args.restart_delay, args.duration_limit)  # fmt: skip
        print(f"# {label}: {kills_per_minute:g} kills/min ...", file=sys.stderr, flush=True)
        report = asyncio.run(run_once(settings, workload, base / label))
        if reports and label != "baseline" and reports[0].exact and report.exact:
            report.time_lost_s = report.wall_s - reports[0].wall_s
        reports.append(report)

    print()
    print(markdown_table(reports))
    print()
    for r in reports:
        recompute = r.recompute_estimate_s
        notes = [f"mean batch {r.mean_batch_s * 1000:.1f} ms" if r.mean_batch_s is not None else "no batches",
                 f"{r.model_loads} model loads",
                 f"recompute estimate {recompute:.2f} s" if recompute is not None else "",
                 f"duplicate submissions {r.counters['duplicate_submissions']}"]  # fmt: skip
        if r.kills:
            notes.append(f"realised {len(r.kills) / r.wall_s * 60:.1f} kills/min")
            notes.append("kills at " + ", ".join(f"{k.at_s:.1f}s {k.signal[3:]} {k.victim}" for k in r.kills))
        print(f"- {r.settings.label}: " + "; ".join(n for n in notes if n))
    if len(reports) == 2 and reports[0].pairs_per_s > 0:
        ratio = reports[1].pairs_per_s / reports[0].pairs_per_s
        print(f"- chaos throughput = {ratio:.1%} of the baseline's")
    if args.out:
        write_csv(args.out, reports)
        print(f"- CSV: {args.out}")

    failed = [r for r in reports if not r.ok]
    for r in failed:
        print(f"\n## {r.settings.label}: FAILED (logs in {r.base / 'logs'})", file=sys.stderr)
        for problem in r.problems:
            print(problem, file=sys.stderr)
    if failed or args.keep or args.base_dir:
        print(f"- runs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

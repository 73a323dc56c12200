"""Worker jobs on a real (one-node) Slurm: how long each step of a batch-system run takes.

    .venv/bin/python bench/slurm_jobs.py                       # as root: starts and stops its own Slurm
    .venv/bin/python bench/slurm_jobs.py --jobs 3 --limit 1200 --model small

One run, as a user would do it: a broker and a sink as processes (``jobs.cluster.LocalCluster``), a
producer sending ``--limit`` claims (``../shared/data/fever/paper_dev.jsonl`` if present, else the
shipped sample) under the 4 shipped templates, and ``--jobs`` worker jobs submitted with ``pervade submit
--scheduler slurm`` to a one-node Slurm with fake GPUs (``jobs/lab/slurm/``; the workers compute on the CPU,
one thread each). At ``--preempt-at`` of the rows one job is ``scancel``led and one more submitted. Printed,
each from the submit (or the event) it follows:

- submit: the ``pervade submit`` command itself (Python start, rendering, sbatch);
- all running: until ``squeue`` shows every job running;
- all joined: until the broker logged every worker joining (torch imported, registered);
- first verdict: until the earliest ``finished_at`` in the Parquet output;
- scancel → left: from ``scancel`` until the broker logged the worker gone, and the batches it handed back;
- late job → first verdict: from the second submit until that job's worker finished its first batch;
- drained → queue empty: from the producer's return until no job is left in ``squeue`` (they end by
  themselves on the broker's ``drained``);
- verdicts/s over the whole run.

Caveat: one node with 2 cores: every job, the broker, the sink and the producer share them, and a worker
here spends ~3 s importing torch. The times are the batch system's and pervade's overheads on top of that,
not a cluster's queue wait.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
from transformers.utils import logging as hf_logging

from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.slurm import SlurmLab
from pervade.producer.claims import sample_claims_path

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
WORKER_ARGS = ("--threads", "1", "--grace-seconds", "5", "--heartbeat-interval", "0.5", "--heartbeat-liveness", "3",
               "--file-host", "127.0.0.1", "--file-bind-host", "127.0.0.1")  # fmt: skip


def stamp(record: dict) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


async def poll(predicate, timeout_s: float = 300) -> float:
    """Wait until ``predicate()`` (run on a thread) is true; the time it became so."""
    async with asyncio.timeout(timeout_s):
        while not await asyncio.to_thread(predicate):
            await asyncio.sleep(0.05)
    return time.time()


async def submit(slurm: SlurmLab, cluster: LocalCluster, jobs: int) -> tuple[list[str], float]:
    """``pervade submit``: the job ids and the time it was called."""
    started = time.time()
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pervade", "submit", "--scheduler", "slurm", "--broker", cluster.endpoint,
         "--workers", str(jobs), "--cpus-per-job", "1", "--memory", "", "--time", "30",
         "--log-dir", str(cluster.base / "jobs"), "--cache-dir", str(cluster.base / "node-cache"), "--", *WORKER_ARGS],
        env=slurm.env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.split(), started


def first_finished(out_dir: Path, worker_ids: set[str] | None = None) -> float | None:
    """The earliest ``finished_at`` in the output (of these workers), as a Unix time."""
    times = []
    for path in out_dir.glob("*.parquet"):
        table = pq.read_table(path, columns=["worker_id", "finished_at"]).to_pylist()
        times += [r["finished_at"].timestamp() for r in table if worker_ids is None or r["worker_id"] in worker_ids]
    return min(times) if times else None


async def run(args: argparse.Namespace, slurm: SlurmLab, base: Path) -> list[tuple[str, str]]:
    from pervade.tinymodel import build_tiny_model

    model = build_tiny_model(base / "model", size=args.model)
    claims = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    cluster = LocalCluster(base / "run")
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        await cluster.start_producer("--model", str(model), "--claims", str(claims), "--limit", str(args.limit),
                                     "--batch-size", str(args.batch_size), "--wait")  # fmt: skip
        t_run = time.time()
        ids, t_submit = await submit(slurm, cluster, args.jobs)
        t_submitted = time.time()
        running = await poll(lambda: set(slurm.run("squeue", "-h", "-r", "-t", "R", "-o", "%i").split()) >= set(ids))
        joined = await poll(lambda: len({e["worker_id"] for e in cluster.events("broker", "worker_joined")}) >= len(ids))
        joined = max(stamp(e) for e in cluster.events("broker", "worker_joined"))
        first = await poll(lambda: first_finished(cluster.out_dir) is not None)
        first = first_finished(cluster.out_dir) or first

        total = args.limit * 4
        await poll(lambda: cluster.rows_written() >= total * args.preempt_at)
        victim = ids[0]
        t_cancel = time.time()
        await asyncio.to_thread(slurm.run, "scancel", victim)
        (late,), t_late = await submit(slurm, cluster, 1)
        victim_worker = f"slurm-{victim}-gpu0"
        left = await poll(lambda: any(e["worker_id"] == victim_worker for e in cluster.events("broker", "worker_left")))
        left = next(stamp(e) for e in cluster.events("broker", "worker_left") if e["worker_id"] == victim_worker)
        released = sum(e.get("released", 0) for e in cluster.events("broker", "worker_leaving") if e["worker_id"] == victim_worker)
        late_workers = {f"slurm-{late}-gpu0"}
        await poll(lambda: first_finished(cluster.out_dir, late_workers) is not None)
        late_first = first_finished(cluster.out_dir, late_workers) or 0.0

        code = await asyncio.wait_for(cluster.procs.children["producer"].wait(), 900)
        t_done = time.time()
        if code != 0:
            raise SystemExit(f"producer failed:\n{cluster.procs.tail('producer')}")
        ours = {*ids, late}
        emptied = await poll(lambda: not (slurm.queued() & ours), 120)
        rows = cluster.rows_written()
    finally:
        await asyncio.to_thread(subprocess.run, ["scancel", "--name", "pervade-worker"], env=slurm.env, capture_output=True)
        await cluster.stop()
    return [
        ("jobs", f"{args.jobs} (+1 late, 1 cancelled)"),
        ("submit (command)", f"{t_submitted - t_submit:.2f} s"),
        ("submit → all running", f"{running - t_submit:.2f} s"),
        ("submit → all workers joined", f"{joined - t_submit:.2f} s"),
        ("submit → first verdict", f"{first - t_submit:.2f} s"),
        ("scancel → broker saw the worker leave", f"{left - t_cancel:.2f} s (batches handed back: {released})"),
        ("late submit → its first verdict", f"{late_first - t_late:.2f} s"),
        ("producer done → queue empty (drained)", f"{emptied - t_done:.2f} s"),
        ("verdicts", f"{rows} in {t_done - t_run:.1f} s ({rows / (t_done - t_run):.0f}/s)"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3, help="worker jobs submitted at the start (default: 3)")
    parser.add_argument("--limit", type=int, default=1200, help="claims (x 4 templates) (default: 1200)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default="small", choices=["tiny", "small", "medium"], help="tiny-model shape (default: small)")
    parser.add_argument("--preempt-at", type=float, default=0.2, help="share of rows written when a job is cancelled (default: 0.2)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    slurm = SlurmLab.start(fake_gpus=args.jobs + 1)
    try:
        version = slurm.run("sbatch", "--version").strip()
        with tempfile.TemporaryDirectory(prefix="pervade-bench-slurm-") as tmp:
            rows = asyncio.run(run(args, slurm, Path(tmp)))
    finally:
        slurm.stop()
    print(f"\nSlurm worker jobs, {datetime.now():%Y-%m-%d}, {platform.node()} ({platform.processor() or platform.machine()}), {version}")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| step | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

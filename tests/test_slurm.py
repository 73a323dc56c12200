"""Worker jobs on a real Slurm: ``pervade submit --scheduler slurm`` against a one-node Slurm on localhost.

The module's fixture starts munged, slurmctld and slurmd with four fake GPUs (jobs/lab/slurm/start-slurm.sh,
which installs Debian's packages when they are missing) and stops them by pid at the end. The broker, the
sink and the producer run as processes of the test; the workers run only as Slurm jobs, started the way a
user starts them. Needs root, as CI has.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.slurm import SlurmLab, free_port
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.sinks.failures import read_failures
from pervade.sinks.summary import read_verdicts
from tests.shadowing import write_shadowing_files
from tests.templates import shipped_templates_file
from tests.waiting import wait_until

#: Long enough that the late job, whose worker takes about 7 s to start, still finds work: 1,200 claims x 2
#: templates took 12 s on an idle 2-core machine and twice ended 1.5 s after the late worker registered;
#: 2,400 x 3 lasts about three times that.
CLAIMS = 2400
TEMPLATES = ("direct", "verdict_only", "chat_yes_no_calibrated")
BATCH_SIZE = 8
FAKE_GPUS = 4
RUN_TIMEOUT_S = 300
#: What every worker job passes to its worker: the test cluster's heartbeats, loopback file service.
WORKER_ARGS = ("--threads", "1", "--grace-seconds", "5", "--heartbeat-interval", "0.5", "--heartbeat-liveness", "3",
               "--file-host", "127.0.0.1", "--file-bind-host", "127.0.0.1")  # fmt: skip


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmLab]:
    if os.geteuid() != 0:
        pytest.skip("a one-node Slurm needs root (CI runs as root); see jobs/lab/slurm/start-slurm.sh")
    lab = SlurmLab.start(fake_gpus=FAKE_GPUS)
    try:
        yield lab
    finally:
        lab.stop()  # by pid; raises if a daemon's pidfile is left behind


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model slow enough on this CPU (about 120 claims/s a core) that a run lasts long enough to preempt."""
    from pervade.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "small", size="small")


async def submit(slurm: SlurmLab, broker: str, base: Path, workers: int) -> list[str]:
    """``pervade submit --scheduler slurm``, run as a user would, from a directory of their own that holds a
    ``jobs.py``, ``broker.py``, ... (the jobs start there too); the job ids it prints."""
    write_shadowing_files(base)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pervade", "submit", "--scheduler", "slurm", "--broker", broker, "--workers", str(workers),
        "--cpus-per-job", "1", "--memory", "", "--time", "15", "--log-dir", str(base / "jobs"),
        "--cache-dir", str(base / "node-cache"), "--idle-timeout", "120", "--broker-deadline", "60", "--", *WORKER_ARGS,
        env=slurm.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=base,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().split()


def job_output(base: Path, job_id: str) -> str:
    path = base / "jobs" / f"pervade-worker-{job_id}.out"
    return path.read_text() if path.exists() else ""


@pytest.mark.timeout(RUN_TIMEOUT_S + 180)
async def test_worker_jobs_survive_a_cancelled_job_and_a_late_one_takes_work(
    slurm: SlurmLab, tmp_path: Path, small_model: Path, fever_claims: Path
) -> None:
    cluster = LocalCluster(tmp_path)
    claims = list(read_claims(ClaimsSource(str(fever_claims), limit=CLAIMS)))
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        await cluster.start_producer("--model", str(small_model), "--claims", str(fever_claims), "--limit", str(CLAIMS),
                                     "--templates", str(shipped_templates_file(tmp_path, TEMPLATES)), "--batch-size", str(BATCH_SIZE),
                                     "--wait")  # fmt: skip
        first = await submit(slurm, cluster.endpoint, tmp_path, workers=3)
        assert len(first) == 3 and all("_" in job for job in first), first  # one array of three tasks

        total = CLAIMS * len(TEMPLATES)
        await wait_until(lambda: cluster.rows_written() >= total // 20, 120, "no verdicts from the Slurm jobs")
        victim = first[1]
        victim_number = await asyncio.to_thread(slurm.job_number, victim)
        await asyncio.to_thread(slurm.run, "scancel", victim)  # preemption: SIGTERM to the job, SIGKILL after KillWait
        (late,) = await submit(slurm, cluster.endpoint, tmp_path, workers=1)  # opportunistic scale-up

        producer = cluster.procs.children["producer"]
        code = await asyncio.wait_for(producer.wait(), RUN_TIMEOUT_S)
        assert code == 0, cluster.procs.tail("producer")
        # The broker says the run is drained: every job ends by itself, holding no GPU idle.
        ours = {*first, late}
        await wait_until(lambda: not (slurm.queued() & ours), 60, "the jobs did not end by themselves")
    finally:
        await asyncio.to_thread(subprocess.run, ["scancel", "--name", "pervade-worker"], env=slurm.env, capture_output=True)
        await cluster.stop()

    table = read_verdicts(cluster.out_dir)
    rows = table.to_pylist()
    pairs = Counter((r["claim_id"], r["template_id"]) for r in rows)
    assert len(pairs) == total and set(pairs.values()) == {1}, "a pair is missing or written twice"
    assert {c for c, _ in pairs} == {c.claim_id for c in claims}
    assert read_failures(cluster.out_dir) == []

    by_worker = Counter(r["worker_id"] for r in rows)
    assert by_worker[f"slurm-{late}-gpu0"] > 0, f"the late job took no work: {by_worker}"
    assert set(by_worker) <= {f"slurm-{job}-gpu0" for job in ours}, by_worker
    assert {r["dtype"] for r in rows} == {"float32"}  # auto on a CPU

    victim_log = job_output(tmp_path, victim)
    assert '"reason": "signal SIGTERM"' in victim_log, f"the cancelled worker did not leave on SIGTERM:\n{victim_log[-2000:]}"
    states = slurm.final_states()
    assert states.get(victim_number) == "CANCELLED", states
    for job in (first[0], first[2], late):
        log = job_output(tmp_path, job)
        assert '"event": "broker_drained"' in log, f"{job} did not end on the broker's word:\n{log[-2000:]}"
        assert states.get(slurm.job_number(job)) == "COMPLETED", (job, states)
    counters = cluster.broker_counters()
    assert counters["batches_failed"] == 0


async def test_a_job_starts_a_worker_per_gpu_that_waits_for_a_late_broker(slurm: SlurmLab, tmp_path: Path) -> None:
    """Two fake GPUs give two workers, each on its own GPU; they keep retrying a broker that is not up yet,
    join it when it comes, and end the job once idle."""
    cluster = LocalCluster(tmp_path)
    cluster.endpoint = f"tcp://127.0.0.1:{free_port()}"  # where the broker will be, later
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pervade", "submit", "--scheduler", "slurm", "--broker", cluster.endpoint,
        "--gpus-per-job", "2", "--cpus-per-job", "1", "--memory", "", "--time", "5", "--log-dir", str(tmp_path / "jobs"),
        "--cache-dir", str(tmp_path / "node-cache"), "--idle-timeout", "3", "--broker-deadline", "120", "--", *WORKER_ARGS,
        env=slurm.env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    (job,) = (await process.communicate())[0].decode().split()
    try:
        await wait_until(lambda: job_output(tmp_path, job).count('"event": "worker_started"') == 2, 60, "workers")
        await asyncio.sleep(4.0)  # the workers knock at a closed door for longer than their idle timeout
        await cluster.start_broker()
        await wait_until(lambda: job not in slurm.queued(), 60, "the job did not end once idle")
    finally:
        await asyncio.to_thread(subprocess.run, ["scancel", job], env=slurm.env, capture_output=True)
        await cluster.stop()
    output = job_output(tmp_path, job)
    started = [json.loads(line) for line in output.splitlines() if '"event": "node_worker_started"' in line]
    assert sorted((e["worker_id"], e["gpu"]) for e in started) == [(f"slurm-{job}-gpu0", "0"), (f"slurm-{job}-gpu1", "1")]
    joined = {e["worker_id"] for e in cluster.events("broker", "worker_joined")}  # maybe twice: a retry's
    assert joined == {f"slurm-{job}-gpu0", f"slurm-{job}-gpu1"}  # registration can land beside the first
    assert output.count('"event": "worker_idle"') == 2
    assert slurm.final_states()[slurm.job_number(job)] == "COMPLETED"

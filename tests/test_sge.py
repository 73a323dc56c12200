"""Worker jobs on a real (Son of) Grid Engine: ``pervade submit --scheduler sge`` against a one-node cell.

The module's fixture starts sge_qmaster and sge_execd (jobs/lab/sge/start-sge.sh, which installs Debian's
packages when they are missing) and stops them by pid at the end. The cell has no GPUs (Grid Engine has no
notion of them; sites add a ``gpu`` complex), so the jobs here are CPU jobs: what is tested is the rendered
script under Grid Engine's own parser and shepherd, the task array, ``-notify``'s SIGUSR2 on ``qdel``, and
the end of the run. Needs root, as CI has.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pervade.jobs.cluster import LocalCluster
from tests.templates import shipped_templates_file
from tests.test_slurm import WORKER_ARGS
from tests.waiting import wait_until

LAB_SCRIPTS = Path(__file__).resolve().parents[1] / "jobs" / "lab" / "sge"
CLAIMS = 1000
TEMPLATES = ("direct", "chat_yes_no_calibrated")
RUN_TIMEOUT_S = 300


@dataclass
class GridEngine:
    lab: Path
    env: dict[str, str]

    def run(self, *command: str) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr or done.stdout}"
        return done.stdout

    def queued(self) -> set[str]:
        """Job numbers with any task still queued or running."""
        return {line.split()[0] for line in self.run("qstat").splitlines()[2:] if line.strip()}


@pytest.fixture(scope="module")
def grid_engine() -> Iterator[GridEngine]:
    if os.geteuid() != 0:
        pytest.skip("a one-node Grid Engine needs root (CI runs as root); see jobs/lab/sge/start-sge.sh")
    lab = Path(tempfile.mkdtemp(prefix="pervade-sge-"))
    lab.chmod(0o755)
    env = {**os.environ, "SGE_LAB": str(lab), "SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
    started = subprocess.run(["bash", str(LAB_SCRIPTS / "start-sge.sh")], env=env, capture_output=True, text=True,
                             timeout=600, check=False)  # fmt: skip
    try:
        assert started.returncode == 0, f"Grid Engine did not start:\n{started.stdout}\n{started.stderr}"
        yield GridEngine(lab, env)
    finally:
        pids = {name: (lab / name).read_text().strip() for name in ("qmaster.pid", "execd.pid") if (lab / name).exists()}
        stopped = subprocess.run(["bash", str(LAB_SCRIPTS / "stop-sge.sh")], env=env, capture_output=True, text=True,
                                 timeout=300, check=False)  # fmt: skip
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{name} {pid} still running:\n{stopped.stderr}"
        shutil.rmtree(lab, ignore_errors=True)


def job_output(log_dir: Path, job_id: str) -> str:
    """Grid Engine names the output of task T of job J ``NAME.oJ.T``."""
    job, _, task = job_id.partition(".")
    path = log_dir / f"pervade-worker.o{job}.{task}" if task else log_dir / f"pervade-worker.o{job}"
    return path.read_text() if path.exists() else ""


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
async def test_worker_jobs_under_grid_engine_leave_on_its_warning_and_end_with_the_run(
    grid_engine: GridEngine, tmp_path: Path, fever_claims: Path
) -> None:
    from pervade.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "model", size="small")
    cluster = LocalCluster(tmp_path / "run")
    log_dir = tmp_path / "jobs"
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        templates = shipped_templates_file(tmp_path, TEMPLATES)
        await cluster.start_producer("--model", str(model), "--claims", str(fever_claims), "--limit", str(CLAIMS),
                                     "--templates", str(templates), "--batch-size", "8", "--wait")  # fmt: skip
        submitted = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pervade", "submit", "--scheduler", "sge", "--broker", cluster.endpoint,
             "--workers", "2", "--gpus-per-job", "0", "--cpus-per-job", "1", "--memory", "", "--time", "10",
             "--log-dir", str(log_dir), "--cache-dir", str(tmp_path / "node-cache"), "--idle-timeout", "120",
             "--broker-deadline", "60", "--", *WORKER_ARGS],
            env=grid_engine.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        jobs = submitted.stdout.split()
        assert len(jobs) == 2 and jobs[0].endswith(".1") and jobs[1].endswith(".2"), jobs

        await wait_until(lambda: cluster.rows_written() >= CLAIMS * len(TEMPLATES) // 10, 120, "no verdicts from the jobs")
        victim = jobs[1]
        number, _, task = victim.partition(".")
        await asyncio.to_thread(grid_engine.run, "qdel", number, "-t", task)  # -notify: SIGUSR2 now, SIGKILL 5 s later

        code = await asyncio.wait_for(cluster.procs.children["producer"].wait(), RUN_TIMEOUT_S)
        assert code == 0, cluster.procs.tail("producer")
        await wait_until(lambda: number not in grid_engine.queued(), 60, "the jobs did not end with the run")
    finally:
        await asyncio.to_thread(subprocess.run, ["qdel", "-f", "-u", "*"], env=grid_engine.env, capture_output=True)
        await cluster.stop()

    rows = cluster.rows_written()
    assert rows == CLAIMS * len(TEMPLATES)
    from pervade.sinks.summary import read_verdicts

    table = read_verdicts(cluster.out_dir).to_pylist()
    pairs = Counter((r["claim_id"], r["template_id"]) for r in table)
    assert len(pairs) == CLAIMS * len(TEMPLATES) and set(pairs.values()) == {1}
    workers = Counter(r["worker_id"] for r in table)
    assert set(workers) <= {f"sge-{job}-cpu" for job in jobs}, workers

    victim_log = job_output(log_dir, victim)
    assert '"signal": "SIGUSR2"' in victim_log, f"no -notify warning reached the node:\n{victim_log[-2000:]}"
    # The worker left gracefully on the warning: Grid Engine signals the process group, so the worker's own
    # SIGUSR2 and the node's forwarded SIGTERM race; whichever comes first, it hands its batches back.
    leaving = [json.loads(line) for line in victim_log.splitlines() if '"event": "worker_leaving"' in line]
    assert [e["reason"] for e in leaving] in (["signal SIGUSR2"], ["signal SIGTERM"]), victim_log[-2000:]
    assert '"event": "worker_stopped"' in victim_log and '"exit_status": 0' in victim_log
    survivor_log = job_output(log_dir, jobs[0])
    assert '"event": "broker_drained"' in survivor_log, survivor_log[-2000:]

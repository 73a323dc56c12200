"""``pervade node``, what a batch job runs, without a batch system: real node, worker and broker processes.

The Slurm tests (tests/test_slurm.py) run the same through sbatch and scancel; these cover what a
one-node Slurm cannot show here: Grid Engine's warning signals, and a broker that never comes.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from pervade.constants import EXIT_BROKER_UNREACHABLE
from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.slurm import free_port
from pervade.jobs.node import visible_gpus
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import load_templates
from tests.waiting import wait_until

HEARTBEATS = ("--heartbeat-interval", "0.5", "--heartbeat-liveness", "3")
WORKER_ARGS = ("--threads", "1", "--grace-seconds", "5", *HEARTBEATS, "--file-host", "127.0.0.1", "--file-bind-host", "127.0.0.1")


async def start_node(cluster: LocalCluster, *node_args: str) -> asyncio.subprocess.Process:
    return await cluster.procs.start("node", "node", "--broker", cluster.endpoint, "--job-id", "job7",
                                     "--cache-dir", str(cluster.base / "node-cache"), *node_args, "--", *WORKER_ARGS)  # fmt: skip


def node_events(cluster: LocalCluster, event: str) -> list[dict]:
    return cluster.events("node", event)


@pytest.mark.parametrize(
    ("value", "gpus"),
    [("0,1", ["0", "1"]), ("GPU-5c1b,GPU-77aa", ["GPU-5c1b", "GPU-77aa"]), ("", []), ("NoDevFiles", []), (None, [])],
)
def test_the_gpus_a_job_was_given(value: str | None, gpus: list[str]) -> None:
    assert visible_gpus({} if value is None else {"CUDA_VISIBLE_DEVICES": value}) == gpus


async def test_a_node_runs_a_worker_per_gpu_and_ends_when_the_broker_is_drained(tmp_path: Path, tiny_model: Path) -> None:
    cluster = LocalCluster(tmp_path)
    try:
        await cluster.start_broker()
        await cluster.start_sink()
        node = await start_node(cluster, "--gpus", "0,1")
        await cluster.start_producer("--model", str(tiny_model), "--claims", str(sample_claims_path()), "--limit", "40",
                                     "--batch-size", "4", "--wait")  # fmt: skip
        assert await asyncio.wait_for(cluster.procs.children["producer"].wait(), 120) == 0
        assert await asyncio.wait_for(node.wait(), 60) == 0, cluster.procs.tail("node", 40)
    finally:
        await cluster.stop()
    started = node_events(cluster, "node_worker_started")
    assert sorted((e["worker_id"], e["gpu"]) for e in started) == [("job7-gpu0", "0"), ("job7-gpu1", "1")]
    log = (cluster.procs.log_dir / "node.log").read_text()
    assert log.count('"event": "broker_drained"') == 2  # both workers heard the broker, neither timed out
    assert cluster.rows_written() == 40 * len(load_templates())


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM])
async def test_a_batch_systems_warning_makes_every_worker_leave(tmp_path: Path, sig: signal.Signals) -> None:
    """Grid Engine's -notify sends SIGUSR1 (suspend coming) or SIGUSR2 (kill coming) to the job; HTCondor and
    Slurm send SIGTERM. The node passes it on, each worker says goodbye, and the job exits 0."""
    cluster = LocalCluster(tmp_path)
    try:
        await cluster.start_broker()
        node = await start_node(cluster, "--gpus", "0,1")
        await wait_until(lambda: len(cluster.events("broker", "worker_joined")) >= 2, 60, "both workers joined")
        node.send_signal(sig)
        assert await asyncio.wait_for(node.wait(), 30) == 0, cluster.procs.tail("node", 40)
        await wait_until(lambda: len(cluster.events("broker", "worker_left")) >= 2, 10, "both workers left")
    finally:
        await cluster.stop()
    assert [e["signal"] for e in node_events(cluster, "node_signal")] == [sig.name]
    stopped = [json.loads(line) for line in (cluster.procs.log_dir / "node.log").read_text().splitlines()
               if '"event": "worker_stopped"' in line]  # fmt: skip
    assert len(stopped) == 2 and all(e["exit_status"] == 0 for e in stopped)


async def test_workers_give_up_on_a_broker_that_never_comes(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path)
    cluster.endpoint = f"tcp://127.0.0.1:{free_port()}"  # nobody there
    node = await start_node(cluster, "--gpus", "", "--broker-deadline", "2")
    try:
        assert await asyncio.wait_for(node.wait(), 60) == EXIT_BROKER_UNREACHABLE
    finally:
        await cluster.stop()
    assert [e["worker_id"] for e in node_events(cluster, "node_worker_started")] == ["job7-cpu"]
    log = (cluster.procs.log_dir / "node.log").read_text()
    assert '"event": "broker_unreachable"' in log

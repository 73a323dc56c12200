"""CURVE with real processes: the run's key holders are served by the broker and by each other's file
service, nobody else is."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from pervade.jobs.cluster import LocalCluster
from pervade.keys import init_keys
from pervade.producer.claims import sample_claims_path


def pervade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pervade", *args], capture_output=True, text=True, timeout=120, check=False)


def test_a_broker_on_a_network_address_without_keys_refuses_to_start() -> None:
    done = pervade("broker", "--bind", "tcp://*:0")
    assert done.returncode == 2
    assert "refusing to listen on tcp://*:0 without keys" in done.stderr and "pervade keys init" in done.stderr


def strangers_keys(base: Path, run_keys: Path) -> Path:
    """A keys directory that looks right but holds client keys the broker never authorised."""
    other = base / "stranger"
    init_keys(other)
    (other / "broker.key").write_bytes((run_keys / "broker.key").read_bytes())  # trusts the right broker
    return other


async def test_only_the_runs_key_holders_submit_work_and_get_verdicts(tmp_path: Path, tiny_model: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    stranger = strangers_keys(tmp_path, keys)
    cluster = LocalCluster(tmp_path / "run")
    claims = ("--model", str(tiny_model), "--claims", str(sample_claims_path()), "--limit", "8", "--batch-size", "4")
    try:
        await cluster.start_broker("--keys", str(keys))
        await cluster.start_sink("--keys", str(keys))
        for _ in range(2):  # the second gets the model files from the first, over the keyed file service
            await cluster.start_worker("--keys", str(keys), "--device", "cpu", "--threads", "1")
        # no key, and a key the broker does not admit: the handshake fails, nothing reaches the broker
        await cluster.start_producer(*claims, "--wait", "--timeout", "8", name="no-key")
        await cluster.start_producer(*claims, "--wait", "--timeout", "8", "--keys", str(stranger), name="stranger")
        for name in ("no-key", "stranger"):
            assert await asyncio.wait_for(cluster.procs.children[name].wait(), 60) == 1, cluster.procs.tail(name)
        assert cluster.events("broker", "job_done") == [] and cluster.rows_written() == 0
        assert not any(e.get("kind") == "submit" for e in cluster.events("broker", "invalid_message"))

        await cluster.start_producer(*claims, "--wait", "--timeout", "60", "--keys", str(keys), name="holder")
        assert await asyncio.wait_for(cluster.procs.children["holder"].wait(), 90) == 0, cluster.procs.tail("holder")

        # the status view under the same authentication: the run's monitor key reads it, nobody else does
        status = await asyncio.to_thread(pervade, "status", "--broker", cluster.endpoint, "--json", "--keys", str(keys))
        assert status.returncode == 0, status.stderr
        assert sorted(w["worker_id"] for w in json.loads(status.stdout)["workers"]) == ["worker-0", "worker-1"]
        for who in ((), ("--keys", str(stranger))):
            refused = await asyncio.to_thread(pervade, "status", "--broker", cluster.endpoint, "--json", "--timeout", "2", *who)
            assert refused.returncode == 1 and "no answer from the broker" in refused.stderr and refused.stdout == ""

        # revoked while the broker runs: the same keys no longer get through (the directory's mtime changed,
        # so the broker reads it again at the next handshake)
        (keys / "authorized" / "producer.key").unlink()  # the producers' key only: workers and sink stay
        await cluster.start_producer(*claims, "--wait", "--timeout", "8", "--keys", str(keys), "--job-id", "after-revocation", name="revoked")
        assert await asyncio.wait_for(cluster.procs.children["revoked"].wait(), 60) == 1, cluster.procs.tail("revoked")
    finally:
        await cluster.stop()
    assert cluster.rows_written() == 8 * 4  # the holder's job only: nothing from the revoked producer
    assert [e["job_id"] for e in cluster.events("broker", "job_done")] != [] and not any(
        e.get("job_id") == "after-revocation" for e in cluster.events("broker", "job_done")
    )
    listening = cluster.events("broker", "broker_listening")
    assert listening and all(e["curve"] for e in listening)
    fetched = [e for w in ("worker-0", "worker-1") for e in cluster.events(w, "files_ready")]
    assert len(fetched) == 2 and sorted(e["peer_bytes"] > 0 for e in fetched) == [False, True], fetched


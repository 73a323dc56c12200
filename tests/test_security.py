"""CURVE with real processes: the run's key holders are served by the broker and by each other's file
service, nobody else is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import zmq
import zmq.asyncio

from pervade.context import ContextSpec
from pervade.jobs.cluster import LocalCluster
from pervade.keyadmin import add_key
from pervade.keys import ClientKeys, init_keys
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import load_templates
from pervade.protocol import (
    Assign,
    Batch,
    BatchResult,
    Claim,
    Completed,
    ContextLoaded,
    DeviceInfo,
    Heartbeat,
    LoadContext,
    Pull,
    StatusRequest,
    Submit,
    Verdict,
    WorkerReady,
)
from tests.conftest import Peer
from tests.waiting import wait_until


def pervade(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pervade", *args], capture_output=True, text=True, timeout=120, check=False
    )


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
        # the second, with a worker key of its own, gets the model files from the first over the keyed file
        # service: the broker names the first's public key, and the first admits the second's worker key
        node1 = add_key(keys, "worker", "node1").bundle
        assert node1 is not None
        for worker_keys in (keys, node1):
            await cluster.start_worker("--keys", str(worker_keys), "--device", "cpu", "--threads", "1")
        # no key, and a key the broker does not admit: the handshake fails, nothing reaches the broker
        await cluster.start_producer(*claims, "--wait", "--timeout", "8", name="no-key")
        await cluster.start_producer(*claims, "--wait", "--timeout", "8", "--keys", str(stranger), name="stranger")
        for name in ("no-key", "stranger"):
            assert await asyncio.wait_for(cluster.procs.children[name].wait(), 60) == 1, cluster.procs.tail(name)
        assert cluster.events("broker", "job_done") == [] and cluster.rows_written() == 0
        assert not any(e.get("kind") == "submit" for e in cluster.events("broker", "invalid_message"))

        # both workers registered before the work comes, so both get some (one batch per worker in turn) and
        # the second fetches the model from the first; one registering late found the queue taken
        await wait_until(lambda: len(cluster.events("broker", "worker_joined")) >= 2, 90, "both workers to register")
        await cluster.start_producer(*claims, "--wait", "--timeout", "60", "--keys", str(keys), name="holder")
        assert await asyncio.wait_for(cluster.procs.children["holder"].wait(), 90) == 0, cluster.procs.tail("holder")

        # the status view under the same authentication: the run's monitor key reads it, nobody else does
        status = await asyncio.to_thread(pervade, "status", "--broker", cluster.endpoint, "--json", "--keys", str(keys))
        assert status.returncode == 0, status.stderr
        shown = sorted((w["worker_id"], w["key"]) for w in json.loads(status.stdout)["workers"])
        assert shown == [("worker-0", "worker"), ("worker-1", "node1")]
        for who in ((), ("--keys", str(stranger))):
            refused = await asyncio.to_thread(
                pervade, "status", "--broker", cluster.endpoint, "--json", "--timeout", "2", *who
            )
            assert refused.returncode == 1 and "no answer from the broker" in refused.stderr and refused.stdout == ""

        # revoked while the broker runs: the same keys no longer get through (the directory's mtime changed,
        # so the broker reads it again at the next handshake)
        (keys / "authorized" / "producer" / "producer.key").unlink()  # the producers' key only: the rest stay
        await cluster.start_producer(
            *claims, "--wait", "--timeout", "8", "--keys", str(keys), "--job-id", "after-revocation", name="revoked"
        )
        assert await asyncio.wait_for(cluster.procs.children["revoked"].wait(), 60) == 1, cluster.procs.tail("revoked")
    finally:
        await cluster.stop()
    assert cluster.rows_written() == 8 * len(load_templates())  # the holder's job only: nothing from the revoked producer
    table = pq.read_table(cluster.out_dir).to_pydict()
    assert set(zip(table["worker_id"], table["worker_key"], strict=True)) <= {
        ("worker-0", "worker"),
        ("worker-1", "node1"),
    }
    assert [e["job_id"] for e in cluster.events("broker", "job_done")] != [] and not any(
        e.get("job_id") == "after-revocation" for e in cluster.events("broker", "job_done")
    )
    listening = cluster.events("broker", "broker_listening")
    assert listening and all(e["curve"] for e in listening)
    fetched = [e for w in ("worker-0", "worker-1") for e in cluster.events(w, "files_ready")]
    assert len(fetched) == 2 and sorted(e["peer_bytes"] > 0 for e in fetched) == [False, True], fetched


async def beat(peer: Peer) -> None:
    """A scripted peer's heartbeats, faster than the cluster's liveness."""
    while True:
        await peer.send(Heartbeat())
        await asyncio.sleep(0.2)


def made_up(b: Batch, worker_id: str) -> Completed:
    """A result no model computed: every claim refuted."""
    verdicts = [Verdict(claim_id=c.claim_id, verdict="REFUTES", scores=[0.0, 0.0, 1.0]) for c in b.claims]
    return Completed(result=BatchResult(
        batch_id=b.batch_id, job_id=b.job_id, context_id=b.context.context_id, model=b.context.model,
        template_id=b.template_id, worker_id=worker_id, device="cpu", submitted_at=b.submitted_at,
        started_at=time.time(), finished_at=time.time(), verdicts=verdicts, worker_key="worker",
    ))  # fmt: skip


async def test_a_key_acts_only_in_its_role_and_a_revoked_key_is_cut_off_mid_run(
    tmp_path: Path, tiny_model: Path
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    rogue_node = add_key(keys, "worker", "rogue-node")
    assert rogue_node.bundle is not None
    cluster = LocalCluster(tmp_path / "run")
    claims = ("--model", str(tiny_model), "--claims", str(sample_claims_path()), "--limit", "8", "--batch-size", "4")
    ctx = zmq.asyncio.Context()
    device = DeviceInfo(kind="cpu", name="cpu")
    peers: list[Peer] = []

    def connect(identity: bytes, keys: ClientKeys) -> Peer:
        peers.append(Peer(ctx, cluster.endpoint, identity, keys))
        return peers[-1]

    try:
        await cluster.start_broker("--keys", str(keys))
        await cluster.start_sink("--keys", str(keys))
        # a holder of a worker key of its own, which takes three batches and sits on them; it reconnected
        # once (the broker's descriptor for the new connection is likely the old one's number)
        scout = connect(b"scout", ClientKeys.load(rogue_node.bundle, "worker"))
        await scout.send(StatusRequest())
        await scout.receive()
        scout.close()
        await asyncio.sleep(0.3)
        rogue = connect(b"rogue", ClientKeys.load(rogue_node.bundle, "worker"))
        await rogue.send(WorkerReady(worker_id="rogue", host="h", pid=1, device=device))
        await rogue.send(Pull(credit=3))
        beating = asyncio.create_task(beat(rogue))
        # the producers' key posing as a worker, and the sink's key submitting: refused, whatever they send
        impostor = connect(b"impostor", ClientKeys.load(keys, "producer"))
        await impostor.send(WorkerReady(worker_id="impostor", host="h", pid=2, device=device))
        await impostor.send(Pull(credit=8))
        submitter = connect(b"submitter", ClientKeys.load(keys, "sink"))
        await submitter.send(Submit(batch=Batch(
            batch_id="forged/0", job_id="forged", context=ContextSpec(model=str(tiny_model)), template_id="t",
            template="{claim}", claims=[Claim(claim_id="c", text="a claim")], submitted_at=time.time(),
        )))  # fmt: skip
        assert [(await impostor.receive()).reason for _ in range(2)] == [
            "the producer key 'producer' may not send 'worker_ready'", "the producer key 'producer' may not send 'pull'"
        ]  # fmt: skip
        assert (await submitter.receive()).reason == "the sink key 'sink' may not send 'submit'"

        await cluster.start_producer(*claims, "--wait", "--timeout", "120", "--keys", str(keys), name="producer")
        held: list[Batch] = []
        while sum(len(b.members) or 1 for b in held) < 3:  # its credit: three batches, sliced or not
            message = await rogue.receive(timeout_s=60)
            if isinstance(message, LoadContext):
                await rogue.send(ContextLoaded(context_id=message.context.context_id, seconds=0.0))
            elif isinstance(message, Assign):
                held.append(message.batch)
        for b in held:  # the impostor answers the rogue's batches with made-up verdicts: refused
            await impostor.send(made_up(b, "impostor"))
        assert [(await impostor.receive()).reason for _ in held] == [
            "the producer key 'producer' may not send 'completed'"
        ] * len(held)

        worker = await cluster.start_worker("--keys", str(keys), "--device", "cpu", "--threads", "1")
        await wait_until(lambda: cluster.events(worker, "worker_started"), 60, "the worker to start")
        status = await asyncio.to_thread(pervade, "status", "--broker", cluster.endpoint, "--json", "--keys", str(keys))
        keys_shown = {w["worker_id"]: w["key"] for w in json.loads(status.stdout)["workers"]}
        assert keys_shown == {"rogue": "rogue-node", "worker-0": "worker"}, status.stdout

        # revoked mid-run: its connection is cut within 2 s, and its batches go to the real worker
        disconnects = rogue.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        revoked_at = time.monotonic()
        (keys / "authorized" / "worker" / "rogue-node.key").unlink()
        await asyncio.wait_for(disconnects.recv_multipart(), 5)
        cut_after_s = time.monotonic() - revoked_at
        beating.cancel()
        with contextlib.suppress(zmq.Again, asyncio.TimeoutError):  # nothing it sends now reaches the broker
            for b in held:
                await asyncio.wait_for(rogue.send(made_up(b, "rogue")), 1)
        assert await asyncio.wait_for(cluster.procs.children["producer"].wait(), 120) == 0, cluster.procs.tail(
            "producer"
        )
        disconnects.close()
    finally:
        for peer in peers:
            peer.close()
        await cluster.stop()
        ctx.destroy(linger=0)  # every socket, the monitor too: a failed wait must not hang the test
    assert cut_after_s < 2.0, cut_after_s
    [revocation] = cluster.events("broker", "key_revoked")
    assert revocation["key"] == "worker/rogue-node" and revocation["peers_dropped"] == 1
    assert revocation["connections_cut"] == 1
    [left] = [e for e in cluster.events("broker", "worker_left") if e["worker_id"] == "rogue"]
    # what the real worker had not already taken a copy of, idle while the rogue sat on its batches
    copied = cluster.broker_counters()["speculative_assignments"]
    assert left["reason"] == "its key worker/rogue-node was revoked" and left["requeued"] == len(held) - copied
    table = pq.read_table(cluster.out_dir).to_pydict()
    assert len(table["claim_id"]) == 8 * len(load_templates())  # every pair, once
    assert set(zip(table["worker_id"], table["worker_key"], strict=True)) == {("worker-0", "worker")}
    assert cluster.broker_counters()["role_refusals"] == 2 + 1 + len(held)

"""pervade across hosts: the cluster lab's namespaces, shaped links and shared file system (jobs/lab/cluster.py).

One lab for the module: a login host (broker, sink, producers), a storage host serving the model over sshfs
at 1 Gb/s, and three compute hosts. Every process is real and keyed (the broker listens on the login host's
address, not loopback). The tests:

0. the lab itself: the storage link's rate bounds a read of the shared file system, a second read crosses
   the link again (no page cache), a cut host reaches nobody until healed, delay shows in a round trip;
1. a job across hosts: every pair written once; the workers read one copy of the model from the shared file
   system, the rest from peers on other hosts, and the storage link carried it;
2. a partition: a compute host cut off longer than the heartbeat timeout mid-run, then healed: its batches
   go to the other worker, what it sends late changes nothing, it serves again, and the output is exact;
3. the broker's host cut off from everyone for 20 s, then healed: every client reconnects, output exact;
4. every link at 20 ms each way and 1% loss: the job completes, every pair exactly once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from pervade.context import make_context
from pervade.errors import PervadeError
from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.cluster import ClusterLab, LabConfig, LinkShape, why_not_here
from pervade.keys import init_keys
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.producer.templates import dump_templates, load_templates
from pervade.sinks.failures import read_failures
from pervade.sinks.summary import read_verdicts
from tests.waiting import wait_until

COMPUTE_HOSTS = 3
TEMPLATE = "direct"
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def lab() -> Iterator[ClusterLab]:
    reason = why_not_here()
    if reason is not None:
        pytest.skip(reason)
    lab = ClusterLab.start(LabConfig(compute_hosts=COMPUTE_HOSTS))
    try:
        yield lab
    finally:
        lab.stop()  # by pid; raises if a mount or a namespace is left behind


def export(lab: ClusterLab, model: Path, name: str) -> Path:
    """A model copied to the storage host's disk, as every other host sees it: on the shared file system."""
    exported = lab.export_dir / "models" / name
    shutil.copytree(model, exported)
    return lab.on_shared(exported)


@pytest.fixture(scope="module")
def shared_model(lab: ClusterLab, small_model: Path) -> Path:
    return export(lab, small_model, "small")


@pytest.fixture(scope="module")
def shared_tiny_model(lab: ClusterLab, tiny_model: Path) -> Path:
    """The tiny model (under 1 MB): TCP over a lossy 80 ms round trip moves about 200 KB/s, too slow for
    the small model's 17 MB in a test."""
    return export(lab, tiny_model, "tiny")


def keyed_cluster(base: Path, lab: ClusterLab, heartbeat_interval_s: float = 0.5) -> LocalCluster:
    keys = base / "keys"
    init_keys(keys)
    return LocalCluster(base, lab=lab, keys=keys, heartbeat_interval_s=heartbeat_interval_s)


def producer_args(base: Path, model: Path, claims: Path, limit: int, batch_size: int) -> tuple[str, ...]:
    templates = base / "templates.json"
    templates.write_text(dump_templates({TEMPLATE: load_templates()[TEMPLATE]}))
    return ("--model", str(model), "--claims", str(claims), "--limit", str(limit), "--templates", str(templates),
            "--batch-size", str(batch_size), "--wait", "--timeout", str(TIMEOUT_S))  # fmt: skip


async def start_workers(cluster: LocalCluster, count: int, *extra: str) -> list[str]:
    workers = [await cluster.start_worker("--device", "cpu", "--threads", "1", *extra) for _ in range(count)]
    await wait_until(lambda: len(cluster.serving_workers()) == count, TIMEOUT_S, f"{count} workers")
    return workers


async def finish(cluster: LocalCluster) -> None:
    code = await asyncio.wait_for(cluster.procs.children["producer"].wait(), TIMEOUT_S)
    assert code == 0, cluster.procs.tail("producer", 30)


def assert_exact(cluster: LocalCluster, claims: Path, limit: int) -> list[dict]:
    """Every (claim, template) pair exactly once, no failure recorded; the rows."""
    rows = read_verdicts(cluster.out_dir).to_pylist()
    pairs = Counter((row["claim_id"], row["template_id"]) for row in rows)
    doubled = [pair for pair, n in pairs.items() if n > 1]
    assert doubled == [], f"{len(doubled)} pairs written more than once, e.g. {doubled[:3]}"
    expected = {(claim.claim_id, TEMPLATE) for claim in read_claims(ClaimsSource(str(claims), limit=limit))}
    assert set(pairs) == expected, f"{len(expected - set(pairs))} pairs missing"
    assert read_failures(cluster.out_dir) == []
    return rows


def on_host(lab: ClusterLab, host: str, code: str, timeout_s: float = 60) -> str:
    """Run a Python snippet on a lab host; its stdout."""
    done = subprocess.run(lab.hosts[host].command(sys.executable, "-c", code), capture_output=True, text=True,
                          timeout=timeout_s, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CONNECT = """
import socket, time
deadline = time.monotonic() + {patience_s}
while True:  # the first answer's round trip, or "unreachable" once the patience is spent
    started = time.perf_counter()
    try:
        socket.create_connection(("{address}", 22), timeout=2).close()
        print(round((time.perf_counter() - started) * 1000, 2))
        break
    except OSError:
        if time.monotonic() > deadline:
            print("unreachable")
            break
"""


def connect_ms(lab: ClusterLab, host: str, patience_s: float = 10) -> str:
    """A TCP handshake from ``host`` to the storage host's sshd: its milliseconds, or "unreachable"."""
    return on_host(lab, host, CONNECT.format(address=lab.storage.address, patience_s=patience_s))


def test_the_lab_shapes_cuts_and_serves_files_over_the_network(lab: ClusterLab) -> None:
    blob = lab.export_dir / "blob"
    blob.write_bytes(os.urandom(40_000_000))
    read = f"import time; t = time.perf_counter(); open({str(lab.on_shared(blob))!r}, 'rb').read(); print(time.perf_counter() - t)"
    sent = lab.link_bytes("storage")["sent"]
    seconds = [float(on_host(lab, "compute-0", read)) for _ in range(2)]
    carried = lab.link_bytes("storage")["sent"] - sent
    assert carried >= 2 * 40_000_000, carried  # both reads crossed the storage link: nothing from a local cache
    rate = lab.config.storage_link.rate_mbit * 1e6 / 8
    assert min(seconds) >= 40_000_000 / rate * 0.9, seconds  # and no faster than the link allows

    assert connect_ms(lab, "compute-1") != "unreachable"
    lab.cut("compute-1")
    try:
        assert connect_ms(lab, "compute-1", patience_s=3) == "unreachable"
        assert connect_ms(lab, "compute-2") != "unreachable"  # only that host is cut off
    finally:
        lab.heal("compute-1")
    assert connect_ms(lab, "compute-1") != "unreachable"

    lab.shape("compute-2", LinkShape(delay_ms=10))
    try:
        # the SYN and its answer cross compute-2's link twice (10 ms each way); the storage link adds none
        assert 20 <= float(connect_ms(lab, "compute-2")) < 60
    finally:
        lab.shape("compute-2", lab.config.host_link)
    blob.unlink()


async def rows_at_least(cluster: LocalCluster, rows: int) -> None:
    await wait_until(lambda: cluster.rows_written() >= rows, TIMEOUT_S, f"{rows} rows written")


@pytest.mark.timeout(TIMEOUT_S + 60)
async def test_a_job_across_hosts_reads_the_shared_file_system_once(
    tmp_path: Path, lab: ClusterLab, shared_model: Path, fever_claims: Path
) -> None:
    manifest = make_context(str(lab.export_dir / "models" / "small")).manifest
    assert manifest is not None
    cluster = keyed_cluster(tmp_path, lab)
    storage_sent_before = lab.link_bytes("storage")["sent"]
    try:
        await cluster.start_broker()
        assert cluster.endpoint.startswith(f"tcp://{lab.login.address}:"), cluster.endpoint
        await cluster.start_sink()
        workers = await start_workers(cluster, COMPUTE_HOSTS)
        await cluster.start_producer(*producer_args(tmp_path, shared_model, fever_claims, 48, 4))
        await finish(cluster)
    finally:
        await cluster.stop()
    assert_exact(cluster, fever_claims, 48)

    ready = {worker: cluster.events(worker, "files_ready")[-1] for worker in workers}
    assert sorted(r["origin_bytes"] for r in ready.values()) == [0, 0, manifest.total_bytes], ready
    assert sorted(r["peer_bytes"] for r in ready.values()) == [0, manifest.total_bytes, manifest.total_bytes], ready
    for worker, files in ready.items():
        own = cluster.worker_hosts[worker].address
        peers = {endpoint.split("//")[1].rsplit(":", 1)[0] for endpoint in files["by_peer"]}
        assert own not in peers, (worker, files["by_peer"])  # bytes came over the network, from another host
        assert peers <= {host.address for host in lab.compute}, files["by_peer"]
    # the storage link carried the model to the producer (it hashes the files into a manifest) and to the one
    # worker that read the origin: two copies, plus the file system's own traffic, never one per worker
    storage_sent = lab.link_bytes("storage")["sent"] - storage_sent_before
    assert 2 * manifest.total_bytes <= storage_sent < 2.5 * manifest.total_bytes, storage_sent


@pytest.mark.timeout(TIMEOUT_S + 60)
async def test_a_partitioned_host_loses_its_batches_then_serves_again(
    tmp_path: Path, lab: ClusterLab, shared_model: Path, fever_claims: Path
) -> None:
    claims = 3000  # long enough to outlast the cut, the heal and the worker's reconnection backoff (1, 2, 4 s)
    cluster = keyed_cluster(tmp_path, lab)  # heartbeats every 0.5 s, dead after 1.5 s of silence
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        other_worker, cut_worker = await start_workers(cluster, 2)
        cut_host = cluster.worker_hosts[cut_worker].name
        await cluster.start_producer(*producer_args(tmp_path, shared_model, fever_claims, claims, 8))
        await rows_at_least(cluster, claims // 10)
        lab.cut(cut_host)
        await wait_until(lambda: died(cluster, cut_worker), 30, f"the broker did not declare {cut_worker} dead")
        await asyncio.sleep(3)  # the cut lasts well past the timeout: its batches go to the other worker
        lab.heal(cut_host)
        healed_at = time.time()
        await wait_until(lambda: joins(cluster, cut_worker) >= 2, 30, f"{cut_worker} did not register again")
        # the rest of the run is the healed worker's alone: the other one hands its queued batches back
        await cluster.procs.stop([other_worker])
        await finish(cluster)
    finally:
        await cluster.stop()
    rows = assert_exact(cluster, fever_claims, claims)
    counters = cluster.broker_counters()
    assert counters["requeues"] >= 1, counters  # what the cut worker held went back to the queue
    assert counters["batches_failed"] == 0, counters
    after_heal = [row for row in rows if row["worker_id"] == cut_worker and row["started_at"].timestamp() > healed_at]
    assert after_heal, f"{cut_worker} wrote nothing after its host was healed"
    # whatever it finished during the cut reached the broker late, and was taken once at most: no pair is
    # doubled (assert_exact)
    assert cluster.events(cut_worker, "broker_connected")[-1]["generation"] >= 2  # it re-registered


def died(cluster: LocalCluster, worker: str) -> bool:
    return any(event["worker_id"] == worker for event in cluster.events("broker", "worker_declared_dead"))


def joins(cluster: LocalCluster, worker: str) -> int:
    return sum(event["worker_id"] == worker for event in cluster.events("broker", "worker_joined"))


@pytest.mark.timeout(TIMEOUT_S + 60)
async def test_the_broker_cut_off_for_20_seconds_loses_nothing(
    tmp_path: Path, lab: ClusterLab, shared_model: Path, fever_claims: Path
) -> None:
    claims = 800
    cluster = keyed_cluster(tmp_path, lab)
    try:
        await cluster.start_broker()
        await cluster.start_sink("--roll-seconds", "0.5")
        workers = await start_workers(cluster, 2)
        await cluster.start_producer(*producer_args(tmp_path, shared_model, fever_claims, claims, 8))
        await rows_at_least(cluster, claims // 10)
        lab.cut("login")  # the broker, the sink and the producer: everyone's peer is gone
        await asyncio.sleep(20)
        lab.heal("login")
        await finish(cluster)
    finally:
        await cluster.stop()
    assert_exact(cluster, fever_claims, claims)
    for client in workers:  # the workers lost the broker, and found it again
        assert cluster.events(client, "broker_reconnecting"), client
        assert cluster.events(client, "broker_connected")[-1]["generation"] >= 2, client


@pytest.mark.timeout(TIMEOUT_S + 60)
async def test_slow_lossy_links_complete_the_job_exactly_once(
    tmp_path: Path, lab: ClusterLab, shared_tiny_model: Path, fever_claims: Path
) -> None:
    claims = 96
    slow = LinkShape(rate_mbit=1_000, delay_ms=20, loss_pct=1)
    for host in lab.hosts:
        lab.shape(host, slow)
    cluster = keyed_cluster(tmp_path, lab)
    try:
        await cluster.start_broker()
        await cluster.start_sink()
        await start_workers(cluster, 2)
        await cluster.start_producer(*producer_args(tmp_path, shared_tiny_model, fever_claims, claims, 4))
        await finish(cluster)
    finally:
        await cluster.stop()
        for host in lab.hosts:
            lab.shape(host, lab.config.storage_link if host == "storage" else lab.config.host_link)
    assert_exact(cluster, fever_claims, claims)


def test_the_delayer_reads_packet_ids_and_accepts_through_the_last() -> None:
    """netdelay's netlink framing, without a socket: two packet announcements in one datagram (with an attribute
    before the header, as the kernel may order them), an acknowledgement, and an error that must not pass."""
    from pervade.jobs.lab import netdelay

    def announcement(packet_id: int) -> bytes:
        attributes = netdelay._attribute(9, b"\x00\x00\x00\x05") + netdelay._attribute(
            netdelay.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3)
        )
        message = netdelay._message(netdelay.NFQNL_MSG_PACKET, 0, attributes)
        return message

    ack = netdelay.NLMSG_HDR.pack(36, netdelay.NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", 0) + bytes(16)
    assert netdelay.packet_ids(announcement(7) + announcement(8) + ack) == [7, 8]
    refusal = netdelay.NLMSG_HDR.pack(36, netdelay.NLMSG_ERROR, 0, 0, 0) + struct.pack("=i", -16) + bytes(16)
    with pytest.raises(OSError, match="refused"):
        netdelay.packet_ids(refusal)

    sent: list[bytes] = []

    class Recorder:
        def send(self, data: bytes) -> None:
            sent.append(data)

    netdelay.accept_through(Recorder(), 3, 41)  # type: ignore[arg-type]
    length, kind, _flags, _seq, _pid = netdelay.NLMSG_HDR.unpack_from(sent[0])
    assert length == len(sent[0]) and kind == (netdelay.NFNL_SUBSYS_QUEUE << 8) | netdelay.NFQNL_MSG_VERDICT_BATCH
    assert struct.unpack_from("!H", sent[0], 18)[0] == 3  # the queue, in the nfgenmsg
    assert struct.unpack_from("!II", sent[0], 24) == (netdelay.NF_ACCEPT, 41)  # the verdict header attribute


def test_a_lab_refuses_shapes_and_sizes_it_cannot_build() -> None:
    for bad in (LinkShape(rate_mbit=0), LinkShape(delay_ms=-1), LinkShape(loss_pct=100)):
        with pytest.raises(PervadeError, match="a link's"):
            bad.check()
    with pytest.raises(PervadeError, match="1 to 200 compute hosts"):
        LabConfig(compute_hosts=0)

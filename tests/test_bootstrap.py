"""Bootstrap with real processes: workers joining a run get a 110 MB model from each other, not the origin.

One cluster on loopback (broker, sink, workers each with a node cache of its own, producers), in phases:

1. Three workers join at once: exactly one reads the origin, the other two fetch every byte from peers.
2. A request for a path outside the manifest is refused by a live worker's file service.
3. A fourth worker fetches slowly (tiny chunks) from the three; one source is SIGKILLed mid-transfer. The
   download goes on from the others, keeping what it had, and the origin is never read.
4. A byte is flipped in a source's cached weights, and the other sources leave. A fifth worker fetching
   from it detects the bad piece, refuses that peer, and gets the rest from the origin. Its files are right.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from pervade.context import make_context
from pervade.jobs.cluster import LocalCluster
from pervade.manifest import Manifest
from pervade.protocol import ChunkData, FetchChunk, FetchRefused, decode_peer, encode
from tests.waiting import wait_until

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers.utils import logging as hf_logging

    from pervade.tinymodel import build_tiny_model

    hf_logging.disable_progress_bar()
    return build_tiny_model(tmp_path_factory.mktemp("medium") / "model", size="medium")


async def until(condition: Callable[[], object], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Watch the processes' logs (they are other processes: there is no event to await)."""
    await wait_until(condition, timeout_s, f"waiting for {what}")


def files_ready(cluster: LocalCluster, worker: str) -> dict:
    events = cluster.events(worker, "files_ready")
    return events[-1] if events else {}


def file_endpoint(cluster: LocalCluster, worker: str) -> str:
    return cluster.events(worker, "worker_started")[0]["file_endpoint"]


def cached_weights(cluster: LocalCluster, worker: str, manifest: Manifest) -> Path:
    return cluster.cache_dir(worker) / "blobs" / manifest.by_path()["model.safetensors"].blob_name


def assert_cache_matches(cluster: LocalCluster, worker: str, manifest: Manifest) -> None:
    view = cluster.cache_dir(worker) / "views" / manifest.digest
    for entry in manifest.files:
        assert hashlib.sha256((view / entry.path).read_bytes()).digest() == entry.sha256, f"{worker}: {entry.path}"


async def produce(cluster: LocalCluster, model: Path, claims: Path, limit: int, name: str) -> None:
    templates = cluster.base / "templates.json"
    templates.write_text('{"direct": "Claim: {claim}\\nIs this claim true? Answer:"}')
    await cluster.start_producer("--claims", str(claims), "--model", str(model), "--limit", str(limit),
                                 "--batch-size", "4", "--templates", str(templates), "--wait", name=name)  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_workers_bootstrap_from_peers(tmp_path: Path, medium_model: Path, fever_claims: Path) -> None:
    manifest = make_context(str(medium_model)).manifest
    assert manifest is not None and manifest.total_bytes >= 100_000_000
    total = manifest.total_bytes
    cluster = LocalCluster(tmp_path)
    try:
        await cluster.start_broker()
        await cluster.start_sink()
        for _ in range(3):
            await cluster.start_worker("--device", "cpu", "--threads", "1")
        await until(lambda: len(cluster.serving_workers()) == 3, "three workers")

        # 1. three workers at once: one origin read in all
        await produce(cluster, medium_model, fever_claims, 24, "producer-1")
        assert await cluster.procs.children["producer-1"].wait() == 0, cluster.procs.tail("producer-1")
        ready = {w: files_ready(cluster, w) for w in ("worker-0", "worker-1", "worker-2")}
        assert sorted(r["origin_bytes"] for r in ready.values()) == [0, 0, total], ready
        assert sorted(r["peer_bytes"] for r in ready.values()) == [0, total, total], ready
        for worker in ready:
            assert_cache_matches(cluster, worker, manifest)

        # 2. only files listed in a manifest are served
        ctx = zmq.asyncio.Context()
        probe = ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(file_endpoint(cluster, "worker-0"))
        for path, expect_data in (("../../../../etc/passwd", False), ("config.json", True)):
            await probe.send_multipart(encode(FetchChunk(files=manifest.digest, path=path, offset=0, length=64)))
            assert await probe.poll(10_000)
            reply, data = decode_peer(await probe.recv_multipart())
            if expect_data:
                assert isinstance(reply, ChunkData) and data == (medium_model / "config.json").read_bytes()[:64]
            else:
                assert isinstance(reply, FetchRefused) and reply.reason == "path not in the manifest"
        probe.close()
        ctx.term()

        # 3. a source SIGKILLed mid-transfer: the download continues from the others
        slow = await cluster.start_worker("--device", "cpu", "--threads", "1", "--chunk-kib", "4", "--credit", "1", "--peer-timeout", "2")
        await until(lambda: slow in cluster.serving_workers(), slow)
        await produce(cluster, medium_model, fever_claims, 80, "producer-2")  # more than the warm workers hold
        partial_dir = cluster.cache_dir(slow) / "partial"

        def weights_half_there() -> bool:
            parts = [p for p in partial_dir.glob("*.part") if p.stat().st_size == manifest.by_path()["model.safetensors"].size]
            return any(p.stat().st_blocks * 512 > 40_000_000 for p in parts)

        await until(weights_half_there, "40 MB of the weights on the slow worker")
        victim_endpoint = file_endpoint(cluster, "worker-0")
        await cluster.procs.kill("worker-0", signal.SIGKILL)
        await until(lambda: files_ready(cluster, slow), f"{slow} to hold the files")
        slow_ready = files_ready(cluster, slow)
        assert slow_ready["origin_bytes"] == 0 and slow_ready["peer_bytes"] == total, slow_ready
        assert slow_ready["peers_failed"] >= 1 and 0 < slow_ready["by_peer"].get(victim_endpoint, 0) < total, slow_ready
        assert_cache_matches(cluster, slow, manifest)
        assert await cluster.procs.children["producer-2"].wait() == 0, cluster.procs.tail("producer-2")

        # 4. a flipped byte in a source's cache is caught, and that source is not trusted again
        weights = cached_weights(cluster, "worker-1", manifest)
        corrupted = bytearray(weights.read_bytes())
        corrupted[len(corrupted) // 2] ^= 0x40
        weights.write_bytes(corrupted)
        for leaving in ("worker-2", slow):
            assert await cluster.procs.kill(leaving, signal.SIGTERM) == 0
        checker = await cluster.start_worker("--device", "cpu", "--threads", "1")
        await until(lambda: checker in cluster.serving_workers(), checker)
        await produce(cluster, medium_model, fever_claims, 40, "producer-3")
        await until(lambda: files_ready(cluster, checker), f"{checker} to hold the files")
        checked = files_ready(cluster, checker)
        assert checked["corrupt_pieces"] == 1 and checked["peers_failed"] == 1, checked
        assert checked["origin_bytes"] == manifest.piece_size, checked  # the one bad piece, from the origin
        assert checked["peer_bytes"] == total - manifest.piece_size, checked
        assert_cache_matches(cluster, checker, manifest)
        assert await cluster.procs.children["producer-3"].wait() == 0, cluster.procs.tail("producer-3")
    finally:
        await cluster.stop()

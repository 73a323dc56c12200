"""Model files as content: manifests, the node cache, the broker's source map, and the peer file service
with real sockets and real files (the process-level bootstrap test is tests/test_bootstrap.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.broker.sources import FileSources
from pervade.context import ContextSpec
from pervade.errors import ConfigError
from pervade.gpuworker.cache import FileCache, default_cache_root
from pervade.gpuworker.fetch import Fetcher, TransferConfig
from pervade.gpuworker.fileserver import FileServer, FileServiceConfig
from pervade.keys import ClientKeys, PeerAdmission, init_keys
from pervade.manifest import Manifest, build_manifest, check_relative_path
from pervade.protocol import ChunkData, FetchChunk, FetchRefused, Sources, decode_peer, encode

PIECE = 64 * 1024


def write_model_dir(path: Path, sizes: dict[str, int], seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(hashlib.shake_256(f"{seed}-{i}".encode()).digest(size) if size else b"")
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model_dir(tmp_path / "model", {"config.json": 300, "model.safetensors": 5 * PIECE + 123, "sub/tok.json": 0})


@pytest.fixture
def manifest(model_dir: Path) -> Manifest:
    return build_manifest(model_dir, piece_size=PIECE)


# --- manifests ------------------------------------------------------------------------------------


def test_manifest_lists_files_with_piece_hashes(model_dir: Path, manifest: Manifest) -> None:
    by_path = manifest.by_path()
    assert list(by_path) == ["config.json", "model.safetensors", "sub/tok.json"]
    weights = by_path["model.safetensors"]
    data = (model_dir / "model.safetensors").read_bytes()
    assert weights.size == len(data) and weights.sha256 == hashlib.sha256(data).digest()
    assert len(weights.pieces) == 6 and weights.pieces[5] == hashlib.sha256(data[5 * PIECE :]).digest()
    assert manifest.total_bytes == 300 + 5 * PIECE + 123


def test_manifest_digest_is_content_not_location(tmp_path: Path, model_dir: Path, manifest: Manifest) -> None:
    copy = write_model_dir(tmp_path / "elsewhere", {"config.json": 300, "model.safetensors": 5 * PIECE + 123, "sub/tok.json": 0})
    (copy / ".git").mkdir()
    (copy / ".git" / "HEAD").write_text("ignored")
    (copy / "README.md").write_text("ignored")
    assert build_manifest(copy, piece_size=PIECE).digest == manifest.digest
    (copy / "config.json").write_bytes(b"x" * 300)
    assert build_manifest(copy, piece_size=PIECE).digest != manifest.digest


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../b", "a//b", "./a", ".hidden", "a\\b", ""])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ConfigError, match="unsafe path"):
        check_relative_path(path)


def test_context_id_derives_from_the_manifest(manifest: Manifest) -> None:
    a = ContextSpec(model="/shared/models/x", files=manifest.digest)
    b = ContextSpec(model="/scratch/copy-of-x", revision="main", files=manifest.digest)
    assert a.context_id == b.context_id
    assert ContextSpec(model="/shared/models/x", files=manifest.digest, dtype="bfloat16").context_id != a.context_id


# --- node cache -----------------------------------------------------------------------------------


def test_default_cache_root_prefers_the_batch_systems_scratch() -> None:
    assert default_cache_root({"SLURM_TMPDIR": "/s", "TMPDIR": "/t"}) == Path("/s/pervade-files")
    assert default_cache_root({"_CONDOR_SCRATCH_DIR": "/c", "TMPDIR": "/t"}) == Path("/c/pervade-files")
    assert default_cache_root({"TMPDIR": "/t"}) == Path("/t/pervade-files")
    assert default_cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/pervade/files")


def fill(cache: FileCache, source: Path, manifest: Manifest) -> Path:
    """Put ``manifest``'s files in ``cache`` the way a fetch does: verified partials renamed into place."""
    for entry in cache.missing(manifest):
        partial = cache.partial_path(entry)
        partial.write_bytes((source / entry.path).read_bytes())
        cache.commit_blob(entry, partial)
    return cache.complete(manifest)


def test_cache_lays_out_a_loadable_directory(tmp_path: Path, model_dir: Path, manifest: Manifest) -> None:
    cache = FileCache(tmp_path / "cache")
    assert cache.manifest(manifest.digest) is None and len(cache.missing(manifest)) == 3
    view = fill(cache, model_dir, manifest)
    assert (view / "sub" / "tok.json").read_bytes() == b""
    assert (view / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert cache.missing(manifest) == [] and cache.complete_digests() == [manifest.digest]
    # another worker process of the node sees it too
    assert FileCache(tmp_path / "cache").manifest(manifest.digest) == manifest


def test_cache_evicts_least_recently_used_and_spares_pinned(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "cache", limit_bytes=3 * PIECE)
    dirs = [write_model_dir(tmp_path / f"m{i}", {"w.bin": PIECE, "shared.json": 100}, seed=i) for i in range(3)]
    for d in dirs:  # shared.json differs per seed; make one truly shared blob
        (d / "shared.json").write_text("same tokenizer")
    manifests = [build_manifest(d, piece_size=PIECE) for d in dirs]
    for d, m in zip(dirs[:2], manifests[:2], strict=True):
        fill(cache, d, m)
    os.utime(cache.root / "manifests" / f"{manifests[0].digest}.json", (1, 1))  # m0 is the oldest
    cache.pin(manifests[0])
    # m2 needs PIECE more: m0 is oldest but pinned, so m1 goes; the shared blob stays (m0 and m2 use it)
    assert cache.make_room(manifests[2]) == [manifests[1].digest]
    assert cache.manifest(manifests[1].digest) is None and cache.manifest(manifests[0].digest) is not None
    assert (cache.root / "blobs" / manifests[0].by_path()["shared.json"].blob_name).exists()
    assert not (cache.root / "blobs" / manifests[1].by_path()["w.bin"].blob_name).exists()
    cache.unpin(manifests[0].digest)
    fill(cache, dirs[2], manifests[2])
    assert cache.make_room(manifests[1]) == [manifests[0].digest]  # unpinned now, and least recently used


def test_eviction_spares_the_blobs_of_a_download_in_progress(tmp_path: Path) -> None:
    """Another worker of the node evicts while this one is mid-download: committed blobs of a pinned
    manifest (not complete yet, so not in manifests/) survive the garbage collection."""
    old_dir = write_model_dir(tmp_path / "old", {"w.bin": 2 * PIECE}, seed=1)
    new_dir = write_model_dir(tmp_path / "new", {"a.bin": PIECE, "b.bin": PIECE}, seed=2)
    third_dir = write_model_dir(tmp_path / "third", {"c.bin": 2 * PIECE}, seed=3)
    old, new, third = (build_manifest(d, piece_size=PIECE) for d in (old_dir, new_dir, third_dir))
    downloading = FileCache(tmp_path / "cache", limit_bytes=4 * PIECE)
    fill(downloading, old_dir, old)
    downloading.pin(new)
    first = new.by_path()["a.bin"]
    partial = downloading.partial_path(first)
    partial.write_bytes((new_dir / "a.bin").read_bytes())
    downloading.commit_blob(first, partial)  # half of "new" is in, not complete
    evicting = FileCache(tmp_path / "cache", limit_bytes=4 * PIECE)  # another process of the node
    assert evicting.make_room(third) == [old.digest]
    assert downloading.has_blob(first), "a pinned download lost a blob it had already fetched"
    assert not downloading.has_blob(old.by_path()["w.bin"])


def test_partials_of_dead_workers_are_removed_at_start(tmp_path: Path) -> None:
    cache = FileCache(tmp_path / "cache")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (cache.root / "partial" / f"{'ab' * 32}.{dead}.0000.part").write_bytes(b"x")
    (cache.root / "partial" / f"hub.{dead}.0000").mkdir()
    (cache.root / "partial" / f"hub.{dead}.0000" / "f").write_bytes(b"x")
    live = cache.root / "partial" / f"{'cd' * 32}.1.0000.part"  # pid 1 is alive
    live.write_bytes(b"x")
    cache.clean_partials()
    assert list((cache.root / "partial").iterdir()) == [live]


# --- the broker's map of sources ------------------------------------------------------------------

DIGEST = "a" * 64


def test_one_origin_reader_then_every_finished_download_becomes_a_source() -> None:
    files = FileSources(max_uploads_per_peer=1, max_sources=4)
    assert files.find(b"w0", DIGEST, []) == Sources(files=DIGEST, origin=True)
    assert files.find(b"w1", DIGEST, []) is None  # w0 reads the origin: wait for it
    assert files.find(b"w2", DIGEST, []) is None
    woken = files.held(b"w0", "tcp://w0", [DIGEST])
    assert woken == [(b"w1", Sources(files=DIGEST, peers=["tcp://w0"]))]  # one upload slot: w2 still waits
    # w1 is done: its slot on w0 is free and it is a source itself, so w2 fetches from both
    assert files.held(b"w1", "tcp://w1", [DIGEST]) == [(b"w2", Sources(files=DIGEST, peers=["tcp://w0", "tcp://w1"]))]
    assert files.find(b"w3", DIGEST, []) is None  # both sources at their bound
    assert files.held(b"w2", "tcp://w2", [DIGEST]) == [(b"w3", Sources(files=DIGEST, peers=["tcp://w0", "tcp://w1", "tcp://w2"]))]


def test_sources_skip_excluded_and_retired_and_origin_passes_on_death() -> None:
    files = FileSources()
    files.find(b"w0", DIGEST, [])
    assert files.find(b"w1", DIGEST, []) is None
    assert files.forget(b"w0") == [(b"w1", Sources(files=DIGEST, origin=True))]  # the origin reader died
    files.held(b"w1", "tcp://w1", [DIGEST])
    files.held(b"w2", "tcp://w2", [DIGEST])
    assert files.find(b"w3", DIGEST, ["tcp://w1"]) == Sources(files=DIGEST, peers=["tcp://w2"])
    files.retire(b"w2")
    assert files.find(b"w3", DIGEST, ["tcp://w1"]) == Sources(files=DIGEST, origin=True)
    files.dropped(b"w1", [DIGEST])
    assert files.find(b"w4", DIGEST, []) is None  # w3 reads the origin now
    # w3's read fails (the origin changed, an I/O error) but w3 lives on: w4 takes over
    assert files.abandon(b"w3", DIGEST) == [(b"w4", Sources(files=DIGEST, origin=True))]


# --- the peer file service, over real sockets ---------------------------------------------------


@pytest_asyncio.fixture
async def serving(tmp_path: Path, model_dir: Path, manifest: Manifest) -> AsyncIterator[Callable[..., FileServer]]:
    """Start file servers over caches filled from ``model_dir``; stops them after the test."""
    ctx = zmq.asyncio.Context()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start(name: str, max_uploads: int = 4) -> FileServer:
        cache = FileCache(tmp_path / name)
        fill(cache, model_dir, manifest)
        server = FileServer(ctx, cache, FileServiceConfig(bind_host="127.0.0.1", max_uploads=max_uploads), "127.0.0.1")
        server.start()
        tasks.append(asyncio.create_task(server.serve(stop)))
        return server

    yield start
    stop.set()
    await asyncio.gather(*tasks)
    ctx.term()


class Probe:
    """A downloader speaking to a file server by hand: one DEALER for all its requests. (A new socket per
    request under the same identity races the ROUTER, which refuses an identity still connected.)"""

    def __init__(self, endpoint: str, identity: bytes, keys: ClientKeys | None = None) -> None:
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        if keys is not None:
            keys.apply(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(endpoint)

    async def ask(self, request: FetchChunk, timeout_ms: int = 5000) -> tuple[object, bytes | None]:
        await self.sock.send_multipart(encode(request))
        assert await self.sock.poll(timeout_ms), "no answer from the file server"
        return decode_peer(await self.sock.recv_multipart())

    async def answered(self, request: FetchChunk) -> bool:
        """Whether the server answers at all within 1.5 s. After a refused CURVE handshake the socket has no
        pipe left to send on (zmq.Again) or the request goes unanswered: either way, never served."""
        try:
            await self.sock.send_multipart(encode(request), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return bool(await self.sock.poll(1500))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.asyncio
async def test_server_serves_only_files_in_its_manifests(serving, model_dir: Path, manifest: Manifest) -> None:
    server = serving("a", max_uploads=1)
    digest = manifest.digest
    probe, other = Probe(server.endpoint, b"probe"), Probe(server.endpoint, b"other")
    try:
        reply, data = await probe.ask(FetchChunk(files=digest, path="model.safetensors", offset=PIECE, length=1000))
        assert isinstance(reply, ChunkData) and data == (model_dir / "model.safetensors").read_bytes()[PIECE : PIECE + 1000]
        for path in ("../../../etc/passwd", "/etc/passwd", "model.safetensors/../config.json", "missing.bin"):
            reply, data = await probe.ask(FetchChunk(files=digest, path=path, offset=0, length=10))
            assert isinstance(reply, FetchRefused) and reply.reason == "path not in the manifest" and data is None
        reply, _ = await probe.ask(FetchChunk(files="b" * 64, path="config.json", offset=0, length=10))
        assert isinstance(reply, FetchRefused) and "does not hold" in reply.reason
        reply, _ = await probe.ask(FetchChunk(files=digest, path="config.json", offset=300, length=10))
        assert isinstance(reply, FetchRefused) and "out of range" in reply.reason
        # the upload bound: "probe" counts as a downloader for a few seconds, a second one is told busy
        reply, _ = await other.ask(FetchChunk(files=digest, path="config.json", offset=0, length=10))
        assert isinstance(reply, FetchRefused) and reply.busy
    finally:
        probe.close()
        other.close()
    assert server.refused >= 6


async def test_a_keyed_file_service_serves_only_the_runs_key_holders(tmp_path: Path, model_dir: Path, manifest: Manifest) -> None:
    init_keys(tmp_path / "keys")
    run_keys = ClientKeys.load(tmp_path / "keys", "worker")
    init_keys(tmp_path / "other")
    stranger = ClientKeys.load(tmp_path / "other", "worker")
    ctx = zmq.asyncio.Context()
    auth = AsyncioAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback("*", credentials_provider=PeerAdmission(run_keys))
    cache = FileCache(tmp_path / "cache")
    fill(cache, model_dir, manifest)
    server = FileServer(ctx, cache, FileServiceConfig(bind_host="127.0.0.1"), "127.0.0.1", keys=run_keys)
    server.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    request = FetchChunk(files=manifest.digest, path="config.json", offset=0, length=10)
    probes = {
        "peer": Probe(server.endpoint, b"peer", run_keys.for_peers()),
        "plain": Probe(server.endpoint, b"plain"),
        "stranger": Probe(server.endpoint, b"stranger", ClientKeys(stranger.public, stranger.secret, server_public=run_keys.public)),
        "wrong-server-key": Probe(server.endpoint, b"wrong", run_keys),  # trusts the broker's key, not the peer's
    }
    try:
        reply, data = await probes["peer"].ask(request)
        assert isinstance(reply, ChunkData) and data == (model_dir / "config.json").read_bytes()[:10]
        for name in ("plain", "stranger", "wrong-server-key"):
            assert not await probes[name].answered(request), f"the {name} downloader was served"
    finally:
        for probe in probes.values():
            probe.close()
        stop.set()
        await serving
        auth.stop()
        ctx.term()


def sources_in_turn(*answers: Sources) -> tuple[Callable, list[list[str]]]:
    """A find_sources that gives ``answers`` one after the other and records what was excluded."""
    asked: list[list[str]] = []

    async def find_sources(digest: str, exclude: list[str]) -> Sources:
        asked.append(list(exclude))
        return answers[min(len(asked) - 1, len(answers) - 1)]

    return find_sources, asked


def blob_digests(view: Path) -> dict[str, bytes]:
    return {p.relative_to(view).as_posix(): hashlib.sha256(p.read_bytes()).digest() for p in view.rglob("*") if p.is_file()}


@pytest.mark.asyncio
async def test_fetch_from_two_peers_detects_a_flipped_byte(tmp_path: Path, serving, manifest: Manifest) -> None:
    good, bad = serving("good"), serving("bad")
    weights = manifest.by_path()["model.safetensors"]
    blob = bad.cache.blob_path(weights)
    corrupted = bytearray(blob.read_bytes())
    for piece in range(len(weights.pieces)):  # one byte flipped in every piece of the weights
        corrupted[piece * PIECE + 7] ^= 0x01
    blob.write_bytes(corrupted)
    find_sources, _ = sources_in_turn(
        Sources(files=manifest.digest, peers=[bad.endpoint, good.endpoint]), Sources(files=manifest.digest, peers=[good.endpoint])
    )
    ctx = zmq.asyncio.Context()
    fetcher = Fetcher(ctx, FileCache(tmp_path / "fetcher"), TransferConfig(chunk_bytes=16 * 1024, credit=2), find_sources)
    view, stats = await fetcher.fetch(ContextSpec(model=str(tmp_path / "model"), files=manifest.digest), manifest)
    ctx.term()
    assert stats.corrupt_pieces >= 1 and stats.peers_failed == 1 and stats.origin_bytes == 0
    assert stats.peer_bytes == manifest.total_bytes and stats.by_peer[good.endpoint] > 0
    assert blob_digests(view) == {e.path: e.sha256 for e in manifest.files}
    # every verified byte of the weights came from the good peer: none of the bad one's pieces got in
    assert stats.by_peer[bad.endpoint] <= manifest.total_bytes - weights.size


@pytest.mark.asyncio
async def test_fetch_resumes_from_the_origin_when_the_peer_goes_silent(tmp_path: Path, model_dir: Path, manifest: Manifest) -> None:
    """A peer that accepts the connection and never answers (frozen, or a dead node's port) is given up
    after the timeout, and the files come from the origin."""
    ctx = zmq.asyncio.Context()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    find_sources, asked = sources_in_turn(Sources(files=manifest.digest, peers=[endpoint]), Sources(files=manifest.digest, origin=True))
    fetcher = Fetcher(ctx, FileCache(tmp_path / "f"), TransferConfig(peer_timeout_s=0.5), find_sources)
    view, stats = await fetcher.fetch(ContextSpec(model=str(model_dir), files=manifest.digest), manifest)
    silent.close(linger=0)
    ctx.term()
    assert asked == [[], [endpoint]]
    assert stats.origin_bytes == manifest.total_bytes and stats.peer_bytes == 0 and stats.peers_failed == 1
    assert blob_digests(view) == {e.path: e.sha256 for e in manifest.files}
    assert list((tmp_path / "f" / "partial").iterdir()) == []  # nothing half-written left behind

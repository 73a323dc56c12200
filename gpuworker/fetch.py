"""Bootstrap: get a context's files into the node cache, from peers when any hold them, else from the origin.

``Fetcher.fetch`` asks the broker who holds the files (``FindSources``) and pulls pieces from every peer it
names at once: each peer has its own DEALER and its own window of ``credit`` chunk requests in flight (the
zguide's credit-based flow control), and takes the next piece from a shared queue as it finishes one, so a
fast peer serves more. Every piece is checked against the manifest's hash before it is written; a bad piece
goes back to the queue, to be fetched from someone else, and a peer that sends two bad pieces is dropped.
A peer that goes silent for ``peer_timeout_s`` or refuses (busy, evicted) is dropped too and its pieces
return to the queue: the download resumes from other peers, keeping every piece already verified. When no
peer is left the fetcher asks the broker again, naming the peers that failed it; the broker then names
others, or tells the worker to read the origin (a local path, the shared file system, or the hub).

Nothing here blocks the event loop: hashing, writing and origin reads run on threads.
"""

from __future__ import annotations

import asyncio
import enum
import os
import shutil
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog
import zmq
import zmq.asyncio

from pervade.context import ContextSpec
from pervade.errors import ContextLoadError, ProtocolError
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.download import Download, PieceKey
from pervade.gpuworker.fileserver import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from pervade.keys import ClientKeys
from pervade.manifest import Manifest
from pervade.options import FILES_SECTION, POSITIVE, OptionError, at_least, check_options, option
from pervade.protocol import ChunkData, FetchChunk, FetchRefused, Sources, decode_peer, encode
from pervade.transport import peer_socket

log = structlog.get_logger(__name__)

FindSources = Callable[[str, list[str]], Awaitable[Sources]]


class PeerOutcome(enum.Enum):
    """How a peer's part of a download ended."""

    DONE = "done"  # nothing left for it to serve
    BUSY = "busy"  # it serves other downloaders now: worth asking again later
    FAILED = "failed"  # silent, broken, or sent a bad piece: not asked again for this download


@dataclass(frozen=True)
class TransferConfig:
    """How a worker downloads model files from peers."""

    #: Bytes per chunk request (a piece is fetched as one or more chunks from one peer).
    chunk_bytes: int = option(1024 * 1024, "KiB per chunk request", flag="--chunk-kib", parse=int, unit=1024,
                              group=FILES_SECTION)  # fmt: skip
    credit: int = option(8, "chunk requests in flight per peer: the window that keeps the pipe full",
                         flag="--credit", check=at_least(1), group=FILES_SECTION)  # fmt: skip
    peer_timeout_s: float = option(10.0, "give up a peer silent for this many seconds (its pieces go to others)",
                                   flag="--peer-timeout", check=POSITIVE, group=FILES_SECTION)  # fmt: skip
    max_strikes: int = option(2, "bad pieces after which a peer is dropped from a download", check=at_least(1))

    def __post_init__(self) -> None:
        check_options(self)
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            # the value in bytes: a command line shows it in its flag's unit (--chunk-kib)
            limits = f"{MIN_CHUNK_BYTES // 1024} KiB to {MAX_CHUNK_BYTES // 1024} KiB"
            raise OptionError("chunk_bytes", f"must be from {limits} (what a peer serves)", self.chunk_bytes)


@dataclass
class FetchStats:
    """Where the bytes of one context's files came from."""

    origin_bytes: int = 0
    peer_bytes: int = 0
    cached_bytes: int = 0
    corrupt_pieces: int = 0
    peers_failed: int = 0
    seconds: float = 0.0
    by_peer: Counter[str] = field(default_factory=Counter)
    #: Hears the bytes of each piece as it lands (from the event loop, or the origin reader's thread).
    on_bytes: Callable[[int], None] | None = None

    def landed(self, count: int) -> None:
        if self.on_bytes is not None:
            self.on_bytes(count)


class Fetcher:
    """Fills the node cache with a context's files: peers first, the origin when none can serve."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        cache: FileCache,
        config: TransferConfig,
        find_sources: FindSources,
        keys: ClientKeys | None = None,
    ) -> None:
        self._ctx = ctx
        #: CURVE keys for peers' file services (``ClientKeys.for_peers``): the server key is replaced by each
        #: peer's own when the broker names it (``Sources.peer_keys``). None: plain TCP.
        self.keys = keys
        self.cache = cache
        self.config = config
        self._find_sources = find_sources

    async def fetch(
        self, spec: ContextSpec, manifest: Manifest, on_bytes: Callable[[int], None] | None = None
    ) -> tuple[Path, FetchStats]:
        """The local model directory of ``manifest`` (fetched if needed) and where its bytes came from;
        ``on_bytes`` hears the bytes found cached, then those of each piece fetched (a progress bar)."""
        started = time.perf_counter()
        stats = FetchStats(on_bytes=on_bytes)
        missing = await asyncio.to_thread(self.cache.missing, manifest)
        stats.cached_bytes = manifest.total_bytes - sum(e.size for e in missing)
        stats.landed(stats.cached_bytes)
        if missing:
            download = await asyncio.to_thread(Download, self.cache, manifest, missing)
            try:
                await self._fill(spec, download, stats)
            finally:
                await asyncio.to_thread(download.close)  # runs to the end even if this task is cancelled
        view = await asyncio.to_thread(self.cache.complete, manifest)
        stats.seconds = time.perf_counter() - started
        return view, stats

    async def _fill(self, spec: ContextSpec, download: Download, stats: FetchStats) -> None:
        failed: list[str] = []
        while not download.finished:
            adopted = await asyncio.to_thread(download.adopt_cached)
            stats.cached_bytes += adopted
            stats.landed(adopted)
            if download.finished:
                break
            sources = await self._find_sources(download.manifest.digest, failed)
            if sources.peers:
                log.info("fetching_from_peers", peers=sources.peers, pieces=len(download.todo))
                before = len(download.todo)
                keys = self._peer_keys(sources)
                async with asyncio.TaskGroup() as group:  # one peer's unexpected error cancels the others
                    tasks = [
                        group.create_task(self._from_peer(p, k, download, stats))
                        for p, k in zip(sources.peers, keys, strict=True)
                    ]
                outcomes = [t.result() for t in tasks]
                failed.extend(p for p, o in zip(sources.peers, outcomes, strict=True) if o is PeerOutcome.FAILED)
                stats.peers_failed = len(failed)
                if all(o is PeerOutcome.BUSY for o in outcomes) and len(download.todo) >= before:
                    await asyncio.sleep(0.5)  # every peer busy: give them a moment before asking again
            elif sources.origin:
                log.info("fetching_from_origin", origin=spec.model, pieces=len(download.todo))
                await self._from_origin(spec, download, stats)
            else:
                await asyncio.sleep(1.0)  # the broker had nothing better to say; ask again

    # --- peers -----------------------------------------------------------------------------------

    def _peer_keys(self, sources: Sources) -> list[ClientKeys | None]:
        """The CURVE keys to reach each peer of ``sources`` with: ours, with the peer's public key (as the
        broker saw it register) as the server key, since each worker node may hold a key of its own. A
        broker without keys names none: then every peer serves under the run's shared worker key."""
        if self.keys is None:
            return [None] * len(sources.peers)
        if len(sources.peer_keys) != len(sources.peers):
            if sources.peer_keys:
                log.warning("sources_keys_mismatch", peers=len(sources.peers), keys=len(sources.peer_keys))
            return [self.keys] * len(sources.peers)
        # UTF-8, not ASCII: a key with a stray character then fails as a bad key when the peer's socket is
        # made (a failed peer), not as an error that ends the whole download
        return [replace(self.keys, server_public=key.encode()) for key in sources.peer_keys]

    async def _from_peer(
        self, endpoint: str, keys: ClientKeys | None, download: Download, stats: FetchStats
    ) -> PeerOutcome:
        """Pull pieces from one peer (reached with ``keys``; None: plain TCP) until none are left for it. A
        peer that fails us (silent, refusing, a bad piece) is left out when the broker is asked again."""
        sock: zmq.asyncio.Socket | None = None
        digest = download.manifest.digest
        chunks: deque[tuple[PieceKey, int, int]] = deque()  # requests not yet sent
        in_flight: dict[tuple[int, int], PieceKey] = {}  # (file, offset) -> piece
        buffers: dict[PieceKey, bytearray] = {}  # pieces being assembled
        strikes = 0
        try:
            sock = peer_socket(self._ctx, endpoint, keys)
            while True:
                while len(in_flight) < self.config.credit:
                    if not chunks:
                        key = download.take(endpoint)
                        if key is None:
                            break
                        buffers[key] = bytearray(download.span(key)[1])
                        chunks.extend(download.chunks(key, self.config.chunk_bytes))
                    key, offset, length = chunks.popleft()
                    entry = download.entries[key[0]]
                    request = FetchChunk(files=digest, path=entry.path, offset=offset, length=max(length, 1))
                    await sock.send_multipart(encode(request))
                    in_flight[(key[0], offset)] = key
                if not in_flight:
                    return PeerOutcome.DONE if strikes == 0 else PeerOutcome.FAILED
                if not await sock.poll(int(self.config.peer_timeout_s * 1000), zmq.POLLIN):
                    log.warning("peer_silent", peer=endpoint, timeout_s=self.config.peer_timeout_s)
                    return PeerOutcome.FAILED
                frames = await sock.recv_multipart(copy=False)  # the data frame is not copied again
                message, data = decode_peer([f.bytes for f in frames[:2]] + [f.buffer for f in frames[2:]])
                if isinstance(message, FetchRefused):
                    log.info("peer_refused", peer=endpoint, reason=message.reason, busy=message.busy)
                    return PeerOutcome.BUSY if message.busy and strikes == 0 else PeerOutcome.FAILED
                if not isinstance(message, ChunkData) or data is None:
                    raise ProtocolError(f"expected chunk_data, got {type(message).__name__}")
                index = download.file_index(message.path)
                key = in_flight.pop((index, message.offset), None) if index is not None else None
                if key is None:
                    continue  # not an answer to anything we asked
                buffer = buffers[key]
                start = message.offset - download.span(key)[0]
                buffer[start : start + len(data)] = data
                if any(k == key for k in in_flight.values()) or any(c[0] == key for c in chunks):
                    continue  # more chunks of this piece to come
                del buffers[key]
                if not await self._piece_from_peer(endpoint, download, stats, key, buffer):
                    strikes += 1
                    if strikes >= self.config.max_strikes:
                        return PeerOutcome.FAILED
        except (ProtocolError, zmq.ZMQError) as exc:
            log.warning("peer_failed", peer=endpoint, error=str(exc))
            return PeerOutcome.FAILED
        finally:
            for key in buffers:
                download.give_back(key)
            if sock is not None:
                sock.close(linger=0)

    async def _piece_from_peer(
        self, endpoint: str, download: Download, stats: FetchStats, key: PieceKey, piece: bytearray
    ) -> bool:
        """Write a piece a peer sent, if it matches the manifest; else hand it back to be fetched elsewhere.
        Whether it matched."""
        if await asyncio.to_thread(download.verify_and_write, key, piece):
            await download.piece_done(key)
            stats.peer_bytes += len(piece)
            stats.landed(len(piece))
            stats.by_peer[endpoint] += len(piece)
            return True
        stats.corrupt_pieces += 1
        log.warning("corrupt_piece", peer=endpoint, path=download.entries[key[0]].path, piece=key[1])
        download.give_back(key, bad_source=endpoint)
        return False

    # --- origin ----------------------------------------------------------------------------------

    async def _from_origin(self, spec: ContextSpec, download: Download, stats: FetchStats) -> None:
        keys = list(download.todo)
        download.todo.clear()
        cancelled = threading.Event()
        try:
            done, read = await asyncio.to_thread(self._copy_from_origin, spec, download, keys, cancelled, stats.landed)
        except BaseException:
            cancelled.set()
            for key in keys:
                download.give_back(key)
            raise
        for key in done:
            await download.piece_done(key)
        stats.origin_bytes += read

    def _copy_from_origin(
        self,
        spec: ContextSpec,
        download: Download,
        keys: list[PieceKey],
        cancelled: threading.Event,
        landed: Callable[[int], None],
    ) -> tuple[list[PieceKey], int]:
        """Read the pieces from the origin, checking each. Runs on a thread."""
        staging = None
        done: list[PieceKey] = []
        read = 0
        try:
            by_file: dict[int, list[int]] = {}
            for f, p in keys:
                by_file.setdefault(f, []).append(p)
            for index, pieces in by_file.items():
                entry = download.entries[index]
                if os.path.isdir(spec.model):
                    source = Path(spec.model) / entry.path
                else:
                    staging = staging or download.cache.staging_dir()
                    source = Path(_hub_download(spec, entry.path, staging))
                with source.open("rb", buffering=0) as f:
                    for piece in pieces:
                        if cancelled.is_set():
                            raise ContextLoadError("fetch from the origin cancelled")
                        offset, length = download.span((index, piece))
                        data = os.pread(f.fileno(), length, offset)
                        read += len(data)
                        if not download.verify_and_write((index, piece), data):
                            raise ContextLoadError(
                                f"{spec.model}: {entry.path} does not match the context's manifest "
                                "(changed since it was hashed?)"
                            )
                        done.append((index, piece))
                        landed(len(data))
        except OSError as exc:
            raise ContextLoadError(f"cannot read {spec.model}: {exc}") from exc
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return done, read


def _hub_download(spec: ContextSpec, filename: str, staging: Path) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(spec.model, filename, revision=spec.revision, cache_dir=staging)

"""The peer file service: a worker serves the model files in its node cache to other workers, on a ROUTER
socket of its own.

The ZeroMQ Guide's credit-based file transfer (chapter 7, fileio3): the downloader keeps a few chunk
requests outstanding and asks for the next one as each chunk arrives, so the flow is paced by the receiver
and nothing queues without bound on either side. The server only answers requests; it reads the chunk on a
thread (``os.pread``) and sends it as a raw frame. A manifest is looked up in the cache on a thread too.

What may be read is decided by the manifests, never by the request: a request names a manifest digest and
a path; the path is looked up in that manifest, and the file opened is the blob named by the entry's hash.
A path that is not in a manifest the worker holds is refused. Concurrent downloaders are bounded: a new one
beyond ``max_uploads`` is told ``busy`` and goes to another peer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import zmq
import zmq.asyncio

from pervade.errors import ProtocolError
from pervade.gpuworker.cache import FileCache
from pervade.keys import ClientKeys
from pervade.manifest import FileEntry
from pervade.options import FILES_SECTION, POSITIVE, at_least, check_options, option
from pervade.protocol import ChunkData, FetchChunk, FetchRefused, decode_peer, encode, encode_chunk
from pervade.transport import file_server_socket

log = structlog.get_logger(__name__)

#: Largest chunk a server sends in one message.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MIN_CHUNK_BYTES = 4096
#: Requests one downloader may have in progress here; more are refused (a downloader's credit is far
#: lower), so a client that asks and never reads cannot pile chunks up in this worker's memory.
MAX_REQUESTS_PER_DOWNLOADER = 64


@dataclass(frozen=True)
class FileServiceConfig:
    """How a worker serves its files to peers."""

    bind_host: str = option("*", "interface the file service binds (*: all); the port is picked free",
                            flag="--file-bind-host", group=FILES_SECTION)  # fmt: skip
    advertise_host: str | None = option(
        None,
        "host name or address peers reach this worker's file service at (default: this node's host name)",
        flag="--file-host",
        group=FILES_SECTION,
    )
    max_uploads: int = option(4, "peers served at once; more are told to go elsewhere", flag="--max-uploads",
                              check=at_least(1), group=FILES_SECTION)  # fmt: skip
    #: A downloader that asked nothing for this long no longer counts against ``max_uploads`` (a
    #: downloader keeps requests in flight while it works, so a short pause means it is done).
    upload_idle_s: float = option(1.0, "seconds after which a silent downloader no longer counts", check=POSITIVE)

    def __post_init__(self) -> None:
        check_options(self)


class FileServer:
    """Serves chunks of the files this node's cache holds. ``start`` binds; ``serve`` runs until stopped."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        cache: FileCache,
        config: FileServiceConfig,
        host: str,
        keys: ClientKeys | None = None,
    ) -> None:
        self.cache = cache
        #: CURVE: serve under the run's worker key pair (peers admitted by the context's authenticator).
        self.keys = keys
        self.config = config
        self._ctx = ctx
        self._host = config.advertise_host or host
        self._sock: zmq.asyncio.Socket | None = None
        self._reader = ThreadPoolExecutor(max_workers=4, thread_name_prefix="file-read")
        #: Downloader identity -> when it last asked.
        self._downloaders: dict[bytes, float] = {}
        #: Downloader identity -> requests being read or sent now.
        self._in_progress: Counter[bytes] = Counter()
        #: digest -> path -> entry, for the manifests served so far.
        self._paths: dict[str, dict[str, FileEntry]] = {}
        self.endpoint = ""
        self.bytes_served = 0
        self.refused = 0

    def start(self) -> str:
        if self._sock is None:
            self._sock, port = file_server_socket(
                self._ctx, self.config.bind_host, self.keys, max_pending=MAX_REQUESTS_PER_DOWNLOADER
            )
            self.endpoint = f"tcp://{self._host}:{port}"
            log.info("file_service_listening", endpoint=self.endpoint)
        return self.endpoint

    async def serve(self, stopping: asyncio.Event) -> None:
        self.start()
        sock = self._bound()
        pending: set[asyncio.Task[None]] = set()
        try:
            while not stopping.is_set():
                if not await sock.poll(200, zmq.POLLIN):
                    continue
                frames = await sock.recv_multipart(zmq.NOBLOCK)
                task = asyncio.create_task(self.handle(frames))  # reads overlap; the loop stays free
                pending.add(task)
                task.add_done_callback(pending.discard)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self.close()

    async def handle(self, frames: list[bytes]) -> None:
        """Answer one request; bad input is answered with a refusal, never raised."""
        if len(frames) < 2:
            return
        identity = frames[0]
        try:
            message, _ = decode_peer(frames[1:])
            if not isinstance(message, FetchChunk):
                raise ProtocolError("a file server only answers fetch_chunk")
        except ProtocolError as exc:
            await self._reply(identity, encode(FetchRefused(files="", path="", offset=0, reason=str(exc))))
            return
        if message.files not in self._paths:  # a manifest file read, and a stat of each blob: on a thread
            manifest = await asyncio.to_thread(self.cache.manifest, message.files)
            if manifest is not None:
                self._paths[message.files] = manifest.by_path()
        refusal = self._refusal(identity, message)
        if refusal is not None:
            self.refused += 1
            log.info("fetch_refused", path=message.path, reason=refusal.reason, busy=refusal.busy)
            await self._reply(identity, encode(refusal))
            return
        entry = self._paths[message.files][message.path]  # checked by _refusal
        length = min(message.length, entry.size - message.offset)
        loop = asyncio.get_running_loop()
        self._in_progress[identity] += 1
        try:
            data = await loop.run_in_executor(self._reader, self._read, entry.blob_name, message.offset, length)
        except OSError as exc:  # evicted meanwhile, or a disk error
            self._paths.pop(message.files, None)
            reason = f"cannot read: {exc}"
            await self._reply(
                identity,
                encode(FetchRefused(files=message.files, path=message.path, offset=message.offset, reason=reason)),
            )
            return
        finally:
            self._in_progress[identity] -= 1
            if self._in_progress[identity] <= 0:
                del self._in_progress[identity]
        self.bytes_served += len(data)
        await self._reply(
            identity, encode_chunk(ChunkData(files=message.files, path=message.path, offset=message.offset), data)
        )

    def _refusal(self, identity: bytes, request: FetchChunk) -> FetchRefused | None:
        def refuse(reason: str, busy: bool = False) -> FetchRefused:
            return FetchRefused(files=request.files, path=request.path, offset=request.offset, reason=reason, busy=busy)

        paths = self._paths.get(request.files)  # looked up in the cache by ``handle``
        if paths is None:
            return refuse("this worker does not hold those files")
        entry = paths.get(request.path)
        if entry is None:
            return refuse("path not in the manifest")
        if request.offset >= max(entry.size, 1) or request.length > MAX_CHUNK_BYTES:
            return refuse(f"chunk out of range (file of {entry.size} bytes, at most {MAX_CHUNK_BYTES} per chunk)")
        now = time.monotonic()
        self._downloaders = {d: t for d, t in self._downloaders.items() if now - t < self.config.upload_idle_s}
        if identity not in self._downloaders and len(self._downloaders) >= self.config.max_uploads:
            return refuse(f"serving {len(self._downloaders)} downloaders already", busy=True)
        if self._in_progress[identity] >= MAX_REQUESTS_PER_DOWNLOADER:
            return refuse(f"more than {MAX_REQUESTS_PER_DOWNLOADER} requests in progress")
        self._downloaders[identity] = now
        return None

    def _read(self, blob_name: str, offset: int, length: int) -> bytes:
        # Opened per read (microseconds against a MiB read): no handle outlives an eviction, whoever
        # evicts, so deleted blobs free their space and no descriptor table fills up.
        fd = os.open(self.cache.root / "blobs" / blob_name, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    async def _reply(self, identity: bytes, frames: list) -> None:
        try:
            await self._bound().send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # the downloader left
            log.debug("file_reply_dropped", error=str(exc))

    def _bound(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            raise RuntimeError("the file service is not started (or closed)")
        return self._sock

    def forget_files(self) -> None:
        """Forget the manifests looked up so far (after an eviction: they are looked up again)."""
        self._paths.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.forget_files()
        self._reader.shutdown(wait=False, cancel_futures=True)

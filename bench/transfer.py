"""Peer transfer throughput: a model directory moved between two workers on loopback, against a raw ZeroMQ
stream of the same bytes (the ceiling) and a plain file copy.

    .venv/bin/python bench/transfer.py                          # 1 GB (4 x 250 MB), 1 MiB chunks, credit 8
    .venv/bin/python bench/transfer.py --size-gb 1.0 --sweep    # several (chunk, credit) pairs
    .venv/bin/python bench/transfer.py --chunk-kib 4096 --credit 4 --repeat 5 --work-dir /tmp/xfer

A model directory of ``--files`` random ``*.safetensors`` files (``--size-gb`` in all, plus a small
``config.json``) is written once (under ``--work-dir``, reused when it is already there with the right
size), and hashed into a manifest. The model is never loaded: only its bytes move. Rows, each timed
``--repeat`` times (the table gives the best and the median):

- ``raw zmq``: the zguide's fileio3 pattern with nothing else: a server process with a ROUTER reads chunks
  with ``os.pread`` and sends them; this process's DEALER keeps ``credit`` chunk requests in flight and
  throws the bytes away. No hashing, no disk writes, no asyncio: the ceiling of a ZeroMQ stream here.
- ``pervade``: the real thing. A ``FileServer`` runs in a separate process over a ``FileCache`` filled
  beforehand (hard links to the model files, else copies); this process runs the real ``Fetcher`` into an
  empty ``FileCache``, with a ``find_sources`` that names that one server. Every 4 MiB piece is checked
  against the manifest's sha256 and written to the cache (a partial file, renamed into ``blobs/``), and
  the model directory of symlinks is laid out. Same chunk size and credit as the raw row.
- ``pervade+curve``: the same, for the default (chunk, credit) pair, with the run's CURVE keys on both sides
  (the server a CURVE server admitting the run's key through a ZeroMQ authenticator, the ``Fetcher`` a CURVE
  client): what authentication and encryption cost.
- ``file copy``: ``shutil.copyfile`` of every file into a fresh directory (the lower bound of any copy that
  goes through the page cache; it runs once, not per sweep point).

Page cache, honestly: the source files were just written and hashed, and this machine has far more memory
than the data, so every read of every row hits the page cache, not the disk. Writes (pervade, file copy)
go to the page cache too and are not fsynced (``os.sync()`` runs before each timed run, so one run's
write-back does not land in the next). So the figures measure the CPU cost of each path (system calls,
copies, hashing, the protocol) on loopback, not a disk or a network: on a cluster the NIC (1.25 GB/s at
10 Gb/s) or the node-local disk is the likelier limit. MB is 10^6 bytes.

Both sides of each transfer share this machine's cores (two processes, plus pervade's reader and hashing
threads); on a small or busy machine the figures are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from pervade.context import ContextSpec
from pervade.errors import ContextLoadError
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.fetch import Fetcher, TransferConfig
from pervade.gpuworker.fileserver import FileServer, FileServiceConfig
from pervade.keys import ClientKeys, PeerAdmission, init_keys
from pervade.logs import configure_logging
from pervade.manifest import Manifest, build_manifest
from pervade.protocol import Sources

SWEEP = [(256, 16), (1024, 4), (1024, 8), (1024, 16), (4096, 2), (4096, 4), (4096, 8)]
WRITE_BLOCK = 16 * 1024 * 1024


@dataclass
class Row:
    name: str
    chunk_kib: int | None
    credit: int | None
    seconds: list[float]
    nbytes: int

    def best(self) -> float:
        return min(self.seconds)

    def table_line(self) -> str:
        chunk = f"{self.chunk_kib}" if self.chunk_kib else "-"
        credit = f"{self.credit}" if self.credit else "-"
        best, median = self.best(), statistics.median(self.seconds)
        return (f"| {self.name:<13} | {chunk:>9} | {credit:>6} | {best:>6.2f} | {median:>8.2f} "
                f"| {self.nbytes / best / 1e6:>10.0f} | {self.nbytes / median / 1e6:>12.0f} |")  # fmt: skip


# --- the model directory ------------------------------------------------------------------------------


def make_model_dir(directory: Path, size_bytes: int, files: int) -> list[Path]:
    """``files`` random safetensors-named files of ``size_bytes`` in all (kept if already the right size)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama", "note": "transfer benchmark, random bytes"}\n')
    per_file = size_bytes // files
    paths = [directory / f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    for path in paths:
        if path.exists() and path.stat().st_size == per_file:
            continue
        with path.open("wb") as f:
            left = per_file
            while left:
                f.write(os.urandom(min(WRITE_BLOCK, left)))
                left -= min(WRITE_BLOCK, left)
    return [directory / "config.json", *paths]


def fill_cache(root: Path, model_dir: Path, manifest: Manifest) -> None:
    """Put ``manifest``'s files in a FileCache at ``root`` (hard links when the file system allows)."""
    cache = FileCache(root)
    for entry in manifest.files:
        if not cache.has_blob(entry):
            partial = cache.partial_path(entry)
            try:
                os.link(model_dir / entry.path, partial)
            except OSError:
                shutil.copyfile(model_dir / entry.path, partial)
            cache.commit_blob(entry, partial)
    cache.complete(manifest)


# --- servers (child processes) ------------------------------------------------------------------------


def serve_pervade(cache_root: str, keys_dir: str | None, endpoint_out: mp.Queue, stop: mp.Event) -> None:
    """Child process: a FileServer over the filled cache until ``stop`` is set (CURVE with ``keys_dir``)."""

    async def main() -> None:
        configure_logging("warning")
        ctx = zmq.asyncio.Context()
        keys = ClientKeys.load(Path(keys_dir), "worker") if keys_dir else None
        auth = None
        if keys is not None:
            auth = AsyncioAuthenticator(ctx)
            auth.start()
            auth.configure_curve_callback("*", credentials_provider=PeerAdmission(keys))
        # Every timed run is a new downloader, and the server counts a finished one against max_uploads
        # until it has been idle upload_idle_s (5 s): with the default 4, back-to-back runs are refused.
        config = FileServiceConfig(bind_host="127.0.0.1", max_uploads=64)
        server = FileServer(ctx, FileCache(Path(cache_root)), config, "127.0.0.1", keys=keys)
        endpoint_out.put(server.start())
        stopping = asyncio.Event()
        serving = asyncio.create_task(server.serve(stopping))
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await serving
        if auth is not None:
            auth.stop()
        ctx.term()

    asyncio.run(main())


def serve_raw(paths: list[str], endpoint_out: mp.Queue, stop: mp.Event) -> None:
    """Child process: the fileio3 server. A request is ``[file index, offset, length]`` (3 x 8 bytes);
    the answer is the chunk, read with pread from the page cache."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint_out.put(f"tcp://127.0.0.1:{port}")
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    while not stop.is_set():
        if not sock.poll(200):
            continue
        identity, request = sock.recv_multipart()
        index, offset, length = (int.from_bytes(request[i : i + 8], "little") for i in (0, 8, 16))
        sock.send_multipart([identity, os.pread(fds[index], length, offset)], copy=False)
    for fd in fds:
        os.close(fd)
    sock.close()
    ctx.term()


class Server:
    """A server child process, started with spawn (no inherited ZeroMQ state)."""

    def __init__(self, target: Callable[..., None], *args: object) -> None:
        spawn = mp.get_context("spawn")
        queue, self.stop = spawn.Queue(), spawn.Event()
        self.process = spawn.Process(target=target, args=(*args, queue, self.stop), daemon=True)
        self.process.start()
        self.endpoint: str = queue.get(timeout=60)

    def close(self) -> None:
        self.stop.set()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()


# --- the timed transfers ------------------------------------------------------------------------------


def raw_stream(endpoint: str, sizes: list[int], chunk: int, credit: int) -> int:
    """Pull every file's bytes with ``credit`` requests in flight; returns the bytes received."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    requests = ((i, o, min(chunk, size - o)) for i, size in enumerate(sizes) for o in range(0, size, chunk))
    in_flight = received = 0
    for index, offset, length in requests:
        if in_flight == credit:
            received += len(sock.recv(copy=False))
            in_flight -= 1
        sock.send(index.to_bytes(8, "little") + offset.to_bytes(8, "little") + length.to_bytes(8, "little"))
        in_flight += 1
    for _ in range(in_flight):
        received += len(sock.recv(copy=False))
    sock.close()
    ctx.term()
    return received


async def pervade_fetch(
    endpoint: str, model_dir: Path, manifest: Manifest, cache_root: Path, chunk: int, credit: int,
    keys: ClientKeys | None = None,
) -> int:
    """The real Fetcher from one peer into an empty cache; returns the bytes it got from the peer."""

    async def find_sources(digest: str, exclude: list[str]) -> Sources:
        if endpoint in exclude:
            raise ContextLoadError(f"the file server {endpoint} failed the download")
        return Sources(files=digest, peers=[endpoint])

    ctx = zmq.asyncio.Context()
    config = TransferConfig(chunk_bytes=chunk, credit=credit)
    fetcher = Fetcher(ctx, FileCache(cache_root), config, find_sources, keys.for_peers() if keys else None)
    try:
        _, stats = await fetcher.fetch(ContextSpec(model=str(model_dir), files=manifest.digest), manifest)
    finally:
        ctx.term()
    if stats.peer_bytes != manifest.total_bytes:
        raise RuntimeError(f"fetched {stats.peer_bytes} bytes from the peer, expected {manifest.total_bytes}")
    return stats.peer_bytes


def fetch_once(
    endpoint: str, model_dir: Path, manifest: Manifest, cache_root: Path, chunk: int, credit: int,
    keys: ClientKeys | None = None,
) -> int:
    return asyncio.run(pervade_fetch(endpoint, model_dir, manifest, cache_root, chunk, credit, keys))


def copy_files(paths: list[Path], target: Path) -> None:
    for path in paths:
        shutil.copyfile(path, target / path.name)


def timed(run: Callable[[], object], cleanup: Callable[[], None], repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        cleanup()
        os.sync()
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    cleanup()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="total size of the model files, GB (default: 1.0)")
    parser.add_argument("--files", type=int, default=4, help="files the size is split into (default: 4)")
    parser.add_argument(
        "--chunk-kib", type=int, default=1024, help="KiB per chunk request (default: 1024, the worker's)"
    )
    parser.add_argument("--credit", type=int, default=8, help="chunk requests in flight (default: 8, the worker's)")
    parser.add_argument("--sweep", action="store_true", help=f"also run the (chunk KiB, credit) pairs {SWEEP}")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (default: 3)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the model files here and reuse them (default: a temporary directory, removed)",
    )
    args = parser.parse_args()
    configure_logging("warning")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pervade-transfer-"))
    model_dir, server_cache, scratch = work / "model", work / "server-cache", work / "scratch"
    paths = make_model_dir(model_dir, int(args.size_gb * 1e9), args.files)
    manifest = build_manifest(model_dir)
    total = manifest.total_bytes
    fill_cache(server_cache, model_dir, manifest)

    def clean_scratch() -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)

    pairs = [(args.chunk_kib, args.credit)] + (
        [p for p in SWEEP if p != (args.chunk_kib, args.credit)] if args.sweep else []
    )
    rows: list[Row] = []
    keys_dir = work / "keys"
    init_keys(keys_dir, force=True)
    raw = Server(serve_raw, [str(p) for p in paths])
    peer = Server(serve_pervade, str(server_cache), None)
    keyed_peer = Server(serve_pervade, str(server_cache), str(keys_dir))
    try:
        sizes = [p.stat().st_size for p in paths]
        for chunk_kib, credit in pairs:
            chunk = chunk_kib * 1024
            print(f"# chunk {chunk_kib} KiB, credit {credit} ...", file=sys.stderr, flush=True)
            raw_run = partial(raw_stream, raw.endpoint, sizes, chunk, credit)
            fetch_run = partial(fetch_once, peer.endpoint, model_dir, manifest, scratch / "cache", chunk, credit)
            rows.append(Row("raw zmq", chunk_kib, credit, timed(raw_run, lambda: None, args.repeat), total))
            rows.append(Row("pervade", chunk_kib, credit, timed(fetch_run, clean_scratch, args.repeat), total))
        chunk_kib, credit = pairs[0]
        print("# pervade with CURVE ...", file=sys.stderr, flush=True)
        keyed_run = partial(fetch_once, keyed_peer.endpoint, model_dir, manifest, scratch / "cache", chunk_kib * 1024,
                            credit, ClientKeys.load(keys_dir, "worker"))  # fmt: skip
        rows.append(Row("pervade+curve", chunk_kib, credit, timed(keyed_run, clean_scratch, args.repeat), total))
        print("# file copy ...", file=sys.stderr, flush=True)
        rows.append(
            Row("file copy", None, None, timed(partial(copy_files, paths, scratch), clean_scratch, args.repeat), total)
        )
    finally:
        raw.close()
        peer.close()
        keyed_peer.close()
        shutil.rmtree(scratch, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")  # fmt: skip
    print(f"# {total / 1e9:.2f} GB in {len(manifest.files)} files ({args.files} x {sizes[-1] / 1e6:.0f} MB + config.json), "
          f"piece {manifest.piece_size // 1024} KiB, {args.repeat} runs per row, loopback, page cache warm")  # fmt: skip
    print()
    print("| row           | chunk KiB | credit | best s | median s | best MB/s | median MB/s |")
    print("|---------------|----------:|-------:|-------:|---------:|----------:|------------:|")
    for row in rows:
        print(row.table_line())
    print()
    for chunk_kib, credit in pairs:
        raw_row, ours = (r for r in rows if (r.chunk_kib, r.credit) == (chunk_kib, credit) and r.name in ("raw zmq", "pervade"))
        print(
            f"- chunk {chunk_kib} KiB, credit {credit}: pervade at {raw_row.best() / ours.best():.0%} of the raw stream"
        )
    keyed = next(r for r in rows if r.name == "pervade+curve")
    print(f"- pervade with CURVE (default pair) at {rows[1].best() / keyed.best():.0%} of pervade without")
    print(f"- pervade (default pair) at {rows[-1].best() / rows[1].best():.0%} of a plain file copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())

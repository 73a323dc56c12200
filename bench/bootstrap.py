"""Bootstrap: N workers joining a run at once, fetching the model files from each other, against every
worker reading the origin itself.

    .venv/bin/python bench/bootstrap.py                          # 8 workers, a `medium` tiny model (~110 MB)
    .venv/bin/python bench/bootstrap.py --workers 8 --model DIR --keep

Two rows, in the same run, on the same model directory (``--model``, default a ``medium`` tiny model
built into the run's directory):

- ``pervade``: a broker, a sink and ``--workers`` workers as real processes (``jobs.cluster.LocalCluster``,
  ``python -m pervade ROLE``), each worker with its own empty ``--cache-dir`` (a node of its own) and its
  file service on loopback (``--file-host 127.0.0.1 --file-bind-host 127.0.0.1 --threads 1``). Once every
  worker is connected, a producer submits ``--limit`` claims (``../shared/data/fever/paper_dev.jsonl`` if
  present, else the shipped sample) in batches of ``--batch-size``, enough batches that the broker tells
  every idle worker to load the context. The broker names the origin to the first worker that asks and
  makes the others wait for it, then hands out peers (``broker/sources.py``). The bytes come from each
  worker's ``files_ready`` log event (origin_bytes, peer_bytes); the broker's counters are printed as a
  check. The clock runs from the producer's start (its process start, so it includes hashing the model
  into a manifest and submitting) until the last worker's ``files_ready`` (the log timestamps,
  ``pervade/logs.py``). ``from 1st order`` counts from the first worker's ``context_loading`` instead (the
  broker's first load order arriving), leaving out the producer's start-up: it imports ``datasets`` to read
  the claims, which takes seconds between declaring the context and sending the first batch.
- ``origin only``: the baseline. ``--workers`` processes, each running the real ``Fetcher`` into its own
  empty cache with a ``find_sources`` that always answers ``origin=True``: every process reads, verifies
  (sha256 per piece) and writes the whole directory. They start together (a shared event, after they
  have imported everything) and the clock runs from that start to the last one done.

Caveat: here the "origin" is this machine's local disk, with the model in the page cache (it was just
written and hashed), so reading it N times is nearly free and every process and worker competes for the
same few cores. The time gap therefore understates what N concurrent readers of a shared file system (or
the hub) cost on a cluster; the origin-bytes column (N x model for the baseline, about 1 x model for
pervade) is the figure that transfers to a cluster. The workers also import torch and (``--context-mode
full``, the default) load the model right after their files are ready, on the same cores, so figures are
taken under load; on a machine that is busy with other work too, they are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zmq.asyncio

from pervade.context import ContextSpec
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.fetch import Fetcher, TransferConfig
from pervade.jobs.cluster import LocalCluster
from pervade.logs import configure_logging
from pervade.manifest import Manifest, build_manifest, manifest_from_json, manifest_to_json
from pervade.producer.claims import sample_claims_path
from pervade.protocol import Sources

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
START_TIMEOUT_S = 180.0


@dataclass
class Row:
    name: str
    workers: int
    origin_bytes: int
    peer_bytes: int
    first_s: float
    all_s: float
    from_order_s: float


def log_time(record: dict) -> float:
    """Unix time of a log record (structlog's ISO timestamp, UTC)."""
    return datetime.fromisoformat(record["timestamp"]).timestamp()


# --- pervade: broker, sink, workers, producer -------------------------------------------------------------


async def wait_for_workers(cluster: LocalCluster, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(cluster.serving_workers()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(cluster.serving_workers())} of {count} workers started in {START_TIMEOUT_S:.0f} s"
            )
        for name in ("broker", "sink"):
            if not cluster.running(name):
                raise RuntimeError(f"{name} exited:\n{cluster.procs.tail(name)}")
        await asyncio.sleep(0.2)


async def pervade_row(args: argparse.Namespace, model: Path, claims: Path, base: Path) -> tuple[Row, dict]:
    cluster = LocalCluster(base / "cluster")
    names = [f"worker-{i}" for i in range(args.workers)]
    try:
        await cluster.start_broker()
        await cluster.start_sink()
        for i in range(args.workers):
            await cluster.start_worker(
                "--cache-dir", str(base / "caches" / f"worker-{i}"), "--file-host", "127.0.0.1",
                "--file-bind-host", "127.0.0.1", "--threads", "1", "--context-mode", args.context_mode,
                "--chunk-kib", str(args.chunk_kib), "--credit", str(args.credit),
            )  # fmt: skip
        await wait_for_workers(cluster, args.workers)
        print(f"# pervade: {args.workers} workers connected, starting the producer", file=sys.stderr, flush=True)
        started = time.time()
        await cluster.start_producer("--claims", str(claims), "--model", str(model), "--limit", str(args.limit),
                                     "--batch-size", str(args.batch_size))  # fmt: skip
        deadline = time.monotonic() + args.timeout
        while sum(bool(cluster.events(n, "files_ready")) for n in names) < args.workers:
            failed = [n for n in names if not cluster.running(n) or cluster.events(n, "context_load_failed")]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers failed or timed out: {failed}\n{cluster.procs.tail(failed[0] if failed else names[0])}"
                )
            await asyncio.sleep(0.2)
    finally:
        await cluster.stop()  # the broker logs its counters as it stops
    ready = [cluster.events(n, "files_ready")[0] for n in names]
    times = [log_time(r) - started for r in ready]
    first_order = min(log_time(cluster.events(n, "context_loading")[0]) for n in names)
    row = Row(
        "pervade", args.workers, sum(r["origin_bytes"] for r in ready), sum(r["peer_bytes"] for r in ready),
        min(times), max(times), max(log_time(r) for r in ready) - first_order,
    )  # fmt: skip
    return row, cluster.broker_counters()


# --- baseline: every worker reads the origin --------------------------------------------------------------


def origin_reader(
    model: str, manifest_json: bytes, cache_root: str, ready: mp.Queue, go: mp.Event, done: mp.Queue
) -> None:
    """Child process: fetch the whole directory from the origin into an empty cache, once ``go`` is set."""
    configure_logging("warning")
    manifest = manifest_from_json(manifest_json)

    async def find_sources(digest: str, exclude: list[str]) -> Sources:
        return Sources(files=digest, origin=True)

    async def fetch() -> int:
        ctx = zmq.asyncio.Context()
        fetcher = Fetcher(ctx, FileCache(Path(cache_root)), TransferConfig(), find_sources)
        _, stats = await fetcher.fetch(ContextSpec(model=model, files=manifest.digest), manifest)
        ctx.term()
        return stats.origin_bytes

    ready.put(os.getpid())
    go.wait()
    origin_bytes = asyncio.run(fetch())
    done.put((origin_bytes, time.time()))


def origin_row(workers: int, model: Path, manifest: Manifest, base: Path) -> Row:
    spawn = mp.get_context("spawn")
    ready, done, go = spawn.Queue(), spawn.Queue(), spawn.Event()
    procs = [
        spawn.Process(target=origin_reader, args=(str(model), manifest_to_json(manifest), str(base / "origin-caches" / str(i)), ready, go, done))
        for i in range(workers)
    ]  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=START_TIMEOUT_S)
    started = time.time()
    go.set()
    results = [done.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    times = [t - started for _, t in results]
    return Row("origin only", workers, sum(b for b, _ in results), 0, min(times), max(times), max(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8, help="workers joining at once (default: 8)")
    parser.add_argument(
        "--model", type=Path, default=None, help="model directory (default: a `medium` tiny model, built)"
    )
    parser.add_argument("--limit", type=int, default=64, help="claims the producer submits (default: 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="claims per batch (default: 8)")
    parser.add_argument(
        "--context-mode", default="full", choices=["full", "partial", "agnostic"], help="workers' mode (default: full)"
    )
    parser.add_argument("--chunk-kib", type=int, default=1024, help="workers' chunk size, KiB (default: 1024)")
    parser.add_argument("--credit", type=int, default=8, help="workers' chunk requests in flight per peer (default: 8)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up if the workers do not all hold the files in this many seconds",
    )
    parser.add_argument(
        "--base-dir", type=Path, default=None, help="where logs and caches go (default: a temporary directory)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the base directory (logs, caches)")
    args = parser.parse_args()
    configure_logging("warning")

    base = args.base_dir or Path(tempfile.mkdtemp(prefix="pervade-bootstrap-"))
    model = args.model
    if model is None:
        from pervade.tinymodel import build_tiny_model

        print("# building a medium tiny model ...", file=sys.stderr, flush=True)
        model = build_tiny_model(base / "model", "medium")
    model = model.resolve()
    claims = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    manifest = build_manifest(model)  # also puts the model in the page cache for both rows
    model_bytes = manifest.total_bytes
    try:
        row, counters = asyncio.run(pervade_row(args, model, claims, base))
        print(f"# origin only: {args.workers} processes ...", file=sys.stderr, flush=True)
        rows = [row, origin_row(args.workers, model, manifest, base)]
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, python {sys.version.split()[0]}"
    )
    print(f"# model {model} ({model_bytes / 1e6:.1f} MB), claims {claims} (limit {args.limit}, batches of {args.batch_size}), "
          f"context mode {args.context_mode}, chunk {args.chunk_kib} KiB, credit {args.credit}")  # fmt: skip
    print()
    print(
        "| row         | workers | origin MB | origin reads | peer MB | first holds s | all hold s | from 1st order s |"
    )
    print(
        "|-------------|--------:|----------:|-------------:|--------:|--------------:|-----------:|-----------------:|"
    )
    for r in rows:
        print(f"| {r.name:<11} | {r.workers:>7} | {r.origin_bytes / 1e6:>9.1f} | {r.origin_bytes / model_bytes:>11.2f}x "
              f"| {r.peer_bytes / 1e6:>7.1f} | {r.first_s:>13.2f} | {r.all_s:>10.2f} | {r.from_order_s:>16.2f} |")  # fmt: skip
    print()
    print(f"- broker counters: origin {counters.get('origin_bytes', 0) / 1e6:.1f} MB, peers {counters.get('peer_bytes', 0) / 1e6:.1f} MB, "
          f"cached {counters.get('cached_bytes', 0) / 1e6:.1f} MB")  # fmt: skip
    saved = rows[1].origin_bytes / max(rows[0].origin_bytes, 1)
    print(f"- origin only reads {saved:.1f}x the origin bytes pervade does")
    if args.keep:
        print(f"- logs and caches kept in {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Bootstrap: N workers joining a run at once, fetching the model files from each other, against every
worker reading the origin itself; on this machine over loopback, or across the hosts of a cluster lab.

    .venv/bin/python bench/bootstrap.py                          # 8 workers, a `medium` tiny model (~110 MB)
    .venv/bin/python bench/bootstrap.py --workers 8 --model DIR --keep
    .venv/bin/python bench/bootstrap.py --lab --model smollm2 --storage-mbit 1000 250   # root only

Two rows, in the same run, on the same model directory (``--model``: a directory, ``smollm2`` for the
converted SmolLM2-135M-Instruct, ~540 MB, or by default a ``medium`` tiny model built into the run's
directory); with ``--lab``, both rows once per ``--storage-mbit`` rate:

- ``pervade``: a broker, a sink and ``--workers`` workers as real processes (``jobs.cluster.LocalCluster``,
  ``python -m pervade ROLE``), each worker with its own empty cache (a node of its own) and its file service
  on its own address (``--threads 1``). Once every worker is connected, a producer submits ``--limit``
  claims (``../shared/data/fever/paper_dev.jsonl`` if present, else the shipped sample) in batches of
  ``--batch-size``, enough batches that the broker tells every idle worker to load the context. The broker
  names the origin to the first worker that asks and makes the others wait for it, then hands out peers
  (``broker/sources.py``). The bytes come from each worker's ``files_ready`` log event (origin_bytes,
  peer_bytes); the broker's counters are printed as a check. The clock runs from the producer's start (its
  process start, so it includes hashing the model into a manifest and submitting) until the last worker's
  ``files_ready`` (the log timestamps, ``pervade/logs.py``). ``from 1st order`` counts from the first
  worker's ``context_loading`` instead (the broker's first load order arriving), leaving out the producer's
  start-up: it imports ``datasets`` and hashes the model, which takes seconds before the first batch.
- ``origin only``: the baseline. ``--workers`` child processes (``bootstrap.py read-origin``), each running
  the real ``Fetcher`` into its own empty cache with a ``find_sources`` that always answers
  ``origin=True``: every process reads, verifies (sha256 per piece) and writes the whole directory. They
  start together (each says it is ready once it has imported everything; then all are told to go, on
  stdin) and the clock runs from that start to the last one done (``first holds`` / ``all hold``; ``from
  1st order`` is the same clock here).

Columns: ``origin MB`` and ``peer MB`` are summed over the workers (what they report), ``origin reads`` is
origin MB over the model's size. ``storage MB`` (``--lab`` only) is what the storage host's link sent during
the row (its eth0 counter): for ``pervade`` it includes the producer hashing the model over the shared file
system (one more copy, before the first order; printed under the table) and sshfs's own traffic.

On this machine (no ``--lab``) the "origin" is the local disk, with the model in the page cache, so reading
it N times is nearly free: the time gap understates what N concurrent readers of a shared file system cost
on a cluster, and the origin-bytes column is the figure that transfers.

With ``--lab`` (root only; ``jobs/lab/cluster.py``) the lab has one compute host per worker: the broker,
sink and producer run on its login host, worker i (and origin reader i) on compute host i, and the model is
copied to the storage host's disk and read by everyone at its path on the shared file system (sshfs, no page
cache across opens), through the storage link shaped to ``--storage-mbit`` (each rate in turn, the same lab;
hosts' own links stay at the lab's 10 Gb/s). Peers serve each other across their own links. What it does not
emulate: CPU and memory are this machine's, shared by every host (note its core count and load line in the
output); sshfs encrypts (aes128-gcm) and FUSE copies every byte, on those same cores, so at high rates the
storage link may not be the bottleneck, the CPU is; the storage host serves from this machine's page cache;
and it emulates the storage *link*, not a parallel file system's metadata servers or striping (N clients
opening the same files at once cost a real PFS more than they cost here).

Everywhere: the workers import torch and (``--context-mode full``, the default) load the model right after
their files are ready, on the same cores as those still fetching, so figures are taken under load; on a
machine busy with other work too, they are lower bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import zmq.asyncio

from pervade.context import ContextSpec
from pervade.gpuworker.cache import FileCache
from pervade.gpuworker.fetch import Fetcher, TransferConfig
from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.cluster import ClusterLab, LabConfig, LinkShape
from pervade.keys import init_keys
from pervade.logs import configure_logging
from pervade.manifest import Manifest, build_manifest, manifest_from_json, manifest_to_json
from pervade.producer.claims import sample_claims_path
from pervade.protocol import Sources

FEVER_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: Workers import torch before they connect: eight of them on two shared cores take minutes.
START_TIMEOUT_S = 300.0
READ_ORIGIN = "read-origin"


@dataclass
class Row:
    name: str
    workers: int
    origin_bytes: int
    peer_bytes: int
    first_s: float
    all_s: float
    from_order_s: float
    #: The lab's storage rate, Mbit/s, and what its link sent during the row (None without a lab).
    storage_mbit: float | None = None
    storage_bytes: int | None = None
    #: pervade only: what the storage link sent before the first load order (the producer's hashing).
    storage_before_order: int | None = None
    load: str = ""


@dataclass
class Placement:
    """Where the processes run: this machine over loopback (no lab), or the lab's hosts, keyed."""

    lab: ClusterLab | None = None
    keys: Path | None = None

    def prefix(self, slot: int) -> list[str]:
        """The command prefix that runs process ``slot`` on its compute host (none without a lab)."""
        return self.lab.compute[slot % len(self.lab.compute)].command() if self.lab is not None else []

    def storage_sent(self) -> int | None:
        return self.lab.link_bytes("storage")["sent"] if self.lab is not None else None


def log_time(record: dict) -> float:
    """Unix time of a log record (structlog's ISO timestamp, UTC)."""
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def load_line() -> str:
    """The 1-minute load average: every host of a lab, and anything else running here, shares these cores."""
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


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


async def start_cluster(args: argparse.Namespace, base: Path, place: Placement) -> tuple[LocalCluster, list[str]]:
    """A broker, a sink and ``--workers`` workers (worker i on compute host i in a lab), all connected."""
    cluster = LocalCluster(base / "cluster", lab=place.lab, keys=place.keys)
    await cluster.start_broker()
    await cluster.start_sink()
    names = []
    for i in range(args.workers):
        host = place.lab.compute[i].name if place.lab is not None else None
        names.append(await cluster.start_worker(
            "--threads", "1", "--context-mode", args.context_mode, "--chunk-kib", str(args.chunk_kib),
            "--credit", str(args.credit), host=host,
        ))  # fmt: skip
    await wait_for_workers(cluster, args.workers)
    return cluster, names


async def wait_for_files(
    args: argparse.Namespace, cluster: LocalCluster, names: list[str], place: Placement
) -> int | None:
    """Until every worker holds the files; the storage link's sent counter at the first load order."""
    at_first_order = None
    deadline = time.monotonic() + args.timeout
    while sum(bool(cluster.events(n, "files_ready")) for n in names) < len(names):
        failed = [n for n in names if not cluster.running(n) or cluster.events(n, "context_load_failed")]
        if failed or time.monotonic() > deadline:
            raise RuntimeError(
                f"workers failed or timed out: {failed}\n{cluster.procs.tail(failed[0] if failed else names[0])}"
            )
        if at_first_order is None and any(cluster.events(n, "context_loading") for n in names):
            at_first_order = place.storage_sent()
        await asyncio.sleep(0.2)
    return at_first_order


async def pervade_row(
    args: argparse.Namespace, model: Path, claims: Path, base: Path, place: Placement
) -> tuple[Row, dict]:
    cluster, names = await start_cluster(args, base, place)
    try:
        print(f"# pervade: {args.workers} workers connected, starting the producer; {load_line()}",
              file=sys.stderr, flush=True)  # fmt: skip
        storage_before = place.storage_sent()
        started = time.time()
        await cluster.start_producer("--claims", str(claims), "--model", str(model), "--limit", str(args.limit),
                                     "--batch-size", str(args.batch_size))  # fmt: skip
        at_first_order = await wait_for_files(args, cluster, names, place)
        storage_after = place.storage_sent()
        load = load_line()
    finally:
        await cluster.stop()  # the broker logs its counters as it stops
    ready = [cluster.events(n, "files_ready")[0] for n in names]
    times = [log_time(r) - started for r in ready]
    first_order = min(log_time(cluster.events(n, "context_loading")[0]) for n in names)
    row = Row(
        "pervade", args.workers, sum(r["origin_bytes"] for r in ready), sum(r["peer_bytes"] for r in ready),
        min(times), max(times), max(log_time(r) for r in ready) - first_order,
        storage_bytes=difference(storage_after, storage_before),
        storage_before_order=difference(at_first_order, storage_before), load=load,
    )  # fmt: skip
    return row, cluster.broker_counters()


# --- baseline: every worker reads the origin --------------------------------------------------------------


def read_origin(argv: list[str]) -> int:
    """Child process (``bootstrap.py read-origin MODEL MANIFEST CACHE``): say ``ready`` on stdout, wait for a
    line on stdin, fetch the whole directory from the origin into an empty cache, then print a JSON line
    with the origin bytes and the time it finished."""
    model, manifest_file, cache_root = argv
    configure_logging("warning")
    manifest = manifest_from_json(Path(manifest_file).read_bytes())

    async def find_sources(digest: str, exclude: list[str]) -> Sources:
        return Sources(files=digest, origin=True)

    async def fetch() -> int:
        ctx = zmq.asyncio.Context()
        fetcher = Fetcher(ctx, FileCache(Path(cache_root)), TransferConfig(), find_sources)
        _, stats = await fetcher.fetch(ContextSpec(model=model, files=manifest.digest), manifest)
        ctx.term()
        return stats.origin_bytes

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    origin_bytes = asyncio.run(fetch())
    print(json.dumps({"origin_bytes": origin_bytes, "done": time.time()}), flush=True)
    return 0


def reader_log(base: Path, slot: int) -> BinaryIO:
    (base / "origin-logs").mkdir(parents=True, exist_ok=True)
    return open(base / "origin-logs" / f"reader-{slot}.log", "wb")


async def start_reader(
    slot: int, model: Path, manifest_file: Path, base: Path, place: Placement
) -> asyncio.subprocess.Process:
    """Origin reader ``slot`` on its compute host (or here), its stderr in ``origin-logs/``."""
    argv = [sys.executable, str(Path(__file__).resolve()), READ_ORIGIN, str(model), str(manifest_file),
            str(base / "origin-caches" / str(slot))]  # fmt: skip
    with reader_log(base, slot) as log:
        return await asyncio.create_subprocess_exec(
            *place.prefix(slot), *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log
        )


async def expect_line(proc: asyncio.subprocess.Process, timeout: float, base: Path, slot: int) -> str:
    """The reader's next stdout line; RuntimeError with its log if it ends or takes longer than ``timeout``."""
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if not line:
        log = (base / "origin-logs" / f"reader-{slot}.log").read_text(errors="replace")
        raise RuntimeError(f"origin reader {slot} ended (code {await proc.wait()}):\n{log[-2000:]}")
    return line


async def origin_row(args: argparse.Namespace, model: Path, manifest: Manifest, base: Path, place: Placement) -> Row:
    manifest_file = base / "manifest.json"
    manifest_file.parent.mkdir(parents=True, exist_ok=True)
    manifest_file.write_bytes(manifest_to_json(manifest))
    procs = [await start_reader(i, model, manifest_file, base, place) for i in range(args.workers)]
    try:
        for i, proc in enumerate(procs):
            await expect_line(proc, START_TIMEOUT_S, base, i)
        storage_before = place.storage_sent()
        started = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        await asyncio.gather(*(proc.stdin.drain() for proc in procs if proc.stdin is not None))
        results = [json.loads(await expect_line(proc, args.timeout, base, i)) for i, proc in enumerate(procs)]
        storage_after = place.storage_sent()
        load = load_line()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    times = [r["done"] - started for r in results]
    return Row("origin only", args.workers, sum(r["origin_bytes"] for r in results), 0, min(times), max(times),
               max(times), storage_bytes=difference(storage_after, storage_before), load=load)  # fmt: skip


# --- the runs ---------------------------------------------------------------------------------------------


async def both_rows(
    args: argparse.Namespace, model: Path, manifest: Manifest, claims: Path, base: Path, place: Placement
) -> tuple[list[Row], dict]:
    row, counters = await pervade_row(args, model, claims, base, place)
    print(f"# origin only: {args.workers} processes ...; {load_line()}", file=sys.stderr, flush=True)
    return [row, await origin_row(args, model, manifest, base, place)], counters


async def on_loopback(
    args: argparse.Namespace, model: Path, manifest: Manifest, claims: Path, base: Path
) -> tuple[list[Row], list[dict]]:
    rows, counters = await both_rows(args, model, manifest, claims, base, Placement())
    return rows, [counters]


async def on_lab(args: argparse.Namespace, model: Path, claims: Path, base: Path) -> tuple[list[Row], list[dict]]:
    """Both rows at each storage rate, on a lab with one compute host per worker."""
    lab = ClusterLab.start(LabConfig(compute_hosts=args.workers, storage_link=LinkShape(args.storage_mbit[0])))
    print(f"# lab {lab.root} up ({lab.config.compute_hosts} compute hosts); copying the model to its storage",
          file=sys.stderr, flush=True)  # fmt: skip
    try:
        keys = base / "keys"
        init_keys(keys)
        exported = lab.export_dir / "model"
        shutil.copytree(model, exported)
        manifest = build_manifest(exported)  # from the storage host's disk: nothing crosses its link
        shared = lab.on_shared(exported)
        rows, counters = [], []
        for rate in args.storage_mbit:
            lab.shape("storage", LinkShape(rate_mbit=rate))
            print(f"# storage link at {rate:g} Mbit/s", file=sys.stderr, flush=True)
            rate_rows, rate_counters = await both_rows(
                args, shared, manifest, claims, base / f"storage-{rate:g}", Placement(lab, keys)
            )
            for row in rate_rows:
                row.storage_mbit = rate
            rows += rate_rows
            counters.append(rate_counters)
    finally:
        lab.stop()
    return rows, counters


def resolve_model(choice: str | None, base: Path) -> Path:
    if choice is None:
        from pervade.tinymodel import build_tiny_model

        print("# building a medium tiny model ...", file=sys.stderr, flush=True)
        return build_tiny_model(base / "model", "medium").resolve()
    if choice == "smollm2":
        from pervade.smollm2 import ensure_smollm2

        return ensure_smollm2().resolve()
    return Path(choice).resolve()


def megabytes(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.1f}"


def print_report(args: argparse.Namespace, rows: list[Row], counters: list[dict], model: Path, model_bytes: int,
                 claims: Path, base: Path) -> None:  # fmt: skip
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, "
          f"python {sys.version.split()[0]}, {'cluster lab' if args.lab else 'loopback'}")  # fmt: skip
    print(f"# model {model} ({model_bytes / 1e6:.1f} MB), claims {claims} (limit {args.limit}, batches of {args.batch_size}), "
          f"context mode {args.context_mode}, chunk {args.chunk_kib} KiB, credit {args.credit}")  # fmt: skip
    print()
    print("| row         | storage Mb/s | workers | origin MB | origin reads | peer MB | storage MB | first holds s "
          "| all hold s | from 1st order s | load at end |")  # fmt: skip
    print("|-------------|-------------:|--------:|----------:|-------------:|--------:|-----------:|--------------:"
          "|-----------:|-----------------:|-------------|")  # fmt: skip
    for r in rows:
        rate = "-" if r.storage_mbit is None else f"{r.storage_mbit:g}"
        print(f"| {r.name:<11} | {rate:>12} | {r.workers:>7} | {r.origin_bytes / 1e6:>9.1f} | {r.origin_bytes / model_bytes:>11.2f}x "
              f"| {r.peer_bytes / 1e6:>7.1f} | {megabytes(r.storage_bytes):>10} | {r.first_s:>13.2f} | {r.all_s:>10.2f} "
              f"| {r.from_order_s:>16.2f} | {r.load} |")  # fmt: skip
    print()
    for r, c in zip(rows[0::2], counters, strict=True):
        where = "" if r.storage_mbit is None else f" at {r.storage_mbit:g} Mb/s"
        print(f"- broker counters{where}: origin {c.get('origin_bytes', 0) / 1e6:.1f} MB, peers {c.get('peer_bytes', 0) / 1e6:.1f} MB, "
              f"cached {c.get('cached_bytes', 0) / 1e6:.1f} MB")  # fmt: skip
    for r in rows:
        if r.storage_before_order is not None:
            print(
                f"- pervade at {r.storage_mbit:g} Mb/s: {megabytes(r.storage_before_order)} MB of its storage MB "
                "crossed the storage link before the first load order (the producer hashing the model)"
            )
    for ours, theirs in zip(rows[0::2], rows[1::2], strict=True):
        where = "" if ours.storage_mbit is None else f"at {ours.storage_mbit:g} Mb/s: "
        print(f"- {where}origin only reads {theirs.origin_bytes / max(ours.origin_bytes, 1):.1f}x the origin bytes "
              f"pervade does; all hold the model after {ours.all_s:.1f} s (pervade) vs {theirs.all_s:.1f} s")  # fmt: skip
    if args.keep:
        print(f"- logs and caches kept in {base}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8, help="workers joining at once (default: 8)")
    parser.add_argument("--model", default=None,
                        help="model directory, or `smollm2` (default: a `medium` tiny model, built)")  # fmt: skip
    parser.add_argument("--lab", action="store_true",
                        help="run across the hosts of a cluster lab, one compute host per worker (root only)")  # fmt: skip
    parser.add_argument("--storage-mbit", type=float, nargs="+", default=[1000.0],
                        help="--lab: the storage link's rates, Mbit/s, both rows at each (default: 1000)")  # fmt: skip
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
    if args.workers < 1 or min(args.storage_mbit) <= 0:
        parser.error("--workers and --storage-mbit must be positive")
    return args


def main() -> int:
    if sys.argv[1:2] == [READ_ORIGIN]:
        return read_origin(sys.argv[2:])
    args = parse_args()
    configure_logging("warning")
    base = (args.base_dir or Path(tempfile.mkdtemp(prefix="pervade-bootstrap-"))).resolve()
    model = resolve_model(args.model, base)
    claims = FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()
    model_bytes = 0
    try:
        if args.lab:
            rows, counters = asyncio.run(on_lab(args, model, claims, base))
            model_bytes = build_manifest(model).total_bytes
        else:
            manifest = build_manifest(model)  # also puts the model in the page cache for both rows
            model_bytes = manifest.total_bytes
            rows, counters = asyncio.run(on_loopback(args, model, manifest, claims, base))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print_report(args, rows, counters, model, model_bytes, claims, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

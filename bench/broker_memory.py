"""Memory of a broker holding a large queue: the RSS of a real broker process while N claims wait in it.

    .venv/bin/python bench/broker_memory.py                   # 1,000,000 claims, batches of 32, 1 template
    .venv/bin/python bench/broker_memory.py --claims 100000 --csv broker_memory_100k.csv

The broker keeps its queue in SQLite (``broker/store.py``), not in its memory, so its resident set should
stay flat however many claims are queued. This measures that claim on the real thing: it starts
``python -m pervade broker --state DIR`` as a separate process (as ``pervade run`` does) with no workers and
no sink, so nothing is ever dispatched and every claim submitted stays queued, then submits N synthetic
claims through the producer's Python API (``Producer.submit_sweep``, in this process).

The N claims go in ``--steps`` equal parts (default 10), each one job of ``N / steps`` claims: a part's
``submit_sweep`` returns only once the broker has acknowledged all of its batches, and the broker commits
before it acknowledges, so after each part exactly that many claims are queued in the store. Then the broker
process is sampled:

- broker RSS (``psutil.Process(pid).memory_info().rss``), split into anonymous memory (the Python heap,
  SQLite's page cache) and file-backed pages (shared libraries, SQLite's memory-mapped ``-shm`` WAL index),
  from ``/proc/PID/status``;
- the size on disk of the state directory (database, write-ahead log, WAL index), and of the database file
  and the WAL alone. The WAL holds every page each commit touched, so it is several times the data; a
  checkpoint copies it into the database, and the file is then reused, not shrunk (a clean stop deletes
  it). So while claims are being submitted the directory is much larger than the database it settles to;
- submission throughput (claims/s) of that part.

One row is printed before anything is submitted (the idle broker), one after each part, and one "settled"
row ``--settle-seconds`` after the last part (long enough for the broker's periodic WAL checkpoint to run).
At the end: the broker's peak RSS (``VmHWM``), the total time and the overall throughput. The broker is then
stopped with SIGTERM, as a batch system would, and its state directory removed unless ``--keep-state``.

Claims are FEVER-like: texts and gold labels sampled (with a fixed seed) from
``../shared/data/fever/paper_dev.jsonl`` when that file exists, else generated sentences of similar
length, each with a distinct id. Repeated texts cost the store as much as distinct ones (nothing is
deduplicated or compressed), so the sample's 9,999 texts stand for a real million-claim set.

The broker and this process share the machine's cores: on a small or busy machine, the throughput figures
are lower bounds, and the memory figures are unaffected.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from pervade.context import make_context
from pervade.errors import PervadeError
from pervade.jobs.local import ProcessGroup, wait_for_endpoint
from pervade.logs import configure_logging
from pervade.producer.client import Producer
from pervade.producer.templates import load_templates
from pervade.protocol import Claim

#: The FEVER claims sampled for texts, relative to the repository root, when present.
DEFAULT_FEVER = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: The model named in the batches' context. No worker ever loads it, so it need not be available.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
#: The SQLite file of the store and its two companions in WAL mode (see broker/store.py).
STORE_FILE = "broker.sqlite3"
MIB = 1024 * 1024


@dataclass
class Sample:
    """The broker process, and its state on disk, at one point of the run."""

    label: str  # "idle", "10%", ..., "100%", "settled"
    claims: int  # claims queued (acknowledged by the broker)
    batches: int  # batches queued
    rss_mib: float  # resident set, psutil's memory_info().rss
    anon_mib: float  # of which anonymous (RssAnon): heap, SQLite page cache
    file_mib: float  # of which file-backed or shared (RssFile + RssShmem): libraries, the -shm WAL index
    disk_mib: float  # state directory on disk: database + WAL + WAL index
    db_mib: float  # of which the database file (grows as checkpoints copy the WAL into it)
    wal_mib: float  # of which the write-ahead log (reused, not shrunk, once checkpointed)
    elapsed_s: float  # since the first claim was submitted
    claims_per_s: float | None  # submission throughput of the part that ended here


# --- claims ------------------------------------------------------------------------------------


def load_pool(path: Path | None, seed: int) -> list[tuple[str, str | None]]:
    """(text, gold label) pairs to sample claims from: a FEVER file's, or generated sentences."""
    if path is not None and path.exists():
        pool: list[tuple[str, str | None]] = []
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                if isinstance(record.get("claim"), str) and record["claim"].strip():
                    pool.append((record["claim"], record.get("label")))
        if pool:
            return pool
    # Short encyclopaedic statements of FEVER's length (about 8 to 12 words).
    rng = random.Random(seed)
    subjects = ["Colin Kaepernick", "Tilda Swinton", "Fox 2000 Pictures", "The Beatles", "Telemundo", "Ann Richards",
                "Stranger Things", "Marie Curie", "The Amazon River", "Mount Everest", "Nikolaj Coster-Waldau",
                "Peggy Sue Got Married", "Brad Wilk", "Andrew Kevin Walker", "The Lincoln-Douglas debates"]  # fmt: skip
    predicates = ["was born in", "released a film about", "is a member of", "won an award for", "worked with",
                  "was founded in", "is located in", "starred in", "wrote a book about", "was directed by"]  # fmt: skip
    objects = ["the United States", "1994", "a drama series", "the National Football League", "Paris",
               "a Spanish-language network", "the Nobel Prize in Physics", "a rock band", "Texas", "Netflix"]  # fmt: skip
    labels = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]
    return [
        (f"{rng.choice(subjects)} {rng.choice(predicates)} {rng.choice(objects)}.", rng.choice(labels))
        for _ in range(10_000)
    ]


def synthetic_claims(pool: list[tuple[str, str | None]], start: int, count: int, seed: int) -> Iterator[Claim]:
    """Claims ``start`` to ``start + count - 1``: distinct ids, texts and labels sampled from the pool.
    Deterministic in (seed, start), so two runs submit the same claims."""
    rng = random.Random(seed * 1_000_003 + start)
    for index in range(start, start + count):
        text, label = pool[rng.randrange(len(pool))]
        yield Claim(claim_id=f"bench-{index:09d}", text=text, gold_label=label)


# --- measuring the broker ------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status, in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024  # reported in kB
    return fields


def disk_usage(state_dir: Path) -> tuple[int, int, int]:
    """(every file of the state directory, the database file, the write-ahead log), in bytes."""
    total = db = wal = 0
    for entry in os.scandir(state_dir):
        if entry.is_file(follow_symlinks=False):
            size = entry.stat(follow_symlinks=False).st_size
            total += size
            if entry.name == STORE_FILE:
                db = size
            elif entry.name == f"{STORE_FILE}-wal":
                wal = size
    return total, db, wal


def sample(
    label: str, broker: psutil.Process, state_dir: Path, claims: int, batches: int, elapsed_s: float,
    claims_per_s: float | None,
) -> Sample:  # fmt: skip
    status = proc_status(broker.pid)
    disk, db, wal = disk_usage(state_dir)
    return Sample(
        label=label, claims=claims, batches=batches, rss_mib=broker.memory_info().rss / MIB,
        anon_mib=status.get("RssAnon", 0) / MIB, file_mib=(status.get("RssFile", 0) + status.get("RssShmem", 0)) / MIB,
        disk_mib=disk / MIB, db_mib=db / MIB, wal_mib=wal / MIB, elapsed_s=elapsed_s, claims_per_s=claims_per_s,
    )  # fmt: skip


TABLE_HEADER = (
    "| queued | claims | batches | broker RSS MiB | anon MiB | file MiB | state on disk MiB | database MiB | WAL MiB "
    "| elapsed s | claims/s |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(s: Sample) -> str:
    rate = f"{s.claims_per_s:,.0f}" if s.claims_per_s is not None else ""
    return (
        f"| {s.label} | {s.claims:,} | {s.batches:,} | {s.rss_mib:.1f} | {s.anon_mib:.1f} | {s.file_mib:.1f} "
        f"| {s.disk_mib:.1f} | {s.db_mib:.1f} | {s.wal_mib:.1f} | {s.elapsed_s:.1f} | {rate} |"
    )


# --- the run -------------------------------------------------------------------------------------


async def submit_all(
    endpoint: str,
    broker: psutil.Process,
    state_dir: Path,
    templates: dict[str, str],
    args: argparse.Namespace,
    samples: list[Sample],
) -> float:
    """Submit the claims part by part, sampling the broker after each; returns the submission time, from
    the first batch sent to the last one acknowledged (connecting and closing are not counted)."""
    context = make_context(args.model, resolve_files=False)  # never loaded: no files to hash
    pool = load_pool(args.fever, args.seed)
    bounds = [round(args.claims * k / args.steps) for k in range(args.steps + 1)]
    batches = 0
    async with Producer(endpoint, max_unacked=args.max_unacked) as producer:
        started = time.perf_counter()
        for k in range(1, args.steps + 1):
            part_start, count = bounds[k - 1], bounds[k] - bounds[k - 1]
            if count == 0:
                continue
            part_started = time.perf_counter()
            report = await producer.submit_sweep(
                synthetic_claims(pool, part_start, count, args.seed), templates, context,
                batch_size=args.batch_size, job_id=f"bench-memory-{os.getpid()}-{k:03d}",
            )  # fmt: skip
            if report.rejected or report.accepted != report.batches:
                raise PervadeError(f"the broker did not queue every batch of part {k}: {report.rejected[:3]}")
            batches += report.batches
            part_s = time.perf_counter() - part_started
            label = f"{100 * bounds[k] / args.claims:.0f}%"
            samples.append(
                sample(label, broker, state_dir, bounds[k], batches, time.perf_counter() - started, count / part_s)
            )
            print(table_row(samples[-1]), flush=True)
        submit_s = time.perf_counter() - started
    return submit_s


async def measure(args: argparse.Namespace, templates: dict[str, str]) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="pervade-broker-memory-", dir=args.state_parent))
    state_dir, log_dir = run_dir / "state", run_dir / "logs"
    log_dir.mkdir()
    endpoint_file = log_dir / "broker.endpoint"
    procs = ProcessGroup(log_dir, log_level="info")
    samples: list[Sample] = []
    started = time.perf_counter()
    try:
        process = await procs.start(
            "broker", "broker", "--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(endpoint_file),
            "--state", str(state_dir),
        )  # fmt: skip
        endpoint = await wait_for_endpoint(endpoint_file, process)
        broker = psutil.Process(process.pid)
        await asyncio.sleep(1.0)  # let the idle broker finish starting (first turns of its loop)
        samples.append(sample("idle", broker, state_dir, 0, 0, 0.0, None))
        print(TABLE_HEADER)
        print(table_row(samples[-1]), flush=True)

        # Race the submission against the broker's exit: a producer would wait forever for a dead broker.
        submitting = asyncio.ensure_future(submit_all(endpoint, broker, state_dir, templates, args, samples))
        exited = asyncio.ensure_future(process.wait())
        await asyncio.wait({submitting, exited}, return_when=asyncio.FIRST_COMPLETED)
        if submitting.done() and submitting.exception() is not None:
            await asyncio.wait({exited}, timeout=5.0)  # a failed sample may mean the broker is dying: see which
        if process.returncode is not None:  # the broker died (a sample of it may have failed too)
            submitting.cancel()
            raise PervadeError(f"the broker exited with status {process.returncode}:\n{procs.tail('broker')}")
        exited.cancel()
        submit_s = submitting.result()

        await asyncio.sleep(args.settle_seconds)
        last = samples[-1]
        samples.append(sample("settled", broker, state_dir, last.claims, last.batches, last.elapsed_s, None))
        print(table_row(samples[-1]), flush=True)
        peak = proc_status(broker.pid).get("VmHWM", 0) / MIB
        broker_cpu = broker.cpu_times()
    finally:
        await procs.stop(["broker"])
        if not args.keep_state:  # on failure too: the error carries the tail of the broker's log
            shutil.rmtree(run_dir, ignore_errors=True)
    total_s = time.perf_counter() - started

    idle, full = samples[0], samples[-1]
    print()
    # The kernel updates VmHWM lazily, so a sample taken between its updates can be higher: report the larger.
    highest = max(s.rss_mib for s in samples)
    print(f"peak broker RSS: {max(peak, highest):.1f} MiB (VmHWM {peak:.1f}, highest sample {highest:.1f}); "
          f"idle {idle.rss_mib:.1f} MiB, "
          f"with {full.claims:,} claims queued {full.rss_mib:.1f} MiB ({full.rss_mib - idle.rss_mib:+.1f} MiB)")  # fmt: skip
    per_claim = MIB / max(full.claims, 1)
    print(f"state on disk: {full.disk_mib:.1f} MiB ({full.disk_mib * per_claim:.0f} bytes per claim), of which the "
          f"database {full.db_mib:.1f} MiB ({full.db_mib * per_claim:.0f} bytes per claim) and the WAL "
          f"{full.wal_mib:.1f} MiB")  # fmt: skip
    pairs = full.claims * args.templates
    print(f"submission: {full.claims:,} claims x {args.templates} template(s) = {pairs:,} pairs in {full.batches:,} "
          f"batches, {submit_s:.1f} s: {full.claims / submit_s:,.0f} claims/s, {pairs / submit_s:,.0f} pairs/s, "
          f"{full.batches / submit_s:,.0f} batches/s")  # fmt: skip
    print(f"total time (broker start to broker stopped): {total_s:.1f} s")
    own_cpu = psutil.Process().cpu_times()
    print(f"CPU time: broker {broker_cpu.user + broker_cpu.system:.1f} s (user {broker_cpu.user:.1f}, system "
          f"{broker_cpu.system:.1f}), this process (producer and claims) {own_cpu.user + own_cpu.system:.1f} s")  # fmt: skip
    print(f"bench process RSS (producer, claims generator): {psutil.Process().memory_info().rss / MIB:.1f} MiB")
    if procs.children["broker"].returncode not in (0, None):
        print(f"warning: the broker exited with status {procs.children['broker'].returncode}", file=sys.stderr)

    if args.csv:
        with args.csv.open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(asdict(samples[0])))
            writer.writeheader()
            for s in samples:
                writer.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(s).items()})
        print(f"samples written to {args.csv}")
    if args.keep_state:
        print(f"broker state kept in {state_dir} (logs in {log_dir})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=int, default=1_000_000, help="claims to queue (default: 1000000)")
    parser.add_argument("--batch-size", type=int, default=32, help="claims per batch (default: 32)")
    parser.add_argument("--templates", type=int, default=1, metavar="K", help="use the first K shipped templates; each claim is queued once per template (default: 1)")  # fmt: skip
    parser.add_argument("--templates-file", type=Path, default=None, help="templates file (default: the shipped set)")
    parser.add_argument("--steps", type=int, default=10, help="parts the claims are submitted in, one sample after each (default: 10, every 10%%)")  # fmt: skip
    parser.add_argument("--max-unacked", type=int, default=16, help="producer's batches in flight without an acknowledgement (default: 16, the producer's default)")  # fmt: skip
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model named in the context; never loaded (default: {DEFAULT_MODEL})")  # fmt: skip
    parser.add_argument("--fever", type=Path, default=DEFAULT_FEVER, help="FEVER .jsonl file to sample claim texts from; generated sentences if missing (default: ../shared/data/fever/paper_dev.jsonl)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the claim sampling (default: 0)")
    parser.add_argument("--settle-seconds", type=float, default=6.0, help="wait after the last part before the 'settled' sample; the broker checkpoints its WAL every 5 s (default: 6)")  # fmt: skip
    parser.add_argument("--state-parent", type=Path, default=None, help="directory in which to create the broker's state directory (default: the system's temporary directory)")  # fmt: skip
    parser.add_argument("--keep-state", action="store_true", help="keep the broker's state directory and log instead of removing them")  # fmt: skip
    parser.add_argument(
        "--csv", type=Path, default=None, metavar="PATH", help="also write the samples to this CSV file"
    )
    args = parser.parse_args()
    for name in ("claims", "batch_size", "templates", "steps", "max_unacked"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        templates = dict(list(load_templates(args.templates_file).items())[: args.templates])
    except PervadeError as exc:
        parser.error(str(exc))
    if len(templates) < args.templates:
        parser.error(f"--templates {args.templates}: the templates file has only {len(templates)}")
    if args.state_parent is not None:
        args.state_parent.mkdir(parents=True, exist_ok=True)
    configure_logging("warning", json=False)  # the producer's info lines would break up the table

    fever = args.fever if args.fever.exists() else None
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, python {sys.version.split()[0]}")  # fmt: skip
    print(f"# claims: {args.claims:,} ({'sampled from ' + str(fever) if fever else 'generated sentences'}), "
          f"batch size {args.batch_size}, {args.templates} template(s), max unacked {args.max_unacked}, no workers")  # fmt: skip
    try:
        return asyncio.run(measure(args, templates))
    except PervadeError as exc:
        print(f"broker_memory: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""Broker capacity: claims/s a real broker routes, and per-batch latency, with 10, 100 and 1,000 workers
running a null model.

    .venv/bin/python bench/broker_capacity.py                                  # 10, 100, 1000 workers, batch 32
    .venv/bin/python bench/broker_capacity.py --workers 10 100 1000 --batch-sizes 32 --sink both
    .venv/bin/python bench/broker_capacity.py --workers 100 --claims 50000 --profile-broker

Targets (issue 21): at least 30,000 claims/s at batch size 1 and 150,000 at batch size 32, with 100 workers
and a real sink, on this machine (issue 6's was 20,000 at batch 32).

What runs, for every row (one row per workers x batch size x sink mode; every row starts afresh):

- a real broker, ``python -m pervade broker --bind tcp://127.0.0.1:* --endpoint-file F`` (plain TCP: the
  broker allows that on loopback without keys), with ``--state`` in the row's directory (SQLite in WAL
  mode, without fsync, as by default);
- a real sink, ``python -m pervade sink --broker EP --out DIR``, writing Parquet as in production (with
  ``--sink without`` there is none, and the broker only routes claims to workers and keeps the results);
- N simulated workers with a *null model*, hosted by ``ceil(N / --workers-per-process)`` processes (this
  script again, ``broker_capacity.py simulate ...``), each owning many DEALER sockets made by
  ``pervade.transport.dealer_socket``, the worker's own socket set-up. Each socket speaks the worker's
  protocol through ``pervade.protocol``: ``worker_ready`` and ``pull`` with credit ``--prefetch + 1``,
  ``context_loaded`` at once for every ``load_context``, and for every ``assign`` a ``completed`` whose
  verdicts are a fixed label for every claim; what arrived in one message is answered in one, with the
  ``pull`` the real worker's window (``gpuworker/intake.py``'s ``CreditWindow``: about two runs of 256
  claims, so hundreds of batches at batch size 1) would grant, as ``gpuworker/link.py`` does, minus the
  model. A socket silent for a heartbeat interval sends a
  heartbeat. One process drives its sockets with one ``zmq.Poller`` loop rather than a ``BrokerSession``
  each: 1,000 asyncio sessions, each polling with a timeout, would measure the simulator, not the broker;
- a producer in this process (``producer.client.Producer.submit_sweep``, the ``produce`` command's API,
  up to ``--max-unacked`` batches in flight) submitting ``--claims`` FEVER claims (texts and labels from
  ``../shared/data/fever/paper_dev.jsonl``, cycled under distinct ids; generated sentences if missing)
  under one template, in batches of ``--batch-sizes``, for the offline tiny model's context
  (``jobs.local.ensure_tiny_model``: the producer hashes its files and declares its manifest; no
  simulated worker ever loads it).

The producer starts once the broker has registered every simulated worker (each has heard the broker's
heartbeat). The columns:

- ``claims_per_s``: claims / ``wall_s``, where ``wall_s`` runs from the first batch submitted to the job
  done: with a sink, the producer's ``JobDone``, sent once every batch is durably written (the sink's
  Parquet file renamed into place and acknowledged); without a sink, the last ``completed`` sent by a
  simulated worker. With a sink, the wall time includes the sink closing and publishing its last file,
  which it does as soon as the broker says nothing more is coming (``roll_now``: the job ended and every
  batch delivered), not after ``--idle-roll-seconds`` without new results as before. A short row (30,000
  claims at batch 32 take a quarter of a second) is still mostly its start and its end: use ``--claims``
  of a few hundred thousand for the steady rate.
- ``submit_s``: first batch submitted to the broker's ``accepted`` for the last one (the producer's part).
  When it is close to ``wall_s``, the producer's window of ``--max-unacked`` batches paces the row.
- per-batch latency, p50 and p99 over every batch, in ms, on one clock (one machine):
  ``queue``: the batch's ``submitted_at`` (the producer built it) to a simulated worker receiving its
  ``assign``: the time a batch spends getting through the broker (accepted, committed, queued, dispatched),
  backlog included: when the producer submits faster than batches are dispatched, it grows with
  ``--claims``;
  ``dispatch``: from the moment the broker could assign the batch (it had been submitted, and the worker had
  granted the credit it used; credits are used first granted, first used) to the worker receiving it: the
  broker's reaction time, without the wait for work or for a free worker. A GPU worker with a prefetch
  window never idles as long as this stays below the time it computes its prefetched batches;
  ``e2e`` (sink rows only): ``submitted_at`` to its Parquet file being closed (the file's modification
  time): a batch's whole trip, including the sink keeping a file open up to ``--roll-seconds`` (2 s by
  default, so about 1 s at p50) before closing and acknowledging it.
- ``*_cpu_pct``: CPU time over the wall time of the broker, the sink, the producer (this process) and the
  simulators together (100 = one core busy the whole time; this machine has ``os.cpu_count()`` of them);
  ``broker_ms_per_batch``: the broker's CPU time per batch, what one batch costs it from submission to
  acknowledged write: ``1000 / broker_ms_per_batch * batch`` claims/s is what one free core could route.

Every Parquet row is checked at the end of a sink row (exactly one row per claim), and so are the simulators'
counts (every batch assigned once, no protocol errors, no disconnects); a row that fails a check fails the run.

``--profile-broker`` runs the broker under cProfile (``python -m cProfile -o FILE -m pervade broker``) and
prints its hottest functions after each row (by own time; the profile spans the broker's whole life,
start-up and 1,000 registrations included). cProfile slows the broker down, so those rows' figures are not
its capacity. For an unbiased profile attach a sampling profiler (``py-spy top
--pid PID``) to the broker of a normal run; its pid is printed when ``--verbose`` is given.

Caveats. This machine has 2 cores, shared by the broker, the sink, the producer (this process) and the
simulators, and with anything else running: a row's figures are a lower bound of what the broker routes on
a login node of its own. The broker is one asyncio process (one core at most, whatever the machine), so
``broker_cpu_pct`` near 100 means the broker is the bottleneck, and well below it means something else is (a
busy machine, the producer, the simulators or the sink). Each row's directory (logs, Parquet) is removed at
the end unless ``--keep``; the table goes to stdout and, with a plot, to ``bench/results/`` (benchkit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import pstats
import resource
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psutil
import zmq
from benchkit import DEFAULT_OUT_DIR, Report

from pervade.collector import collect_garbage_rarely
from pervade.constants import LABELS
from pervade.context import ContextSpec, ResolvedContext, make_context
from pervade.errors import PervadeError
from pervade.gpuworker.intake import CreditWindow
from pervade.keys import KEYS_ENV, ClientKeys, init_keys, keys_dir
from pervade.logs import configure_logging
from pervade.producer.window import DEFAULT_MAX_UNACKED, DEFAULT_MAX_UNACKED_PAIRS
from pervade.protocol import (
    Assign,
    BatchResult,
    Claim,
    Completed,
    ContextLoaded,
    DeviceInfo,
    Disconnect,
    Drained,
    Error,
    Heartbeat,
    LoadContext,
    Message,
    PeerKeys,
    Pull,
    Verdict,
    WorkerReady,
    decode_group,
    encode,
    encode_group,
)
from pervade.session import Heartbeats
from pervade.transport import dealer_socket, new_identity

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FEVER = REPO.parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
#: Claims/s the whole system should route, by batch size (issue 21).
TARGETS = {1: 30_000, 32: 150_000}
#: Seconds allowed for the processes of a row to start and every simulated worker to be registered.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
#: What every simulated worker answers, for every claim.
NULL_VERDICT = LABELS[0]
NULL_SCORES = [1.0, 0.0, 0.0]
#: How often a simulator reports its progress on stdout, and checks which sockets owe a heartbeat.
PROGRESS_EVERY_S = 0.2
BEAT_CHECK_EVERY_S = 0.25
COLUMNS = [
    "workers", "batch", "sink", "claims", "wall_s", "claims_per_s", "submit_s",
    "queue_p50_ms", "queue_p99_ms", "dispatch_p50_ms", "dispatch_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
    "broker_cpu_pct", "sink_cpu_pct", "producer_cpu_pct", "sims_cpu_pct", "broker_ms_per_batch",
    "broker_us_per_claim",
]  # fmt: skip

T = TypeVar("T")


# --- the simulated workers (a separate process: ``broker_capacity.py simulate ...``) ------------------


@dataclass
class NullWorker:
    """One simulated worker: its DEALER socket and the times of the credits it granted, oldest first."""

    name: str
    socket: zmq.Socket
    #: How much it asks for: the real worker's window (gpuworker/intake.py), set when it registers.
    window: CreditWindow = field(default_factory=lambda: CreditWindow(min_batches=2))
    grants: deque[float] = field(default_factory=deque)
    last_sent: float = 0.0
    heard: bool = False


@dataclass
class SimulatorStats:
    """What one simulator process saw; written as JSON to its ``--stats`` file when it stops."""

    workers: int = 0
    #: Assignments received (a slice of many producer batches is one; a copy is one more).
    assigned: int = 0
    #: Producer batches in those assignments (copies included), and each assigned id's count of them.
    batches: int = 0
    held: dict[str, int] = field(default_factory=dict)
    loads: int = 0
    disconnects: int = 0
    unexpected: int = 0
    errors: list[str] = field(default_factory=list)
    #: Seconds from a batch's ``submitted_at`` to its ``assign`` arriving, per batch.
    queue_s: list[float] = field(default_factory=list)
    #: Seconds from the moment the broker could assign the batch (it had been submitted and the worker had
    #: granted the credit it used) to its ``assign`` arriving, per batch.
    dispatch_s: list[float] = field(default_factory=list)
    last_completed: float = 0.0


class NullWorkerHost:
    """Many null-model workers in one process, driven by one poll loop over their sockets."""

    def __init__(self, endpoint: str, prefix: str, count: int, prefetch: int, heartbeats: Heartbeats) -> None:
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, count + 64)
        self.prefetch = prefetch
        self.heartbeats = heartbeats
        self.stats = SimulatorStats(workers=count)
        self.device = DeviceInfo(kind="cpu", name="null-model")
        self.workers: dict[zmq.Socket, NullWorker] = {}
        self._context_ids: dict[ContextSpec, str] = {}
        directory = keys_dir(None)  # --keys: the run's keys, as $PERVADE_KEYS
        keys = ClientKeys.load(directory, "worker") if directory is not None else None
        for index in range(count):
            name = f"{prefix}-{index:04d}"
            sock = dealer_socket(self.ctx, endpoint, new_identity("worker"), keys)  # type: ignore[arg-type]
            self.workers[sock] = NullWorker(name=name, socket=sock)

    def send(self, worker: NullWorker, message: Message) -> None:
        worker.socket.send_multipart(encode(message), flags=zmq.NOBLOCK)
        worker.last_sent = time.monotonic()

    def send_group(self, worker: NullWorker, messages: list[Message]) -> None:
        for frames in encode_group(messages):  # nothing sent for no messages: no sign of life either
            worker.socket.send_multipart(frames, flags=zmq.NOBLOCK)
            worker.last_sent = time.monotonic()

    def grant(self, worker: NullWorker, credit: int) -> None:
        self.send(worker, Pull(credit=credit))
        worker.grants.extend([time.time()] * credit)

    def top_up(self, worker: NullWorker) -> Pull | None:
        """The credit the real worker would grant now, holding nothing (every batch is answered at once)."""
        credit = worker.window.top_up(held=0)
        if not credit:
            return None
        worker.grants.extend([time.time()] * credit)
        return Pull(credit=credit)

    def register(self, worker: NullWorker) -> None:
        ready = WorkerReady(worker_id=worker.name, host="null-host", pid=os.getpid(), device=self.device)
        self.send(worker, ready)
        worker.grants.clear()
        worker.window = CreditWindow(min_batches=self.prefetch + 1)
        worker.window.outstanding = self.prefetch + 1
        self.grant(worker, self.prefetch + 1)

    def context_id(self, spec: ContextSpec) -> str:
        if spec not in self._context_ids:  # a property that hashes: once per context, not per batch
            self._context_ids[spec] = spec.context_id
        return self._context_ids[spec]

    def complete(self, worker: NullWorker, assign: Assign) -> Completed:
        """Answer a batch at once with the null verdict (the caller asks for one more, as the real worker
        does)."""
        started = time.time()
        batch = assign.batch
        stats = self.stats
        stats.assigned += 1
        stats.held[batch.batch_id] = len(batch.members) or 1
        stats.batches += len(batch.members) or 1
        stats.queue_s.append(started - batch.submitted_at)
        granted = worker.grants.popleft() if worker.grants else started
        worker.window.arrived(len(batch.claims), len(batch.members) or 1)
        stats.dispatch_s.append(started - max(granted, batch.submitted_at))
        verdicts = [
            Verdict(claim_id=c.claim_id, verdict=NULL_VERDICT, scores=NULL_SCORES, gold_label=c.gold_label)
            for c in batch.claims
        ]
        result = BatchResult(
            batch_id=batch.batch_id, job_id=batch.job_id, context_id=self.context_id(batch.context),
            model=batch.context.model, template_id=batch.template_id, worker_id=worker.name, device="null",
            submitted_at=batch.submitted_at, started_at=started, finished_at=time.time(), verdicts=verdicts,
            dtype="null",
        )  # fmt: skip
        return Completed(result=result)

    def handle(self, worker: NullWorker, frames: list[bytes]) -> None:
        """One message from the broker: a group, answered as the real worker answers a run of batches, with
        one group of results and one Pull for as many batches as it completed."""
        worker.heard = True
        messages, errors = decode_group(frames)
        for error in errors:
            self.note_error(f"{worker.name}: undecodable message: {error}")
        answers: list[Message] = []
        for message in messages:
            if isinstance(message, Assign):
                answers.append(self.complete(worker, message))
            elif isinstance(message, LoadContext):
                self.stats.loads += 1
                answers.append(ContextLoaded(context_id=self.context_id(message.context), seconds=0.0))
            elif isinstance(message, Disconnect):  # the broker forgot this worker: register again
                self.stats.disconnects += 1
                self.register(worker)
            elif isinstance(message, Error):
                self.note_error(f"{worker.name}: broker error: {message.reason} {message.detail}")
            elif not isinstance(message, (Heartbeat, Drained, PeerKeys)):  # PeerKeys: for a file service
                self.stats.unexpected += 1
        done = any(isinstance(answer, Completed) for answer in answers)
        if done and (pull := self.top_up(worker)) is not None:
            answers.append(pull)
        if answers:
            self.send_group(worker, answers)
            if done:
                self.stats.last_completed = time.time()

    def note_error(self, error: str) -> None:
        if len(self.stats.errors) < 20:
            self.stats.errors.append(error)

    def beat(self, now: float) -> None:
        """A heartbeat on every socket that has sent nothing for an interval (any message counts)."""
        for worker in self.workers.values():
            if now - worker.last_sent >= self.heartbeats.interval_s:
                self.send(worker, Heartbeat())

    def run(self, control_fd: int) -> None:
        """Serve until ``control_fd`` (stdin) reaches end of file: the benchmark closing it is the stop
        signal. Prints ``{"ready": true}`` once every worker has heard the broker (which heartbeats only
        registered peers), then ``{"done": N, "last": T}`` as batches are completed."""
        poller = zmq.Poller()
        for sock in self.workers:
            poller.register(sock, zmq.POLLIN)
        poller.register(control_fd, zmq.POLLIN)
        for worker in self.workers.values():
            self.register(worker)
        ready = False
        reported = -1
        next_beat = next_progress = time.monotonic()
        while True:
            events = dict(poller.poll(int(BEAT_CHECK_EVERY_S * 1000)))
            if control_fd in events and not os.read(control_fd, 4096):
                break
            for sock in events:
                if sock == control_fd:
                    continue
                worker = self.workers[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(worker, frames)
            now = time.monotonic()
            if now >= next_beat:
                self.beat(now)
                next_beat = now + BEAT_CHECK_EVERY_S
            if not ready and all(w.heard for w in self.workers.values()):
                ready = True
                print(json.dumps({"ready": True}), flush=True)
            if now >= next_progress and self.stats.batches != reported:
                reported = self.stats.batches
                print(json.dumps({"done": reported, "last": self.stats.last_completed}), flush=True)
                next_progress = now + PROGRESS_EVERY_S
        print(json.dumps({"done": self.stats.batches, "last": self.stats.last_completed}), flush=True)

    def close(self) -> None:
        for worker in self.workers.values():
            try:
                worker.socket.send_multipart(encode(Disconnect(reason="benchmark over")), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            worker.socket.close(linger=100)
        self.ctx.term()


def simulate(argv: list[str]) -> int:
    """Entry point of a simulator process."""
    parser = argparse.ArgumentParser(prog="broker_capacity.py simulate")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=1)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    raise_file_limit(args.count * 2 + 256)
    host = NullWorkerHost(args.broker, args.prefix, args.count, args.prefetch, Heartbeats())
    try:
        host.run(sys.stdin.fileno())
    finally:
        host.close()
    stats = host.stats
    args.stats.write_text(json.dumps(stats.__dict__))
    return 0


def raise_file_limit(wanted: int) -> None:
    """Each worker is a TCP connection, on both ends: raise the soft limit on open files (to the hard one
    at most) so 1,000 of them fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            raise PervadeError(f"need {wanted} open files, the hard limit is {hard} (raise it with ulimit -Hn)")


# --- processes --------------------------------------------------------------------------------------


@dataclass
class Child:
    """A process of a row, with the log file its stderr (and, unless piped, stdout) goes to."""

    name: str
    process: asyncio.subprocess.Process
    log: Path

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(text[-lines:])


async def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str], piped: bool = False) -> Child:
    """Start ``argv``; its output goes to ``log_dir/NAME.log`` (stdout and stdin are pipes when ``piped``)."""
    log = log_dir / f"{name}.log"
    with log.open("ab") as handle:  # the child inherits it
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if piped else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if piped else handle,
            stderr=handle,
            env=env,
        )
    return Child(name, process, log)


async def stop(child: Child, sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a child (SIGKILL after STOP_TIMEOUT_S) and wait for it."""
    if child.process.returncode is None:
        child.process.send_signal(sig)
        try:
            await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            child.process.kill()
            await child.process.wait()


async def watched(awaitable: Awaitable[T], children: list[Child], what: str, timeout_s: float | None = None) -> T:
    """Await ``awaitable``, unless one of ``children`` exits first or ``timeout_s`` passes: then raise,
    with the tail of the log of the child that exited (a pipeline with a dead part would wait for ever)."""
    task = asyncio.ensure_future(awaitable)
    exits = {asyncio.ensure_future(c.process.wait()): c for c in children}
    try:
        done, _ = await asyncio.wait({task, *exits}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if not done:
            raise PervadeError(f"timed out after {timeout_s:g} s waiting for {what}")
        child = exits[next(f for f in done if f in exits)]
        raise PervadeError(
            f"{child.name} exited with status {child.process.returncode} while waiting for {what}; "
            f"the end of {child.log}:\n{child.tail()}"
        )
    finally:
        task.cancel()
        for future in exits:
            future.cancel()


@dataclass
class CpuMeter:
    """CPU seconds (user and system, every thread) that some processes use from now on."""

    processes: list[psutil.Process]
    start: float = 0.0

    def __post_init__(self) -> None:
        self.start = self.total()

    @classmethod
    def of(cls, children: list[Child]) -> CpuMeter:
        return cls(processes=[psutil.Process(c.process.pid) for c in children])

    def total(self) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.processes))

    def used(self) -> float:
        return self.total() - self.start


# --- the simulators, from the benchmark's side --------------------------------------------------------


@dataclass
class Fleet:
    """The simulator processes of a row, and what they report on stdout."""

    children: list[Child]
    stats_files: list[Path]
    done: list[int]
    last: list[float]
    target: int | None = None
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    all_done: asyncio.Event = field(default_factory=asyncio.Event)
    _ready: set[int] = field(default_factory=set)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    def start_reading(self) -> None:
        self._readers = [asyncio.create_task(self._read(i, c)) for i, c in enumerate(self.children)]

    async def _read(self, index: int, child: Child) -> None:
        assert child.process.stdout is not None
        async for line in child.process.stdout:
            report = json.loads(line)
            if report.get("ready"):
                self._ready.add(index)
                if len(self._ready) == len(self.children):
                    self.all_ready.set()
            if "done" in report:
                self.done[index], self.last[index] = report["done"], report["last"]
                self.check_done()

    def expect(self, batches: int) -> None:
        self.target = batches
        self.check_done()

    def check_done(self) -> None:
        if self.target is not None and sum(self.done) >= self.target:
            self.all_done.set()

    async def stop(self) -> list[SimulatorStats]:
        """Stop every simulator and read its stats."""
        await self.close()
        stats = []
        for child, path in zip(self.children, self.stats_files, strict=True):
            if child.process.returncode != 0 or not path.exists():
                raise PervadeError(f"{child.name} failed (status {child.process.returncode}):\n{child.tail()}")
            stats.append(SimulatorStats(**json.loads(path.read_text())))
        return stats

    async def close(self) -> None:
        """Close every simulator's stdin (its stop signal) and wait for it to exit."""
        for child in self.children:
            if child.process.stdin is not None and not child.process.stdin.is_closing():
                child.process.stdin.close()
        for child in self.children:
            try:
                await asyncio.wait_for(child.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                await stop(child, signal.SIGKILL)
        await asyncio.gather(*self._readers, return_exceptions=True)


async def start_fleet(
    endpoint: str, workers: int, per_process: int, prefetch: int, row_dir: Path, env: dict[str, str]
) -> Fleet:
    processes = math.ceil(workers / per_process)
    counts = [workers // processes + (k < workers % processes) for k in range(processes)]
    children, stats_files = [], []
    for k, count in enumerate(counts):
        stats = row_dir / f"sim-{k}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "simulate", "--broker", endpoint, "--prefix", f"null-{k}",
                "--count", str(count), "--prefetch", str(prefetch), "--stats", str(stats)]  # fmt: skip
        children.append(await spawn(f"sim-{k}", argv, row_dir / "logs", env, piped=True))
        stats_files.append(stats)
    fleet = Fleet(children, stats_files, done=[0] * processes, last=[0.0] * processes)
    fleet.start_reading()
    return fleet


# --- claims -------------------------------------------------------------------------------------------


def load_pool(path: Path | None) -> list[tuple[str, str | None]]:
    """(text, gold label) pairs to draw claims from: a FEVER file's, or generated sentences."""
    pool: list[tuple[str, str | None]] = []
    if path is not None and path.exists():
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                record = json.loads(line)
                if isinstance(record.get("claim"), str) and record["claim"].strip():
                    pool.append((record["claim"], record.get("label")))
    if not pool:
        subjects = ["Tilda Swinton", "Fox 2000 Pictures", "The Beatles", "Marie Curie", "Mount Everest"]
        objects = ["the United States", "1994", "a drama series", "Paris", "a rock band", "Netflix"]
        pool = [
            (f"{s} is associated with {o}.", LABELS[(i + j) % 3])
            for i, s in enumerate(subjects)
            for j, o in enumerate(objects)
        ]
    return pool


def claims(pool: list[tuple[str, str | None]], count: int) -> Iterator[Claim]:
    """``count`` claims with distinct ids, cycling through the pool's texts."""
    for index in range(count):
        text, label = pool[index % len(pool)]
        yield Claim(claim_id=f"cap-{index:09d}", text=text, gold_label=label)


# --- one row ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """What every row shares."""

    context: ResolvedContext
    template_id: str
    template: str
    pool: list[tuple[str, str | None]]
    root: Path
    env: dict[str, str]
    #: The run's keys directory (``--keys``); None: plain TCP.
    keys: Path | None = None


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q) * 1000) if values else float("nan")


def file_latencies(out_dir: Path) -> tuple[int, list[float]]:
    """Rows in the sink's Parquet files, and per batch the seconds from ``submitted_at`` to its file being
    closed (the file's modification time: the footer is its last write)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows, latencies = 0, []
    for path in sorted(out_dir.glob("*.parquet")):
        closed = path.stat().st_mtime
        table = pq.read_table(path, columns=["batch_id", "submitted_at"])
        rows += table.num_rows
        per_batch = table.group_by("batch_id").aggregate([("submitted_at", "min")])
        submitted = pc.cast(per_batch["submitted_at_min"], "int64").to_numpy() / 1e6
        latencies.extend((closed - submitted).tolist())
    return rows, latencies


def broker_argv(row_dir: Path, log_level: str, profile: Path | None) -> list[str]:
    profiler = ["-m", "cProfile", "-o", str(profile)] if profile is not None else []
    return [sys.executable, *profiler, "-m", "pervade", "broker", "--bind", "tcp://127.0.0.1:*",
            "--endpoint-file", str(row_dir / "broker.endpoint"), "--state", str(row_dir / "state"),
            "--log-json", "--log-level", log_level]  # fmt: skip


def print_profile(path: Path, lines: int) -> None:
    print(f"# broker profile ({path}), by own time:", flush=True)
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(lines)
    sys.stdout.flush()


async def run_row(
    args: argparse.Namespace, setup: Setup, workers: int, batch_size: int, with_sink: bool
) -> dict[str, Any]:
    from pervade.jobs.local import wait_for_endpoint

    row_dir = setup.root / f"w{workers}-b{batch_size}-{'sink' if with_sink else 'nosink'}"
    (row_dir / "logs").mkdir(parents=True)
    endpoint_file, out_dir = row_dir / "broker.endpoint", row_dir / "out"
    profile = row_dir / "broker.prof" if args.profile_broker else None
    children: list[Child] = []
    fleet: Fleet | None = None
    try:
        broker = await spawn("broker", broker_argv(row_dir, args.log_level, profile), row_dir / "logs", setup.env)
        children.append(broker)
        endpoint = await wait_for_endpoint(endpoint_file, broker.process)  # type: ignore[arg-type]
        if args.verbose:
            print(f"# broker pid {broker.process.pid} at {endpoint}, row directory {row_dir}", flush=True)
        if with_sink:
            sink_argv = [sys.executable, "-m", "pervade", "sink", "--broker", endpoint, "--out", str(out_dir),
                         "--sink-id", "sink", "--roll-seconds", str(args.roll_seconds), "--idle-roll-seconds",
                         str(args.idle_roll_seconds), "--log-json", "--log-level", args.log_level]  # fmt: skip
            children.append(await spawn("sink", sink_argv, row_dir / "logs", setup.env))
        fleet = await start_fleet(endpoint, workers, args.workers_per_process, args.prefetch, row_dir, setup.env)
        everyone = children + fleet.children
        await watched(fleet.all_ready.wait(), everyone, f"{workers} simulated workers to register", START_TIMEOUT_S)

        meters = {
            "broker": CpuMeter.of([broker]),
            "sink": CpuMeter.of(children[1:]),
            "producer": CpuMeter(processes=[psutil.Process()]),
            "sims": CpuMeter.of(fleet.children),
        }
        timing = await submit_job(args, setup, endpoint, batch_size, fleet if not with_sink else None, everyone)
        cpu = {name: meter.used() if meter.processes else None for name, meter in meters.items()}

        stats = await fleet.stop()
        fleet = None
        e2e: list[float] = []
        if with_sink:
            await stop(children[1])
            rows, e2e = await asyncio.to_thread(file_latencies, out_dir)
            if rows != args.claims:
                raise PervadeError(f"the sink wrote {rows} rows for {args.claims} claims (see {row_dir})")
        await stop(broker)
        check_simulators(stats, timing.batches, workers, copies=broker_counter(broker, "speculative_assignments"))
        if profile is not None:
            print_profile(profile, args.profile_lines)
    finally:
        if fleet is not None:
            await fleet.close()  # on an error: the error being raised says why
        for child in reversed(children):
            await stop(child)
    if not args.keep:  # only after a row that succeeded: a failed row's logs stay (the error names them)
        shutil.rmtree(row_dir, ignore_errors=True)

    return summarize(args.claims, workers, batch_size, with_sink, timing, stats, e2e, cpu)


@dataclass(frozen=True)
class JobTiming:
    batches: int
    #: First batch submitted, last one accepted, job done (unix seconds).
    started: float
    submitted: float
    finished: float


async def submit_job(
    args: argparse.Namespace, setup: Setup, endpoint: str, batch_size: int, fleet: Fleet | None, watch: list[Child]
) -> JobTiming:
    """Submit the claims as one job and wait until it is done: written (the producer hears ``JobDone``), or
    without a sink (``fleet`` given) until the simulators have completed every batch."""
    from pervade.producer.client import Producer

    job_id = f"capacity-b{batch_size}-{uuid.uuid4().hex[:8]}"
    keys = ClientKeys.load(setup.keys, "producer") if setup.keys is not None else None
    async with Producer(endpoint, max_unacked=args.max_unacked, max_unacked_pairs=args.max_unacked_pairs, keys=keys) as producer:
        started = time.time()
        report = await watched(
            producer.submit_sweep(claims(setup.pool, args.claims), {setup.template_id: setup.template},
                                  setup.context, batch_size=batch_size, job_id=job_id),
            watch, "the broker to accept every batch", args.timeout,
        )  # fmt: skip
        submitted = time.time()
        if report.rejected or report.accepted != report.batches:
            raise PervadeError(f"the broker did not queue every batch: {report.rejected[:3]}")
        if fleet is None:
            await watched(producer.wait(job_id), watch, "the job to be written", args.timeout)
            finished = time.time()
        else:
            fleet.expect(report.batches)
            await watched(fleet.all_done.wait(), watch, "every batch to be completed", args.timeout)
            finished = max(fleet.last)
    return JobTiming(report.batches, started, submitted, finished)


def summarize(
    claims: int, workers: int, batch_size: int, with_sink: bool, timing: JobTiming, stats: list[SimulatorStats],
    e2e: list[float], cpu: dict[str, float | None],
) -> dict[str, Any]:  # fmt: skip
    """The row of the table."""
    wall = timing.finished - timing.started
    queue = [q for s in stats for q in s.queue_s]
    dispatch = [w for s in stats for w in s.dispatch_s]
    row = {
        "workers": workers, "batch": batch_size, "sink": "yes" if with_sink else "no", "claims": claims,
        "wall_s": wall, "claims_per_s": claims / wall, "submit_s": timing.submitted - timing.started,
        "queue_p50_ms": percentile_ms(queue, 50), "queue_p99_ms": percentile_ms(queue, 99),
        "dispatch_p50_ms": percentile_ms(dispatch, 50), "dispatch_p99_ms": percentile_ms(dispatch, 99),
        "e2e_p50_ms": percentile_ms(e2e, 50) if with_sink else "",
        "e2e_p99_ms": percentile_ms(e2e, 99) if with_sink else "",
        **{f"{name}_cpu_pct": 100 * seconds / wall for name, seconds in cpu.items() if seconds is not None},
        "broker_ms_per_batch": 1000 * (cpu["broker"] or 0.0) / timing.batches,
        "broker_us_per_claim": 1e6 * (cpu["broker"] or 0.0) / claims,
    }  # fmt: skip
    return {name: round(value, 3) if isinstance(value, float) else value for name, value in row.items()}


def broker_counter(broker: Child, name: str) -> int:
    """A counter of a broker that has stopped, from the last ``broker_stats`` line of its JSON log."""
    stats = [line for line in broker.log.read_text(errors="replace").splitlines() if '"broker_stats"' in line]
    return int(json.loads(stats[-1]).get(name, 0)) if stats else 0


def check_simulators(stats: list[SimulatorStats], batches: int, workers: int, copies: int = 0) -> None:
    """Every batch assigned exactly once (alone or in a slice), besides the copies the broker made at the end
    of the queue (an idle worker takes what another holds unstarted), to workers that never lost the broker,
    without protocol errors."""
    held: dict[str, int] = {}
    for each in stats:
        held.update(each.held)
    assigned = sum(s.assigned for s in stats)
    errors = [e for s in stats for e in s.errors]
    problems = []
    if sum(held.values()) != batches or assigned != len(held) + copies:
        problems.append(f"{sum(held.values())} batches in {assigned} assignments ({len(held)} distinct) for "
                        f"{batches} submitted and {copies} copies")  # fmt: skip
    if errors:
        problems.append(f"{len(errors)} protocol errors, first: {errors[0]}")
    if sum(s.disconnects for s in stats):
        problems.append(f"the broker forgot {sum(s.disconnects for s in stats)} workers (missed heartbeats?)")
    if sum(s.unexpected for s in stats):
        problems.append(f"{sum(s.unexpected for s in stats)} unexpected messages")
    if problems:
        raise PervadeError(f"simulated workers ({workers}): " + "; ".join(problems))


# --- the report -------------------------------------------------------------------------------------


def draw(ax: Any, rows: list[dict[str, Any]]) -> None:
    """claims/s against workers (left axis, with the target), per-batch queue latency p50/p99 (right)."""
    latency = ax.twinx()
    series_index = 0
    for batch in sorted({r["batch"] for r in rows}):
        for sink in ("yes", "no"):
            series = sorted((r for r in rows if r["batch"] == batch and r["sink"] == sink), key=lambda r: r["workers"])
            if not series:
                continue
            label = f"batch {batch}, {'sink' if sink == 'yes' else 'no sink'}"
            xs, color = [r["workers"] for r in series], f"C{series_index}"
            series_index += 1
            ax.plot(xs, [r["claims_per_s"] for r in series], marker="o", color=color, label=f"claims/s ({label})")
            for q, marker, style in (("p50", "^", "--"), ("p99", "v", ":")):
                values = [r[f"queue_{q}_ms"] for r in series]
                latency.plot(xs, values, marker=marker, linestyle=style, color=color, label=f"queue {q} ({label})")
    for batch, target in TARGETS.items():
        ax.axhline(target, color="red", linewidth=0.8, label=f"target at batch {batch}: {target:,} claims/s")
    ax.set_xscale("log")
    ax.set_xlabel("simulated workers (null model)")
    ax.set_ylabel("claims/s routed, end to end")
    top = max([*TARGETS.values(), *(r["claims_per_s"] for r in rows)])
    ax.set_ylim(0, top * 1.6)  # headroom for the legend
    latency.set_yscale("log")
    lowest = min(min(r["queue_p50_ms"] for r in rows), 1.0)
    latency.set_ylim(lowest / 2, max(r["queue_p99_ms"] for r in rows) * 30)
    latency.set_ylabel("per-batch latency, submitted to assigned (ms)")
    lines, labels = ax.get_legend_handles_labels()
    more_lines, more_labels = latency.get_legend_handles_labels()
    ax.legend(lines + more_lines, labels + more_labels, fontsize=7, loc="upper left")


def verdict(report: Report) -> None:
    """A note per row at a target's batch size, and the verdict against each target."""
    for batch, target in TARGETS.items():
        at_target = [r for r in report.rows if r["batch"] == batch and r["sink"] == "yes"]
        if not at_target:
            report.note(f"no row at batch {batch} with a sink: the target ({target:,} claims/s) was not measured")
            continue
        for row in at_target:
            busy = row["broker_cpu_pct"]
            limit = "the broker saturated its core" if busy >= 90 else f"the broker idle {100 - busy:.0f}% of the time"
            report.note(
                f"batch {batch}, {row['workers']:,} workers: {row['claims_per_s']:,.0f} claims/s, "
                f"{'meets' if row['claims_per_s'] >= target else 'BELOW'} the target of {target:,} "
                f"({row['claims_per_s'] / target:.0%}); {limit}; broker CPU {row['broker_ms_per_batch']:.3f} ms per "
                f"batch, {row['broker_us_per_claim']:.1f} us per claim: one free core would route "
                f"{1e6 / row['broker_us_per_claim']:,.0f} claims/s"
            )
        below = [r for r in at_target if r["claims_per_s"] < target]
        report.note(
            f"verdict: {target:,} claims/s at batch {batch} "
            + (f"MISSED in {len(below)} of {len(at_target)} rows" if below else f"met in all {len(at_target)} rows")
        )


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000], help="simulated workers per row (default: 10 100 1000)")  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32], help="claims per batch (default: 32)")
    parser.add_argument("--claims", type=int, default=500_000, help="claims per row (default: 500000)")
    parser.add_argument("--sink", choices=["with", "without", "both"], default="with", help="rows with a real sink writing Parquet, without one (the broker only routes to workers), or both (default: with)")  # fmt: skip
    parser.add_argument("--prefetch", type=int, default=1, help="batches a simulated worker holds beyond the one in hand; it grants credit prefetch + 1, as the real worker (default: 1)")  # fmt: skip
    parser.add_argument("--max-unacked", type=int, default=DEFAULT_MAX_UNACKED, help=f"producer's batches in flight without the broker's acknowledgement (default: {DEFAULT_MAX_UNACKED}, the producer's default)")  # fmt: skip
    parser.add_argument("--max-unacked-pairs", type=int, default=DEFAULT_MAX_UNACKED_PAIRS, help=f"producer's pairs in flight without the broker's acknowledgement (default: {DEFAULT_MAX_UNACKED_PAIRS:,}, the producer's default)")  # fmt: skip
    parser.add_argument("--workers-per-process", type=int, default=500, help="simulated workers per simulator process (default: 500)")  # fmt: skip
    parser.add_argument("--roll-seconds", type=float, default=2.0, help="the sink's --roll-seconds (default: 2, the sink's default)")  # fmt: skip
    parser.add_argument("--idle-roll-seconds", type=float, default=0.5, help="the sink's --idle-roll-seconds (default: 0.5, the sink's default)")  # fmt: skip
    parser.add_argument("--fever", type=Path, default=DEFAULT_FEVER, help="FEVER .jsonl file the claim texts come from; generated sentences if missing (default: ../shared/data/fever/paper_dev.jsonl)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="give up a row after this many seconds of submitting or waiting (default: 600)")  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level of the broker and the sink (default: info, as deployed)")  # fmt: skip
    parser.add_argument("--profile-broker", action="store_true", help="run the broker under cProfile and print its hottest functions after each row (slows it down)")  # fmt: skip
    parser.add_argument("--profile-lines", type=int, default=25, help="functions printed per profile (default: 25)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"where the CSV and PNG go (default: {DEFAULT_OUT_DIR})")  # fmt: skip
    parser.add_argument("--name", default="broker_capacity", help="name of the CSV and PNG files (default: broker_capacity)")  # fmt: skip
    parser.add_argument("--keys", action="store_true", help="CURVE keys on every connection (pervade keys init into the run's directory; every process gets them as $PERVADE_KEYS), as on a cluster")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep each row's directory (logs, Parquet, broker profile)")
    parser.add_argument("--verbose", action="store_true", help="print each row's broker pid and directory (to attach a profiler)")  # fmt: skip
    args = parser.parse_args(argv)
    positive = ("claims", "max_unacked", "max_unacked_pairs", "workers_per_process", "timeout", "roll_seconds", "idle_roll_seconds")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.prefetch < 0:
        parser.error("--prefetch must be 0 or more")
    if min(args.workers) < 1 or min(args.batch_sizes) < 1:
        parser.error("--workers and --batch-sizes must be at least 1")
    return args


def prepare(args: argparse.Namespace, root: Path) -> Setup:
    """The context (the tiny model's files hashed, as the produce command does), the template, the claims."""
    from pervade.jobs.local import ensure_tiny_model
    from pervade.producer.templates import load_templates

    context = make_context(str(ensure_tiny_model()))
    template_id, template = next(iter(load_templates().items()))
    env = {k: v for k, v in os.environ.items() if k != KEYS_ENV}  # plain TCP on loopback, unless --keys
    env["PYTHONUNBUFFERED"] = "1"
    keys = None
    if args.keys:
        keys = root / "keys"
        init_keys(keys, force=True)
        env[KEYS_ENV] = str(keys)  # the broker, the sink and the simulators read it
    return Setup(context, template_id, template, load_pool(args.fever), root, env, keys)


async def measure(args: argparse.Namespace, setup: Setup, report: Report) -> None:
    modes = {"with": [True], "without": [False], "both": [True, False]}[args.sink]
    for batch_size in args.batch_sizes:
        for workers in args.workers:
            for with_sink in modes:
                report.add(**await run_row(args, setup, workers, batch_size, with_sink))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "simulate":
        return simulate(sys.argv[2:])
    args = parse_args(sys.argv[1:])
    configure_logging("warning", json=False)  # the producer's info lines would break up the table
    root = Path(tempfile.mkdtemp(prefix="pervade-capacity-"))
    try:
        raise_file_limit(2 * max(args.workers) + 1024)  # the broker (a child) inherits it
        setup = prepare(args, root)
        fever = args.fever if args.fever.exists() else None
        report = Report(args.name, columns=COLUMNS, out_dir=args.out_dir)
        report.header(
            f"broker capacity, null-model workers: {args.claims:,} claims per row "
            f"({'FEVER texts from ' + str(fever) if fever else 'generated sentences'}), 1 template, "
            f"prefetch {args.prefetch} (credit {args.prefetch + 1} per worker), producer max unacked {args.max_unacked} batches and {args.max_unacked_pairs:,} pairs, "
            f"{args.workers_per_process} workers per simulator process",
            "latency (ms): queue = submitted_at -> assign at the worker; dispatch = assignable (submitted and a "
            "credit free) -> assign; e2e = submitted_at -> Parquet file closed",
            f"broker, sink, producer and simulators share this machine's {os.cpu_count()} cores "
            f"(1-minute load average at the start: {os.getloadavg()[0]:.1f})",
        )
        collect_garbage_rarely()  # the producer runs in this process: its collector as `pervade produce` sets it
        asyncio.run(measure(args, setup, report))
    except PervadeError as exc:
        print(f"broker_capacity: error: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"# kept the rows' directories in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    verdict(report)
    report.finish(draw, title=f"Broker capacity with null-model workers ({args.claims:,} claims per row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

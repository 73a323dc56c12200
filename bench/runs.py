"""One timed run of a workload through the whole pipeline, as processes: what the RQ benchmarks repeat with
one setting changed (batch size, context mode, workers).

A broker, a sink (``--until-done``) and ``workers`` workers start and must be serving before the clock
starts; then a producer submits the workload with ``--wait``. Three clocks come back (``PipelineRun``), and
the output is checked: every (claim, template) pair exactly once, unless the run was cut short.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from benchkit import DEFAULT_OUT_DIR
from chaos import FEVER_DEV, RunSettings, Workload, load_workload, wait_for_serving

from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.cluster import ClusterLab, LabConfig, LinkShape
from pervade.jobs.local import default_cache_dir
from pervade.keys import init_keys
from pervade.producer.claims import sample_claims_path
from pervade.producer.templates import dump_templates
from pervade.sinks.summary import read_verdicts
from pervade.smollm2 import ensure_smollm2
from pervade.tinymodel import SHAPES, build_tiny_model

CLAIMS_FILE_HELP = "claims (default: ../shared/data/fever/paper_dev.jsonl, else the shipped sample)"


@dataclass(frozen=True)
class PipelineRun:
    pairs: int
    #: Producer start to exit (every pair durably written), or to the time limit.
    end_to_end_s: float
    #: First batch submitted to the producer's exit: the pipeline without the producer's own start-up.
    pipeline_s: float
    #: First batch started to last finished on a worker.
    compute_s: float
    #: Model builds the workers logged (resident loads and per-batch builds).
    model_loads: int
    #: False when the time limit ended the run before every pair was written.
    complete: bool


async def run_pipeline(
    workload: Workload,
    base: Path,
    workers: int = 1,
    threads: int = 1,
    mode: str = "full",
    limit_s: float = 900.0,
) -> PipelineRun:
    """Run ``workload`` with ``workers`` CPU workers in context ``mode``; stop it after ``limit_s``."""
    cluster = LocalCluster(base, log_level="debug" if mode != "full" else "info")  # debug logs per-batch builds
    try:
        templates_file = await start_serving(cluster, workload, workers, threads, mode)
        started = time.time()
        await cluster.start_producer(*producer_args(workload, templates_file))
        producer = cluster.procs.children["producer"]
        try:
            code = await asyncio.wait_for(producer.wait(), limit_s)
        except TimeoutError:
            code = None
        ended = time.time()
        if code not in (0, None):
            raise RuntimeError(f"the producer failed with status {code}:\n{cluster.procs.tail('producer')}")
        if code == 0:
            await asyncio.wait_for(cluster.procs.children["sink"].wait(), 60)
    finally:
        await cluster.stop()
    return _summarize(cluster, workload, started, ended, complete=code == 0)


async def start_serving(cluster: LocalCluster, workload: Workload, workers: int, threads: int, mode: str) -> Path:
    """A broker, a sink (``--until-done``) and ``workers`` workers in context ``mode``, all serving; returns
    the templates file the producer is to read."""
    cluster.base.mkdir(parents=True, exist_ok=True)
    templates_file = cluster.base / "templates.json"
    templates_file.write_text(dump_templates(workload.templates))
    await cluster.start_broker()
    await cluster.start_sink("--until-done")
    for _ in range(workers):
        await cluster.start_worker(*worker_args(mode, threads))
    await wait_for_serving(cluster, workers)
    return templates_file


def _summarize(cluster: LocalCluster, workload: Workload, started: float, ended: float, complete: bool) -> PipelineRun:
    table = read_verdicts(cluster.out_dir, ["claim_id", "template_id", "submitted_at", "started_at", "finished_at"])
    pairs = set(zip(table["claim_id"].to_pylist(), table["template_id"].to_pylist(), strict=True))
    if table.num_rows != len(pairs) or not pairs <= workload.expected:
        raise RuntimeError(f"output not exact: {table.num_rows} rows for {len(pairs)} distinct pairs")
    if complete and len(pairs) != len(workload.expected):
        raise RuntimeError(f"{len(workload.expected) - len(pairs)} pairs missing from a complete run")
    first_submitted = pc.min(table["submitted_at"]).as_py().timestamp()
    compute = pc.max(table["finished_at"]).as_py() - pc.min(table["started_at"]).as_py()
    loads = sum(
        len([e for e in cluster.events(name, "context_loaded") if e.get("resident")])
        + len(cluster.events(name, "batch_context_loaded"))
        for name in cluster.procs.children
        if name.startswith("worker-")
    )
    return PipelineRun(len(pairs), ended - started, ended - first_submitted, compute.total_seconds(), loads, complete)


# The workload every benchmark builds the same way.


#: ``--size`` for the real model rather than a random one.
REAL_MODEL = "smollm2-135m-instruct"


def add_workload_args(parser: argparse.ArgumentParser, claims: int, batch_sizes: list[int] | None = None) -> None:
    """--claims, --templates, --claims-file, --size, --model, --batch-size (or --batch-sizes when a script
    sweeps them), --out-dir, --base-dir and --keep."""
    parser.add_argument("--claims", type=int, default=claims, help=f"claims (default: {claims})")
    parser.add_argument("--templates", type=int, default=2, help="the first K shipped templates (default: 2)")
    if batch_sizes is None:
        parser.add_argument("--batch-size", type=int, default=32, help="claims per batch (default: 32)")
    else:
        parser.add_argument("--batch-sizes", type=int, nargs="+", default=batch_sizes,
                            help=f"claims per batch, one run each (default: {' '.join(map(str, batch_sizes))})")  # fmt: skip
    parser.add_argument("--claims-file", type=Path, default=default_claims_file(), help=CLAIMS_FILE_HELP)
    parser.add_argument("--size", default="small", choices=[*sorted(SHAPES), REAL_MODEL],
                        help=f"offline random model of this shape (default: small), or {REAL_MODEL}: the real "
                        "SmolLM2-135M-Instruct pervade run uses (pervade/smollm2.py)")  # fmt: skip
    parser.add_argument("--model", type=Path, default=None, help="a model directory instead of --size")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="CSV and PNG (default: bench/results)")
    parser.add_argument("--base-dir", type=Path, default=None, help="runs' logs and output (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep --base-dir even when every run passed")


def workload_from_args(args: argparse.Namespace, prefix: str) -> tuple[Workload, Path, Path]:
    """The workload the arguments name, the model directory, and the base directory for the runs."""
    batch_size = getattr(args, "batch_size", None) or args.batch_sizes[0]
    if min(args.claims, args.templates, batch_size, *getattr(args, "batch_sizes", [1])) < 1:
        raise SystemExit("--claims, --templates and batch sizes must be positive")
    base = (args.base_dir or Path(tempfile.mkdtemp(prefix=f"pervade-{prefix}-"))).resolve()
    model = (args.model or (ensure_smollm2() if args.size == REAL_MODEL else ensure_sized_model(args.size))).resolve()
    claims_file = claims_with_at_least(args.claims_file.resolve(), args.claims, base)
    return build_workload(claims_file, args.claims, args.templates, model, batch_size), model, base


def finish_runs(base: Path, failures: dict[str, list[str]], keep: bool) -> int:
    """Report the runs that failed (label: problems), keep the runs' directory when asked or when one failed
    (its logs say why), else remove it; returns the script's exit status."""
    for label, problems in failures.items():
        print(f"\n## {label}: FAILED (logs in {base})", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
    if failures or keep:
        print(f"# runs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failures else 0


def ensure_sized_model(size: str, cache_dir: Path | None = None) -> Path:
    """An offline random model of ``size`` (pervade.tinymodel.SHAPES), built once into the cache and reused
    (same seed, same weights): ``ensure_tiny_model`` for any size."""
    target = (cache_dir or default_cache_dir()) / f"tiny-model-{size}-v1"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-model-{size}-", dir=target.parent))
    print(f"# building a {size} random model into {target} ...", file=sys.stderr, flush=True)
    build_tiny_model(staging, size)
    try:
        staging.rename(target)  # atomic: a concurrent run never sees half a model
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another run won the race
    return target


def default_claims_file() -> Path:
    return FEVER_DEV if FEVER_DEV.exists() else sample_claims_path()


def claims_with_at_least(claims_file: Path, count: int, base: Path) -> Path:
    """``claims_file``, or, when it is a JSON-lines file with fewer than ``count`` claims (the shipped sample
    has 60), a copy under ``base`` that repeats its records with ids made distinct (``ID~k``), so that a
    workload of ``count`` claims exists without FEVER. Duplicated texts cost the same to score."""
    if claims_file.suffix != ".jsonl":
        return claims_file
    records = [json.loads(line) for line in claims_file.read_text().splitlines() if line.strip()]
    if len(records) >= count or not records:
        return claims_file
    base.mkdir(parents=True, exist_ok=True)
    padded = base / f"claims-{count}.jsonl"
    with padded.open("w") as handle:
        for index in range(count):
            record = dict(records[index % len(records)])
            lap = index // len(records)
            if lap:
                record["id"] = f"{record['id']}~{lap}"
            handle.write(json.dumps(record) + "\n")
    print(f"# {claims_file} has {len(records)} claims; repeating them into {padded}", file=sys.stderr, flush=True)
    return padded


def build_workload(claims_file: Path, claims: int, templates: int, model: Path, batch_size: int) -> Workload:
    """The sweep every run computes, through bench/chaos.py's loader (the same claims and templates)."""
    args = argparse.Namespace(claims_file=str(claims_file), claims=claims, templates=templates, model=str(model),
                              batch_size=batch_size)  # fmt: skip
    return load_workload(args)


def load_line() -> str:
    """The machine's 1-minute load average: every process here shares its cores with whatever else runs."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def settings_for(label: str, workers: int, threads: int, limit_s: float) -> RunSettings:
    """bench/chaos.py's run settings for a run without preemption (what check_output needs)."""
    return RunSettings(label, workers, 0.0, "term", "even", 0, threads, 0.5, 0.0, limit_s)


def worker_args(mode: str, threads: int) -> tuple[str, ...]:
    return ("--device", "cpu", "--threads", str(threads), "--grace-seconds", "5", "--context-mode", mode)


def producer_args(workload: Workload, templates_file: Path) -> tuple[str, ...]:
    return ("--model", workload.model, "--claims", str(workload.claims_file), "--limit", str(workload.claims),
            "--templates", str(templates_file), "--batch-size", str(workload.batch_size), "--wait")  # fmt: skip


@dataclass(frozen=True)
class Placement:
    """Where a benchmark's processes run: this machine over loopback (the default), or the hosts of a cluster
    lab (jobs/lab/cluster.py), keyed, with the model read from the lab's shared file system."""

    lab: ClusterLab | None = None
    keys: Path | None = None

    def cluster(self, base: Path, **settings: Any) -> LocalCluster:
        return LocalCluster(base, lab=self.lab, keys=self.keys, **settings)

    def host_prefix(self, slot: int) -> list[str]:
        """The command prefix that runs a process of the ``slot``-th concurrent slot on its compute host (none
        without a lab): a baseline outside pervade placed like the workers."""
        return self.lab.compute[slot % len(self.lab.compute)].command() if self.lab is not None else []


@contextlib.contextmanager
def on_cluster_lab(base: Path, workload: Workload, model: Path, compute_hosts: int,
                   storage_mbit: float = 1000.0) -> Iterator[tuple[Placement, Workload]]:  # fmt: skip
    """A cluster lab for a benchmark's runs (root only): ``compute_hosts`` hosts, ``model`` copied onto the
    storage host's disk, and the workload naming it on the shared file system; stopped at the end."""
    config = LabConfig(compute_hosts=compute_hosts, storage_link=LinkShape(rate_mbit=storage_mbit))
    lab = ClusterLab.start(config, root=base / "lab")
    try:
        exported = lab.export_dir / "model"
        shutil.copytree(model, exported)
        keys = base / "keys"
        init_keys(keys)
        yield Placement(lab, keys), dataclasses.replace(workload, model=str(lab.on_shared(exported)))
    finally:
        lab.stop()


def add_lab_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lab", action="store_true",
                        help="run across the hosts of a cluster lab, the model on its shared file system (root only)")  # fmt: skip
    parser.add_argument("--storage-mbit", type=float, default=1000.0,
                        help="--lab: the storage link's rate, Mbit/s (default: 1000)")  # fmt: skip


def placement_from_args(args: argparse.Namespace, workload: Workload, model: Path, base: Path,
                        hosts: int) -> contextlib.AbstractContextManager[tuple[Placement, Workload]]:  # fmt: skip
    """With --lab, a cluster lab of ``hosts`` compute hosts and the workload on its shared file system; else
    loopback and the workload as it is."""
    if args.lab:
        return on_cluster_lab(base, workload, model, compute_hosts=hosts, storage_mbit=args.storage_mbit)
    return contextlib.nullcontext((Placement(), workload))


def lab_line(args: argparse.Namespace, hosts: int) -> str:
    """Where the runs happen, for a report's header."""
    if not args.lab:
        return "loopback"
    return (f"a cluster lab ({hosts} compute hosts, model on its shared file system, storage link "
            f"{args.storage_mbit:g} Mbit/s)")  # fmt: skip

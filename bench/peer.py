"""A peer system on the same work: pervade's local pipeline against Ray Data, claims/s and time to first verdict.

    .venv/bin/python bench/peer.py --claims ../shared/data/fever/paper_dev.jsonl --limit 2000 --templates 2 \
        --workers 2 --batch-size 32

What. One run scores the same (claim, template) pairs with the same model, batch size and number of workers
twice: once with pervade (``jobs.local.run_local``: broker, sink, producer and N workers as processes, over
ZeroMQ, verdicts written to Parquet) and once with Ray Data (``ray.data.from_items`` of the pairs,
``map_batches`` with an actor pool of N actors). Both score through the same engine
(``gpuworker.engine.load_context`` once per worker or actor, ``score_claims`` per batch), with the same torch
threads per worker (cores // workers), so the verdicts must be identical: the script compares them pair by
pair and exits with status 1 if any differs or is missing.

How. Pairs are ordered as pervade's producer sends them (each chunk of ``--batch-size`` claims under every
template in turn), so Ray's batches of ``--batch-size`` rows are the same (claims, template) groups; an actor
splits a batch that straddles two templates. The clock of each system starts just before it is called and
includes everything it needs: for pervade, the processes' start-up (importing torch, loading the model,
hashing the model files), the producer reading the claims; for Ray, reading the claims (same reader,
``producer.claims.read_claims``), ``ray.init`` (also reported alone, as ``init_s``), the actors' start-up
and model loading. Columns:

- ``wall_s``: start to the last verdict written (pervade: durably, in Parquet) or received by the driver
  (Ray: the end of ``iter_batches``). Ray's shutdown is not counted, nor pervade's stopping of its workers
  and broker after the sink has stopped.
- ``startup_s``: start to the first batch a worker or actor began scoring (pervade: the earliest
  ``started_at`` in its output; Ray: the actor's own clock, returned with the verdicts).
- ``first_verdict_s``: start to the first batch a worker or actor finished scoring (pervade: the earliest
  ``finished_at``), the same event on both sides.
- ``first_delivered_s``: start to the first verdict the user can read: pervade, the first Parquet file
  closed (its modification time; the sink rolls files every 0.5 to 2 s, docs/output.md), not just scored;
  Ray, the first batch ``iter_batches`` hands the driver (in memory, not durable).
- ``claims_per_s`` = claims / wall_s, ``pairs_per_s`` = (claims x templates) / wall_s.
- ``mismatches``: pairs whose verdicts differ, or that one system has and the other lacks (must be 0).

Caveats. On a small machine (the project's has 2 cores) the systems' own processes share the cores with
the scoring: pervade's broker, sink and producer, Ray's GCS, raylet and driver-side executor; both figures
include that overhead, which a GPU node with idle CPU cores would hide. The systems run one after the
other (``--systems`` sets the order), so the second finds the model files in the page cache. One run each,
no repetitions: rerun to see the spread. Ray runs a private local cluster (``ray.init``) with its own
temporary directory and a fresh authentication token held in the environment (nothing under ``~/.ray``),
shut down and removed at the end even on failure; its dashboard is off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchkit import DEFAULT_OUT_DIR, Report

from pervade.jobs.local import LocalRunConfig, ensure_tiny_model, run_local
from pervade.producer.claims import ClaimsSource, read_claims, sample_claims_path
from pervade.producer.templates import dump_templates, load_templates

#: FEVER's paper_dev split, beside the repository (shared/data/), when this checkout has it.
FEVER_DEV = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fever" / "paper_dev.jsonl"
RAY_REQUIREMENT = "ray[data]==2.60.0"
SYSTEMS = ("pervade", "ray")
COLUMNS = [
    "system", "workers", "threads", "batch", "claims", "pairs", "wall_s", "init_s", "startup_s",
    "first_verdict_s", "first_delivered_s", "claims_per_s", "pairs_per_s", "mismatches",
]  # fmt: skip
#: Environment variables set for Ray's local cluster (token authentication without a file in ~/.ray).
RAY_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
#: Object store of the private Ray cluster: the pairs and verdicts need little, and /dev/shm is shared.
RAY_OBJECT_STORE_BYTES = 512 * 1024**2

#: (claim id, template id) -> (verdict, label scores in LABELS order)
Verdicts = dict[tuple[str, str], tuple[str, tuple[float, ...]]]


@dataclass(frozen=True)
class Workload:
    """What both systems run: the same claims file, templates, model and settings."""

    claims: str
    limit: int | None
    templates: dict[str, str]
    model: str
    dtype: str
    device: str
    workers: int
    threads: int
    batch_size: int


@dataclass(frozen=True)
class Measurement:
    """One system's run: seconds from its start, and its verdicts for the cross-check."""

    system: str
    claims: int
    wall_s: float
    startup_s: float
    first_verdict_s: float
    first_delivered_s: float
    verdicts: Verdicts
    init_s: float | None = None


# --- pervade ---------------------------------------------------------------------------------------------


def measure_pervade(work: Workload, scratch: Path) -> Measurement:
    """``run_local`` on the workload; times from its Parquet output (worker clocks are this machine's)."""
    from pervade.sinks.summary import read_verdicts

    templates_file = scratch / "templates.json"
    templates_file.write_text(dump_templates(work.templates), encoding="utf-8")
    config = LocalRunConfig(
        claims=work.claims, templates=templates_file, out_dir=scratch / "pervade-out", workers=work.workers,
        model=work.model, dtype=work.dtype, device=work.device, limit=work.limit, batch_size=work.batch_size,
        threads_per_worker=work.threads, log_level="warning",
    )  # fmt: skip
    started = time.time()
    result = asyncio.run(run_local(config))
    columns = ["claim_id", "template_id", "verdict", "score_supports", "score_refutes", "score_not_enough_info",
               "started_at", "finished_at"]  # fmt: skip
    table = read_verdicts(result.out_dir, columns)
    if table.num_rows == 0:
        raise RuntimeError(f"pervade wrote no verdicts (logs: {result.log_dir})")
    first_file = min(path.stat().st_mtime for path in result.out_dir.glob("*.parquet"))
    rows = table.to_pylist()
    verdicts: Verdicts = {
        (r["claim_id"], r["template_id"]): (r["verdict"], (r["score_supports"], r["score_refutes"],
                                                           r["score_not_enough_info"]))
        for r in rows
    }  # fmt: skip
    return Measurement(
        system="pervade",
        claims=result.summary.claims,
        wall_s=result.wall_seconds,
        startup_s=min(r["started_at"].timestamp() for r in rows) - started,
        first_verdict_s=min(r["finished_at"].timestamp() for r in rows) - started,
        first_delivered_s=first_file - started,
        verdicts=verdicts,
    )


# --- Ray Data --------------------------------------------------------------------------------------------


class RayScorer:
    """A Ray Data actor: loads the context once, scores a batch of (claim, template) rows per call."""

    def __init__(self, model: str, dtype: str, device: str, threads: int, templates: dict[str, str]) -> None:
        import torch

        from pervade.context import ContextSpec
        from pervade.gpuworker.device import select_device
        from pervade.gpuworker.engine import load_context

        torch.set_num_threads(threads)
        spec = ContextSpec(model=model, dtype=dtype).validate()
        files = model if os.path.isdir(model) else None
        self.context = load_context(spec, select_device(device), files)
        self.templates = templates

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pervade.gpuworker.engine import score_claims

        started = time.time()
        ids, template_ids, texts = list(batch["claim_id"]), list(batch["template_id"]), list(batch["text"])
        verdicts: list[str] = [""] * len(ids)
        scores: list[list[float]] = [[]] * len(ids)
        for template_id in dict.fromkeys(template_ids):  # a batch may straddle two templates
            rows = [i for i, t in enumerate(template_ids) if t == template_id]
            scored = score_claims(self.context, self.templates[template_id], [texts[i] for i in rows])
            for i, verdict, row in zip(rows, scored.verdicts, scored.scores, strict=True):
                verdicts[i], scores[i] = verdict, row
        finished = time.time()
        return {
            "claim_id": ids,
            "template_id": template_ids,
            "verdict": verdicts,
            "scores": scores,
            "started_at": [started] * len(ids),
            "finished_at": [finished] * len(ids),
        }


@contextmanager
def ray_cluster(num_cpus: int, num_gpus: int) -> Iterator[float]:
    """A private local Ray cluster; yields the seconds ``ray.init`` took. Shut down, its temporary directory
    removed and the environment restored on exit, even on failure."""
    temp_dir = Path(tempfile.mkdtemp(prefix="peer-ray-"))
    saved = {name: os.environ.get(name) for name in RAY_ENV}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))  # inherited by Ray's daemons
    try:
        imported = "ray" in sys.modules
        import ray

        if imported:  # Ray reads RAY_AUTH_* at import: refresh it, as ray.init does when it enables tokens itself
            from ray._raylet import Config

            Config.initialize("")
        started = time.perf_counter()
        ray.init(
            num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=RAY_OBJECT_STORE_BYTES, include_dashboard=False,
            _temp_dir=str(temp_dir), logging_level="warning", log_to_driver=False,
        )  # fmt: skip
        yield time.perf_counter() - started
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()  # a no-op when ray.init failed before starting anything
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def pair_items(work: Workload) -> tuple[int, list[dict[str, str]]]:
    """The claims (counted) and their (claim, template) rows, in pervade's producer's order."""
    claims = list(read_claims(ClaimsSource(location=work.claims, limit=work.limit)))
    items = []
    for start in range(0, len(claims), work.batch_size):
        chunk = claims[start : start + work.batch_size]
        for template_id in work.templates:
            items += [{"claim_id": c.claim_id, "text": c.text, "template_id": template_id} for c in chunk]
    return len(claims), items


def gpus_for(device: str) -> int:
    """GPUs to give Ray's cluster: those visible when ``device`` lets the actors use one."""
    import torch

    return torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0


def measure_ray(work: Workload) -> Measurement:
    """Ray Data on the workload: ``map_batches`` with an actor pool of ``workers`` actors."""
    gpus = gpus_for(work.device)
    started = time.time()
    claims, items = pair_items(work)
    with ray_cluster(num_cpus=max(os.cpu_count() or 1, work.workers * work.threads), num_gpus=gpus) as init_s:
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-dataset INFO lines would split the table
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.from_items(items).map_batches(
            RayScorer,
            batch_size=work.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=work.workers),
            num_cpus=work.threads,
            num_gpus=min(1.0, gpus / work.workers) if gpus else 0,
            fn_constructor_kwargs={"model": work.model, "dtype": work.dtype, "device": work.device,
                                   "threads": work.threads, "templates": work.templates},
        )  # fmt: skip
        delivered: float | None = None
        verdicts: Verdicts = {}
        first_started = first_finished = float("inf")
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            delivered = delivered or time.time()
            first_started = min(first_started, float(batch["started_at"].min()))
            first_finished = min(first_finished, float(batch["finished_at"].min()))
            for key in zip(batch["claim_id"], batch["template_id"], batch["verdict"], batch["scores"], strict=True):
                verdicts[(str(key[0]), str(key[1]))] = (str(key[2]), tuple(None if s is None else float(s) for s in key[3]))
        wall = time.time() - started
    if delivered is None:
        raise RuntimeError("Ray Data returned no verdicts")
    return Measurement(
        system="ray",
        claims=claims,
        wall_s=wall,
        startup_s=first_started - started,
        first_verdict_s=first_finished - started,
        first_delivered_s=delivered - started,
        verdicts=verdicts,
        init_s=init_s,
    )


# --- comparison and report -------------------------------------------------------------------------------


def compare(a: Verdicts, b: Verdicts) -> tuple[int, float]:
    """Pairs whose verdicts differ or that only one side has; and the largest score difference on the rest."""
    mismatches = len(a.keys() ^ b.keys())
    largest = 0.0
    for key in a.keys() & b.keys():
        (verdict_a, scores_a), (verdict_b, scores_b) = a[key], b[key]
        mismatches += verdict_a != verdict_b
        largest = max(largest, *(abs(x - y) for x, y in zip(scores_a, scores_b, strict=True) if x is not None))
    return mismatches, largest


def draw(axes: Any, rows: list[dict[str, Any]]) -> None:
    """Claims/s (left axis) and seconds to the first verdict scored and delivered (right axis), per system."""
    positions = list(range(len(rows)))
    width = 0.27
    seconds = axes.twinx()
    bars = [
        axes.bar([p - width for p in positions], [r["claims_per_s"] for r in rows], width, color="tab:blue",
                 label="claims/s (left)"),
        seconds.bar(positions, [r["first_verdict_s"] for r in rows], width, color="tab:orange",
                    label="first verdict scored, s (right)"),
        seconds.bar([p + width for p in positions], [r["first_delivered_s"] for r in rows], width, color="tab:red",
                    label="first verdict delivered, s (right)"),
    ]  # fmt: skip
    for container, owner in zip(bars, (axes, seconds, seconds), strict=True):
        owner.bar_label(container, fmt="%.1f", fontsize=8)
    for owner in (axes, seconds):
        owner.set_ylim(0, owner.get_ylim()[1] * 1.35)  # headroom for the legend
    axes.set_ylabel("claims/s (wall time incl. start-up)")
    seconds.set_ylabel("seconds from the system's start")
    axes.set_xticks(positions, [f"{r['system']}\n{r['workers']} workers, batch {r['batch']}" for r in rows])
    axes.legend(bars, [str(b.get_label()) for b in bars], loc="upper center", ncols=3, fontsize=7)


def add_row(report: Report, work: Workload, m: Measurement, mismatches: int | str) -> None:
    pairs = len(m.verdicts)
    report.add(
        system=m.system, workers=work.workers, threads=work.threads, batch=work.batch_size, claims=m.claims,
        pairs=pairs, wall_s=m.wall_s, init_s="" if m.init_s is None else m.init_s, startup_s=m.startup_s,
        first_verdict_s=m.first_verdict_s, first_delivered_s=m.first_delivered_s,
        claims_per_s=m.claims / m.wall_s, pairs_per_s=pairs / m.wall_s, mismatches=mismatches,
    )  # fmt: skip


def default_claims() -> str:
    return str(FEVER_DEV) if FEVER_DEV.exists() else str(sample_claims_path())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", default=default_claims(), help=f"claims file (default: {FEVER_DEV} if present, "
                        "else the shipped sample)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="at most this many claims")
    parser.add_argument("--templates", type=int, default=None, help="the first N default templates (default: all)")
    parser.add_argument("--model", default=None, help="model directory or hub id (default: the offline tiny model)")
    parser.add_argument("--dtype", default="auto", help="dtype of the weights (auto: fp32 on a CPU)")
    parser.add_argument("--device", default="auto", help="torch device for every worker and actor")
    parser.add_argument("--workers", type=int, default=2, help="pervade workers = Ray actors")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: cores // workers)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="claims per batch (one template)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="which, in this order")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the CSV and PNG go")
    args = parser.parse_args(argv)
    if len(set(args.systems)) != len(args.systems):
        parser.error("--systems: name each system once")
    for name in ("limit", "templates", "workers", "threads", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def workload(args: argparse.Namespace) -> Workload:
    templates = load_templates()
    if args.templates is not None:
        if args.templates > len(templates):
            raise SystemExit(f"--templates {args.templates}: only {len(templates)} default templates")
        templates = dict(list(templates.items())[: args.templates])
    return Workload(
        claims=args.claims, limit=args.limit, templates=templates, model=args.model or str(ensure_tiny_model()),
        dtype=args.dtype, device=args.device, workers=args.workers, batch_size=args.batch_size,
        threads=args.threads or max(1, (os.cpu_count() or 1) // args.workers),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ray_release = ray_version() if "ray" in args.systems else "not run"
    work = workload(args)
    report = Report("peer_ray", columns=COLUMNS, out_dir=args.out_dir)
    report.header(
        f"claims: {work.claims} (limit {work.limit}), templates: {', '.join(work.templates)}",
        f"model: {work.model} ({work.dtype}, {work.device}); Ray {ray_release}",
        "times in seconds from each system's start; see the docstring for what each column measures",
    )
    measured: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="peer-") as scratch:
        for system in args.systems:
            measured.append(measure_pervade(work, Path(scratch)) if system == "pervade" else measure_ray(work))
    mismatches: int | str = "n/a"
    if len(measured) == 2:
        mismatches, largest = compare(measured[0].verdicts, measured[1].verdicts)
    for m in measured:
        add_row(report, work, m, mismatches)
    if len(measured) == 2:
        by = {m.system: m for m in measured}
        pervade, ray = by["pervade"], by["ray"]
        report.note(f"verdicts: {mismatches} of {len(pervade.verdicts)} pairs differ or are missing; largest label "
                    f"score difference {largest:.2e}")  # fmt: skip
        throughput = (pervade.claims / pervade.wall_s) / (ray.claims / ray.wall_s)
        report.note(
            f"pervade/Ray: claims/s x{throughput:.2f} (above 1: pervade is faster), "
            f"first verdict scored x{pervade.first_verdict_s / ray.first_verdict_s:.2f}, "
            f"first delivered x{pervade.first_delivered_s / ray.first_delivered_s:.2f} (below 1: pervade is sooner)"
        )
    report.finish(draw, title=f"pervade vs Ray Data: {work.workers} workers, batch {work.batch_size}")
    return 1 if isinstance(mismatches, int) and mismatches else 0


def ray_version() -> str:
    """Ray's version; exits with the install command when Ray Data is missing (before anything runs)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        installed = version("ray")
    except PackageNotFoundError:
        installed = None
    if installed is None or find_spec("pandas") is None:  # ray.data needs ray's "data" extra (pandas, pyarrow)
        raise SystemExit(f"Ray Data is not installed: .venv/bin/pip install '{RAY_REQUIREMENT}'")
    return installed


if __name__ == "__main__":
    sys.exit(main())

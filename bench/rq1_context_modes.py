"""RQ1: what the context costs. One workload in the three context modes, against a naive baseline.

    .venv/bin/python bench/rq1_context_modes.py
    .venv/bin/python bench/rq1_context_modes.py --claims 1024 --templates 4 --workers 2 --size medium

Reproduces the first experiment of Phung & Thain (arXiv 2510.14024): the same fact-checking sweep run
with the model context treated three ways, plus the naive way a user would script it. The paper reports,
on 20 GPUs with SmolLM2-1.7B, 72.1% less time with full context management than context-agnostic, and
a naive baseline far behind both. Here, on this machine, every row computes the same workload: the first
``--claims`` claims (``../shared/data/fever/paper_dev.jsonl``, else the shipped sample) under the first
``--templates`` shipped templates, in batches of ``--batch-size`` claims (one batch = one template), with
``--workers`` concurrent workers (each ``cores / workers`` torch threads, the CPU's stand-in for a GPU):

- ``naive``: the baseline, implemented here, not in pervade. For every batch a fresh Python process
  (``python -c``, ``NAIVE_CHILD``) imports torch and transformers, loads the model from its directory,
  calls ``model.generate`` (greedy, ``--max-new-tokens``) once per claim, parses the verdict out of the
  generated text (the first of the words SUPPORTS, REFUTES or NOT in it), writes the verdicts and exits;
  ``--workers`` such processes run at once until every batch is done. No broker, no reuse of anything.
- ``agnostic``: pervade (``--context-mode agnostic``): each batch builds the model from its origin.
- ``partial``: the files are cached on the worker's node once; each batch builds the model from them.
- ``full``: pervade's default: the model is loaded once per worker and stays resident, with what is derived
  from it (the tokenizer, each template's prefix KV cache), and prefetched batches of one template are
  scored together. In agnostic and partial all of that is rebuilt for every batch, one batch a pass: the
  difference measured is the whole context, not the weights alone.

The pervade rows run a real broker, sink, workers and producer as processes (``jobs.cluster.LocalCluster``,
as ``bench/chaos.py`` does). Columns:

- ``wall s``: end to end. pervade: from starting the broker (so worker start-up, torch import and the
  first model load are included) until the producer's ``--wait`` returns, i.e. every pair durably written
  to Parquet. naive: from the first process spawned until the last batch's verdicts are written.
- ``run s``: pervade only: from the producer's start (workers already connected) to its exit. The
  producer's own start (importing ``datasets``, hashing the model into a manifest) is about 3 s of it.
- ``compute s``: from the first batch started to the last one finished (the Parquet ``started_at`` and
  ``finished_at`` columns; naive: the wall time). ``batch s``: the compute time of one batch: pervade's
  worker busy time (``finished_at - started_at`` of every distinct pass; in full mode a worker scores its
  prefetched batches together in one pass, which then counts once) over the batches (model build included
  in agnostic and partial); naive's process lifetime, spawn to exit. These two leave out the fixed
  start-up costs that dominate a small run's wall time.
- ``pairs``, ``pairs/s``: (claim, template) inferences and pairs / wall s.
- ``model loads``: models built. pervade: the workers' log events (``context_loaded`` with the model
  resident, plus one ``batch_context_loaded`` per batch built on the spot, logged at debug level).
  naive: one per batch process. ``load s`` is their mean duration (naive: process start to model loaded,
  imports included, as measured inside each process).
- ``x naive``: naive wall / this wall. ``vs agnostic``: the time saved against agnostic, in percent (the
  paper's 72.1% figure is this column for ``full``).
- ``exact``: every (claim, template) pair exactly once in the output (Parquet, or the naive JSON files).

On the cluster lab (``--lab``, root only; ``jobs/lab/cluster.py``): every row runs across hosts, and the
model is read from the lab's shared file system over its storage link, shaped to each of ``--storage-mbit``
in turn (one table row per mode and rate; ``storage Mb/s`` column). The broker, sink and producer run on the
login host, each worker (and each naive process's slot) on a compute host of its own, and the model's origin
is the storage host's disk, reached with sshfs with no page cache across opens: an agnostic batch or a naive
process pays a real network read of the whole model, as on a cluster's shared file system. Per rate, the
notes give the paper's proportion (an agnostic batch's model build over a full batch's compute: the paper's
10,400 s / 2,900 s = 3.59 means a load of about 2.6 batches of compute) and ``full`` against its ideal:
the workers' total compute time / workers, plus one model load.

Caveats, and they matter here: the model is the offline random ``--size small`` LlamaForCausalLM (17 MB)
on a CPU, and its "origin" is a directory on this machine's local disk, in the page cache. Building it
again costs tens of milliseconds, against minutes for SmolLM2-1.7B from a shared file system onto a GPU,
so agnostic and partial cost little more than full here; what the machine can show is the order of the
modes and the per-batch process start-up that sinks the naive baseline. ``--size medium`` (110 MB) widens
the gap a little. The random model's generations rarely name a label, so the naive verdicts are mostly
unparsed (counted in the notes): the baseline's cost is honest, its answers are not meaningful, and
neither are pervade's (random weights). Every process shares the machine's cores, so other load on the
machine shows in the times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from benchkit import Report
from chaos import RunReport, Workload, check_output
from runs import (
    Placement,
    add_workload_args,
    finish_runs,
    load_line,
    on_cluster_lab,
    producer_args,
    settings_for,
    start_serving,
    workload_from_args,
)

from pervade.jobs.cluster import LocalCluster
from pervade.jobs.lab.cluster import LinkShape
from pervade.producer.claims import ClaimsSource, read_claims
from pervade.prompts import PromptTemplate
from pervade.sinks.summary import read_verdicts

MODES = ("naive", "agnostic", "partial", "full")
SINK_EXIT_TIMEOUT_S = 60.0

#: The naive baseline's whole program, run as ``python -c NAIVE_CHILD SPEC.json OUT.json`` once per batch. It
#: imports only torch and transformers, as a user's script would; it is a string so that the child does not
#: import this benchmark (and pyarrow, zmq, ...) on top.
NAIVE_CHILD = r"""
import json, os, re, sys, time
started = time.time()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(spec["threads"])
tokenizer = AutoTokenizer.from_pretrained(spec["model"])
model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
loaded = time.time()
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
labels = {"SUPPORTS": "SUPPORTS", "REFUTES": "REFUTES", "NOT": "NOT ENOUGH INFO"}
rows = []
with torch.inference_mode():
    for claim in spec["claims"]:
        prompt = spec["template"].replace("{claim}", claim["text"])
        if spec["chat"]:
            system = [{"role": "system", "content": spec["system"]}] if spec["system"] else []
            prompt = tokenizer.apply_chat_template(system + [{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not spec["chat"])
        output = model.generate(**inputs, max_new_tokens=spec["max_new_tokens"], do_sample=False, pad_token_id=pad)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        found = re.search(r"\b(SUPPORTS|REFUTES|NOT)\b", text.upper())
        rows.append({"claim_id": claim["id"], "template_id": spec["template_id"], "text": text,
                     "verdict": labels[found.group(1)] if found else None})
partial = sys.argv[2] + ".partial"
with open(partial, "w") as handle:
    json.dump({"load_s": loaded - started, "rows": rows}, handle)
os.replace(partial, sys.argv[2])
"""


@dataclass
class ModeResult:
    """One row of the table: a mode's run of the workload."""

    mode: str
    wall_s: float
    pairs_done: int
    model_loads: int
    load_s_mean: float | None
    exact: bool
    #: pervade only: from the producer's start (workers connected) to its exit.
    run_s: float | None = None
    #: From the first batch started to the last one finished.
    compute_s: float | None = None
    #: Mean seconds per batch: compute time in pervade (finished_at - started_at), process lifetime in naive.
    batch_s: float | None = None
    problems: list[str] = field(default_factory=list)
    #: naive only: generations in which a label word was found.
    parsed: int | None = None


@dataclass(frozen=True)
class NaiveBatch:
    batch_id: str
    template_id: str
    template: PromptTemplate
    claims: list[dict[str, str]]


def model_loads(cluster: LocalCluster) -> list[float]:
    """Seconds of every model build the workers logged: resident loads, and per-batch builds (debug)."""
    seconds: list[float] = []
    for name in cluster.procs.children:
        if name.startswith("worker-"):
            seconds += [float(e["seconds"]) for e in cluster.events(name, "context_loaded") if e.get("resident")]
            seconds += [float(e["seconds"]) for e in cluster.events(name, "batch_context_loaded")]
    return seconds


async def run_pervade(
    mode: str, workload: Workload, base: Path, workers: int, threads: int, limit_s: float, place: Placement
) -> ModeResult:
    """The workload through a real broker, sink, workers and producer in one context mode."""
    cluster = place.cluster(base, log_level="debug")  # debug: the per-batch model builds are logged
    problems: list[str] = []
    run_s = None
    started = time.perf_counter()
    try:
        templates_file = await start_serving(cluster, workload, workers, threads, mode)
        t0 = time.perf_counter()
        await cluster.start_producer(*producer_args(workload, templates_file))
        try:
            code = await asyncio.wait_for(cluster.procs.children["producer"].wait(), limit_s)
        except TimeoutError:
            code = None
            problems.append(f"no end after {limit_s:.0f} s: {cluster.rows_written()} rows written")
        wall_s = time.perf_counter() - started
        run_s = time.perf_counter() - t0
        if code not in (0, None):
            problems.append(f"the producer exited with status {code}:\n{cluster.procs.tail('producer')}")
        if code == 0:
            try:
                await asyncio.wait_for(cluster.procs.children["sink"].wait(), SINK_EXIT_TIMEOUT_S)
            except TimeoutError:
                problems.append(f"the sink had not exited {SINK_EXIT_TIMEOUT_S:.0f} s after the job")
    finally:
        await cluster.stop()
    report = RunReport(settings_for(mode, workers, threads, limit_s), workload, base)
    check_output(report, cluster.out_dir)
    loads = model_loads(cluster)
    return ModeResult(mode, wall_s, report.pairs_done, len(loads), mean(loads), report.exact and not problems,
                      run_s=run_s, compute_s=compute_span(cluster.out_dir), batch_s=busy_per_batch(cluster.out_dir),
                      problems=problems + report.problems)  # fmt: skip


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def busy_per_batch(out_dir: Path) -> float | None:
    """Workers' compute time per batch: the duration of every distinct pass (a worker in full mode scores
    several prefetched batches in one pass, and they share its ``started_at`` and ``finished_at``), summed,
    over the number of batches."""
    if not any(out_dir.glob("*.parquet")):
        return None
    table = read_verdicts(out_dir, ["batch_id", "worker_id", "started_at", "finished_at"])
    batches = table.group_by(["batch_id", "worker_id", "started_at", "finished_at"]).aggregate([])
    passes = batches.group_by(["worker_id", "started_at", "finished_at"]).aggregate([])
    busy = pc.sum(pc.subtract(passes["finished_at"], passes["started_at"]).cast(pa.int64())).as_py() or 0
    return busy / 1e6 / batches.num_rows if batches.num_rows else None


def compute_span(out_dir: Path) -> float | None:
    """Seconds from the first batch started to the last one finished, by the output's timing columns."""
    if not any(out_dir.glob("*.parquet")):
        return None
    table = read_verdicts(out_dir, ["started_at", "finished_at"])
    first, last = pc.min(table["started_at"]).as_py(), pc.max(table["finished_at"]).as_py()
    return (last - first).total_seconds()


def naive_batches(workload: Workload) -> list[NaiveBatch]:
    """The same batches the producer makes: chunks of ``batch_size`` claims, one batch per template."""
    claims = [{"id": c.claim_id, "text": c.text}
              for c in read_claims(ClaimsSource(str(workload.claims_file), limit=workload.claims))]  # fmt: skip
    batches = []
    for chunk, first in enumerate(range(0, len(claims), workload.batch_size)):
        for template_id, template in workload.templates.items():
            part = claims[first : first + workload.batch_size]
            batches.append(NaiveBatch(f"{chunk}/{template_id}", template_id, template, part))
    return batches


async def run_naive_batch(batch_file: Path, out_file: Path, log_file: Path, prefix: list[str]) -> float:
    """One naive process (run through ``prefix``: a lab host's nsenter, or nothing), to its end (killed if the
    benchmark is cancelled meanwhile); its lifetime in s."""
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_file.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-c", NAIVE_CHILD, str(batch_file), str(out_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        code = await process.wait()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if code != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"naive batch {batch_file.name} exited with status {code}:\n{tail}")
    return time.perf_counter() - started


async def run_naive(workload: Workload, base: Path, workers: int, threads: int, max_new_tokens: int,
                    limit_s: float, place: Placement) -> ModeResult:  # fmt: skip
    """The baseline: a process per batch that loads the model and generates, ``workers`` at a time."""
    batches = naive_batches(workload)
    for name in ("specs", "out", "logs"):
        (base / name).mkdir(parents=True, exist_ok=True)
    jobs = []
    for index, batch in enumerate(batches):  # written before the clock starts, as a producer would have
        spec = {"model": workload.model, "threads": threads, "max_new_tokens": max_new_tokens,
                "template_id": batch.template_id, "template": batch.template.text, "chat": batch.template.chat,
                "system": batch.template.system, "claims": batch.claims}  # fmt: skip
        spec_file = base / "specs" / f"batch-{index:05d}.json"
        spec_file.write_text(json.dumps(spec))
        jobs.append((spec_file, base / "out" / spec_file.name, base / "logs" / f"batch-{index:05d}.log"))
    free_slots: asyncio.Queue[int] = asyncio.Queue()
    for slot in range(workers):
        free_slots.put_nowait(slot)
    lifetimes: list[float] = []

    async def one(spec_file: Path, out_file: Path, log_file: Path) -> None:
        slot = await free_slots.get()  # a slot is a host: at most one naive process per host at a time
        try:
            lifetimes.append(await run_naive_batch(spec_file, out_file, log_file, place.host_prefix(slot)))
        finally:
            free_slots.put_nowait(slot)

    problems: list[str] = []
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s), asyncio.TaskGroup() as group:  # a failure cancels (kills) the rest
            for job in jobs:
                group.create_task(one(*job))
    except TimeoutError:
        problems.append(f"no end after {limit_s:.0f} s")
    except ExceptionGroup as failed:
        problems += [str(exc) for exc in failed.exceptions]
    wall_s = time.perf_counter() - started
    outputs = [json.loads(out.read_text()) for _, out, _ in jobs if out.exists()]
    rows = [row for output in outputs for row in output["rows"]]
    done, doubled, missing, extra = count_pairs([(r["claim_id"], r["template_id"]) for r in rows], workload.expected)
    if doubled or missing or extra:
        problems.append(f"naive output not exact: {missing} missing, {doubled} doubled, {extra} extra")
    loads = [float(o["load_s"]) for o in outputs]
    parsed = sum(r["verdict"] is not None for r in rows)
    return ModeResult("naive", wall_s, done, len(outputs), mean(loads), not problems, compute_s=wall_s,
                      batch_s=mean(lifetimes), problems=problems, parsed=parsed)  # fmt: skip


def count_pairs(pairs: list[tuple[str, str]], expected: frozenset[tuple[str, str]]) -> tuple[int, int, int, int]:
    """(pairs done, rows doubled, pairs missing, extra pairs) of an output against the expected set."""
    counts = Counter(pairs)
    done = len(counts.keys() & expected)
    doubled = sum(n - 1 for n in counts.values() if n > 1)
    return done, doubled, len(expected - counts.keys()), len(counts.keys() - expected)


def shown(value: float | None, digits: int) -> float | str:
    """A rounded figure, or ``-`` where the row has none."""
    return "-" if value is None else round(value, digits)


def add_rows(report: Report, results: list[ModeResult], storage_mbit: float | None) -> None:
    by_mode = {r.mode: r for r in results}
    naive, agnostic = by_mode.get("naive"), by_mode.get("agnostic")
    for r in results:
        reduction = None if agnostic is None else (1 - r.wall_s / agnostic.wall_s) * 100
        report.add(
            mode=r.mode, storage_mbit=shown(storage_mbit, 0), pairs=r.pairs_done, wall_s=round(r.wall_s, 2),
            run_s=shown(r.run_s, 2), compute_s=shown(r.compute_s, 2), batch_s=shown(r.batch_s, 3),
            pairs_per_s=round(r.pairs_done / r.wall_s, 1), model_loads=r.model_loads,
            load_s=shown(r.load_s_mean, 3), x_naive=shown(None if naive is None else naive.wall_s / r.wall_s, 2),
            vs_agnostic_pct=shown(reduction, 1), exact="yes" if r.exact else "NO",
        )  # fmt: skip


def add_notes(report: Report, results: list[ModeResult], workload: Workload, workers: int, where: str) -> None:
    """The derived figures of one set of rows: time saved, the paper's proportion, full against its ideal."""
    by_mode = {r.mode: r for r in results}
    full, agnostic = by_mode.get("full"), by_mode.get("agnostic")
    if full is not None and agnostic is not None:
        report.note(f"{where}full context took {1 - full.wall_s / agnostic.wall_s:.1%} less wall time than agnostic, "
                    f"agnostic/full {agnostic.wall_s / full.wall_s:.2f} (paper: 72.1% and 3.59, 20 GPUs, SmolLM2-1.7B)")  # fmt: skip
        if full.compute_s and agnostic.compute_s and full.batch_s and agnostic.batch_s:
            build = agnostic.load_s_mean or 0.0
            report.note(
                f"{where}compute span: full {1 - full.compute_s / agnostic.compute_s:.1%} shorter than agnostic; "
                f"mean batch {full.batch_s * 1000:.0f} ms (full) vs {agnostic.batch_s * 1000:.0f} ms (agnostic); "
                f"an agnostic model build {build:.2f} s = {build / full.batch_s:.1f} full batches (paper: about 2.6)"
            )
    if full is not None and full.batch_s and full.load_s_mean and full.compute_s:
        # The job's own time: the model's one load, then the first batch started to the last one finished (the
        # producer's and the workers' start-up, seconds of imports on every run, is left out on both sides).
        batches = len(workload.expected) // min(workload.batch_size, workload.claims_read) or 1
        ideal = full.batch_s * batches / workers + full.load_s_mean
        took = full.compute_s + full.load_s_mean
        report.note(f"{where}full: one load + batches' span {took:.1f} s against an ideal of {ideal:.1f} s (compute "
                    f"{full.batch_s * batches:.1f} s / {workers} workers + one load {full.load_s_mean:.1f} s): "
                    f"{took / ideal - 1:+.1%}")  # fmt: skip
    if "naive" in by_mode and by_mode["naive"].parsed is not None:
        naive = by_mode["naive"]
        report.note(f"{where}naive: {naive.parsed:,} of {naive.pairs_done:,} generations named a label")


def draw(axes: Any, rows: list[dict[str, Any]]) -> None:
    """Wall time and compute span per mode, the wall bar annotated with pairs/s and model loads."""
    xs = range(len(rows))
    walls = [row["wall_s"] for row in rows]
    spans = [row["compute_s"] if row["compute_s"] != "-" else 0.0 for row in rows]
    bars = axes.bar([x - 0.2 for x in xs], walls, 0.4, label="wall (start-up included)")
    axes.bar([x + 0.2 for x in xs], spans, 0.4, label="first batch started to last finished")
    for bar, row in zip(bars, rows, strict=True):
        label = f"{row['pairs_per_s']:,.0f} pairs/s\n{row['model_loads']} loads"
        axes.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    names = [
        row["mode"] if row["storage_mbit"] == "-" else f"{row['mode']}\n{row['storage_mbit']} Mb/s" for row in rows
    ]
    axes.set_xticks(list(xs), names, fontsize=7 if len(rows) > 4 else 10)
    axes.set_ylabel("seconds (same workload)")
    axes.set_ylim(0, max(walls) * 1.25)
    axes.legend(fontsize=8)


def run_modes(
    args: argparse.Namespace, workload: Workload, base: Path, threads: int, place: Placement
) -> list[ModeResult]:
    """Every mode asked for, one after the other, on one placement."""
    results: list[ModeResult] = []
    for mode in args.modes:  # rows print once all are in: x naive and vs agnostic need both
        print(f"# {base.name} {mode} ...", file=sys.stderr, flush=True)
        if mode == "naive":
            run = run_naive(
                workload, base / mode, args.workers, threads, args.max_new_tokens, args.duration_limit, place
            )
        else:
            run = run_pervade(mode, workload, base / mode, args.workers, threads, args.duration_limit, place)
        result = asyncio.run(run)
        print(f"#   {mode}: {result.wall_s:.1f} s, {result.pairs_done:,} pairs", file=sys.stderr, flush=True)
        results.append(result)
    return results


def on_lab(args: argparse.Namespace, workload: Workload, model: Path, base: Path, threads: int,
           report: Report) -> dict[str, list[str]]:  # fmt: skip
    """Every mode at every storage rate, on a lab with a compute host per worker; the failures by label."""
    failures: dict[str, list[str]] = {}
    with on_cluster_lab(base, workload, model, args.workers) as (place, shared):
        for rate in args.storage_mbit:
            place.lab.shape("storage", LinkShape(rate_mbit=rate))
            results = run_modes(args, shared, base / f"storage-{rate:g}", threads, place)
            add_rows(report, results, rate)
            add_notes(report, results, shared, args.workers, f"{rate:g} Mb/s: ")
            failures |= {f"{r.mode} at {rate:g} Mb/s": r.problems for r in results if r.problems or not r.exact}
    return failures


def main() -> int:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, claims=512)
    parser.add_argument("--workers", type=int, default=2, help="concurrent workers / naive processes (default: 2)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="rows to run (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=5, help="naive: tokens generated (default: 5)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="default: cores / workers")
    parser.add_argument("--duration-limit", type=float, default=600.0, help="seconds a row may take (default: 600)")
    parser.add_argument("--lab", action="store_true", help="run across the hosts of a cluster lab (root only)")
    parser.add_argument("--storage-mbit", type=float, nargs="+", default=[1000.0],
                        help="--lab: the storage link's rates, Mbit/s, one set of rows each (default: 1000)")  # fmt: skip
    args = parser.parse_args()
    if min(args.workers, args.max_new_tokens) < 1 or min(args.storage_mbit) <= 0:
        parser.error("--workers, --max-new-tokens and --storage-mbit must be positive")
    workload, model, base = workload_from_args(args, "rq1")
    threads = args.threads_per_worker or max(1, cores // args.workers)
    columns = ["mode", "storage_mbit", "pairs", "wall_s", "run_s", "compute_s", "batch_s", "pairs_per_s",
               "model_loads", "load_s", "x_naive", "vs_agnostic_pct", "exact"]  # fmt: skip
    report = Report("rq1_context_modes" + ("_lab" if args.lab else ""), columns, out_dir=args.out_dir)
    where = f"a cluster lab ({args.workers} compute hosts, model on its shared file system)" if args.lab else "loopback"
    report.header(
        f"RQ1 context modes: {workload.claims_read:,} claims ({args.claims_file.name}) x {len(workload.templates)} "
        f"templates = {len(workload.expected):,} pairs, batch {args.batch_size}, {args.workers} workers x {threads} "
        f"threads, model {model.name}, on {where}; runs in {base}",
        f"{load_line()} at the start",
    )
    if args.lab:
        failures = on_lab(args, workload, model, base, threads, report)
    else:
        results = run_modes(args, workload, base, threads, Placement())
        add_rows(report, results, None)
        add_notes(report, results, workload, args.workers, "")
        failures = {r.mode: r.problems for r in results if r.problems or not r.exact}
    report.note(f"{load_line()} at the end")
    report.finish(draw, f"RQ1: {len(workload.expected):,} pairs, {args.workers} workers, context modes vs naive")
    return finish_runs(base, failures, args.keep or args.base_dir is not None)


if __name__ == "__main__":
    sys.exit(main())

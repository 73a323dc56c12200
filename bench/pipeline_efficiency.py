"""Pipeline efficiency: how much of the device's speed the whole pipeline delivers.

    .venv/bin/python bench/pipeline_efficiency.py
    .venv/bin/python bench/pipeline_efficiency.py --claims 4000 --templates 2 --batch-sizes 8 32 128 --size small

For each batch size, the same claims, templates and model are scored twice:

- **bare loop**: in this process, no networking at all: ``load_context`` once, then ``score_claims`` over
  the claims in batches of that size, one template after the other, with ``--threads`` torch threads. It is
  what a user would write to use the device alone: the upper bound.
- **pipeline**: a real broker, sink, one worker (``--threads`` torch threads on the same device) and
  producer, as processes, the worker already serving. Three clocks:
  - *end to end*: the producer process's start to its exit (every pair durably written in Parquet); this
    includes the producer's own start-up (imports, reading the claims, hashing the model files);
  - *pipeline*: the first batch submitted (``submitted_at`` in the output) to the producer's exit: broker,
    worker (including its first model load) and sink, which is what the issue's ratio is about;
  - *compute*: the first batch started to the last finished on the worker (the output's timing columns).

efficiency = pipeline claims/s / bare claims/s (target >= 0.95); efficiency_compute says how well the
worker keeps its device busy once work flows. On this machine the broker, sink and producer share the second core with the worker's tokenizer
thread, and the worker's tokenization overlaps its device work (the bare loop tokenizes inline), so the
ratio can exceed 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time

import torch
from benchkit import Report
from chaos import Workload
from runs import add_workload_args, finish_runs, run_pipeline, workload_from_args

from pervade.context import make_context
from pervade.gpuworker.engine import load_context, score_claims
from pervade.producer.claims import ClaimsSource, read_claims


def bare_loop(workload: Workload, threads: int) -> float:
    """Seconds to score the workload in this process, batch by batch, with the model already loaded."""
    torch.set_num_threads(threads)
    context = load_context(make_context(workload.model).spec, torch.device("cpu"))
    texts = [c.text for c in read_claims(ClaimsSource(str(workload.claims_file), limit=workload.claims))]
    score_claims(context, next(iter(workload.templates.values())), texts[: workload.batch_size])  # warm-up
    started = time.perf_counter()
    for template in workload.templates.values():
        for first in range(0, len(texts), workload.batch_size):
            score_claims(context, template, texts[first : first + workload.batch_size])
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser, claims=2000, batch_sizes=[32])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker and the bare loop")
    args = parser.parse_args()

    base_workload, model, base = workload_from_args(args, "efficiency")
    columns = ["batch", "pairs", "bare_claims_per_s", "end_to_end_claims_per_s", "pipeline_claims_per_s",
               "efficiency", "compute_claims_per_s", "efficiency_compute"]  # fmt: skip
    report = Report("pipeline_efficiency", columns, out_dir=args.out_dir)
    report.header(
        f"{base_workload.claims_read:,} claims x {len(base_workload.templates)} templates, model {model.name}, "
        f"cpu, {args.threads} torch thread(s) for the worker and the bare loop; {os.cpu_count()} cores in all",
    )
    for batch_size in args.batch_sizes:
        workload = dataclasses.replace(base_workload, batch_size=batch_size)
        bare_s = bare_loop(workload, args.threads)
        run = asyncio.run(run_pipeline(workload, base / f"b{batch_size}", threads=args.threads))
        bare = run.pairs / bare_s
        report.add(batch=batch_size, pairs=run.pairs, bare_claims_per_s=bare,
                   end_to_end_claims_per_s=run.pairs / run.end_to_end_s,
                   pipeline_claims_per_s=run.pairs / run.pipeline_s, efficiency=run.pairs / run.pipeline_s / bare,
                   compute_claims_per_s=run.pairs / run.compute_s,
                   efficiency_compute=run.pairs / run.compute_s / bare)  # fmt: skip

    def draw(axes, rows) -> None:
        xs = range(len(rows))
        series = [("bare loop", "bare_claims_per_s"), ("producer start to end", "end_to_end_claims_per_s"),
                  ("pipeline (first submit to end)", "pipeline_claims_per_s"), ("worker compute span", "compute_claims_per_s")]  # fmt: skip
        width = 0.2
        for i, (label, key) in enumerate(series):
            axes.bar([x + (i - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label)
        axes.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
        axes.set_ylabel("claims/s")
        axes.legend()

    report.finish(draw, "Pipeline efficiency: the whole pipeline against a bare loop on the same device")
    return finish_runs(base, {}, args.keep or args.base_dir is not None)


if __name__ == "__main__":
    sys.exit(main())

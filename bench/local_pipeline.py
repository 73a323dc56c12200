"""Throughput of the whole local pipeline (broker, workers, producer, sink as processes) on FEVER claims.

    .venv/bin/python bench/local_pipeline.py --claims ../shared/data/fever/paper_dev.jsonl --workers 1 2 --batch-sizes 16 64

Prints one row per (workers, batch size): verdicts, wall time from the first process start to the last row
durably written, and verdicts/s. Every run uses a fresh output directory and the offline tiny model unless
``--model`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path

from pervade.jobs.local import LocalRunConfig, ensure_tiny_model, run_local
from pervade.producer.claims import sample_claims_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", default=str(sample_claims_path()), help="claims file (default: the shipped sample)")
    parser.add_argument("--model", default=None, help="model (default: the offline tiny model)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    # Explicitly: pervade run's own default is now SmolLM2-135M-Instruct, and these rows compare with earlier ones.
    model = args.model or str(ensure_tiny_model())

    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    print(f"# claims: {args.claims}  model: {args.model or f'tiny (offline), {model}'}")
    print(f"{'workers':>7} {'batch':>6} {'verdicts':>9} {'wall s':>8} {'verdicts/s':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for batch_size in args.batch_sizes:
                config = LocalRunConfig(
                    claims=args.claims, model=model, workers=workers, batch_size=batch_size,
                    limit=args.limit, out_dir=Path(tmp) / f"w{workers}-b{batch_size}",
                )  # fmt: skip
                result = asyncio.run(run_local(config))
                rows = result.summary.rows
                print(f"{workers:>7} {batch_size:>6} {rows:>9} {result.wall_seconds:>8.1f} {rows / result.wall_seconds:>11.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

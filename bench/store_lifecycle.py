"""The broker store's cost per batch, alone: every batch through its life in the store, no sockets.

    .venv/bin/python bench/store_lifecycle.py                           # 20,000 batches of 1 claim
    .venv/bin/python bench/store_lifecycle.py --batches 50000 --per-commit 8 64 512

What the broker's verbs ask of ``broker/store.py`` for each batch, phase by phase, with a commit every
``--per-commit`` batches (a turn of the broker's loop commits once):

- submit: look the id up (a resubmission?), queue the batch;
- assign: take the front of the queue with its claims, hand it to a worker;
- complete: read the row and claims (a result is checked against them), keep the verdicts, deliver to a sink;
- acknowledge: read the row, mark it written (its claims and verdicts dropped).

It prints the microseconds of one batch in each phase, and the write-ahead log's bytes per batch (what
the broker's checkpoint thread copies into the database). The store is on this machine's disk, in a
temporary directory removed at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchkit import DEFAULT_OUT_DIR, Report, stacked_bars

from pervade.broker.store import BrokerStore
from pervade.context import ContextSpec
from pervade.protocol import Batch, BatchResult, Claim, Verdict

PHASES = ("submit", "assign", "complete", "acknowledge")


def make_batches(count: int, claims: int, spec: ContextSpec) -> list[Batch]:
    return [
        Batch(batch_id=f"job/{n}", job_id="job", context=spec, template_id="t", template="Claim: {claim}\nAnswer:",
              claims=[Claim(claim_id=f"{n}-{i}", text=f"claim {n}-{i} says something checkable") for i in range(claims)],
              submitted_at=time.time())
        for n in range(count)
    ]  # fmt: skip


def result_of(batch: Batch, context_id: str, worker_id: str = "w") -> BatchResult:
    """A null model's result for ``batch`` (``context_id``: its context's id, computed once by the caller)."""
    now = time.time()
    return BatchResult(
        batch_id=batch.batch_id, job_id=batch.job_id, context_id=context_id, model=batch.context.model,
        template_id=batch.template_id, worker_id=worker_id, device="cpu", submitted_at=batch.submitted_at,
        started_at=now, finished_at=now,
        verdicts=[Verdict(claim_id=c.claim_id, verdict="SUPPORTS", scores=[-0.1, -2.3, -3.0]) for c in batch.claims],
    )  # fmt: skip


def run(batches: list[Batch], per_commit: int, directory: Path) -> dict[str, float]:
    """Microseconds per batch in each phase, and KiB of write-ahead log per batch over the whole life."""
    store = BrokerStore.open(directory)
    context_id = batches[0].context.context_id

    def submit(batch: Batch) -> None:
        if store.get(batch.batch_id) is None:
            store.add(batch, context_id)

    def assign(_: Batch) -> None:
        front = store.next_queued_batch(context_id)
        assert front is not None, "the queue ran dry before every batch was assigned"
        store.assign(front[0], b"worker")

    def complete(batch: Batch) -> None:
        found = store.get_with_batch(batch.batch_id)
        assert found is not None
        row = store.complete(found[0], result_of(batch, context_id))
        store.deliver(row, b"sink")

    def acknowledge(batch: Batch) -> None:
        row = store.get(batch.batch_id)
        assert row is not None
        store.written(row)

    steps: dict[str, Callable[[Batch], None]] = dict(zip(PHASES, (submit, assign, complete, acknowledge), strict=True))
    figures: dict[str, float] = {}
    for phase, step in steps.items():
        started = time.perf_counter()
        for first in range(0, len(batches), per_commit):
            for batch in batches[first : first + per_commit]:
                step(batch)
            store.commit()
        figures[f"{phase}_us"] = (time.perf_counter() - started) / len(batches) * 1e6
    log = store.path.with_name(store.path.name + "-wal")
    figures["wal_kib_per_batch"] = log.stat().st_size / len(batches) / 1024  # no checkpoint ran: all of it
    store.close()
    figures["total_us"] = sum(figures[f"{phase}_us"] for phase in PHASES)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=20_000, help="batches through the store (default: 20,000)")
    parser.add_argument("--claims", type=int, default=1, help="claims per batch (default: 1)")
    parser.add_argument("--per-commit", type=int, nargs="+", default=[8, 64, 512],
                        help="batches per commit, one row each (default: 8 64 512)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="CSV and PNG (default: bench/results)")
    args = parser.parse_args()
    if args.batches < 1 or args.claims < 1 or min(args.per_commit) < 1:
        parser.error("--batches, --claims and --per-commit must be at least 1")
    columns = ["batches", "claims", "per_commit", *(f"{p}_us" for p in PHASES), "total_us", "wal_kib_per_batch"]
    report = Report("store_lifecycle", columns=columns, out_dir=args.out_dir)
    report.header("the broker store alone: microseconds per batch in each phase of its life, WAL KiB per batch")
    batches = make_batches(args.batches, args.claims, ContextSpec(model="bench/model"))
    for per_commit in args.per_commit:
        with tempfile.TemporaryDirectory(prefix="pervade-store-") as directory:
            figures = run(batches, per_commit, Path(directory) / "state")
        report.add(batches=args.batches, claims=args.claims, per_commit=per_commit, **figures)

    draw = stacked_bars("per_commit", PHASES, "batches per commit", "us per batch")
    report.finish(draw, title=f"broker store, {args.batches:,} batches of {args.claims}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The broker's view of the run as one ``StatusSnapshot``: what ``pervade status`` shows and what the
Prometheus metrics are made from, O(workers + contexts + jobs); and its jobs alone as a ``RunProgress``,
what a sink's progress bar reads, O(jobs). The jobs are listed by one function for both, so they never
disagree. Built on the broker's event loop (it reads live records)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping

from pervade.broker.records import WorkerRecord
from pervade.broker.store import JobRecord
from pervade.context import ContextSpec
from pervade.protocol import ContextStatus, JobStatus, RunProgress, StatusSnapshot, WorkerStatus

#: Finished jobs listed in a snapshot after the open ones (all jobs count in its totals).
STATUS_FINISHED_JOBS = 20


def worker_state(worker: WorkerRecord) -> str:
    """leaving (said it is preempted), loading (told to load a context not loaded yet), busy (batches in
    hand), or idle."""
    if worker.leaving:
        return "leaving"
    if any(context_id not in worker.loaded for context_id in worker.contexts):
        return "loading"
    return "busy" if worker.in_flight else "idle"


def describe_worker(worker: WorkerRecord, specs: Mapping[str, ContextSpec], now: float) -> WorkerStatus:
    return WorkerStatus(
        worker_id=worker.name,
        host=worker.host,
        device=worker.device.describe(),
        state=worker_state(worker),
        contexts=[specs[c].model if c in specs else c for c in worker.contexts],
        batches_done=worker.batches_done,
        claims_done=worker.claims.total,
        claims_per_s=round(worker.claims.rate(), 2),
        last_seen_s=round(max(0.0, now - worker.last_seen), 2),
        in_flight=len(worker.in_flight),
        credit=worker.credit,
        key=worker.key.name if worker.key is not None else "",
    )


def describe_contexts(
    specs: Mapping[str, ContextSpec], queued: Mapping[str, int], workers: list[WorkerRecord]
) -> list[ContextStatus]:
    """Every context with queued batches or a worker holding it, busiest queue first."""
    holding: Counter[str] = Counter(c for w in workers for c in w.contexts)
    loaded: Counter[str] = Counter(c for w in workers for c in w.loaded)
    shown = sorted(set(queued) | set(holding), key=lambda c: (-queued.get(c, 0), c))
    return [
        ContextStatus(
            context_id=context_id,
            model=specs[context_id].model if context_id in specs else "",
            dtype=specs[context_id].dtype if context_id in specs else "",
            queued_batches=queued.get(context_id, 0),
            workers=holding[context_id],
            loaded_workers=loaded[context_id],
        )
        for context_id in shown
    ]


def describe_job(job: JobRecord) -> JobStatus:
    return JobStatus(
        job_id=job.job_id,
        pairs=job.pairs,
        pairs_done=job.pairs_written + job.pairs_failed,
        pairs_failed=job.pairs_failed,
        batches=job.batches,
        ended=job.ended,
        done=job.done_reported,
    )


def eta_seconds(jobs: list[JobRecord], claims_per_s: float) -> float | None:
    """Seconds until the open jobs' remaining pairs are done at ``claims_per_s``; None when idle."""
    remaining = sum(max(0, j.pairs - j.pairs_written - j.pairs_failed) for j in jobs if not j.done_reported)
    if remaining == 0:
        return 0.0 if jobs else None
    return round(remaining / claims_per_s, 1) if claims_per_s > 0 else None


def shown_jobs(jobs: list[JobRecord]) -> list[JobStatus]:
    """Open jobs, then the most recently finished ones: what a snapshot or a progress reply lists."""
    open_jobs = [j for j in jobs if not j.done_reported]
    finished = [j for j in jobs if j.done_reported][-STATUS_FINISHED_JOBS:]
    return [describe_job(j) for j in open_jobs + finished]


def build_progress(jobs: list[JobRecord], claims_per_s: float) -> RunProgress:
    """The jobs' progress alone (a sink's bar): no worker or context is visited."""
    return RunProgress(taken_at=time.time(), jobs=shown_jobs(jobs), claims_per_s=round(claims_per_s, 2),
                       eta_s=eta_seconds(jobs, claims_per_s))  # fmt: skip


def build_snapshot(
    *,
    endpoint: str,
    started_at: float,
    workers: list[WorkerRecord],
    specs: Mapping[str, ContextSpec],
    queued: Mapping[str, int],
    jobs: list[JobRecord],
    claims_per_s: float,
    batches: Mapping[str, int],
    counters: Mapping[str, int],
    sinks: int,
    producers: int,
) -> StatusSnapshot:
    now, wall = time.monotonic(), time.time()
    return StatusSnapshot(
        endpoint=endpoint,
        taken_at=wall,
        uptime_s=round(wall - started_at, 1),
        workers=sorted((describe_worker(w, specs, now) for w in workers), key=lambda w: w.worker_id),
        contexts=describe_contexts(specs, queued, workers),
        jobs=shown_jobs(jobs),
        pairs_total=sum(j.pairs for j in jobs),
        pairs_done=sum(j.pairs_written + j.pairs_failed for j in jobs),
        claims_per_s=round(claims_per_s, 2),
        eta_s=eta_seconds(jobs, claims_per_s),
        batches=dict(batches),
        counters=dict(counters),
        sinks=sinks,
        producers=producers,
    )

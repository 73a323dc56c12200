"""``produce``: read claims and templates, submit the sweep, optionally wait. What ``pervade produce`` runs,
and what a user's script awaits:

    from pervade.context import make_context
    from pervade.producer import ProduceRequest, produce

    outcome = await produce(ProduceRequest(
        broker="tcp://login1:5555", claims="fever_dev.jsonl",
        context=make_context("HuggingFaceTB/SmolLM2-1.7B-Instruct"), wait=True))
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from pervade.context import DTYPES, ContextSpec, ResolvedContext, make_context
from pervade.errors import JobFailed
from pervade.keys import ClientKeys
from pervade.options import POSITIVE, at_least, broker_option, check_options, nested, option, progress_option
from pervade.producer.claims import ClaimFields, ClaimsReader, ClaimsSource, scan_claims
from pervade.producer.client import Producer, SubmitReport
from pervade.producer.sweep import job_id_for
from pervade.producer.templates import load_templates
from pervade.producer.window import DEFAULT_MAX_UNACKED, DEFAULT_MAX_UNACKED_PAIRS
from pervade.progress import count_bars
from pervade.protocol import JobDone
from pervade.session import Heartbeats

#: Help sections of a sweep's options.
CLAIMS_SECTION = "claims"
MODEL_SECTION = "model (the context)"
#: Seconds between redraws of the submission's progress bars.
PROGRESS_REFRESH_S = 0.2


@dataclass(frozen=True)
class ModelChoice:
    """The model a sweep runs, as the command line names it; ``resolve`` makes it the sweep's context."""

    model: str = option(
        help="a Hugging Face hub id (e.g. HuggingFaceTB/SmolLM2-1.7B-Instruct) or a local model directory",
        flag="--model",
        metavar="ID_OR_DIR",
        group=MODEL_SECTION,
    )
    revision: str | None = option(
        None, "hub revision (branch, tag or commit) of the model", flag="--revision", group=MODEL_SECTION
    )
    dtype: str = option(
        "auto",
        "weights dtype; auto: what each worker's device does best, bf16 on recent GPUs, fp16 on older ones, "
        "fp32 on a CPU",
        flag="--dtype",
        choices=DTYPES,
        group=MODEL_SECTION,
    )

    def spec(self) -> ContextSpec:
        """The context without its files' manifest: validated, and at once."""
        return ContextSpec(model=self.model, revision=self.revision, dtype=self.dtype).validate()

    def resolve(self) -> ResolvedContext:
        """The context with its files' manifest: hashes the model's files (or downloads them), so it blocks:
        call it before the event loop starts, or with ``asyncio.to_thread``."""
        return make_context(self.model, self.revision, self.dtype)


@dataclass(frozen=True)
class ProduceRequest:
    """One sweep: every claim of ``claims`` under every template, for one context."""

    claims: str = option(
        help="a local .jsonl/.json/.csv/.parquet file or a hub dataset name",
        flag="--claims",
        metavar="PATH_OR_HUB_NAME",
        group=CLAIMS_SECTION,
    )
    #: From ``make_context`` (with the files' manifest), or a bare spec for a context without one.
    context: ResolvedContext | ContextSpec
    broker: str = broker_option()
    #: Templates file; None: the shipped default set.
    templates: Path | None = option(
        None,
        "JSON object of template id -> text with one {claim} (default: the shipped set)",
        flag="--templates",
        metavar="FILE",
        group=CLAIMS_SECTION,
    )
    batch_size: int = option(
        32,
        "claims per batch; each batch has one template",
        flag="--batch-size",
        check=at_least(1),
        group=CLAIMS_SECTION,
    )
    limit: int | None = option(
        None, "read at most this many claims", flag="--limit", check=at_least(1), group=CLAIMS_SECTION
    )
    id_field: str = option("id", "record field holding the claim id", flag="--id-field", group=CLAIMS_SECTION)
    claim_field: str = option(
        "claim", "record field holding the claim text", flag="--claim-field", group=CLAIMS_SECTION
    )
    #: None or "": the claims have no gold label.
    label_field: str | None = option(
        "label", "record field holding the gold label; '' for none", flag="--label-field", group=CLAIMS_SECTION
    )
    split: str = option("train", "split of a hub dataset", flag="--split", group=CLAIMS_SECTION)
    dataset_config: str | None = option(
        None, "configuration (subset) of a hub dataset", flag="--dataset-config", group=CLAIMS_SECTION
    )
    skip_invalid: bool = option(
        False,
        "skip and count records without a usable id or claim, instead of failing",
        flag="--skip-invalid",
        group=CLAIMS_SECTION,
    )
    max_unacked: int = option(DEFAULT_MAX_UNACKED, "batches in flight without the broker's acknowledgement",
                              flag="--max-unacked", check=at_least(1))  # fmt: skip
    max_unacked_pairs: int = option(
        DEFAULT_MAX_UNACKED_PAIRS,
        "pairs (claim x template) in flight without the broker's acknowledgement; a larger batch goes alone",
        flag="--max-unacked-pairs",
        check=at_least(1),
    )
    job_id: str | None = option(
        None,
        "job id (default: a hash of what the sweep computes: the claims' content, the templates, the model "
        "and the batch size, so an unchanged re-run is recognised and a changed file is a new job)",
        flag="--job-id",
    )
    #: Wait until every pair is durably written (raises JobFailed if any failed).
    wait: bool = option(
        False,
        "return only when every pair is durably written by a sink or recorded as failed; exit 1 if any failed",
        flag="--wait",
    )
    #: Give up (JobFailed) if submitting, and waiting when asked, takes longer than this.
    timeout_s: float | None = option(
        None,
        "give up (exit 1) if submitting, and waiting with --wait, takes longer than this many seconds",
        flag="--timeout",
        check=POSITIVE,
    )
    heartbeats: Heartbeats = nested(Heartbeats)
    #: CURVE keys for the broker connection (None: plain TCP).
    keys: ClientKeys | None = None
    #: Progress bars of pairs sent and acknowledged on stderr; None: only when stderr is a terminal.
    progress: bool | None = progress_option()

    def __post_init__(self) -> None:
        check_options(self)


#: The request's options that say how the claims are read (``pervade run`` passes them on to its producer).
READING_OPTIONS = ("id_field", "claim_field", "label_field", "split", "dataset_config", "skip_invalid")


@dataclass(frozen=True)
class ProduceOutcome:
    report: SubmitReport
    skipped_records: int
    done: JobDone | None

    def describe(self) -> str:
        r = self.report
        text = f"job {r.job_id}: {r.pairs} pairs in {r.batches} batches accepted by the broker"
        if r.duplicates:
            text += f" ({r.duplicates} batches were already there)"
        if r.resubmissions:
            text += f"; resubmitted {r.resubmissions} time(s): the broker had lost {r.recovered_batches} batches"
        if self.skipped_records:
            text += f"; {self.skipped_records} invalid records skipped"
        if self.done is not None:
            text += f"; all {self.done.pairs} pairs written, as counted by this producer"
        return text


async def produce(request: ProduceRequest) -> ProduceOutcome:
    """Validate the templates and every claim, then submit the sweep (and wait, if asked). The job is named
    by what it computes, so an unchanged re-run is recognised and a changed file is a new job."""
    templates = load_templates(request.templates)  # validated before anything is read or sent
    source = ClaimsSource(
        location=request.claims,
        fields=ClaimFields(id=request.id_field, claim=request.claim_field, label=request.label_field or None),
        split=request.split,
        config=request.dataset_config,
        limit=request.limit,
        skip_invalid=request.skip_invalid,
    )
    # Read whole before anything is sent: a bad record at the end fails the run before its first batch.
    scan = await asyncio.to_thread(scan_claims, source, request.batch_size)
    job_id = request.job_id or job_id_for(request.context, templates, scan.digest, request.batch_size)
    producer = Producer(
        request.broker, max_unacked=request.max_unacked, heartbeats=request.heartbeats, keys=request.keys,
        max_unacked_pairs=request.max_unacked_pairs,
    )  # fmt: skip
    try:
        async with asyncio.timeout(request.timeout_s), producer:
            with count_bars("pairs", request.progress) as bars:
                # Off a terminal the bars are not drawn: nothing to follow.
                follower = None if bars.disable else asyncio.create_task(_follow_submission(producer, job_id, bars))
                try:
                    report = await producer.submit_sweep(
                        ClaimsReader(source), templates, request.context, batch_size=request.batch_size, job_id=job_id,
                        chunk_digests=scan.chunk_digests,
                    )  # fmt: skip
                finally:
                    if follower is not None:
                        follower.cancel()
                        await asyncio.gather(follower, return_exceptions=True)
                _show_submission(bars, report)
            done = await producer.wait(job_id) if request.wait else None
    except TimeoutError:
        submitted = producer.report(job_id)
        if submitted is None or not submitted.answered_pairs:
            where = f"the broker at {request.broker} acknowledged nothing (is it up, and are our keys admitted?)"
        else:
            where = (f"{submitted.answered_pairs} of {submitted.pairs} pairs acknowledged; `pervade status --broker "
                     f"{request.broker}` shows its workers, queues and sinks")  # fmt: skip
        raise JobFailed(f"job {job_id}: not finished within {request.timeout_s} s: {where}") from None
    return ProduceOutcome(report=report, skipped_records=scan.skipped, done=done)


def _show_submission(bars: Progress, report: SubmitReport | None) -> None:
    """Bars of pairs sent and acknowledged (created on the first call)."""
    if report is None:
        return
    if not bars.task_ids:
        bars.add_task("pairs sent", total=None)
        bars.add_task("pairs acknowledged", total=None)
    sent, acknowledged = bars.task_ids
    bars.update(sent, completed=report.pairs)
    bars.update(acknowledged, completed=report.answered_pairs, total=report.pairs or None)


async def _follow_submission(producer: Producer, job_id: str, bars: Progress) -> None:
    """Redraw the bars while the sweep is submitted (cancelled when it is)."""
    while True:
        _show_submission(bars, producer.report(job_id))
        await asyncio.sleep(PROGRESS_REFRESH_S)

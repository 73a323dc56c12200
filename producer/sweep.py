"""A sweep's identity and the producer's own count of it: the job id and batch ids (both named by what they
compute), what a submission came to (``SubmitReport``), and one job as a producer submits it (``Sweep``)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

from pervade.batchset import BatchSet
from pervade.context import ContextSpec, ResolvedContext
from pervade.prompts import SCORING, PromptTemplate
from pervade.protocol import Claim, EndJob, JobDone, JobEnded


@dataclass
class SubmitReport:
    """What a sweep submission came to."""

    job_id: str
    batches: int = 0
    pairs: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rejected_pairs: int = 0
    #: Pairs of the batches the broker has answered (accepted or rejected) so far.
    answered_pairs: int = 0
    #: Times the sweep was submitted again because the broker had lost part of it, and the batches it took
    #: again then.
    resubmissions: int = 0
    recovered_batches: int = 0


def job_id_for(
    context: ContextSpec | ResolvedContext,
    templates: Mapping[str, PromptTemplate],
    claims_digest: str,
    batch_size: int,
) -> str:
    """A job id that names what the sweep computes: the claims' content (``ClaimsScan.digest``), the
    templates, the context, the batch size and how answers are scored (``SCORING``). The same sweep
    submitted again gets the same id (its batches are recognised, not redone); a changed claims file,
    template or model is a new job."""
    key = msgspec.msgpack.encode((SCORING, context.context_id, sorted(templates.items()), claims_digest, batch_size))
    return "job-" + hashlib.sha256(key).hexdigest()[:16]


def work_key(template: PromptTemplate, context: ContextSpec) -> bytes:
    """What each batch of one template computes besides its claims, as ``batch_id_for`` digests it: built
    once a template, not once a batch (at batch size 1 it was a fifth of the producer's time)."""
    return template.key() + context.context_id.encode() + SCORING.encode()


def batch_id_for(job_id: str, chunk: int, template_id: str, claims: bytes, work: bytes) -> str:
    """``JOB/CHUNK/TEMPLATE/CONTENT``: deterministic, so a resend is recognised, and naming what the batch
    computes (its claims' ``chunk_digest``, and ``work_key``: the template, the context, ``SCORING``), so a
    batch id seen before means the same work even where nobody remembers the job (a sink's output, a broker
    on new state)."""
    content = hashlib.sha256(claims + work).hexdigest()[:8]
    return f"{job_id}/{chunk:07d}/{template_id}/{content}"


@dataclass
class Sweep:
    """One job as this producer submits it: its own count of what the broker accepted, and what it needs
    to submit it again."""

    job_id: str
    claims: Iterable[Claim]
    templates: dict[str, PromptTemplate]
    context: ContextSpec
    batch_size: int
    report: SubmitReport
    done: asyncio.Future[JobDone]
    #: What the broker accepted in the first pass (each batch counted once).
    accepted: BatchSet = field(default_factory=BatchSet)
    #: ``chunk_digest`` of each chunk: given by a scan, or recorded in the first pass.
    chunk_digests: list[bytes] | None = None
    #: The broker's answer to the EndJob (or AbortJob) in flight.
    ended: asyncio.Future[JobEnded] | None = None
    #: The broker said, unasked (after a reconnection), that it no longer holds the job: resubmit.
    lost: JobEnded | None = None
    lost_signal: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def rereadable(self) -> bool:
        """Whether the claims can be read again (a list, a ClaimsReader), not a one-shot iterator."""
        return iter(self.claims) is not self.claims

    def end_message(self) -> EndJob:
        held = self.accepted
        return EndJob(job_id=self.job_id, batches=held.batches, pairs=held.pairs, digest=held.digest)

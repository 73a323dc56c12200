"""The compute loop: takes the orders in arrival order, loads contexts, scores runs of batches, sends results.

The blocking model work runs on a dedicated compute thread so the event loop stays free. For a resident context
the loop takes a run of queued batches of the same context and template at once (``WorkQueue.take_run``,
``gpuworker/intake.py``) and scores them as one call, cut into passes for the device; partial and agnostic
modes build the model per batch, which is what those modes measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import structlog
import torch

from pervade.gpuworker.contexts import Contexts, HeldContext
from pervade.gpuworker.device import fit_dtype
from pervade.gpuworker.encoder import Encoder
from pervade.gpuworker.engine import (
    EncodedClaims,
    LoadedContext,
    Scored,
    load_context,
    rows_per_pass,
    score_claims,
    score_encoded,
)
from pervade.gpuworker.intake import MIN_RUN_CLAIMS
from pervade.gpuworker.link import BrokerLink
from pervade.gpuworker.orders import BatchWork, InHand, LoadOrder, Order
from pervade.prompts import PromptTemplate
from pervade.protocol import BatchFailed, BatchResult, Completed, DeviceInfo, Message, Verdict

log = structlog.get_logger("gpuworker")

Result = TypeVar("Result")


class Runner:
    """Runs the orders on the device, one at a time, and reports each batch's outcome to the broker."""

    def __init__(
        self,
        worker_id: str,
        contexts: Contexts,
        encoder: Encoder,
        link: BrokerLink,
        in_hand: InHand,
        compute: ThreadPoolExecutor,
    ) -> None:
        self.worker_id = worker_id
        self.contexts = contexts
        self.encoder = encoder
        self.link = link
        self.in_hand = in_hand
        self._compute = compute
        self.batches_done = 0
        #: Moving average of seconds per batch, to judge whether the batch in hand fits in the grace time.
        self.batch_seconds = 0.0

    async def compute_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            order = await self.link.queue.get(timeout_s=0.2)
            if order is None:
                continue
            self.in_hand.orders, self.in_hand.since = [order], time.monotonic()
            try:
                if isinstance(order, LoadOrder):
                    await self.contexts.load(order.load)
                else:
                    group = [order, *self._coalesce(order)]
                    self.in_hand.orders = list(group)
                    await self.score(group)
            finally:
                self.in_hand.orders = []
            await self.link.top_up_credit()

    def _coalesce(self, first: BatchWork) -> list[BatchWork]:
        """Queued batches to score with ``first``: same context, template and connection, up to a run's
        worth of claims. Only for a resident context: partial and agnostic modes build the model per batch,
        which is what those modes measure."""
        if self.contexts.resident(first.context_id) is None:
            return []

        def belongs(order: Order) -> bool:
            return isinstance(order, BatchWork) and order.generation == first.generation and order.same_run(first)

        def barrier(order: Order) -> bool:
            return isinstance(order, LoadOrder)

        run = self.link.queue.take_run(belongs, barrier, self.link.window.run_claims, first.claims)
        return [order for order in run if isinstance(order, BatchWork)]

    async def score(self, group: list[BatchWork]) -> None:
        """Score a run of batches of one context and template (a single batch in partial and agnostic
        modes), and send a result or a failure for each."""
        held = await self.contexts.ready(group[0].batch.context)
        if held is None:
            return
        started = time.time()
        if held.loaded is not None:
            outcomes = await self._score_resident(held.loaded, group)
        else:
            outcomes = [await self._score_per_batch(held, work) for work in group]
        finished = time.time()
        dtype = held.loaded.dtype if held.loaded is not None else fit_dtype(held.spec.dtype, self.contexts.device_info)
        answers: list[Message] = []
        for work, outcome in zip(group, outcomes, strict=True):
            if isinstance(outcome, Exception):
                log.warning("batch_failed", batch_id=work.batch_id, context_id=work.context_id, error=str(outcome))
                answers.append(BatchFailed(batch_id=work.batch_id, error=str(outcome)))
            else:
                answers.append(Completed(result=self._result(work, outcome, dtype, started, finished)))
        # One group for the whole run (a run of small batches is many answers, one send), and the credit the
        # run freed in it: a broker reads one message from each connection in turn, so a Pull sent apart was
        # read only after every other worker's answers (24,000 completions at 186 GPUs and batch size 1), and
        # the refills waited for all of them. Sent even if the connection changed meanwhile: the broker takes
        # each result whose batch is still open.
        if (pull := self.link.pull_with_answers(answered=sum(work.batches for work in group))) is not None:
            answers.append(pull)
        await self.link.send_group(answers)
        seconds = finished - started
        self.batch_seconds = seconds if not self.batches_done else 0.8 * self.batch_seconds + 0.2 * seconds
        batches = sum(work.batches for work in group)  # the producer's batches: a slice counts its members
        self.batches_done += batches
        log.debug("batches_done", batches=batches, claims=sum(w.claims for w in group), seconds=round(seconds, 4))

    def _result(self, work: BatchWork, scored: Scored, dtype: str, started: float, finished: float) -> BatchResult:
        batch = work.batch
        return BatchResult(
            batch_id=batch.batch_id, job_id=batch.job_id, context_id=work.context_id, model=batch.context.model,
            template_id=batch.template_id, worker_id=self.worker_id, device=self.contexts.device_info.describe(),
            dtype=dtype, submitted_at=batch.submitted_at, started_at=started, finished_at=finished,
            calibration=scored.calibration,
            verdicts=[
                Verdict(claim_id=claim.claim_id, verdict=verdict, scores=scores, gold_label=claim.gold_label)
                for claim, verdict, scores in zip(batch.claims, scored.verdicts, scored.scores, strict=True)
            ],
        )  # fmt: skip

    async def _score_resident(self, loaded: LoadedContext, group: list[BatchWork]) -> list[Scored | Exception]:
        """A run of batches scored as one on the resident model: tokenized on the tokenizer thread (most
        already were, while the previous run computed), then one call on the compute thread. If that call
        fails, each batch is scored alone, so one bad batch fails only itself."""
        encoded: list[EncodedClaims | Exception] = []
        for work in group:
            try:
                encoded.append(await self.encoder.encoded(loaded, work))
            except Exception as exc:
                encoded.append(exc)
        ready = [e for e in encoded if isinstance(e, EncodedClaims)]
        if not ready:
            return list(encoded)
        self.link.window.run_claims = max(MIN_RUN_CLAIMS, rows_per_pass(loaded, ready[0]))
        try:
            scored = await self._on_compute_thread(score_encoded, loaded, EncodedClaims.concat(ready))
            parts: list[Scored | Exception] = []
            offset = 0
            for part in ready:
                parts.append(scored.part(offset, offset + len(part)))
                offset += len(part)
        except Exception as exc:
            if len(ready) == 1:
                parts = [exc]
            else:
                parts = [await self._score_alone(loaded, part) for part in ready]
        taken = iter(parts)
        return [e if isinstance(e, Exception) else next(taken) for e in encoded]

    async def _score_alone(self, loaded: LoadedContext, encoded: EncodedClaims) -> Scored | Exception:
        try:
            return await self._on_compute_thread(score_encoded, loaded, encoded)
        except Exception as exc:
            return exc

    async def _score_per_batch(self, held: HeldContext, work: BatchWork) -> Scored | Exception:
        """Partial and agnostic modes: the model is built for this batch alone, on the compute thread; for
        each producer batch of a slice, which is what those modes measure."""
        contexts, texts = self.contexts, work.texts
        try:
            parts = [
                await self._on_compute_thread(
                    _load_and_score, held, contexts.device, contexts.device_info, work.batch.template, texts[a:b]
                )
                for a, b in work.spans()
            ]
        except Exception as exc:
            return exc
        return Scored.concat(parts)

    async def _on_compute_thread(self, function: Callable[..., Result], *args: object) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self._compute, function, *args)


def _load_and_score(
    held: HeldContext, device: torch.device, device_info: DeviceInfo, template: PromptTemplate | str, texts: list[str]
) -> Scored:
    """Partial and agnostic modes: build the model for this batch only (from the node cache, or from the
    origin), score, and free it. Runs on the compute thread."""
    with contextlib.ExitStack() as stack:
        hub_cache = None
        if held.files_dir is None and not os.path.isdir(held.spec.model):  # agnostic from the hub
            hub_cache = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pervade-agnostic-")))
        context = load_context(held.spec, device, held.files_dir, hub_cache_dir=hub_cache, device_info=device_info)
        try:
            log.debug(
                "batch_context_loaded", seconds=round(context.load_seconds, 4), from_cache=held.files_dir is not None
            )
            return score_claims(context, template, texts)
        finally:
            del context
            if device.type == "cuda":
                torch.cuda.empty_cache()

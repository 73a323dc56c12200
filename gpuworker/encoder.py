"""Tokenizing ahead: a batch for a resident context is tokenized as soon as it arrives, on a tokenizer thread of
its own, while the device computes the batches before it (never on the compute thread: the device does not wait
on the tokenizer). The queued batches of one context and template are tokenized in one call, so batches of one
claim do not cost a call each; the compute loop then finds their tokens ready (``Encoder.encoded``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pervade.gpuworker.contexts import Contexts
from pervade.gpuworker.engine import EncodedClaims, LoadedContext, encode_claims
from pervade.gpuworker.orders import BatchWork

#: Most claims tokenized in one call by the encode loop (the first pass of a run waits for it).
ENCODE_RUN_CLAIMS = 1024


class Encoder:
    """Tokenizes the batches of resident contexts ahead of the compute loop."""

    def __init__(self, contexts: Contexts) -> None:
        self._contexts = contexts
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._to_encode: deque[BatchWork] = deque()
        self._wanted = asyncio.Event()

    def tokenize_ahead(self, work: BatchWork) -> None:
        """Queue a batch that just arrived for the encode loop, if its context is resident (else it is
        tokenized when scored, after the load)."""
        if self._contexts.resident(work.context_id) is None:
            return
        work.encoding = asyncio.get_running_loop().create_future()
        work.encoding.add_done_callback(_retrieve_exception)  # a batch dropped unscored must not warn
        self._to_encode.append(work)
        self._wanted.set()

    async def encode_loop(self, finished: asyncio.Event) -> None:
        """Tokenize arriving batches on the tokenizer thread while the device computes: the queued batches of
        one context and template per call, until ``finished``."""
        while not finished.is_set():
            if not self._to_encode:
                self._wanted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wanted.wait(), 0.2)
                continue
            first = self._to_encode.popleft()
            run, others, claims = [first], [], first.claims
            while self._to_encode and claims < ENCODE_RUN_CLAIMS:  # other templates keep their places
                work = self._to_encode.popleft()
                if work.same_run(first):
                    run.append(work)
                    claims += work.claims
                else:
                    others.append(work)
            self._to_encode.extendleft(reversed(others))
            await self._encode_run(run)

    async def _encode_run(self, run: list[BatchWork]) -> None:
        """Fill each work's ``encoding`` with its tokens; a run that fails is retried batch by batch, so a
        bad batch (a prompt too long) fails alone."""
        first = run[0]
        loaded = self._contexts.resident(first.context_id)
        if loaded is None:  # evicted meanwhile: the batch is tokenized when scored
            _settle(run, None)
            return
        texts = [text for work in run for text in work.texts]
        try:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer, encode_claims, loaded, first.batch.template, texts
            )
        except Exception as exc:
            if len(run) == 1:
                _settle(run, exc)
            else:
                for work in run:
                    await self._encode_run([work])
            return
        for work, piece in zip(run, encoded.split([work.claims for work in run]), strict=True):
            _settle([work], piece)

    async def encoded(self, loaded: LoadedContext, work: BatchWork) -> EncodedClaims:
        """The batch's tokens: from the encode loop, or tokenized now on the tokenizer thread."""
        encoded = await work.encoding if work.encoding is not None else None
        if encoded is None:
            encoded = await asyncio.get_running_loop().run_in_executor(
                self._tokenizer, encode_claims, loaded, work.batch.template, work.texts
            )
        return encoded


def _retrieve_exception(future: asyncio.Future[EncodedClaims | None]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(run: list[BatchWork], outcome: EncodedClaims | BaseException | None) -> None:
    for work in run:
        if work.encoding is not None and not work.encoding.done():
            if isinstance(outcome, BaseException):
                work.encoding.set_exception(outcome)
            else:
                work.encoding.set_result(outcome)

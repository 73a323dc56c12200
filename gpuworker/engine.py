"""Loading a context and scoring claims with it: the worker's model runner, free of any networking.

A template (``pervade.prompts``) names an answer text per label; a label's score is the log-probability of
its whole answer after the prompt (``gpuworker/answers.py``: one forward pass per micro-batch, every answer
packed after its prompt, no ``generate()``), and the verdict is the label with the highest score, less the template's content-free scores
when it calibrates (computed once per context and template, on the plain path). Prompts are right-padded (so
every real token keeps its position). A batch is cut into micro-batches sized for the device
(``gpuworker.device.BatchPlan``), claims sorted by length so that each pads little; one that runs out of
device memory is split and retried, so the producer's batch size never has to match the GPU.

The template's prefix (the instructions before the claim) is run once per context and its KV cache reused
for every claim that starts with exactly its tokens (``gpuworker/prefix.py``); the rest take the plain path.
Work is split in two so the worker can overlap them: ``encode_claims`` (tokenizer, CPU) and
``score_encoded`` (device). Attention is PyTorch's fused SDPA where the model supports it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pervade.context import ContextSpec
from pervade.errors import ContextLoadError
from pervade.gpuworker.answers import head_disagreement, packed_tokens, score_answers
from pervade.gpuworker.device import BatchPlan, describe_device, fit_dtype, plan_batches, prefix_overhead_tokens
from pervade.gpuworker.prefix import PrefixKV, PrefixStore, prefix_text, run_prefix
from pervade.gpuworker.prompting import ResolvedPrompt, resolve_prompt
from pervade.prompts import PromptTemplate, as_template, choose
from pervade.protocol import DeviceInfo

log = structlog.get_logger("pervade.gpuworker.engine")

#: Largest difference between the model's own log-probabilities and the ones pervade computes from its hidden
#: states (``head_disagreement``) for which a model is scored: rounding in bf16 stays far below it; a model with
#: a logit scale (Granite, Cohere) is far above.
HEAD_TOLERANCE = 1e-2

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedContext:
    """A context resident on a device: model, tokenizer, and what scoring needs from them."""

    spec: ContextSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_positions: int | None
    load_seconds: float
    #: The dtype the weights were loaded in (``auto`` resolved for the device).
    dtype: str
    #: Micro-batch budget on this device; shrinks if a micro-batch runs out of memory.
    plan: BatchPlan
    prefixes: PrefixStore = field(default_factory=PrefixStore)
    #: Each template resolved for this tokenizer, and its prefix tokens, by ``PromptTemplate.key`` (tokenizer
    #: thread only).
    prompts: dict[bytes, tuple[ResolvedPrompt, tuple[int, ...]]] = field(default_factory=dict)
    #: A calibrating template's content-free scores, by ``PromptTemplate.key`` (compute thread only).
    calibrations: dict[bytes, list[float | None]] = field(default_factory=dict)

    @property
    def context_id(self) -> str:
        return self.spec.context_id

    @property
    def dtype_bytes(self) -> int:
        return self.model.get_output_embeddings().weight.element_size()

    def prompt(self, template: PromptTemplate) -> tuple[ResolvedPrompt, tuple[int, ...]]:
        """``template`` for this tokenizer, and its prefix's tokens (tokenizer thread: tokenizer work)."""
        key = template.key()
        found = self.prompts.get(key)
        if found is None:
            resolved = resolve_prompt(self.tokenizer, template)
            (prefix,) = resolved.encode(self.tokenizer, [prefix_text(resolved.text)])
            found = self.prompts[key] = (resolved, tuple(prefix))
        return found

    def build_prefix(self, token_ids: tuple[int, ...]) -> PrefixKV:
        """Run a template prefix through the model (compute thread: device work)."""
        return run_prefix(self.model, token_ids, self.device)


#: The steps of ``load_context``, in order, as ``on_stage`` reports them (a progress bar's steps).
LOAD_STAGES = ("tokenizer", "weights", "device", "ready")


def load_context(
    spec: ContextSpec,
    device: torch.device,
    files: str | Path | None = None,
    hub_cache_dir: Path | None = None,
    device_info: DeviceInfo | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> LoadedContext:
    """Load model and tokenizer onto ``device`` from ``files`` (a local model directory, such as the node
    cache's), else from the spec's origin (hub id or directory; hub files go to ``hub_cache_dir`` if given),
    in the dtype that fits the device (``fit_dtype``). ``on_stage`` hears each of ``LOAD_STAGES`` as it
    begins (from this thread). Blocking: run it off the event loop."""
    stage = on_stage or (lambda _: None)
    started = time.perf_counter()
    info = device_info or describe_device(device)
    dtype_name = fit_dtype(spec.dtype, info)
    dtype = _DTYPES[dtype_name]
    source = str(files) if files is not None else spec.model
    revision = None if files is not None else spec.revision
    try:
        stage("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, cache_dir=hub_cache_dir)
        stage("weights")
        model = _from_pretrained(source, revision, dtype, hub_cache_dir)
    except (OSError, ValueError) as exc:
        raise ContextLoadError(f"cannot load {spec.model!r} from {source}: {exc}") from exc
    stage("device")
    model.to(device).eval()
    free_bytes = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if tokenizer.pad_token_id is None:  # SmolLM2 has no pad token; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise ContextLoadError(f"{type(model).__name__} has no linear output head to score answers with")
    gap = head_disagreement(model)
    if gap > HEAD_TOLERANCE:
        raise ContextLoadError(
            f"{type(model).__name__}'s output head does more than a linear layer and a softcap (a logit scale?): "
            f"scoring would be off by up to {gap:.3g}, so pervade refuses this model"
        )
    seconds = time.perf_counter() - started
    stage("ready")
    return LoadedContext(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        max_positions=getattr(model.config, "max_position_embeddings", None),
        load_seconds=seconds,
        dtype=dtype_name,
        plan=plan_batches(info, model.config, dtype, free_bytes),
    )


def _from_pretrained(source: str, revision: str | None, dtype: torch.dtype, cache_dir: Path | None) -> PreTrainedModel:
    """The model with fused SDPA attention, or the model's default attention where it has no SDPA."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=dtype, cache_dir=cache_dir, attn_implementation="sdpa"
        )
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise
        log.warning("sdpa_unsupported", model=source, error=str(exc))
        return AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, cache_dir=cache_dir)


@dataclass(frozen=True)
class Scored:
    """Claims scored under one template: each claim's verdict and label scores (``pervade.prompts``), and the
    content-free scores subtracted before choosing when the template calibrates."""

    verdicts: list[str]
    scores: list[list[float | None]]
    calibration: list[float | None] | None = None

    def __len__(self) -> int:
        return len(self.verdicts)

    def part(self, start: int, end: int) -> Scored:
        """Claims ``start:end`` (a run scored as one, given back per batch)."""
        return Scored(self.verdicts[start:end], self.scores[start:end], self.calibration)

    @staticmethod
    def concat(parts: list[Scored]) -> Scored:
        """Parts scored apart under one template, in order, as one (a slice scored batch by batch)."""
        verdicts = [verdict for part in parts for verdict in part.verdicts]
        return Scored(verdicts, [scores for part in parts for scores in part.scores], parts[0].calibration)


@dataclass
class EncodedClaims:
    """Claims of one template, tokenized and ready for the device (``encode_claims``; no device work).

    ``token_ids[i]`` is claim i's whole prompt; ``reuses[i]`` says whether it starts with ``prefix_ids``
    and so may take its prefix from the KV cache (``gpuworker/prefix.py``)."""

    prompt: ResolvedPrompt
    prefix_ids: tuple[int, ...]
    token_ids: list[list[int]]
    reuses: list[bool]

    def __len__(self) -> int:
        return len(self.token_ids)

    def split(self, sizes: Sequence[int]) -> list[EncodedClaims]:
        """Consecutive pieces of ``sizes`` claims each (a run tokenized at once, given back per batch)."""
        if sum(sizes) != len(self):
            raise ValueError(f"cannot split {len(self)} claims into pieces of {sum(sizes)}")
        pieces, start = [], 0
        for size in sizes:
            end = start + size
            pieces.append(
                EncodedClaims(self.prompt, self.prefix_ids, self.token_ids[start:end], self.reuses[start:end])
            )
            start = end
        return pieces

    @classmethod
    def concat(cls, parts: Sequence[EncodedClaims]) -> EncodedClaims:
        """Several batches of the same template as one (a worker coalescing small batches)."""
        if not parts or any(p.prompt != parts[0].prompt or p.prefix_ids != parts[0].prefix_ids for p in parts):
            raise ValueError("only batches of one template can be scored together")
        if len(parts) == 1:
            return parts[0]
        return cls(
            prompt=parts[0].prompt,
            prefix_ids=parts[0].prefix_ids,
            token_ids=[ids for p in parts for ids in p.token_ids],
            reuses=[r for p in parts for r in p.reuses],
        )


def encode_claims(
    context: LoadedContext, template: PromptTemplate | str, claims: Sequence[str], reuse_prefix: bool = True
) -> EncodedClaims:
    """Tokenize the prompts of ``claims`` under ``template``. CPU work only, safe to run on a thread of its
    own while the device computes another batch (the worker does). Raises ValueError for a template that
    does not fit the model (``resolve_prompt``) or a prompt longer than the model's positions."""
    prompt, prefix = context.prompt(as_template(template))
    token_ids = prompt.encode(context.tokenizer, [prompt.render(claim) for claim in claims])
    if any(not ids for ids in token_ids):
        raise ValueError("a prompt of no tokens (an empty claim under a template of nothing but {claim})")
    widest = max((len(ids) for ids in token_ids), default=0) + packed_tokens(prompt.answers)
    if context.max_positions is not None and widest > context.max_positions:
        raise ValueError(
            f"a prompt and its answers of {widest} tokens exceed the model's {context.max_positions} positions"
        )
    window = sliding_window(context.model.config)
    if window is not None and widest > window:
        raise ValueError(f"a prompt and its answers of {widest} tokens exceed the model's sliding attention window "
                         f"of {window}, which pervade's packed scoring does not apply")  # fmt: skip
    if not reuse_prefix:
        prefix = ()
    size = len(prefix)
    reuses = [size > 0 and len(ids) > size and tuple(ids[:size]) == prefix for ids in token_ids]
    return EncodedClaims(prompt=prompt, prefix_ids=prefix, token_ids=token_ids, reuses=reuses)


def sliding_window(config: object) -> int | None:
    """The model's sliding attention window, if any of its layers has one. The packed pass gives its own
    attention mask, which has no window: prompts must fit inside it (``encode_claims``)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _row_costs(context: LoadedContext, encoded: EncodedClaims) -> tuple[list[int], int]:
    """Each claim's tokens through the model (without the prefix where it is reused; with the answer tokens
    packed after it, ``gpuworker/answers.py``), and what a reusing row costs beyond them: the prefix's keys
    and values (``prefix_overhead_tokens``)."""
    width = len(encoded.prefix_ids)
    packed = packed_tokens(encoded.prompt.answers)
    lengths = [
        (len(ids) - width if reuse else len(ids)) + packed
        for ids, reuse in zip(encoded.token_ids, encoded.reuses, strict=True)
    ]
    return lengths, prefix_overhead_tokens(context.model.config, context.dtype_bytes, width)


def rows_per_pass(context: LoadedContext, encoded: EncodedClaims) -> int:
    """How many claims like these one forward pass holds on this context's device (``BatchPlan``)."""
    if not len(encoded):
        return 1
    lengths, overhead = _row_costs(context, encoded)
    costs = sum(length + (overhead if reuse else 0) for length, reuse in zip(lengths, encoded.reuses, strict=True))
    return max(1, int(context.plan.max_tokens * len(lengths) // max(1, costs)))


def score_claims(
    context: LoadedContext, template: PromptTemplate | str, claims: Sequence[str], reuse_prefix: bool = True
) -> Scored:
    """Verdict and label scores for each claim, in input order."""
    return score_encoded(context, encode_claims(context, template, claims, reuse_prefix))


def score_encoded(context: LoadedContext, encoded: EncodedClaims) -> Scored:
    """Verdicts for tokenized claims, in input order: one forward pass per micro-batch
    (``gpuworker/answers.py``), the template prefix taken from the context's KV cache where it applies; a
    micro-batch that runs out of device memory is split and retried."""
    answers = encoded.prompt.answers
    prefix = context.prefixes.get(encoded.prefix_ids, context.build_prefix) if any(encoded.reuses) else None
    width = len(encoded.prefix_ids)
    lengths, overhead = _row_costs(context, encoded)
    pending: list[tuple[bool, list[int]]] = []
    for reuse in (False, True):
        rows = [i for i, r in enumerate(encoded.reuses) if r == reuse]
        extra = overhead if reuse else 0
        pending += [
            (reuse, [rows[i] for i in g]) for g in context.plan.micro_batches([lengths[i] for i in rows], extra)
        ]
    scores: list[list[float | None] | None] = [None] * len(encoded)
    while pending:
        reuse, group = pending.pop()
        extra = overhead if reuse else 0
        tokens = [encoded.token_ids[i][width:] if reuse else encoded.token_ids[i] for i in group]
        try:
            rows = score_answers(
                context.model, tokens, answers, context.tokenizer.pad_token_id, prefix if reuse else None
            )
        except torch.OutOfMemoryError:
            rows = None  # the traceback (and the tensors it holds) goes before the cache is emptied
        if rows is None:
            torch.cuda.empty_cache()
            cost = (max(lengths[i] for i in group) + extra) * len(group)
            if len(group) == 1 or not context.plan.shrink(cost):
                raise torch.OutOfMemoryError(f"one prompt of {cost} tokens does not fit in the device's memory")
            log.warning("micro_batch_out_of_memory", tokens=cost, max_tokens_now=context.plan.max_tokens)
            pending += [(reuse, part) for part in _regroup(group, [lengths[i] for i in group], context.plan, extra)]
            continue
        context.plan.passed()
        for index, row in zip(group, rows, strict=True):
            scores[index] = row
    done = [row for row in scores if row is not None]
    if len(done) != len(scores):
        raise RuntimeError("a claim was left without scores")  # a bug in the grouping, never silently
    calibration = _calibration(context, encoded.prompt)
    return Scored([choose(row, calibration) for row in done], done, calibration)


def _calibration(context: LoadedContext, prompt: ResolvedPrompt) -> list[float | None] | None:
    """A calibrating template's content-free scores: computed once per context on the plain path (so they
    never depend on which claims share the pass), then kept."""
    if prompt.calibration_ids is None:
        return None
    key = prompt.template.key()
    found = context.calibrations.get(key)
    if found is None:
        (found,) = score_answers(context.model, [list(prompt.calibration_ids)], prompt.answers,
                                 context.tokenizer.pad_token_id)  # fmt: skip
        context.calibrations[key] = found
    return found


def _regroup(group: list[int], lengths: list[int], plan: BatchPlan, overhead: int) -> list[list[int]]:
    """Split ``group`` (claim indices) again under a smaller plan, never into a single piece."""
    parts = [[group[i] for i in part] for part in plan.micro_batches(lengths, overhead)]
    if len(parts) == 1:  # the shrunk budget still holds it all: halve by count
        half = len(group) // 2
        parts = [group[:half], group[half:]]
    return parts

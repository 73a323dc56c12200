"""Loading a context and scoring claims with it: the worker's model runner, free of any networking.

A verdict is the label whose answer token gets the highest next-token logit after the prompt, so a batch
costs one forward pass and no ``generate()``. Prompts are right-padded (so every real token keeps its
position) and the hidden state at each prompt's last real token is projected onto the label rows of the
output embedding only, not the whole vocabulary. A batch is cut into micro-batches sized for the device
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
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.context import ContextSpec
from pervade.errors import ContextLoadError
from pervade.gpuworker.device import BatchPlan, describe_device, fit_dtype, plan_batches, prefix_overhead_tokens
from pervade.gpuworker.prefix import PrefixKV, PrefixStore, prefix_text, run_prefix
from pervade.protocol import DeviceInfo

log = structlog.get_logger("pervade.gpuworker.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def render_prompt(template: str, claim: str) -> str:
    """The prompt for one claim. ``str.replace``, not ``format``: claims may contain braces."""
    return template.replace(CLAIM_PLACEHOLDER, claim)


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str] = LABELS) -> list[int]:
    """The first token of `` LABEL`` for each label: what the model would say next after ``Answer:``."""
    ids = []
    for label in labels:
        tokens = tokenizer.encode(" " + label, add_special_tokens=False)
        if not tokens:
            raise ContextLoadError(f"the tokenizer turns label {label!r} into no tokens")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ContextLoadError(f"labels {list(labels)} share a first token ({ids}); their scores would be equal")
    return ids


@dataclass
class LoadedContext:
    """A context resident on a device: model, tokenizer, and what scoring needs from them."""

    spec: ContextSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    label_ids: list[int]
    label_weight: torch.Tensor
    label_bias: torch.Tensor | None
    max_positions: int | None
    load_seconds: float
    #: The dtype the weights were loaded in (``auto`` resolved for the device).
    dtype: str
    #: Micro-batch budget on this device; shrinks if a micro-batch runs out of memory.
    plan: BatchPlan
    prefixes: PrefixStore = field(default_factory=PrefixStore)
    #: Each template's prefix tokens (tokenizer thread only).
    prefix_ids: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def context_id(self) -> str:
        return self.spec.context_id

    @property
    def dtype_bytes(self) -> int:
        return self.label_weight.element_size()

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
    label_ids = label_token_ids(tokenizer)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ContextLoadError(f"{type(model).__name__} has no linear output head to score labels with")
    index = torch.tensor(label_ids, device=head.weight.device)
    weight = head.weight.detach().index_select(0, index)
    bias = head.bias.detach().index_select(0, index) if head.bias is not None else None
    seconds = time.perf_counter() - started
    stage("ready")
    return LoadedContext(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        label_ids=label_ids,
        label_weight=weight,
        label_bias=bias,
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


#: A claim's verdict and its label scores.
Scored = list[tuple[str, list[float]]]


@dataclass
class EncodedClaims:
    """Claims of one template, tokenized and ready for the device (``encode_claims``; no device work).

    ``token_ids[i]`` is claim i's whole prompt; ``reuses[i]`` says whether it starts with ``prefix_ids``
    and so may take its prefix from the KV cache (``gpuworker/prefix.py``)."""

    template: str
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
                EncodedClaims(self.template, self.prefix_ids, self.token_ids[start:end], self.reuses[start:end])
            )
            start = end
        return pieces

    @classmethod
    def concat(cls, parts: Sequence[EncodedClaims]) -> EncodedClaims:
        """Several batches of the same template as one (a worker coalescing small batches)."""
        if not parts or any(p.template != parts[0].template or p.prefix_ids != parts[0].prefix_ids for p in parts):
            raise ValueError("only batches of one template can be scored together")
        if len(parts) == 1:
            return parts[0]
        return cls(
            template=parts[0].template,
            prefix_ids=parts[0].prefix_ids,
            token_ids=[ids for p in parts for ids in p.token_ids],
            reuses=[r for p in parts for r in p.reuses],
        )


def encode_claims(
    context: LoadedContext, template: str, claims: Sequence[str], reuse_prefix: bool = True
) -> EncodedClaims:
    """Tokenize the prompts of ``claims`` under ``template``. CPU work only, safe to run on a thread of its
    own while the device computes another batch (the worker does)."""
    prompts = [render_prompt(template, claim) for claim in claims]
    token_ids: list[list[int]] = context.tokenizer(prompts)["input_ids"] if prompts else []
    longest = max((len(ids) for ids in token_ids), default=0)
    if context.max_positions is not None and longest > context.max_positions:
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's {context.max_positions} positions")
    prefix: tuple[int, ...] = ()
    if reuse_prefix:
        prefix = context.prefix_ids.get(template) or ()
        if not prefix:
            prefix = context.prefix_ids[template] = tuple(context.tokenizer(prefix_text(template))["input_ids"])
    size = len(prefix)
    reuses = [size > 0 and len(ids) > size and tuple(ids[:size]) == prefix for ids in token_ids]
    return EncodedClaims(template=template, prefix_ids=prefix, token_ids=token_ids, reuses=reuses)


def _row_lengths(context: LoadedContext, encoded: EncodedClaims) -> tuple[list[int], int]:
    """Each claim's tokens through the model (without the prefix where it is reused), and what a reusing row
    costs beyond them (the prefix's keys and values, ``prefix_overhead_tokens``)."""
    width = len(encoded.prefix_ids)
    lengths = [len(ids) - width if reuse else len(ids) for ids, reuse in zip(encoded.token_ids, encoded.reuses)]
    return lengths, prefix_overhead_tokens(context.model.config, context.dtype_bytes, width)


def rows_per_pass(context: LoadedContext, encoded: EncodedClaims) -> int:
    """How many claims like these one forward pass holds on this context's device (``BatchPlan``)."""
    if not len(encoded):
        return 1
    lengths, overhead = _row_lengths(context, encoded)
    costs = sum(length + (overhead if reuse else 0) for length, reuse in zip(lengths, encoded.reuses))
    return max(1, int(context.plan.max_tokens * len(lengths) // max(1, costs)))


def score_claims(context: LoadedContext, template: str, claims: Sequence[str], reuse_prefix: bool = True) -> Scored:
    """Verdict and label scores (next-token logits, in ``LABELS`` order) for each claim, in input order."""
    return score_encoded(context, encode_claims(context, template, claims, reuse_prefix))


def score_encoded(context: LoadedContext, encoded: EncodedClaims) -> Scored:
    """Verdicts for tokenized claims, in input order: one forward pass per micro-batch, the template prefix
    taken from the context's KV cache where it applies; a micro-batch that runs out of device memory is
    split and retried."""
    prefix = context.prefixes.get(encoded.prefix_ids, context.build_prefix) if any(encoded.reuses) else None
    width = len(encoded.prefix_ids)
    lengths, overhead = _row_lengths(context, encoded)
    pending: list[tuple[bool, list[int]]] = []
    for reuse in (False, True):
        rows = [i for i, r in enumerate(encoded.reuses) if r == reuse]
        extra = overhead if reuse else 0
        pending += [
            (reuse, [rows[i] for i in g]) for g in context.plan.micro_batches([lengths[i] for i in rows], extra)
        ]
    scores: list[list[float] | None] = [None] * len(encoded)
    while pending:
        reuse, group = pending.pop()
        extra = overhead if reuse else 0
        tokens = [encoded.token_ids[i][width:] if reuse else encoded.token_ids[i] for i in group]
        try:
            rows = _forward(tokens, context, prefix if reuse else None)
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
    if any(row is None for row in scores):
        raise RuntimeError("a claim was left without scores")  # a bug in the grouping, never silently
    return [(LABELS[max(range(len(LABELS)), key=row.__getitem__)], row) for row in scores if row is not None]


def _regroup(group: list[int], lengths: list[int], plan: BatchPlan, overhead: int) -> list[list[int]]:
    """Split ``group`` (claim indices) again under a smaller plan, never into a single piece."""
    parts = [[group[i] for i in part] for part in plan.micro_batches(lengths, overhead)]
    if len(parts) == 1:  # the shrunk budget still holds it all: halve by count
        half = len(group) // 2
        parts = [group[:half], group[half:]]
    return parts


@torch.inference_mode()
def _forward(token_ids: list[list[int]], context: LoadedContext, prefix: PrefixKV | None) -> list[list[float]]:
    """Label logits for one right-padded micro-batch: one forward pass. With ``prefix``, ``token_ids`` are
    what follows it, and the pass attends to the prefix's cached keys and values."""
    rows, width = len(token_ids), max(len(ids) for ids in token_ids)
    input_ids = torch.full((rows, width), context.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    last = attention_mask.sum(dim=1) - 1
    input_ids = input_ids.to(context.device)
    if prefix is None:
        hidden = context.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask.to(context.device), use_cache=False
        )[0]
    else:
        known = len(prefix)
        full_mask = torch.cat([torch.ones((rows, known), dtype=torch.long), attention_mask], dim=1)
        positions = (known + torch.arange(width)).expand(rows, -1)
        hidden = context.model.base_model(
            input_ids=input_ids,
            attention_mask=full_mask.to(context.device),
            position_ids=positions.to(context.device),
            past_key_values=prefix.cache_for(rows, context.model.config),
            use_cache=True,
        )[0]
    last_hidden = hidden[torch.arange(rows, device=hidden.device), last.to(hidden.device)]
    logits = F.linear(last_hidden.to(context.label_weight.dtype), context.label_weight, context.label_bias)
    softcap = getattr(context.model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if not torch.isfinite(logits).all():
        raise ValueError(
            f"non-finite label scores in {context.dtype} (overflow?); try the context with --dtype float32"
        )
    return logits.float().cpu().tolist()

"""Loading a context and scoring claims with it: the worker's model runner, free of any networking.

A verdict is the label whose answer token gets the highest next-token logit after the prompt, so a batch
costs one forward pass and no ``generate()``. Prompts are right-padded (so every real token keeps its
position) and the hidden state at each prompt's last real token is projected onto the label rows of the
output embedding only, not the whole vocabulary. A batch is cut into micro-batches sized for the device
(``gpuworker.device.BatchPlan``), claims sorted by length so that each pads little; one that runs out of
device memory is split and retried, so the producer's batch size never has to match the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gpuworker.device import BatchPlan, describe_device, fit_dtype, plan_batches
from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.context import ContextSpec
from pervade.errors import ContextLoadError
from pervade.protocol import DeviceInfo

log = structlog.get_logger("gpuworker.engine")

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

    @property
    def context_id(self) -> str:
        return self.spec.context_id


def load_context(
    spec: ContextSpec,
    device: torch.device,
    files: str | Path | None = None,
    hub_cache_dir: Path | None = None,
    device_info: DeviceInfo | None = None,
) -> LoadedContext:
    """Load model and tokenizer onto ``device`` from ``files`` (a local model directory, such as the node
    cache's), else from the spec's origin (hub id or directory; hub files go to ``hub_cache_dir`` if given),
    in the dtype that fits the device (``fit_dtype``). Blocking: run it off the event loop."""
    started = time.perf_counter()
    info = device_info or describe_device(device)
    dtype_name = fit_dtype(spec.dtype, info)
    dtype = _DTYPES[dtype_name]
    source = str(files) if files is not None else spec.model
    revision = None if files is not None else spec.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, cache_dir=hub_cache_dir)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, cache_dir=hub_cache_dir)
    except (OSError, ValueError) as exc:
        raise ContextLoadError(f"cannot load {spec.model!r} from {source}: {exc}") from exc
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


def score_claims(context: LoadedContext, template: str, claims: Sequence[str]) -> list[tuple[str, list[float]]]:
    """Verdict and label scores (next-token logits, in ``LABELS`` order) for each claim, in input order. One
    forward pass per micro-batch; a micro-batch that runs out of device memory is split and retried."""
    prompts = [render_prompt(template, claim) for claim in claims]
    token_ids: list[list[int]] = context.tokenizer(prompts)["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    if context.max_positions is not None and max(lengths, default=0) > context.max_positions:
        raise ValueError(f"a prompt of {max(lengths)} tokens exceeds the model's {context.max_positions} positions")
    scores: list[list[float] | None] = [None] * len(prompts)
    pending = context.plan.micro_batches(lengths)
    while pending:
        group = pending.pop()
        try:
            rows = _forward([token_ids[i] for i in group], context)
        except torch.OutOfMemoryError:
            rows = None  # the traceback (and the tensors it holds) goes before the cache is emptied
        if rows is None:
            torch.cuda.empty_cache()
            tokens = max(lengths[i] for i in group) * len(group)
            if len(group) == 1 or not context.plan.shrink(tokens):
                raise torch.OutOfMemoryError(f"one prompt of {tokens} tokens does not fit in the device's memory")
            log.warning("micro_batch_out_of_memory", tokens=tokens, max_tokens_now=context.plan.max_tokens)
            pending.extend(_regroup(group, [lengths[i] for i in group], context.plan))
            continue
        context.plan.passed()
        for index, row in zip(group, rows, strict=True):
            scores[index] = row
    if any(row is None for row in scores):
        raise RuntimeError("a claim was left without scores")  # a bug in the grouping, never silently
    return [(LABELS[max(range(len(LABELS)), key=row.__getitem__)], row) for row in scores if row is not None]


def _regroup(group: list[int], lengths: list[int], plan: BatchPlan) -> list[list[int]]:
    """Split ``group`` (claim indices) again under a smaller plan, never into a single piece."""
    parts = [[group[i] for i in part] for part in plan.micro_batches(lengths)]
    if len(parts) == 1:  # the shrunk budget still holds it all: halve by count
        half = len(group) // 2
        parts = [group[:half], group[half:]]
    return parts


@torch.inference_mode()
def _forward(token_ids: list[list[int]], context: LoadedContext) -> list[list[float]]:
    """Label logits for one right-padded micro-batch: one forward pass."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), context.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    input_ids = input_ids.to(context.device)
    attention_mask = attention_mask.to(context.device)
    hidden = context.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    last = attention_mask.sum(dim=1) - 1
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    logits = F.linear(last_hidden.to(context.label_weight.dtype), context.label_weight, context.label_bias)
    softcap = getattr(context.model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if not torch.isfinite(logits).all():
        raise ValueError(f"non-finite label scores in {context.dtype} (overflow?); try the context with --dtype float32")
    return logits.float().cpu().tolist()

"""Loading a context and scoring claims with it: the worker's model runner, free of any networking.

A verdict is the label whose answer token gets the highest next-token logit after the prompt, so a batch
costs one forward pass and no ``generate()``. Prompts are right-padded (so every real token keeps its
position) and the hidden state at each prompt's last real token is projected onto the label rows of the
output embedding only, not the whole vocabulary.
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

from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.context import ContextSpec
from pervade.errors import ContextLoadError

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

    @property
    def context_id(self) -> str:
        return self.spec.context_id


def load_context(
    spec: ContextSpec, device: torch.device, files: str | Path | None = None, hub_cache_dir: Path | None = None
) -> LoadedContext:
    """Load model and tokenizer onto ``device`` from ``files`` (a local model directory, such as the node
    cache's), else from the spec's origin (hub id or directory; hub files go to ``hub_cache_dir`` if given).
    Blocking: run it off the event loop."""
    started = time.perf_counter()
    dtype = _DTYPES.get(spec.dtype, "auto")
    source = str(files) if files is not None else spec.model
    revision = None if files is not None else spec.revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, cache_dir=hub_cache_dir)
        model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, cache_dir=hub_cache_dir)
    except (OSError, ValueError) as exc:
        raise ContextLoadError(f"cannot load {spec.model!r} from {source}: {exc}") from exc
    model.to(device).eval()
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
    )


@torch.inference_mode()
def score_claims(context: LoadedContext, template: str, claims: Sequence[str]) -> list[tuple[str, list[float]]]:
    """Verdict and label scores (next-token logits, in ``LABELS`` order) for each claim. One forward pass."""
    prompts = [render_prompt(template, claim) for claim in claims]
    encoded = context.tokenizer(prompts, return_tensors="pt", padding=True)
    input_ids = encoded["input_ids"].to(context.device)
    attention_mask = encoded["attention_mask"].to(context.device)
    if context.max_positions is not None and input_ids.shape[1] > context.max_positions:
        raise ValueError(
            f"a prompt of {input_ids.shape[1]} tokens exceeds the model's {context.max_positions} positions"
        )
    hidden = context.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    last = attention_mask.sum(dim=1) - 1
    last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    logits = F.linear(last_hidden.to(context.label_weight.dtype), context.label_weight, context.label_bias)
    softcap = getattr(context.model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    scores = logits.float().cpu().tolist()
    return [(LABELS[max(range(len(LABELS)), key=row.__getitem__)], row) for row in scores]

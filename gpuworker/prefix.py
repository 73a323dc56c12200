"""The template's shared prefix, computed once per context and reused for every claim.

Every prompt of a template starts with the same text (the instructions before ``{claim}``), often 100 tokens
or more against a claim's 10 to 40. Running that prefix through the model once and handing its keys and
values (the KV cache) to every batch cuts the work per claim several times over (../shared/reference/
inference.md: 3.9x on a CPU, ~8x in FLOPs for SmolLM2-1.7B with a 150-token prefix).

Exactness comes first. A claim's prompt is tokenized whole, as on the plain path, and reuses the prefix only
if its first tokens *are* the prefix's tokens; otherwise (a merge across the boundary) it takes the plain
path. So both paths feed the model the very same tokens, and the verdicts can differ only by floating-point
rounding. The prefix text stops before the whitespace that precedes ``{claim}``: byte-level BPE tokenizers
attach a space to the word after it (``" The"``), so a prefix ending in ``"Claim: "`` would almost never
match, and one ending in ``"Claim:"`` nearly always does.

Pitfalls of transformers 5.x handled here: the cache is a ``DynamicCache`` built from the stored tensors for
each forward pass (the pass appends to it in place, so a shared one would be silently corrupted), expanded
to the batch without a copy; the claim tokens get positions ``P + i``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pervade.constants import CLAIM_PLACEHOLDER

#: Templates whose prefix KV a context keeps; beyond that the least recently used is dropped.
MAX_PREFIXES_PER_CONTEXT = 16


def prefix_text(template: str) -> str:
    """The part of every prompt of ``template`` before the claim, without the whitespace just before it."""
    head = template.split(CLAIM_PLACEHOLDER, 1)[0]
    return head.rstrip(" \t")


@dataclass(frozen=True)
class PrefixKV:
    """A template prefix run through the model: its tokens and each layer's keys and values (batch 1)."""

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    def __len__(self) -> int:
        return len(self.token_ids)

    def cache_for(self, batch_size: int, config: object) -> DynamicCache:
        """A fresh cache holding the prefix for ``batch_size`` rows: views of the stored tensors (no copy);
        the forward pass appends the claims' keys and values to new tensors, never to these."""
        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1)) for k, v in self.layers]
        return DynamicCache(layers, config=config)


@torch.inference_mode()
def run_prefix(model: torch.nn.Module, token_ids: tuple[int, ...], device: torch.device) -> PrefixKV:
    """One forward pass over the prefix, keeping the KV cache it leaves."""
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    model.base_model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
    return PrefixKV(token_ids=token_ids, layers=layers)


class PrefixStore:
    """The prefixes one loaded context holds, by template, least recently used dropped first. Used from the
    compute thread only."""

    def __init__(self, limit: int = MAX_PREFIXES_PER_CONTEXT) -> None:
        self.limit = limit
        self._prefixes: OrderedDict[tuple[int, ...], PrefixKV] = OrderedDict()
        self.built = 0

    def get(self, token_ids: tuple[int, ...], build: Callable[[tuple[int, ...]], PrefixKV]) -> PrefixKV:
        prefix = self._prefixes.get(token_ids)
        if prefix is None:
            prefix = build(token_ids)
            self.built += 1
            self._prefixes[token_ids] = prefix
            while len(self._prefixes) > self.limit:
                self._prefixes.popitem(last=False)
        self._prefixes.move_to_end(token_ids)
        return prefix

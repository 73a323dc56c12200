"""Whole-answer scoring: the log-probability of each label's answer text after each prompt, for one micro-batch,
in one forward pass.

A label's score is ``sum_k log p(a_k | prompt, a_<k)`` over its answer tokens ``a``, with the softmax over
the whole vocabulary. Each row of the pass holds a prompt (what follows the template prefix's cached keys and
values, where it is reused) and then, packed after it, every answer but its last token::

    prompt p0..pL-1 | answer 1: a0 a1 a2 | answer 2: b0 b1 | ... | padding

An attention mask of the row's own (``_Row.allowed``) lets each answer see the prefix, the prompt and its own
earlier tokens, never another answer; each answer's tokens take the positions that follow the prompt, as if it
were alone. So the hidden state at the prompt's last token gives every answer's first token, and the one at
``a_k`` gives ``a_k+1``: the same numbers as scoring each answer after the prompt on its own (the reference
loop of tests/reference.py), for the prompt's tokens once plus a few answer tokens, with no copy of any cache.
Only the positions that predict an answer token go through the output head, never the padding.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from pervade.constants import LABELS
from pervade.gpuworker.prefix import PrefixKV

#: One micro-batch's scores: per prompt, a score per label (None for a label without an answer).
Rows = list[list[float | None]]


def packed_tokens(answers: Sequence[tuple[int, ...] | None]) -> int:
    """The tokens each row carries after its prompt: every answer but its last token."""
    return sum(len(a) - 1 for a in answers if a is not None)


#: Positions sent through the output head at once: bounds the fp32 logits in memory (1,024 x 49,152 x 4 bytes,
#: 200 MB for SmolLM2's vocabulary) whatever the micro-batch.
HEAD_CHUNK = 1024


@dataclass
class _Scored:
    """Where the pass reads the answers' tokens: each position read once, through the output head
    (``positions``: (row, column)), and each answer token's log-probability at one of them (``reads``:
    (position index, token, label)). The first tokens of all the answers are read at one position."""

    positions: list[tuple[int, int]]
    reads: list[tuple[int, int, int]]

    def add(self, row: int, column: int, tokens_labels: list[tuple[int, int]]) -> None:
        self.positions.append((row, column))
        self.reads += [(len(self.positions) - 1, token, label) for token, label in tokens_labels]


@torch.inference_mode()
def score_answers(
    model: PreTrainedModel,
    token_ids: Sequence[Sequence[int]],
    answers: Sequence[tuple[int, ...] | None],
    pad_id: int,
    prefix: PrefixKV | None = None,
) -> Rows:
    """Each answer's log-probability after each prompt of ``token_ids`` (what follows ``prefix`` when given)."""
    device = model.device
    rows = len(token_ids)
    known = len(prefix) if prefix is not None else 0
    width = max(len(ids) for ids in token_ids) + packed_tokens(answers)
    # Laid out in numpy, then handed to torch whole: a row takes a dozen small writes, and each cost a torch
    # call's overhead (55 us a row in all, on the compute thread, before every pass; docs/benchmarks.md).
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    positions = np.zeros((rows, width), dtype=np.int64)
    allowed = np.zeros((rows, width, known + width), dtype=np.bool_)
    allowed[:, :, :known] = True  # every token sees the template prefix
    read = _Scored([], [])
    for row, ids in enumerate(token_ids):
        _pack_row(row, list(ids), answers, known, input_ids, positions, allowed, read)
    dtype = model.get_output_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~torch.from_numpy(allowed), torch.finfo(dtype).min)
    hidden = model.base_model(
        input_ids=torch.from_numpy(input_ids).to(device),
        attention_mask=mask[:, None].to(device),  # 4D: used as given, no causal mask of its own
        position_ids=torch.from_numpy(positions).to(device),
        past_key_values=prefix.cache_for(rows, model.config) if prefix is not None else None,
        use_cache=prefix is not None,
    )[0]
    where = torch.tensor(read.positions, device=device)
    normalizer, logits = _head(model, hidden[where[:, 0], where[:, 1]], [(p, t) for p, t, _ in read.reads])
    scores: Rows = [[None] * len(LABELS) for _ in range(rows)]
    for (position, _, label), logit in zip(read.reads, logits, strict=True):
        value = logit - normalizer[position]
        row = read.positions[position][0]
        scores[row][label] = value if scores[row][label] is None else scores[row][label] + value  # type: ignore[operator]
    return scores


def _pack_row(
    row: int,
    ids: list[int],
    answers: Sequence[tuple[int, ...] | None],
    known: int,
    input_ids: np.ndarray,
    positions: np.ndarray,
    allowed: np.ndarray,
    read: _Scored,
) -> None:
    """Lay out one row: the prompt, then each answer but its last token, with what each token may attend to
    (columns: the ``known`` prefix tokens, then this row's tokens) and where each answer token is read."""
    length = len(ids)
    input_ids[row, :length] = ids
    positions[row, :length] = _counting(known + length)[known:]
    allowed[row, :length, known : known + length] = _lower_triangle(length)
    read.add(row, length - 1, [(a[0], label) for label, a in enumerate(answers) if a is not None])
    start = length
    for label, answer in enumerate(answers):
        if answer is None:
            continue
        fed = len(answer) - 1
        if fed:
            end = start + fed
            input_ids[row, start:end] = answer[:-1]
            positions[row, start:end] = _counting(known + length + fed)[known + length :]
            allowed[row, start:end, known : known + length] = True
            allowed[row, start:end, known + start : known + end] = _lower_triangle(fed)
            for k in range(1, len(answer)):
                read.add(row, start + k - 1, [(answer[k], label)])
            start = end
    padding = _counting(input_ids.shape[1])[start:]
    allowed[row, padding, known + padding] = True  # a pad token sees itself: no row of the mask is empty


def _lower_triangle(size: int) -> np.ndarray:
    """``size`` x ``size``, True on and below the diagonal: each token sees itself and those before it (a
    read-only view)."""
    return _triangle(_power_of_two_at_least(size))[:size, :size]


def _counting(size: int) -> np.ndarray:
    """0, 1, ... ``size`` - 1 (a read-only view)."""
    return _numbers(_power_of_two_at_least(size))[:size]


def _power_of_two_at_least(size: int) -> int:
    """What the two caches below are built for: sizes rounded up to a power of two, so that a worker seeing
    prompts of every length keeps one array per power, not one per length (a triangle per length up to 8,192
    tokens would be gigabytes)."""
    return 1 << max(0, size - 1).bit_length()


@functools.cache
def _triangle(size: int) -> np.ndarray:
    triangle = np.tri(size, dtype=np.bool_)
    triangle.flags.writeable = False
    return triangle


@functools.cache
def _numbers(size: int) -> np.ndarray:
    numbers = np.arange(size, dtype=np.int64)
    numbers.flags.writeable = False
    return numbers


@torch.inference_mode()
def head_disagreement(model: PreTrainedModel, tokens: int = 8) -> float:
    """How far ``_head``'s log-probabilities are from the model's own (its forward pass, whatever its head
    does: a logit scale, a softcap), on a short sequence: 0 up to rounding for every model this module
    scores right; a model whose head does more than ``_head`` knows shows a large difference."""
    ids = torch.arange(tokens, device=model.device)[None] % max(1, model.config.vocab_size)
    expected = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    hidden = model.base_model(input_ids=ids)[0][0]
    wanted = [(position, int(ids[0, position])) for position in range(tokens)]
    normalizer, logits = _head(model, hidden, wanted)
    return max(
        abs(logit - normalizer[position] - expected[position, token].item())
        for (position, token), logit in zip(wanted, logits, strict=True)
    )


def _head(
    model: PreTrainedModel, hidden: torch.Tensor, wanted: list[tuple[int, int]]
) -> tuple[list[float], list[float]]:
    """The output head at each of ``hidden``'s positions (N, H), in chunks of ``HEAD_CHUNK``: each position's
    log-sum-exp over the whole vocabulary, and the logit of each (position, token) of ``wanted``, in fp32."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    index = torch.tensor(wanted, device=hidden.device).reshape(-1, 2)
    normalizers, chosen = [], torch.empty(len(wanted), device=hidden.device)
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head(hidden[start : start + HEAD_CHUNK].to(head.weight.dtype)).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        normalizers.append(torch.logsumexp(logits, dim=-1))
        mine = (index[:, 0] >= start) & (index[:, 0] < start + HEAD_CHUNK)
        chosen[mine] = logits[index[mine, 0] - start, index[mine, 1]]
    normalizer = torch.cat(normalizers)
    if not (torch.isfinite(normalizer).all() and torch.isfinite(chosen).all()):
        raise ValueError(f"non-finite answer scores in {head.weight.dtype} (overflow?); try --dtype float32")
    return normalizer.cpu().tolist(), chosen.cpu().tolist()

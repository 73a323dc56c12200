"""Prompt templates as a Prompt-for-Fact sweep needs them: the prompt, how it is formatted for the model, which
answer text is scored for which FEVER label, and whether the verdict is calibrated.

A template travels inside every batch (``Batch.template``), so a worker needs nothing else to score it:

- ``text``: the prompt, with ``{claim}`` exactly once;
- ``chat``: wrap ``text`` as the user message with the tokenizer's chat template (an instruct model's own
  format), ending with the generation prompt, so the answer is the assistant's first words; ``system`` is an
  optional system message before it;
- ``labels``: FEVER label -> the answer text scored for it (``{"SUPPORTS": " true", "REFUTES": " false"}``);
  a label left out is never predicted by this template; ``None`` scores the labels' own names
  (``DEFAULT_ANSWERS``);
- ``calibrate``: contextual calibration (Zhao et al., "Calibrate Before Use", ICML 2021): the worker scores the
  template once with a content-free claim (``CONTENT_FREE_CLAIM``) and subtracts those scores from every
  claim's before choosing, which cancels the template's bias towards one answer.

A label's score is the log-probability of its whole answer text after the prompt (``gpuworker/answers.py``).
``producer/templates.py`` reads and validates a templates file into these.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from pervade.constants import CLAIM_PLACEHOLDER, LABELS

#: The answers scored when a template names none: each label's own name, after a space (a prompt ending in
#: "Answer:" is followed by " SUPPORTS").
DEFAULT_ANSWERS: dict[str, str] = {label: " " + label for label in LABELS}

#: How a label's score is computed: the log-probability of its whole answer text. Part of every job and batch
#: id (a sweep scored another way is other work) and written in each Parquet row (``score_kind``).
SCORING = "answer_logprob"

#: The claim a calibrating template is scored with once per context, to measure its bias (Zhao et al. use
#: "N/A", "" and "[MASK]" and average them; "N/A" alone is their most used).
CONTENT_FREE_CLAIM = "N/A"


class PromptTemplate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One prompt template of a sweep (see the module's docstring for each field)."""

    text: str
    chat: bool = False
    system: str | None = None
    labels: dict[str, str] | None = None
    calibrate: bool = False

    @property
    def answers(self) -> tuple[str | None, ...]:
        """The answer text scored for each label, in ``LABELS`` order; None for a label this template never
        predicts."""
        answers = DEFAULT_ANSWERS if self.labels is None else self.labels
        return tuple(answers.get(label) for label in LABELS)

    def key(self) -> bytes:
        """The template's bytes: what identifies it in caches and batch ids (its dict field makes it
        unhashable)."""
        return msgspec.msgpack.encode(self)


def as_template(template: str | PromptTemplate) -> PromptTemplate:
    """A template in its full form: a bare string is a plain template with the default answers."""
    return PromptTemplate(text=template) if isinstance(template, str) else template


def choose(scores: Sequence[float | None], calibration: Sequence[float | None] | None = None) -> str:
    """The verdict: the label with the highest score, less its content-free score when calibrated. Labels
    without a score (left out by the template) are never chosen; a tie goes to the first in ``LABELS``."""
    best, verdict = float("-inf"), None
    for index, score in enumerate(scores):
        if score is None:
            continue
        value = score - calibration[index] if calibration is not None else score  # type: ignore[operator]
        if verdict is None or value > best:
            best, verdict = value, LABELS[index]
    if verdict is None:
        raise ValueError("no label was scored")
    return verdict


def claim_text_ok(template: PromptTemplate) -> bool:
    """Whether ``text`` holds the claim's placeholder exactly once."""
    return template.text.count(CLAIM_PLACEHOLDER) == 1

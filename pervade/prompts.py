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

import json
from collections.abc import Sequence
from typing import Any

import msgspec

from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.errors import TemplateError

#: The answers scored when a template names none: each label's own name, after a space (a prompt ending in
#: "Answer:" is followed by " SUPPORTS").
DEFAULT_ANSWERS: dict[str, str] = {label: " " + label for label in LABELS}

#: How a label's score is computed: the log-probability of its whole answer text. Part of every job and batch
#: id (a sweep scored another way is other work) and written in each Parquet row (``score_kind``).
SCORING = "answer_logprob"

#: The claim a calibrating template is scored with once per context, to measure its bias (Zhao et al. use
#: "N/A", "" and "[MASK]" and average them; "N/A" alone is their most used).
CONTENT_FREE_CLAIM = "N/A"


class PromptTemplate(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True, omit_defaults=True):
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


#: A template object's fields (``PromptTemplate``).
_FIELDS = ("text", "chat", "system", "labels", "calibrate")
_REQUIRED = object()


def check_template(value: object, where: str) -> PromptTemplate:
    """One template, from its text, its object or a PromptTemplate (a worker checks what a producer sent, as a
    producer checks a file); raises TemplateError naming ``where`` and the field."""
    if isinstance(value, PromptTemplate):
        value = msgspec.to_builtins(value)
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise TemplateError(f'{where} must be a text or an object with a "text" field, got {type(value).__name__}')
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise TemplateError(f"{where}: unknown field {unknown[0]!r}; a template has {', '.join(_FIELDS)}")
    if "text" not in value:
        raise TemplateError(f"{where}: field 'text' is missing (the prompt, with {CLAIM_PLACEHOLDER} once)")
    text = _field(value, "text", str, where)
    count = text.count(CLAIM_PLACEHOLDER)
    if count != 1:
        raise TemplateError(f"{where}, field 'text': must contain {CLAIM_PLACEHOLDER} exactly once, found {count}")
    chat = _field(value, "chat", bool, where, default=False)
    system = _field(value, "system", str, where, default=None)
    if system is not None and not system.strip():
        raise TemplateError(f"{where}, field 'system': an empty system message; leave the field out instead")
    if system is not None and not chat:
        raise TemplateError(f"{where}, field 'system': a system message needs \"chat\": true")
    if system is not None and CLAIM_PLACEHOLDER in system:
        raise TemplateError(f"{where}, field 'system': the claim goes in 'text'; {CLAIM_PLACEHOLDER} found here")
    labels = _labels(value.get("labels"), where)
    calibrate = _field(value, "calibrate", bool, where, default=False)
    return PromptTemplate(text=text, chat=chat, system=system, labels=labels, calibrate=calibrate)


def _field(value: dict, name: str, kind: type, where: str, default: object = _REQUIRED) -> Any:
    """``value[name]`` checked to be a ``kind`` (JSON booleans are booleans only, never 0 or 1)."""
    if name not in value or value[name] is None and default is None:
        return default
    found = value[name]
    if not isinstance(found, kind) or (kind is not bool and isinstance(found, bool)):
        expected = {str: "a string", bool: "true or false"}[kind]
        raise TemplateError(f"{where}, field {name!r}: expected {expected}, got {json.dumps(found)[:40]}")
    return found


def _labels(labels: object, where: str) -> dict[str, str] | None:
    """The label -> answer text map: known labels, at least two (one alone would be every verdict), non-empty
    answers, no answer given to two labels."""
    if labels is None:
        return None
    field = f"{where}, field 'labels'"
    if not isinstance(labels, dict):
        raise TemplateError(f"{field}: expected an object of FEVER label -> answer text, got {type(labels).__name__}")
    unknown = [label for label in labels if label not in LABELS]
    if unknown:
        raise TemplateError(f"{field}: {unknown[0]!r} is not a FEVER label; use {', '.join(LABELS)}")
    if len(labels) < 2:
        raise TemplateError(f"{field}: needs at least two labels (with one, every verdict would be it)")
    for label, answer in labels.items():
        if not isinstance(answer, str) or not answer.strip():
            raise TemplateError(
                f"{field}: the answer for {label} must be a non-empty text, got {json.dumps(answer)[:40]}"
            )
    if len(set(labels.values())) != len(labels):
        raise TemplateError(f"{field}: two labels have the same answer text; their scores would be equal")
    return {label: labels[label] for label in LABELS if label in labels}


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

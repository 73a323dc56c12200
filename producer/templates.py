"""Prompt templates: a JSON object mapping a template id to a template, either a text with one ``{claim}``
placeholder or an object of ``pervade.prompts.PromptTemplate``'s fields::

    {"plain": "Claim: {claim}\nAnswer:",
     "chat_tf": {"text": "Is this claim true or false? {claim}", "chat": true,
                 "labels": {"SUPPORTS": "true", "REFUTES": "false"}, "calibrate": true}}

Templates are validated whole before anything is sent, so a typo fails the run at once instead of after
half the sweep, with the template id and the field in the message. The shipped set
(``pervade/data/templates.json``) is a small Prompt-for-Fact sweep: plain and chat prompts, the labels' names
and other answer words, with and without calibration, zero- and few-shot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec

from pervade.constants import CLAIM_PLACEHOLDER, LABELS
from pervade.errors import TemplateError
from pervade.prompts import PromptTemplate
from pervade.samples import default_templates_path

MAX_TEMPLATE_ID_LENGTH = 64
#: A template object's fields (``pervade.prompts.PromptTemplate``).
_FIELDS = ("text", "chat", "system", "labels", "calibrate")
_REQUIRED = object()


def validate_templates(templates: object, source: str = "templates") -> dict[str, PromptTemplate]:
    """Check a parsed templates object (template id -> a text, or an object of ``PromptTemplate``'s fields);
    returns each template in its full form, or raises TemplateError naming the template id and the field."""
    if not isinstance(templates, dict):
        raise TemplateError(
            f"{source}: expected a JSON object of template id -> template, got {type(templates).__name__}"
        )
    if not templates:
        raise TemplateError(f"{source}: no templates")
    checked: dict[str, PromptTemplate] = {}
    for template_id, template in templates.items():
        if not isinstance(template_id, str) or not template_id.strip():
            raise TemplateError(f"{source}: template ids must be non-empty strings, got {template_id!r}")
        if len(template_id) > MAX_TEMPLATE_ID_LENGTH:
            raise TemplateError(
                f"{source}: template id {template_id[:20]!r}... is longer than {MAX_TEMPLATE_ID_LENGTH}"
            )
        checked[template_id] = _template(template, f"{source}: template {template_id!r}")
    return checked


def _template(value: object, where: str) -> PromptTemplate:
    """One template, from its text or its object."""
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


def load_templates(path: str | Path | None = None) -> dict[str, PromptTemplate]:
    """Read and validate a templates file; ``None`` loads the shipped default set. The file must be UTF-8
    JSON with each template id once: a repeated id is refused (JSON parsers keep the last one silently)."""
    path = Path(path) if path is not None else default_templates_path()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TemplateError(f"cannot read templates file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TemplateError(
            f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save the file as UTF-8"
        ) from None
    try:
        parsed = json.loads(text, object_pairs_hook=_refuse_repeated_keys)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{path}: not valid JSON: {exc}") from None
    except _RepeatedKey as exc:
        raise TemplateError(f"{path}: template id {exc.key!r} appears more than once") from None
    return validate_templates(parsed, source=str(path))


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _RepeatedKey(key)
        result[key] = value
    return result

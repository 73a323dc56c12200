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
from collections.abc import Mapping
from pathlib import Path

import msgspec

from pervade.errors import TemplateError
from pervade.prompts import PromptTemplate, check_template
from pervade.samples import default_templates_path

MAX_TEMPLATE_ID_LENGTH = 64


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
        checked[template_id] = check_template(template, f"{source}: template {template_id!r}")
    return checked


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
        raise TemplateError(
            f"{path}: {exc.key!r} appears more than once in one JSON object (as a template id, or as a field or "
            "label of one template); JSON readers keep only the last"
        ) from None
    return validate_templates(parsed, source=str(path))


def dump_templates(templates: Mapping[str, PromptTemplate]) -> str:
    """A templates file's text holding ``templates`` (what ``load_templates`` reads back), for a sweep run
    from a script or a benchmark."""
    return json.dumps({template_id: msgspec.to_builtins(t) for template_id, t in templates.items()}, indent=1)


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

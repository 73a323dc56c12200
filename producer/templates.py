"""Prompt templates: a JSON object mapping a template id to a text with one ``{claim}`` placeholder.

Templates are validated whole before anything is sent, so a typo fails the run at once instead of after
half the sweep. The default set (``pervade/data/templates.json``) ends each prompt with ``Answer:`` so the
next token is the verdict the model is asked for.
"""

from __future__ import annotations

import json
from pathlib import Path

from pervade.constants import CLAIM_PLACEHOLDER
from pervade.errors import TemplateError
from pervade.samples import default_templates_path

MAX_TEMPLATE_ID_LENGTH = 64


def validate_templates(templates: object, source: str = "templates") -> dict[str, str]:
    """Check a parsed templates object; returns it as a plain dict or raises TemplateError."""
    if not isinstance(templates, dict):
        raise TemplateError(f"{source}: expected a JSON object of template id -> text, got {type(templates).__name__}")
    if not templates:
        raise TemplateError(f"{source}: no templates")
    for template_id, text in templates.items():
        if not isinstance(template_id, str) or not template_id.strip():
            raise TemplateError(f"{source}: template ids must be non-empty strings, got {template_id!r}")
        if len(template_id) > MAX_TEMPLATE_ID_LENGTH:
            raise TemplateError(
                f"{source}: template id {template_id[:20]!r}... is longer than {MAX_TEMPLATE_ID_LENGTH}"
            )
        if not isinstance(text, str):
            raise TemplateError(f"{source}: template {template_id!r} must be a string, got {type(text).__name__}")
        count = text.count(CLAIM_PLACEHOLDER)
        if count != 1:
            raise TemplateError(
                f"{source}: template {template_id!r} must contain {CLAIM_PLACEHOLDER} exactly once, found {count}"
            )
    return dict(templates)


def load_templates(path: str | Path | None = None) -> dict[str, str]:
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

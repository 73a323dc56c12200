"""Prompt templates: a JSON object mapping a template id to a text with one ``{claim}`` placeholder.

Templates are validated whole before anything is sent, so a typo fails the run at once instead of after
half the sweep. The default set (``pervade/data/templates.json``) ends each prompt with ``Answer:`` so the
next token is the verdict the model is asked for.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pervade.constants import CLAIM_PLACEHOLDER
from pervade.errors import TemplateError

MAX_TEMPLATE_ID_LENGTH = 64


def default_templates_path() -> Path:
    return Path(str(resources.files("pervade") / "data" / "templates.json"))


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
            raise TemplateError(f"{source}: template id {template_id[:20]!r}... is longer than {MAX_TEMPLATE_ID_LENGTH}")
        if not isinstance(text, str):
            raise TemplateError(f"{source}: template {template_id!r} must be a string, got {type(text).__name__}")
        count = text.count(CLAIM_PLACEHOLDER)
        if count != 1:
            raise TemplateError(
                f"{source}: template {template_id!r} must contain {CLAIM_PLACEHOLDER} exactly once, found {count}"
            )
    return dict(templates)


def load_templates(path: str | Path | None = None) -> dict[str, str]:
    """Read and validate a templates file; ``None`` loads the shipped default set."""
    path = Path(path) if path is not None else default_templates_path()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read templates file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{path}: not valid JSON: {exc}") from None
    return validate_templates(parsed, source=str(path))

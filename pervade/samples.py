"""The data shipped with pervade (``pervade/data/``): a small claims file and the default templates, for
offline runs, the tiny model's tokenizer and the tests."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_claims_path() -> Path:
    """The small claims file shipped with pervade, for offline runs."""
    return Path(str(resources.files("pervade") / "data" / "sample_claims.jsonl"))


def default_templates_path() -> Path:
    """The default set of prompt templates (JSON: template id -> text with one ``{claim}``)."""
    return Path(str(resources.files("pervade") / "data" / "templates.json"))

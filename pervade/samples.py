"""The data shipped with pervade (``pervade/data/``): a small claims file and the default templates, for
offline runs, the tiny model's tokenizer and the tests; and where pervade keeps the models it makes."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def sample_claims_path() -> Path:
    """The small claims file shipped with pervade, for offline runs."""
    return Path(str(resources.files("pervade") / "data" / "sample_claims.jsonl"))


def default_templates_path() -> Path:
    """The default set of prompt templates (JSON: template id -> text with one ``{claim}``)."""
    return Path(str(resources.files("pervade") / "data" / "templates.json"))


def default_cache_dir() -> Path:
    """pervade's model cache on this machine (the tiny models, the converted SmolLM2):
    ``$XDG_CACHE_HOME/pervade``, else ``~/.cache/pervade``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pervade"

"""Templates files for tests: some of the shipped templates, by name, written as a user would pass them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pervade.producer.templates import dump_templates, load_templates


def shipped_templates_file(directory: Path, names: Iterable[str]) -> Path:
    """``directory/templates.json`` holding the shipped templates ``names``, in that order."""
    shipped = load_templates()
    path = directory / "templates.json"
    path.write_text(dump_templates({name: shipped[name] for name in names}))
    return path

"""Files a user may well keep in their own directory, named like pervade's role packages. Python puts the
current directory (``python -m ...``) or a script's directory first on ``sys.path``, so if pervade imported
its packages under these top-level names, the user's file would be imported in their place."""

from __future__ import annotations

from pathlib import Path

#: The role packages' folder names: each would shadow pervade's if pervade installed them at the top level.
SHADOWING_NAMES = ("jobs", "broker", "producer", "sinks", "gpuworker")


def write_shadowing_files(directory: Path) -> list[Path]:
    """Write ``jobs.py``, ``broker.py``, ... into ``directory``: each fails loudly when imported."""
    written = []
    for name in SHADOWING_NAMES:
        path = directory / f"{name}.py"
        path.write_text(f"raise ImportError(\"the user's own {name}.py was imported in place of pervade's package\")\n")
        written.append(path)
    return written

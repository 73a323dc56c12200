"""pervade beside a user's own files named like its packages: a script of theirs that imports pervade's API,
from a directory holding ``jobs.py``, ``broker.py``, ``producer.py``, ``sinks.py`` and ``gpuworker.py``.
(``pervade run`` and Slurm worker jobs started from such a directory: tests/test_cli.py, tests/test_slurm.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pervade.producer.templates import load_templates
from tests.shadowing import SHADOWING_NAMES, write_shadowing_files

#: A user's script: every module of pervade imported, then the producer's API used on the shipped claims.
USER_SCRIPT = """
import importlib, pkgutil, sys
import pervade

imported = 0
for role in {roles!r}:
    package = importlib.import_module(f"pervade.{{role}}")
    for module in pkgutil.walk_packages(package.__path__, f"pervade.{{role}}."):
        importlib.import_module(module.name)
        imported += 1
for module in pkgutil.iter_modules(pervade.__path__, "pervade."):
    if module.name != "pervade.__main__":  # that one runs the command
        importlib.import_module(module.name)
    imported += 1

from pervade.producer.claims import ClaimsSource, read_claims, sample_claims_path
from pervade.producer.templates import load_templates

claims = list(read_claims(ClaimsSource(str(sample_claims_path()))))
print(imported, len(claims), len(load_templates()))
"""


def test_a_users_script_beside_files_named_like_pervades_packages(tmp_path: Path) -> None:
    write_shadowing_files(tmp_path)
    script = tmp_path / "sweep.py"
    script.write_text(USER_SCRIPT.format(roles=SHADOWING_NAMES))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported, claims, templates = map(int, result.stdout.split())
    assert imported > 40 and claims == 60 and templates == len(load_templates())
    assert not (tmp_path / "__pycache__").exists()  # Python caches a module it imports: none of the user's was

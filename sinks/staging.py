"""The staging directory: where a sink writes a file until it is whole, beside the output directory and on
the same file system, so that publishing the file is one atomic rename (``sinks/commit.py``). Staging files
are named after their writer, so that the leftovers of a dead sink can be told from a live one's."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from pervade.errors import ConfigError


def staging_dir_for(out_dir: Path) -> Path:
    """Where files are written before they are complete: ``.NAME.partial`` beside ``out_dir``, on the same file
    system, so that publishing a file is one atomic rename. Raises ConfigError when that is impossible (the
    output directory is the root of a file system, or its parent is not writable): any folder inside the
    output directory would be read as output by polars."""
    out_dir = out_dir.resolve()
    staging = out_dir.parent / f".{out_dir.name}.partial"
    try:
        staging.mkdir(exist_ok=True)
        if staging.stat().st_dev == out_dir.stat().st_dev:
            return staging
        staging.rmdir()
        problem = f"{out_dir} is the root of a file system"
    except OSError as exc:
        problem = f"cannot create {staging}: {exc.strerror or exc}"
    raise ConfigError(
        f"{problem}. A sink stages each file beside the output directory, on the same file system, so that "
        f"readers only ever see whole files: use a directory inside it, e.g. --out {out_dir / 'verdicts'}"
    )


@dataclass(frozen=True)
class StagedFile:
    """A closed, fsynced Parquet file in the staging directory, to be published under ``final``."""

    path: Path
    final: Path
    batch_ids: list[str]
    rows: int


def staged_name(final_name: str) -> str:
    """The staging name of a file: its writer's pid and host, so leftovers of a dead sink can be told."""
    return f"{final_name}~{os.getpid()}@{socket.gethostname()}.partial"


def staged_owner(name: str) -> tuple[int, str] | None:
    """(pid, host) of a staging file's writer, from its name; None for a name not made by ``staged_name``."""
    if not name.endswith(".partial"):
        return None
    pid, _, host = name.removesuffix(".partial").rpartition("~")[2].partition("@")
    return (int(pid), host) if pid.isdigit() and host else None

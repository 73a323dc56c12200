"""What every benchmark script reports: a header naming the date and machine, a table on stdout, the same rows
as a CSV file, and a PNG plot (matplotlib), so that a figure in docs/benchmarks.md can always be traced back
to a command and a file.

    from benchkit import Report  # bench/ is on sys.path when a script runs
    report = Report("rq2_batch_size", columns=["mode", "batch", "wall_s"], out_dir=args.out_dir)
    report.add(mode="full", batch=1, wall_s=20.1)
    report.finish(plot=lambda ax, rows: ...)
"""

from __future__ import annotations

import csv
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where the scripts write their CSV and PNG files unless told otherwise.
DEFAULT_OUT_DIR = Path("bench/results")


def machine_line() -> str:
    """One line naming the date, host, CPU count, Python and torch: the context of every figure."""
    try:
        import torch

        torch_version = torch.__version__
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        torch_version, gpu = "absent", "no GPU"
    return (
        f"# {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} cores, {gpu}, "
        f"python {sys.version.split()[0]}, torch {torch_version}"
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@dataclass
class Report:
    """Rows of one benchmark: printed as they come (a long run shows progress), written as CSV and PNG
    at the end."""

    name: str
    columns: Sequence[str]
    out_dir: Path = DEFAULT_OUT_DIR
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._widths = [max(len(c), 10) for c in self.columns]

    def header(self, *lines: str) -> None:
        """Print the machine line, the script's own lines, and the column names."""
        print(machine_line())
        for line in lines:
            print(f"# {line}")
        print("  ".join(c.rjust(w) for c, w in zip(self.columns, self._widths, strict=True)), flush=True)

    def add(self, **row: Any) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise ValueError(f"{self.name}: unknown columns {sorted(unknown)}")
        self.rows.append(row)
        cells = [_cell(row.get(c, "")) for c in self.columns]
        print("  ".join(v.rjust(w) for v, w in zip(cells, self._widths, strict=True)), flush=True)

    def note(self, line: str) -> None:
        """A line printed now and kept under the table (a derived figure: a ratio, a sensitivity)."""
        self.notes.append(line)
        print(f"# {line}", flush=True)

    def write_csv(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.name}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.columns))
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def write_plot(self, draw: Callable[[Any, list[dict[str, Any]]], None], title: str) -> Path:
        """A PNG drawn by ``draw(axes, rows)``; the title carries the machine line so a plot stands alone."""
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on cluster nodes
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.name}.png"
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
        try:
            draw(axes, self.rows)
            axes.set_title(title, fontsize=10)
            figure.text(0.01, 0.01, machine_line().lstrip("# "), fontsize=6, color="gray")
            figure.tight_layout(rect=(0, 0.03, 1, 1))
            figure.savefig(path)
        finally:
            plt.close(figure)
        return path

    def finish(self, draw: Callable[[Any, list[dict[str, Any]]], None] | None = None, title: str = "") -> None:
        """Write the CSV (and the PNG if ``draw`` is given) and say where they are."""
        written = [self.write_csv()]
        if draw is not None and self.rows:
            written.append(self.write_plot(draw, title or self.name))
        print("# wrote " + ", ".join(str(p) for p in written), flush=True)


def stacked_bars(
    label: str, parts: Sequence[str], xlabel: str, ylabel: str
) -> Callable[[Any, list[dict[str, Any]]], None]:
    """A ``Report.finish`` drawing: one bar per row, labelled by its ``label`` column, stacking the columns
    ``PART_us`` for each of ``parts`` in order."""

    def draw(axes: Any, rows: list[dict[str, Any]]) -> None:
        labels = [str(row[label]) for row in rows]
        bottom = [0.0] * len(rows)
        for part in parts:
            heights = [row[f"{part}_us"] for row in rows]
            axes.bar(labels, heights, bottom=bottom, label=part)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.legend()

    return draw

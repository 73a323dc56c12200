"""Progress bars for long work (claims sent, verdicts written, model files fetched, a model loading), drawn
by rich on stderr, and only when stderr is a terminal: batch-system logs and pipes stay free of them.

Log lines printed while bars are live go above the bars (``configure_logging`` writes to whatever
``sys.stderr`` is at the time, which rich redirects through its console while it draws).
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal a person watches."""
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


class RateColumn(ProgressColumn):
    """Items per second, from rich's own speed estimate."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("–" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


def _bars(*columns: ProgressColumn | str, enabled: bool | None) -> Progress:
    """A set of bars on stderr; drawn only when ``enabled``, or (None) when stderr is a terminal."""
    shown = on_terminal() if enabled is None else enabled
    return Progress(*columns, console=Console(stderr=True), disable=not shown)


def count_bars(unit: str, enabled: bool | None = None) -> Progress:
    """Bars counting ``unit`` (pairs, verdicts): done of total, percentage, rate, elapsed and ETA. A task
    without a total pulses and shows the count and rate."""
    return _bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        enabled=enabled,
    )


def reported_bars(unit: str, enabled: bool | None = None) -> Progress:
    """Bars whose rate and ETA someone else measures (the broker, for the sink's bar): each task carries
    ``rate`` (per second) and ``eta`` (text) fields, updated with its progress."""
    return _bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:,.1f} " + unit + "/s"),
        TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"),
        enabled=enabled,
    )


def byte_bars(enabled: bool | None = None) -> Progress:
    """Bars counting bytes (model files): size done of total, speed, ETA."""
    return _bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        enabled=enabled,
    )


def stage_bars(enabled: bool | None = None) -> Progress:
    """Bars of named steps (loading a model: tokenizer, weights, device), with the current step shown."""
    return _bars(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        enabled=enabled,
    )

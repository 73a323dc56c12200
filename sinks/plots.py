"""The report's plots, drawn with matplotlib's Agg backend (no display needed) at fixed pixel sizes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: batch nodes and CI have no display

import matplotlib.pyplot as plt
from matplotlib.artist import Artist
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from pervade.sinks.scores import ABOVE_BASELINE, TemplateResult, Timeline

#: Pixel sizes (width, height) of the plots: figure inches times DPI, never cropped.
DPI = 100
ACCURACY_SIZE = (1000, 500)
TIMELINE_SIZE = (1000, 700)


def _figure(size: tuple[int, int], rows: int = 1) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(rows, 1, figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, squeeze=False, sharex=True,
                             layout="constrained")  # fmt: skip
    return fig, list(axes[:, 0])


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": the size stays what was asked
    plt.close(fig)
    return path


def plot_accuracy(results: list[TemplateResult], best: list[TemplateResult], path: Path) -> Path:
    """Accuracy per template, one group of bars per context, each with its 95% interval and a dashed line at
    its majority baseline; a bar whose interval is not wholly above its baseline is faded (it does not beat
    chance), and the best of each context is outlined."""
    fig, (ax,) = _figure(ACCURACY_SIZE)
    scored = [r for r in results if r.accuracy is not None]
    contexts = sorted({r.context_id for r in scored})
    templates = sorted({r.template_id for r in scored})
    width = 0.8 / max(1, len(contexts))
    best_keys = {(r.context_id, r.template_id) for r in best}
    handles: list[Artist] = []
    for i, context_id in enumerate(contexts):
        by_template = {r.template_id: r for r in scored if r.context_id == context_id}
        names = [name for name in templates if name in by_template]
        rows = [by_template[name] for name in names]
        xs = [t + i * width for t, name in enumerate(templates) if name in by_template]
        heights = [100 * r.accuracy for r in rows]  # type: ignore[operator]
        intervals = [r.accuracy_ci or (0.0, 0.0) for r in rows]
        bars = ax.bar(xs, heights, width)
        colour = bars.patches[0].get_facecolor()
        # The legend's patch is drawn here, unfaded: matplotlib's own would copy the first bar, faded or not.
        handles.append(Patch(facecolor=colour, label=f"{Path(rows[0].model).name} ({context_id})"))
        ax.errorbar(xs, heights, yerr=[[h - 100 * lo for h, (lo, _) in zip(heights, intervals, strict=True)],
                                       [100 * hi - h for h, (_, hi) in zip(heights, intervals, strict=True)]],
                    fmt="none", ecolor="black", elinewidth=1, capsize=3)  # fmt: skip
        ax.hlines([100 * (r.baseline or 0.0) for r in rows], [x - width / 2 for x in xs], [x + width / 2 for x in xs],
                  colors="tab:red", linestyles="--", linewidth=2, zorder=3)  # fmt: skip
        for bar, row, (_, high) in zip(bars, rows, intervals, strict=True):
            if row.vs_baseline != ABOVE_BASELINE:
                bar.set_facecolor((*colour[:3], 0.35))  # the fill only: a best template's outline stays solid
            if (context_id, row.template_id) in best_keys:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, 100 * high),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(
        [t + width * (len(contexts) - 1) / 2 for t in range(len(templates))], templates, rotation=20, ha="right"
    )
    ax.set_ylabel("accuracy against gold labels (%), 95% CI")
    ax.set_ylim(0, 105)  # room for the label above an interval that reaches 100%
    ax.set_title(
        "Accuracy per prompt template, with its 95% CI and majority baseline (best of each context outlined)"
        if scored
        else "No gold labels: accuracy unknown"
    )
    if contexts:
        handles += [
            Line2D([], [], color="tab:red", linestyle="--", linewidth=2, label="majority baseline (same claims)"),
            Patch(facecolor=(0.5, 0.5, 0.5, 0.35), label="faded: not above its baseline"),
        ]
        ax.legend(handles=handles, loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_timeline(timeline: Timeline, path: Path) -> Path:
    """Claims per second (top) and workers with a batch in hand (bottom) over the run."""
    fig, (rate_ax, workers_ax) = _figure(TIMELINE_SIZE, rows=2)
    edges = [i * timeline.bin_s for i in range(len(timeline.claims_per_s) + 1)]
    rate_ax.stairs(timeline.claims_per_s, edges, fill=True, alpha=0.7)
    rate_ax.set_ylabel("claims/s")
    rate_ax.set_title(
        f"Throughput and busy workers from {timeline.start:%Y-%m-%d %H:%M:%S} UTC ({timeline.bin_s:g} s bins)"
    )
    workers_ax.stairs(timeline.workers, edges, color="tab:orange", linewidth=2)
    workers_ax.set_ylabel("workers with a batch")
    workers_ax.set_xlabel("seconds since the first batch started")
    workers_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    workers_ax.set_ylim(0, max(timeline.workers, default=0) + 1)
    rate_ax.set_ylim(bottom=0)
    return _save(fig, path)

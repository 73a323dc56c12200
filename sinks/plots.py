"""The report's plots, drawn with matplotlib's Agg backend (no display needed) at fixed pixel sizes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: batch nodes and CI have no display

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from pervade.sinks.scores import TemplateResult, Timeline

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
    """Accuracy per template, one group of bars per context; the best of each context outlined."""
    fig, (ax,) = _figure(ACCURACY_SIZE)
    scored = [r for r in results if r.accuracy is not None]
    contexts = sorted({r.context_id for r in scored})
    templates = sorted({r.template_id for r in scored})
    width = 0.8 / max(1, len(contexts))
    best_keys = {(r.context_id, r.template_id) for r in best}
    for i, context_id in enumerate(contexts):
        by_template = {r.template_id: r for r in scored if r.context_id == context_id}
        xs = [t + i * width for t, name in enumerate(templates) if name in by_template]
        heights = [100 * by_template[name].accuracy for name in templates if name in by_template]  # type: ignore[operator]
        model = next(iter(by_template.values())).model
        bars = ax.bar(xs, heights, width, label=f"{Path(model).name} ({context_id})")
        for bar, name in zip(bars, [n for n in templates if n in by_template], strict=True):
            if (context_id, name) in best_keys:
                bar.set_edgecolor("black")
                bar.set_linewidth(2)
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xticks(
        [t + width * (len(contexts) - 1) / 2 for t in range(len(templates))], templates, rotation=20, ha="right"
    )
    ax.set_ylabel("accuracy against gold labels (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per prompt template (best outlined)" if scored else "No gold labels: accuracy unknown")
    if contexts:
        ax.legend(loc="upper right", fontsize=8)
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

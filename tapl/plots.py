"""PNG plots of a run, drawn with matplotlib's object API (no global backend is changed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_series(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    step: bool = False,
) -> Path:
    """Draw one line per series over ``x`` and save the figure as a PNG.

    Args:
        x: The shared x values (e.g. rounds).
        series: Label -> y values, each as long as ``x``.
        path: Where to write the PNG (parent folders are created).
        title, xlabel, ylabel: The figure's texts.
        step: Draw steps (for counts that change at each x) instead of straight segments.
    """
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, values in series.items():
        if len(values) != len(x):
            raise ValueError(f"Series {label!r} has {len(values)} values for {len(x)} x values.")
        if step:
            axes.step(x, values, where="post", label=label)
        else:
            axes.plot(x, values, marker="o", markersize=3, label=label)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if series:
        axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_boxes(groups: Mapping[str, Sequence[float]], path: str | Path, *, title: str, ylabel: str) -> Path:
    """Draw one box plot per group (e.g. per-client values of each algorithm) and save it as a PNG."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [label for label, values in groups.items() if len(values)]
    if labels:
        axes.boxplot([list(groups[label]) for label in labels], tick_labels=labels, showmeans=True)
    axes.set(title=title, ylabel=ylabel)
    axes.grid(alpha=0.3, axis="y")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path

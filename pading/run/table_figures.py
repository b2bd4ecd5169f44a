"""Figures of pipelines/tables.py: the t-SNE of synthetic unseen features (the paper's
Fig. 5) and a bar chart of the ablation table's HM-PQ. Matplotlib's object API with the
Agg canvas (no global backend state, safe in Ray workers)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from pading.errors import DataError

#: OpenMP/BLAS threads of t-SNE: the point sets are small, and spinning threads on a shared
#: machine cost far more than they gain (50 points: 0.4 s with 1 thread, 20 s with 2 busy cores).
TSNE_THREADS = 1
#: t-SNE perplexity, lowered for tiny point sets (it must stay below the point count).
TSNE_PERPLEXITY = 30.0
#: Inches per panel of the t-SNE figure.
PANEL_SIZE = 4.5
POINT_SIZE = 8
FIGURE_DPI = 120
COLOUR_MAP = "tab20"


def tsne_embedding(features: np.ndarray, *, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2) t-SNE coordinates (PCA initialisation, fixed seed)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise DataError("t-SNE", f"needs at least 2 feature rows (N, D), got shape {features.shape}")
    perplexity = min(TSNE_PERPLEXITY, (features.shape[0] - 1) / 3.0)
    with threadpool_limits(limits=TSNE_THREADS):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            features.astype(np.float32)
        )


def tsne_figure(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], class_names: Mapping[int, str],
                path: str | Path, *, seed: int = 0) -> Path:
    """Side-by-side t-SNE panels, one per generator, coloured by class.

    Args:
        panels: title -> (features (N, D), class indices (N,)); every panel should hold the
            same classes so colours match across panels.
        class_names: class index -> name, for the legend.
        path: the PNG to write.
    """
    if not panels:
        raise DataError("t-SNE", "no panels to draw")
    classes = sorted({int(c) for _, labels in panels.values() for c in np.unique(labels)})
    palette = colormaps[COLOUR_MAP]
    colours = {c: palette(i % palette.N) for i, c in enumerate(classes)}
    figure = Figure(figsize=(PANEL_SIZE * len(panels), PANEL_SIZE + 1))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, (features, labels)) in zip(axes, panels.items()):
        points = tsne_embedding(features, seed=seed)  # (N, 2)
        for c in classes:
            chosen = labels == c
            axis.scatter(points[chosen, 0], points[chosen, 1], s=POINT_SIZE, color=colours[c],
                         label=class_names.get(c, str(c)))
        axis.set_title(title)
        axis.set_xticks([])
        axis.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="lower center", ncol=min(len(classes), 6), markerscale=2, frameon=False)
    figure.subplots_adjust(bottom=0.2)
    path = Path(path)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[float], path: str | Path, *,
              title: str = "Ablation: HM-PQ", ylabel: str = "HM-PQ (%)") -> Path:
    """A bar per row with a ± std error bar, written as PNG."""
    if not (len(labels) == len(means) == len(stds)) or not labels:
        raise DataError("bar chart", f"labels, means and stds must be non-empty and equally long, got "
                                     f"{len(labels)}, {len(means)}, {len(stds)}")
    figure = Figure(figsize=(1.6 * len(labels) + 2, 4))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    positions = np.arange(len(labels))
    axis.bar(positions, means, yerr=stds, capsize=4, color=[f"C{i}" for i in range(len(labels))])
    axis.set_xticks(positions, labels, rotation=20, ha="right")
    axis.set_ylim(bottom=0)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path

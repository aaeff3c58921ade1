"""The per-layer width figure: original vs current channels of every prunable group."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def width_figure(original: dict[str, int], current: dict[str, int], title: str = "") -> Figure:
    """Bars of original (light) and kept (dark) channels per group, in model order, with the kept fraction."""
    names = list(original)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.0), dpi=100)
    xs = range(len(names))
    ax.bar(xs, [original[n] for n in names], color="#c6dbef", label="original")
    ax.bar(xs, [current.get(n, 0) for n in names], color="#2171b5", label="kept")
    for x, n in zip(xs, names):
        if original[n]:
            ax.text(x, current.get(n, 0), f"{current.get(n, 0) / original[n]:.0%}", ha="center", va="bottom",
                    fontsize=6, rotation=90)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.set_title(title or "channels per prunable group")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

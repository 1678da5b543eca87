"""Small matplotlib figures for asset metadata, returned as PNG bytes (no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_library_sizes(obs: pd.DataFrame) -> bytes:
    """Histogram of log10 library size per study (UMI and read-count studies differ by ~100x)."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for study, group in obs.groupby("study", observed=True):
        ax.hist(np.log10(group["n_counts"].clip(lower=1)), bins=40, alpha=0.5, label=str(study))
    ax.set_xlabel("log10 counts per cell")
    ax.set_ylabel("cells")
    ax.legend(fontsize=7)
    return figure_png(fig)


def plot_cells_by_condition(obs: pd.DataFrame) -> bytes:
    """Stacked bar of cells per study by condition (NA shown as its own bar)."""
    table = (obs.assign(condition=obs["condition"].astype(object).fillna("NA"))
             .groupby(["study", "condition"], observed=True).size().unstack(fill_value=0))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    table.plot.bar(stacked=True, ax=ax)
    ax.set_ylabel("cells")
    ax.set_xlabel("")
    plt.setp(ax.get_xticklabels(), rotation=0)
    return figure_png(fig)

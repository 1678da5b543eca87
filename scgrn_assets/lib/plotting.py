"""Small matplotlib figures for asset metadata, returned as PNG bytes (no display needed)."""

from __future__ import annotations

import logging

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


def plot_histogram(values: np.ndarray, xlabel: str, bins: int = 60) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4477aa")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return figure_png(fig)


def plot_loss_curve(values: np.ndarray, ylabel: str, held_out: np.ndarray | None = None,
                    baseline: float | None = None) -> bytes:
    """A training curve with a running mean (minibatch losses are noisy); optionally the held-out loss
    (shape (n, 2): step, loss) and a baseline (e.g. the position-only entropy) as a dashed line."""
    values = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = np.arange(1, len(values) + 1)
    ax.plot(steps, values, lw=0.6, alpha=0.5, label="per step")
    if len(values) >= 10:
        window = max(5, len(values) // 30)
        smooth = pd.Series(values).rolling(window, min_periods=1).mean()
        ax.plot(steps, smooth.to_numpy(), lw=1.5, label=f"running mean ({window})")
    if held_out is not None and len(held_out):
        held_out = np.asarray(held_out, dtype=float)
        ax.plot(held_out[:, 0], held_out[:, 1], "o-", ms=3, lw=1.5, label="held-out cells")
    if baseline is not None and np.isfinite(baseline):
        ax.axhline(baseline, ls="--", lw=1, color="grey", label="position-only entropy")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    return figure_png(fig)


_logger = logging.getLogger(__name__)


def safe_plot(plot, *args) -> tuple[bytes | None, str | None]:
    """Run a plot; a failure becomes a warning string, never an exception (a picture never takes an answer down)."""
    try:
        return plot(*args), None
    except Exception as error:  # noqa: BLE001 - any plotting failure is only a missing picture
        _logger.warning("plot %s failed: %s", getattr(plot, "__name__", plot), error)
        return None, f"{getattr(plot, '__name__', 'plot')} failed: {type(error).__name__}: {error}"

"""Figures of a cell-level NB fit for the asset metadata (PNG bytes): ELBO, volcano, PPC."""

from __future__ import annotations

import numpy as np
import pandas as pd

from scgrn_assets.lib.plotting import figure_png, plt


def _new_figure(n_panels: int = 1):
    return plt.subplots(1, n_panels, figsize=(5.0 * n_panels, 4.0), squeeze=False)


def plot_elbo(elbo_history: np.ndarray) -> bytes:
    """PNG of the ELBO per step with a running mean (minibatch estimates are noisy)."""
    figure, axes = _new_figure()
    axis = axes[0, 0]
    history = np.asarray(elbo_history, dtype=np.float64)
    steps = np.arange(1, len(history) + 1)
    axis.plot(steps, history, lw=0.5, alpha=0.4, label="per step")
    window = max(1, len(history) // 50)
    if len(history) >= window:
        running = np.convolve(history, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], running, lw=1.5, label=f"mean of {window} steps")
    axis.set_xlabel("ADVI step")
    axis.set_ylabel("ELBO (nats)")
    axis.set_yscale("symlog")
    axis.legend()
    return figure_png(figure)


def plot_cell_model_volcano(effect_table: pd.DataFrame, lfsr_threshold: float = 0.05) -> bytes:
    """PNG: posterior mean log fold change vs -log10 lfsr, called genes highlighted."""
    figure, axes = _new_figure()
    axis = axes[0, 0]
    n_draws_floor = 1e-4  # lfsr of 0 from finite draws; plotted at this floor
    height = -np.log10(np.maximum(effect_table["lfsr"].to_numpy(), n_draws_floor))
    called = effect_table["lfsr"].to_numpy() < lfsr_threshold
    axis.scatter(effect_table["beta1_mean"][~called], height[~called], s=4, c="grey", label="not called")
    axis.scatter(effect_table["beta1_mean"][called], height[called], s=6, c="crimson", label=f"lfsr < {lfsr_threshold}")
    axis.axhline(-np.log10(lfsr_threshold), ls="--", c="k", lw=0.8)
    axis.set_xlabel("beta1 posterior mean (log fold change, condition vs control)")
    axis.set_ylabel("-log10 local false sign rate")
    axis.legend()
    return figure_png(figure)


def plot_ppc(ppc_table: pd.DataFrame) -> bytes:
    """PNG: observed vs replicated zero fraction (with 94% band) and the mean-variance relation."""
    figure, axes = _new_figure(2)
    zero_axis, variance_axis = axes[0]
    replicated = ppc_table["replicated_zero_fraction"]
    zero_axis.errorbar(
        ppc_table["observed_zero_fraction"],
        replicated,
        # A replicated mean outside its own band would give a negative bar, which matplotlib refuses.
        yerr=[np.clip(replicated - ppc_table["replicated_zero_fraction_low_94"], 0, None),
              np.clip(ppc_table["replicated_zero_fraction_high_94"] - replicated, 0, None)],
        fmt="o",
        ms=2,
        lw=0.5,
        alpha=0.6,
    )
    zero_axis.plot([0, 1], [0, 1], "k--", lw=0.8)
    zero_axis.set_xlabel("observed zero fraction")
    zero_axis.set_ylabel("replicated zero fraction (94% band)")
    expressed = ppc_table["observed_mean"] > 0
    variance_axis.loglog(ppc_table["observed_mean"][expressed], ppc_table["observed_variance"][expressed], ".", ms=3, label="observed")
    variance_axis.loglog(ppc_table["replicated_mean"][expressed], ppc_table["replicated_variance"][expressed], ".", ms=3, label="replicated")
    variance_axis.set_xlabel("mean count per cell")
    variance_axis.set_ylabel("variance")
    variance_axis.legend()
    return figure_png(figure)

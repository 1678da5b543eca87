"""Posterior predictive checks of the cell-level NB model: does data drawn from the fit look like the counts?"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scgrn_assets.lib.condition_effects.cell_model_data import prepare_nb_data


def posterior_predictive_check(
    idata,
    counts,
    library_size,
    condition,
    study_index,
    gene_length_bp,
    n_cells: int = 2000,
    n_draws: int = 50,
    seed: int = 0,
) -> pd.DataFrame:
    """Observed vs replicated zero fraction, mean and variance per gene.

    Replicates counts from ``n_draws`` posterior draws for a random subsample of ``n_cells``
    cells (their own library sizes, conditions and studies) and compares with the observed
    counts of the same cells. Cells with unknown condition are excluded, as in the fit.

    Parameters
    ----------
    idata : arviz.InferenceData
    counts, library_size, condition, study_index, gene_length_bp
        As passed to ``fit_nb_posterior`` (the modelled genes only).
    n_cells, n_draws : int
    seed : int

    Returns
    -------
    pd.DataFrame
        One row per gene: gene, observed_zero_fraction, replicated_zero_fraction (mean over
        draws), replicated_zero_fraction_low_94 / _high_94 (3% and 97% quantiles over draws),
        observed_mean, replicated_mean, observed_variance, replicated_variance (counts per cell).
    """
    from scgrn_assets.lib.condition_effects.model import stacked_draws  # imports PyMC: only when checking

    gene_names = [str(name) for name in idata.posterior["gene"].values]
    study_names = [str(name) for name in idata.posterior["study"].values]
    data = prepare_nb_data(counts, library_size, condition, study_index, gene_length_bp, study_names, gene_names)
    generator = np.random.default_rng(seed)
    cells = np.sort(generator.choice(data.n_cells, size=min(n_cells, data.n_cells), replace=False))
    observed = data.counts[cells].toarray().astype(np.float64)
    beta0, beta1 = stacked_draws(idata, "beta0"), stacked_draws(idata, "beta1")
    study_effect, phi = stacked_draws(idata, "b"), stacked_draws(idata, "phi")
    gamma = stacked_draws(idata, "gamma")
    chosen_draws = generator.choice(beta0.shape[0], size=min(n_draws, beta0.shape[0]), replace=False)
    log_size = data.log_library_size[cells].astype(np.float64)[:, None]
    cell_condition = data.condition[cells].astype(np.float64)[:, None]
    cell_study = data.study_index[cells]
    log_length = data.log_gene_length_kb.astype(np.float64)
    zero_fraction, mean, variance = [], [], []
    for draw in chosen_draws:
        eta = log_size + beta0[draw] + beta1[draw] * cell_condition + study_effect[draw][cell_study] + gamma[draw] * log_length
        mu = np.exp(eta)
        replicated = generator.negative_binomial(phi[draw], phi[draw] / (phi[draw] + mu))
        zero_fraction.append((replicated == 0).mean(axis=0))
        mean.append(replicated.mean(axis=0))
        variance.append(replicated.var(axis=0))
    zero_fraction = np.asarray(zero_fraction)
    return pd.DataFrame(
        {
            "gene": gene_names,
            "observed_zero_fraction": (observed == 0).mean(axis=0),
            "replicated_zero_fraction": zero_fraction.mean(axis=0),
            "replicated_zero_fraction_low_94": np.quantile(zero_fraction, 0.03, axis=0),
            "replicated_zero_fraction_high_94": np.quantile(zero_fraction, 0.97, axis=0),
            "observed_mean": observed.mean(axis=0),
            "replicated_mean": np.mean(mean, axis=0),
            "observed_variance": observed.var(axis=0),
            "replicated_variance": np.mean(variance, axis=0),
        }
    )


def ppc_misfit_summary(
    ppc_table: pd.DataFrame,
    max_fraction_outside_zero_band: float = 0.3,
    max_median_abs_log_variance_ratio: float = 0.4,
) -> dict:
    """Numbers an asset check can threshold, and whether they pass.

    Parameters
    ----------
    ppc_table : pd.DataFrame
        From :func:`posterior_predictive_check`.
    max_fraction_outside_zero_band : float
        Largest tolerated share of genes whose observed zero fraction lies outside the
        replicated 94% band (a calibrated model leaves ~6% plus approximation slack out).
    max_median_abs_log_variance_ratio : float
        Largest tolerated median over expressed genes of ``|log(observed var / replicated var)|``.

    Returns
    -------
    dict
        median_abs_zero_fraction_error, fraction_outside_zero_band, median_abs_log_variance_ratio,
        n_genes, passed (bool).
    """
    outside = (ppc_table["observed_zero_fraction"] < ppc_table["replicated_zero_fraction_low_94"]) | (
        ppc_table["observed_zero_fraction"] > ppc_table["replicated_zero_fraction_high_94"]
    )
    # Genes with (almost) no counts have no variance to compare.
    expressed = (ppc_table["observed_variance"] > 0) & (ppc_table["replicated_variance"] > 0)
    log_variance_ratio = np.log(
        ppc_table.loc[expressed, "observed_variance"] / ppc_table.loc[expressed, "replicated_variance"]
    )
    median_abs_log_variance_ratio = float(np.median(np.abs(log_variance_ratio))) if expressed.any() else 0.0
    fraction_outside = float(outside.mean())
    return {
        "median_abs_zero_fraction_error": float(
            np.median(np.abs(ppc_table["observed_zero_fraction"] - ppc_table["replicated_zero_fraction"]))
        ),
        "fraction_outside_zero_band": fraction_outside,
        "median_abs_log_variance_ratio": median_abs_log_variance_ratio,
        "n_genes": int(len(ppc_table)),
        "passed": bool(
            fraction_outside <= max_fraction_outside_zero_band
            and median_abs_log_variance_ratio <= max_median_abs_log_variance_ratio
        ),
    }

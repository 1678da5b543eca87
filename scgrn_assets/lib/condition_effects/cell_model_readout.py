"""What we read off the cell-level NB posterior (per-gene effects, global parameters), and saving it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.condition_effects.cell_model import GLOBAL_PARAMETERS, NBPosterior
from scgrn_assets.lib.storage import atomic_path


def _stacked_draws(idata, name: str) -> np.ndarray:
    """Posterior draws of one variable with chain and draw merged (one implementation, in pseudobulk_model)."""
    from scgrn_assets.lib.condition_effects.model import stacked_draws

    return stacked_draws(idata, name)


def highest_density_interval(draws: np.ndarray, probability: float = 0.94) -> tuple[np.ndarray, np.ndarray]:
    """Narrowest interval holding ``probability`` of the draws, per column (:func:`arviz.hdi`).

    Parameters
    ----------
    draws : np.ndarray, shape (n_draws, n_columns)

    Returns
    -------
    low, high : np.ndarray, shape (n_columns,)
    """
    from scgrn_assets.lib.quiet_imports import import_arviz

    draws = np.asarray(draws)
    bounds = import_arviz().hdi(draws[np.newaxis], hdi_prob=probability)  # (1 chain, draws, columns) -> (columns, 2)
    bounds = bounds.astype(draws.dtype, copy=False)  # the bounds are draws: keep their dtype
    return bounds[:, 0], bounds[:, 1]


def condition_effect_table(idata, gene_names=None) -> pd.DataFrame:
    """One row per gene: what the posterior says about the condition effect beta1.

    Parameters
    ----------
    idata : arviz.InferenceData
        From :func:`scgrn_assets.lib.condition_effects.cell_model_inference.fit_nb_posterior`.
    gene_names : sequence of str, optional
        Defaults to the posterior's ``gene`` coordinate.

    Returns
    -------
    pd.DataFrame
        Columns: gene; beta1_mean, beta1_sd (log fold change, natural log); beta1_low_94,
        beta1_high_94 (94% highest-density interval); prob_positive = P(beta1 > 0);
        lfsr = min(P(beta1 >= 0), P(beta1 <= 0)), the local false sign rate; beta0_mean;
        phi_mean (inverse dispersion).
    """
    beta1 = _stacked_draws(idata, "beta1")
    if gene_names is None:
        gene_names = [str(name) for name in idata.posterior["gene"].values]
    low, high = highest_density_interval(beta1, 0.94)
    return pd.DataFrame(
        {
            "gene": list(gene_names),
            "beta1_mean": beta1.mean(axis=0),
            "beta1_sd": beta1.std(axis=0, ddof=1),
            "beta1_low_94": low,
            "beta1_high_94": high,
            "prob_positive": (beta1 > 0).mean(axis=0),
            "lfsr": np.minimum((beta1 >= 0).mean(axis=0), (beta1 <= 0).mean(axis=0)),
            "beta0_mean": _stacked_draws(idata, "beta0").mean(axis=0),
            "phi_mean": _stacked_draws(idata, "phi").mean(axis=0),
        }
    )


def global_parameter_summary(idata) -> pd.DataFrame:
    """ArviZ summary (mean, sd, 94% HDI) of the global parameters, one row each."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()

    present = [name for name in GLOBAL_PARAMETERS if name in idata.posterior]
    return az.summary(idata, var_names=present, kind="stats")


def save_posterior(posterior: NBPosterior, path) -> None:
    """Write the posterior (draws and ELBO group, no data matrix) as netCDF, atomically.

    Written under a temporary name in the same folder and renamed into place, so a crash never
    leaves a half-written file that looks complete. ``arviz.from_netcdf(path)`` reads it back.
    """
    # netCDF attributes hold no booleans, hence the int.
    posterior.idata.posterior.attrs.update(
        n_steps=int(posterior.n_steps), converged=int(posterior.converged), seconds=float(posterior.seconds)
    )
    with atomic_path(Path(path)) as temporary:
        posterior.idata.to_netcdf(str(temporary))


def load_posterior(path) -> NBPosterior:
    """Read a posterior written by :func:`save_posterior`."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()

    idata = az.from_netcdf(os.fspath(path))
    attrs = idata.posterior.attrs
    return NBPosterior(
        idata=idata,
        elbo_history=np.asarray(idata["elbo"]["elbo"].values),
        n_steps=int(attrs.get("n_steps", 0)),
        converged=bool(attrs.get("converged", 0)),
        seconds=float(attrs.get("seconds", float("nan"))),
    )

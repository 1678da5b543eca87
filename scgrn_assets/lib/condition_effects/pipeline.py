"""From a corpus to "which genes change with condition, and how sure are we": the path the assets share.

1. :func:`corpus_pseudobulk` sums each animal's cells (dropping second copies of cells that two
   studies share), :func:`~scgrn_assets.lib.condition_effects.pseudobulk.check_design` decides which studies can
   inform the effect, :func:`select_expressed_genes` keeps genes with enough counts to test.
2. :func:`~scgrn_assets.lib.condition_effects.model.fit_pseudobulk_model` gives the posterior (the
   default), or the cell-level minibatch ADVI model of the original pipeline
   (``method="cell_advi"``), kept for comparison: it treats cells as replicates.
3. :func:`sample_level_ppc` asks whether the model reproduces the between-animal variance it
   will be judged by; :func:`~scgrn_assets.lib.condition_effects.model.effect_table` turns draws into the
   table, with calls at a stated false discovery target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.condition_effects.pseudobulk import Pseudobulk, check_design, pseudobulk_by_animal
from scgrn_assets.lib.storage import atomic_path


METHODS = ("pseudobulk", "cell_advi")
#: A gene is tested when at least this many animals have at least MIN_COUNT counts of it.
MIN_COUNT, MIN_ANIMALS_EXPRESSED = 5, 3
#: Share of genes whose observed between-animal variance may sit above 97.5% of replicates.
MAX_PPC_EXTREME_FRACTION = 0.2


@dataclass
class CorpusPseudobulk:
    """The per-animal pseudobulk of a corpus and what was done to get it.

    Attributes
    ----------
    pseudobulk : Pseudobulk
        Animals of modelled studies (contrast and baseline-only), expressed genes.
    design : DesignReport
    n_repeated_cells_dropped : int
        Cells dropped because an identical cell sits in an earlier study (a SuperSeries beside
        its subseries would otherwise count the same animals twice).
    cell_rows : np.ndarray
        Rows of the corpus that went into the pseudobulk (for the cell-level model).
    """

    pseudobulk: Pseudobulk
    design: object
    n_repeated_cells_dropped: int
    cell_rows: np.ndarray


def corpus_pseudobulk(corpus, levels: tuple[str, str], *, max_genes: int | None = None) -> CorpusPseudobulk:
    """Pseudobulk per animal from an AnnData corpus (cells x genes, raw counts, ``obs`` as the corpus writes it).

    Genes a modelled study did not measure (``var["measured_in_<study>"]`` False) are left out
    rather than fitted as zeros; of the rest, :func:`select_expressed_genes` keeps the testable
    ones, at most ``max_genes`` (the most expressed).
    """
    from scgrn_assets.lib.corpus.build import measured_column
    from scgrn_assets.lib.corpus.qc_checks import row_fingerprints

    obs = corpus.obs
    condition = obs["condition"].astype(object)
    known = condition.notna().to_numpy() & condition.isin(levels).to_numpy()
    if not known.any():
        raise ScgrnInputError("no cell has a known condition", file="combined_corpus",
                              fix="check the catalog's condition rules")
    rows = np.flatnonzero(known)
    counts = corpus.X[rows]
    # Second copies of identical cells (same count vector) in a later study are dropped.
    fingerprints = row_fingerprints(counts)
    _, first = np.unique(fingerprints, return_index=True)
    keep = np.zeros(len(rows), dtype=bool)
    keep[first] = True
    n_dropped = int((~keep).sum())
    rows, counts = rows[keep], counts[keep]
    cell_obs = obs.iloc[rows]
    pseudobulk = pseudobulk_by_animal(counts, cell_obs, corpus.var_names.tolist(), levels)
    design = check_design(pseudobulk)
    modelled = design.modelled_studies
    measured = np.all([corpus.var[measured_column(s)].to_numpy() if measured_column(s) in corpus.var else
                       np.ones(corpus.n_vars, dtype=bool) for s in modelled], axis=0)
    in_model = pseudobulk.samples["study"].isin(modelled).to_numpy()
    pseudobulk = pseudobulk.subset(samples=in_model, genes=measured)
    pseudobulk = pseudobulk.subset(genes=select_expressed_genes(pseudobulk, max_genes=max_genes))
    in_study = cell_obs["study"].astype(str).isin(modelled).to_numpy()
    return CorpusPseudobulk(pseudobulk=pseudobulk, design=design, n_repeated_cells_dropped=n_dropped,
                            cell_rows=rows[in_study])


def select_expressed_genes(pseudobulk: Pseudobulk, *, min_count: int = MIN_COUNT,
                           min_animals: int = MIN_ANIMALS_EXPRESSED, max_genes: int | None = None) -> np.ndarray:
    """Sorted indices of genes with >= ``min_count`` counts in >= ``min_animals`` animals, capped at the
    ``max_genes`` highest base means (genes too sparse to test would only dilute the calls)."""
    expressed = np.flatnonzero((pseudobulk.counts >= min_count).sum(axis=0) >= min(min_animals, pseudobulk.n_samples))
    if max_genes is not None and len(expressed) > max_genes:
        level = pseudobulk.normalised()[:, expressed].mean(axis=0)
        expressed = np.sort(expressed[np.argsort(-level, kind="stable")[:max_genes]])
    if len(expressed) == 0:
        raise ScgrnInputError(f"no gene has >= {min_count} counts in >= {min_animals} animals",
                              file="combined_corpus", fix="check QC thresholds and the condition rules")
    return expressed


# --------------------------------------------------------------------------- criticism


def between_animal_variance(counts: np.ndarray, library_size: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Pooled within-group variance of log normalised pseudobulk, per gene.

    Parameters
    ----------
    counts : np.ndarray, shape (..., n_samples, n_genes)
    library_size : np.ndarray, shape (n_samples,)
    groups : np.ndarray, shape (n_samples,)
        Study x condition label of each animal: variance is taken within these groups, so it is
        the animal-to-animal variation the condition effect is judged against.

    Returns
    -------
    np.ndarray, shape (..., n_genes)
    """
    values = np.log((counts + 0.5) / library_size[:, None] * 1e6)
    codes = pd.factorize(groups)[0]
    total, dof = 0.0, 0
    for code in np.unique(codes):
        member = codes == code
        if member.sum() < 2:
            continue
        block = values[..., member, :]
        total = total + ((block - block.mean(axis=-2, keepdims=True)) ** 2).sum(axis=-2)
        dof += int(member.sum()) - 1
    return total / max(dof, 1)


def sample_level_ppc(pseudobulk: Pseudobulk, replicated: np.ndarray) -> pd.DataFrame:
    """Observed vs replicated between-animal variance per gene.

    Parameters
    ----------
    replicated : np.ndarray, shape (n_draws, n_samples, n_genes)
        Posterior predictive pseudobulk.

    Returns
    -------
    pd.DataFrame
        ``gene``, ``observed_between_animal_variance``, ``replicated_between_animal_variance``
        (mean over draws), ``ppp`` = P(replicated >= observed) (near 0: the model is too sure).
    """
    library = np.exp(pseudobulk.log_offset())
    groups = (pseudobulk.samples["study"].astype(str) + "|" + pseudobulk.samples["condition"].astype(str)).to_numpy()
    observed = between_animal_variance(pseudobulk.counts.astype(np.float64), library, groups)
    simulated = between_animal_variance(replicated, library, groups)
    return pd.DataFrame({"gene": pseudobulk.gene_names, "observed_between_animal_variance": observed,
                         "replicated_between_animal_variance": simulated.mean(axis=0),
                         "ppp": (simulated >= observed[None, :]).mean(axis=0)})


def ppc_summary(ppc: pd.DataFrame, max_extreme_fraction: float = MAX_PPC_EXTREME_FRACTION) -> dict:
    """Share of genes whose observed between-animal variance exceeds 97.5% of replicates, and whether that passes.

    A model that treats cells as replicates leaves no room for animals to differ: nearly every
    gene lands there. A calibrated model leaves a few percent.
    """
    ratio = np.log(ppc["observed_between_animal_variance"] / np.maximum(ppc["replicated_between_animal_variance"],
                                                                         1e-12))
    extreme = float((ppc["ppp"] < 0.025).mean()) if len(ppc) else 0.0
    return {"fraction_genes_variance_above_replicates": extreme,
            "median_log_variance_ratio": float(np.median(ratio)) if len(ppc) else 0.0,
            "n_genes": int(len(ppc)), "passed": bool(extreme <= max_extreme_fraction)}


def replicated_pseudobulk_from_cells(idata, pseudobulk: Pseudobulk, cell_library_size: np.ndarray,
                                     cell_sample: np.ndarray, gene_length_bp: np.ndarray | None = None,
                                     n_draws: int = 100, seed: int = 0) -> np.ndarray:
    """Posterior predictive pseudobulk of the cell-level model (:mod:`scgrn_assets.lib.condition_effects.cell_model`).

    Each cell's count is NB(s_i r_g, phi_g) with ``r_g`` shared by the cells of one animal, so an
    animal's sum has mean ``r_g sum s_i`` and variance ``mean + r_g^2 sum s_i^2 / phi_g``; the draw
    is a Negative Binomial with those two moments.

    Parameters
    ----------
    cell_library_size, cell_sample : np.ndarray, shape (n_cells,)
        Library sizes of the fitted cells and the pseudobulk row each belongs to.
    """
    from functools import partial

    from scgrn_assets.lib.condition_effects.model import stacked_draws

    stacked = partial(stacked_draws, idata)
    beta0, beta1, phi = stacked("beta0"), stacked("beta1"), stacked("phi")
    study_effect, gamma = stacked("b"), stacked("gamma")
    studies = [str(s) for s in idata.posterior["study"].values]
    sample_study = np.searchsorted(studies, pseudobulk.samples["study"].astype(str).to_numpy())
    is_case = pseudobulk.is_case.astype(np.float64)
    first_moment = np.bincount(cell_sample, weights=cell_library_size, minlength=pseudobulk.n_samples)
    second_moment = np.bincount(cell_sample, weights=cell_library_size**2, minlength=pseudobulk.n_samples)
    log_length = np.zeros(pseudobulk.n_genes) if gene_length_bp is None else np.log(gene_length_bp / 1000.0)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(beta0.shape[0], size=min(n_draws, beta0.shape[0]), replace=False)
    replicated = np.empty((len(chosen), pseudobulk.n_samples, pseudobulk.n_genes))
    for row, draw in enumerate(chosen):
        rate = np.exp(beta0[draw][None, :] + is_case[:, None] * beta1[draw][None, :]
                      + study_effect[draw][sample_study] + gamma[draw] * log_length[None, :])
        mean = rate * first_moment[:, None]
        excess = rate**2 * second_moment[:, None] / phi[draw][None, :]
        shape = mean**2 / np.maximum(excess, 1e-12)
        replicated[row] = rng.negative_binomial(shape, shape / (shape + mean))
    return replicated


# --------------------------------------------------------------------------- storage


def save_pseudobulk_posterior(idata, pseudobulk: Pseudobulk, path) -> None:
    """Write the posterior and the pseudobulk it was fitted on (``observed_data``, ``constant_data``) as netCDF, atomically."""
    import xarray as xr

    samples = pseudobulk.samples
    idata = idata.copy()
    observed = xr.Dataset({"counts": (("animal_row", "gene"), pseudobulk.counts)},
                          coords={"gene": pseudobulk.gene_names})
    constant = xr.Dataset({column: ("animal_row", samples[column].astype(str).to_numpy() if samples[column].dtype == object
                                    else samples[column].to_numpy()) for column in samples.columns})
    constant.attrs["levels"] = list(pseudobulk.levels)
    for name, group in (("observed_data", observed), ("constant_data", constant)):
        if name in idata.groups():
            del idata[name]
        idata.add_groups({name: group})
    with atomic_path(Path(path)) as temporary:
        idata.to_netcdf(str(temporary))


def load_pseudobulk_posterior(path) -> tuple[object, Pseudobulk]:
    """The ArviZ InferenceData and the Pseudobulk written by :func:`save_pseudobulk_posterior`."""
    from scgrn_assets.lib.quiet_imports import import_arviz
    az = import_arviz()

    idata = az.from_netcdf(os.fspath(path))
    constant = idata.constant_data
    samples = pd.DataFrame({name: constant[name].values for name in constant.data_vars})
    for column in ("study", "animal", "condition"):
        samples[column] = samples[column].astype(str)
    levels = tuple(str(level) for level in np.atleast_1d(constant.attrs["levels"]))
    pseudobulk = Pseudobulk(counts=np.asarray(idata.observed_data["counts"].values, dtype=np.int64), samples=samples,
                            gene_names=[str(g) for g in idata.observed_data["gene"].values], levels=levels)
    return idata, pseudobulk


# --------------------------------------------------------------------------- per study


def effects_by_study(pseudobulk: Pseudobulk, contrast_studies: list[str], *, fdr_target: float = 0.05,
                     seed: int = 0, progress: Progress | None = None) -> pd.DataFrame:
    """The same model fitted to each contrast study alone: one table per study, stacked with a ``study`` column.

    Lets a user see whether the studies (e.g. different Alzheimer's models) agree.
    ``progress(n_studies_fitted, n_studies, study=study)`` is called before each study's fit.
    """
    from scgrn_assets.lib.condition_effects.model import PosteriorConfig, effect_draws, effect_table, fit_pseudobulk_model

    tables = []
    for index, study in enumerate(contrast_studies):
        report(progress, index, len(contrast_studies), study=study)
        alone = pseudobulk.subset(samples=(pseudobulk.samples["study"] == study).to_numpy())
        alone = alone.subset(genes=select_expressed_genes(alone, min_animals=min(MIN_ANIMALS_EXPRESSED,
                                                                                  alone.n_samples)))
        posterior = fit_pseudobulk_model(alone, PosteriorConfig(seed=seed))
        table = effect_table(effect_draws(posterior), alone, fdr_target=fdr_target)
        tables.append(table.assign(study=study))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


# --------------------------------------------------------------------------- plots


def plot_volcano(table: pd.DataFrame) -> bytes:
    """PNG: log2 fold change vs -log10 s-value, calls highlighted."""
    from scgrn_assets.lib.plotting import figure_png, plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    height = -np.log10(np.clip(table["svalue"].to_numpy(dtype=float), 1e-6, 1.0))
    called = table["called"].to_numpy(dtype=bool)
    ax.scatter(table["log2fc_mean"][~called], height[~called], s=4, c="grey", label="not called")
    ax.scatter(table["log2fc_mean"][called], height[called], s=6, c="crimson", label="called")
    ax.set_xlabel("log2 fold change (posterior mean)")
    ax.set_ylabel("-log10 s-value")
    ax.legend(fontsize=7)
    return figure_png(fig)


def plot_ma(table: pd.DataFrame) -> bytes:
    """PNG: log2 fold change against mean normalised expression (MA plot)."""
    from scgrn_assets.lib.plotting import figure_png, plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    called = table["called"].to_numpy(dtype=bool)
    x = np.log10(np.clip(table["base_mean"].to_numpy(dtype=float), 1e-3, None))
    ax.scatter(x[~called], table["log2fc_mean"][~called], s=4, c="grey")
    ax.scatter(x[called], table["log2fc_mean"][called], s=6, c="crimson")
    ax.axhline(0.0, c="k", lw=0.8)
    ax.set_xlabel("log10 base mean")
    ax.set_ylabel("log2 fold change")
    return figure_png(fig)


def plot_sample_ppc(ppc: pd.DataFrame) -> bytes:
    """PNG: observed vs replicated between-animal variance per gene (on the diagonal when calibrated)."""
    from scgrn_assets.lib.plotting import figure_png, plt

    fig, ax = plt.subplots(figsize=(5, 4))
    observed = np.clip(ppc["observed_between_animal_variance"].to_numpy(dtype=float), 1e-6, None)
    replicated = np.clip(ppc["replicated_between_animal_variance"].to_numpy(dtype=float), 1e-6, None)
    ax.loglog(replicated, observed, ".", ms=3, alpha=0.6)
    low, high = min(observed.min(), replicated.min()), max(observed.max(), replicated.max())
    ax.plot([low, high], [low, high], "k--", lw=0.8)
    ax.set_xlabel("replicated between-animal variance")
    ax.set_ylabel("observed between-animal variance")
    return figure_png(fig)

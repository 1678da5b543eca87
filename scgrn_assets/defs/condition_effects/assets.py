"""Condition effects: the posterior (replicate = animal), the gene tables, and PyDESeq2 beside them."""

import dagster as dg
import numpy as np
import pandas as pd

from scgrn_assets.metadata import plots_metadata, png_metadata, table_preview
from scgrn_assets.defs.condition_effects.checks import POSTERIOR_CHECKS
from scgrn_assets.io_managers import file_artefact, output_path
from scgrn_assets.jobs import GPU_POOL, gpu_op_tags
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.condition_effects import (agreement_with_peer, corpus_pseudobulk, effect_draws, effect_table, effects_by_study,
                                 fit_pseudobulk_model, load_pseudobulk_posterior, plot_ma, plot_sample_ppc,
                                 plot_volcano, posterior_diagnostics, PosteriorConfig, ppc_summary, PseudobulkPosterior,
                                 pydeseq2_effects, replicated_pseudobulk, replicated_pseudobulk_from_cells,
                                 sample_level_ppc, save_pseudobulk_posterior)
from scgrn_assets.lib.condition_effects.pipeline import METHODS
from scgrn_assets.lib.condition_effects.model import MAX_PARETO_K
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.sql_store import write_parquet
from scgrn_assets.resources import NBModelSettings, ScgrnStorage
from scgrn_assets.run_console import asset_progress

#: Share of genes whose importance sampler may fail its k-hat check before the posterior is refused.
MAX_SHARE_UNRELIABLE_GENES = 0.01


def _fit_cell_advi(context, nb_model: NBModelSettings, corpus, prepared):
    """The original pipeline's cell-level minibatch ADVI model on the same cells and genes (cells as replicates)."""
    from scgrn_assets.lib.condition_effects import fit_nb_posterior, NBFitConfig

    pseudobulk = prepared.pseudobulk
    cells = corpus[prepared.cell_rows][:, pseudobulk.gene_names]
    studies = sorted(pseudobulk.samples["study"].unique())
    obs = cells.obs
    condition = (obs["condition"].astype(str) == pseudobulk.levels[1]).to_numpy(dtype=float)
    length = cells.var["gene_length_bp"].to_numpy(dtype=float) if "gene_length_bp" in cells.var else \
        np.full(cells.n_vars, np.nan)
    config = NBFitConfig(max_steps=nb_model.max_steps, min_steps=min(nb_model.max_steps, NBFitConfig.min_steps),
                         batch_size=nb_model.batch_size, seed=nb_model.seed, device=nb_model.device)
    posterior = fit_nb_posterior(
        counts=cells.X, library_size=obs["n_counts"].to_numpy(), condition=condition,
        study_index=np.searchsorted(studies, obs["study"].astype(str).to_numpy()), gene_length_bp=length,
        study_names=studies, gene_names=pseudobulk.gene_names, config=config,
        progress=asset_progress(context, "ADVI", "steps"))
    animal_key = obs["study"].astype(str) + "\x00" + obs["animal" if "animal" in obs else "sample"].astype(str)
    sample_key = pseudobulk.samples["study"].astype(str) + "\x00" + pseudobulk.samples["animal"].astype(str)
    cell_sample = pd.Index(sample_key).get_indexer(animal_key)
    replicated = replicated_pseudobulk_from_cells(
        posterior.idata, pseudobulk, obs["n_counts"].to_numpy(dtype=float), cell_sample,
        gene_length_bp=np.where(np.isfinite(length) & (length > 0), length, 1000.0), seed=nb_model.seed)
    return posterior.idata, replicated, {"n_steps": posterior.n_steps, "converged": posterior.converged,
                                         "inference_check": "mean-field ADVI, cells as replicates: not checked "
                                                            "against NUTS; see the sample-level PPC"}


@dg.asset(group_name="condition_effects", io_manager_key="artefact_io_manager", metadata=file_artefact(".nc"),
          kinds={"pymc", "netcdf"}, pool=GPU_POOL,
          op_tags=gpu_op_tags(), tags={"stage": "condition_effects"},
          check_specs=POSTERIOR_CHECKS)
def nb_posterior(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_model: NBModelSettings,
                 combined_corpus):
    """Posterior of each gene's condition effect, with the animal (GEO sample) as the replicate: a Negative-Binomial
    GLM on per-animal pseudobulk (study intercepts, a dispersion trend), computed exactly per gene by importance
    sampling; or, with ``method: cell_advi``, the original cell-level ADVI model. ArviZ netCDF with the
    pseudobulk it was fitted on."""
    if nb_model.method not in METHODS:
        raise ScgrnInputError(f"unknown method {nb_model.method!r}", study="nb_posterior",
                              fix=f"set the nb_model resource's method to one of {list(METHODS)}")
    catalog = storage.load_catalog()
    corpus = read_corpus(combined_corpus)
    prepared = corpus_pseudobulk(corpus, catalog.condition_levels, max_genes=nb_model.n_top_genes)
    pseudobulk, design = prepared.pseudobulk, prepared.design
    context.log.info(f"pseudobulk: {pseudobulk.n_samples} animals x {pseudobulk.n_genes} genes; "
                     f"contrast studies {design.contrast_studies}")
    if nb_model.method == "pseudobulk":
        posterior = fit_pseudobulk_model(pseudobulk, PosteriorConfig(seed=nb_model.seed, device=nb_model.device))
        idata, replicated = posterior.idata, replicated_pseudobulk(posterior, seed=nb_model.seed)
        diagnostics = posterior_diagnostics(idata)
        inference = {"passed": diagnostics["n_genes_pareto_k_above_0.7"]
                     <= MAX_SHARE_UNRELIABLE_GENES * diagnostics["n_genes"], **diagnostics,
                     **{f"dispersion_trend_{k}": v for k, v in posterior.dispersion_trend.items()}}
        fit_metadata = {"seconds": round(posterior.seconds, 1)}
    else:
        idata, replicated, fit_metadata = _fit_cell_advi(context, nb_model, corpus, prepared)
        inference = {"passed": True, "note": fit_metadata.pop("inference_check")}
    idata.posterior.attrs["method"] = nb_model.method
    path = output_path(context, storage.layout)
    save_pseudobulk_posterior(idata, pseudobulk, path)
    ppc = sample_level_ppc(pseudobulk, replicated)
    write_parquet(ppc, path.with_name("posterior_predictive_check.parquet"))
    summary = ppc_summary(ppc)
    yield dg.Output(path, metadata={
        "method": nb_model.method, "n_animals": pseudobulk.n_samples, "n_genes": pseudobulk.n_genes,
        "n_cells": int(pseudobulk.samples["n_cells"].sum()),
        "repeated_cells_dropped": prepared.n_repeated_cells_dropped,
        "design": table_preview(design.studies, n_rows=len(design.studies)), **fit_metadata,
        **plots_metadata(("posterior_predictive", plot_sample_ppc, ppc)),
    })
    excluded = design.studies[design.studies["role"] != "contrast"]
    yield dg.AssetCheckResult(
        check_name="design_has_replicated_contrast", passed=True,
        description=None if excluded.empty else "; ".join(f"{r.study} {r.role}: {r.reason}"
                                                          for r in excluded.itertuples()),
        metadata={"contrast_studies": ", ".join(design.contrast_studies),
                  "studies": table_preview(design.studies, n_rows=len(design.studies))})
    yield dg.AssetCheckResult(
        check_name="posterior_predictive_fits", passed=summary["passed"],
        description=None if summary["passed"] else
        f"{summary['fraction_genes_variance_above_replicates']:.0%} of genes vary more between animals than the "
        "model allows: it is too sure; use method: pseudobulk (animals as replicates)",
        metadata={k: v for k, v in summary.items() if k != "passed"})
    yield dg.AssetCheckResult(
        check_name="inference_is_reliable", passed=bool(inference.pop("passed")),
        description=None if nb_model.method != "pseudobulk" else
        f"genes with PSIS k-hat above {MAX_PARETO_K} are not represented well by importance sampling",
        metadata=inference)


@dg.asset(group_name="condition_effects", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "condition_effects"})
def condition_effects(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_model: NBModelSettings,
                      nb_posterior):
    """One row per gene: log2 fold change (case vs control) with its posterior sd and 90% interval, lfsr, s-value
    and the call at the run's false discovery target, over the animals of every contrast study; DuckDB table
    ``condition_effects``."""
    idata, pseudobulk = load_pseudobulk_posterior(nb_posterior)
    posterior = PseudobulkPosterior(idata=idata, pseudobulk=pseudobulk, studies=[], dispersion_trend={}, seconds=0.0)
    contrast = pseudobulk.samples[pseudobulk.samples.groupby("study")["condition"].transform("nunique") > 1]
    table = effect_table(effect_draws(posterior), pseudobulk, fdr_target=nb_model.fdr_target,
                         contrast_samples=contrast)
    return dg.Output(table, metadata={
        "n_genes": len(table), "n_called": int(table["called"].sum()), "fdr_target": nb_model.fdr_target,
        "method": str(idata.posterior.attrs.get("method", "pseudobulk")),
        "top_genes": table_preview(table.sort_values("svalue"), n_rows=15),
        **plots_metadata(("volcano", plot_volcano, table), ("ma_plot", plot_ma, table)),
    })


@dg.asset(group_name="condition_effects", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "condition_effects"})
def condition_effects_by_study(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_model: NBModelSettings,
                               nb_posterior):
    """The same model fitted to each study with both conditions alone (same columns plus ``study``): do the AD
    models agree? DuckDB table ``condition_effects_by_study``."""
    _, pseudobulk = load_pseudobulk_posterior(nb_posterior)
    counts = pseudobulk.samples.groupby("study")["condition"].agg(["nunique", "size"])
    contrast = [study for study, group in pseudobulk.samples.groupby("study")
                if group["condition"].value_counts().min() >= 2 and group["condition"].nunique() == 2]
    table = effects_by_study(pseudobulk, contrast, fdr_target=nb_model.fdr_target, seed=nb_model.seed,
                             progress=asset_progress(context, "per-study fits", "studies"))
    called = table.groupby("study")["called"].sum().to_dict() if len(table) else {}
    return dg.Output(table, metadata={"studies": contrast, "n_called_per_study": str(called),
                                     "n_rows": len(table), "animals_per_study": table_preview(counts.reset_index())})


@dg.asset(group_name="condition_effects", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "condition_effects"})
def condition_effects_pydeseq2(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_model: NBModelSettings,
                               nb_posterior, condition_effects: pd.DataFrame):
    """PyDESeq2 (``~ study + condition``, Wald test, BH) on the same pseudobulk, and how it agrees with
    ``condition_effects``; DuckDB table ``condition_effects_pydeseq2``."""
    _, pseudobulk = load_pseudobulk_posterior(nb_posterior)
    contrast = pseudobulk.samples.groupby("study")["condition"].transform("nunique") > 1
    peer = pydeseq2_effects(pseudobulk.subset(samples=contrast.to_numpy()), fdr_target=nb_model.fdr_target)
    ours = condition_effects
    agreement = agreement_with_peer(ours, peer)
    return dg.Output(peer, metadata={"seconds": round(peer.attrs["seconds"], 1), **agreement,
                                     "top_genes": table_preview(peer.sort_values("padj"), n_rows=10)})

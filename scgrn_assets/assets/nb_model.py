"""The hierarchical Negative-Binomial posterior and the per-gene condition effects."""

import dagster as dg

from scgrn_assets.assets.metadata import png_metadata, table_preview
from scgrn_assets.io_managers import artefact_path
from scgrn_assets.jobs import GPU_POOL, gpu_op_tags
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.nb_inference import fit_nb_posterior
from scgrn_assets.lib.nb_model import (NBFitConfig, condition_effect_table, global_parameter_summary,
                                       load_posterior, plot_elbo, plot_ppc, plot_volcano,
                                       posterior_predictive_check, ppc_misfit_summary, save_posterior,
                                       select_model_inputs)
from scgrn_assets.lib.sql_store import register_view, write_parquet
from scgrn_assets.resources import NBModelSettings, ScgrnStorage


@dg.asset(group_name="nb_model", io_manager_key="artefact_io_manager", kinds={"pymc", "netcdf"}, pool=GPU_POOL,
          op_tags=gpu_op_tags(), tags={"stage": "nb_model"},
          check_specs=[dg.AssetCheckSpec("posterior_predictive_fits", asset="nb_posterior", blocking=True,
                                         description="Observed zero fractions inside the replicated 94% band and "
                                                     "observed/replicated variance close, for most genes.")])
def nb_posterior(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_model: NBModelSettings,
                 combined_corpus):
    """Hierarchical NB fit (minibatch ADVI, PyMC): condition effect beta1 per gene, study effects,
    gene-length term, per-gene dispersion; posterior draws as an ArviZ netCDF."""
    catalog = storage.load_catalog()
    corpus = read_corpus(combined_corpus)
    inputs = select_model_inputs(corpus, n_top_genes=nb_model.n_top_genes, levels=catalog.condition_levels)
    subset, studies = inputs.adata, inputs.studies
    config = NBFitConfig(max_steps=nb_model.max_steps, min_steps=min(nb_model.max_steps, NBFitConfig.min_steps),
                         batch_size=nb_model.batch_size, seed=nb_model.seed, device=nb_model.device)

    def progress(step: int, n_steps: int, elbo: float) -> None:
        if step % 500 == 0:
            context.log.info(f"ADVI step {step}/{n_steps}: ELBO {elbo:.4g}")

    arguments = dict(counts=subset.X, library_size=subset.obs["n_counts"].to_numpy(), condition=inputs.condition,
                     study_index=inputs.study_index, gene_length_bp=subset.var["gene_length_bp"].to_numpy())
    posterior = fit_nb_posterior(**arguments, study_names=studies, gene_names=subset.var_names.tolist(),
                                 config=config, progress=progress)
    path = artefact_path(storage.layout, "nb_posterior", None)
    save_posterior(posterior, path)
    ppc = posterior_predictive_check(posterior.idata, **arguments, seed=nb_model.seed)
    misfit = ppc_misfit_summary(ppc)
    write_parquet(ppc, path.with_name("posterior_predictive_check.parquet"))
    yield dg.Output(path, metadata={
        "n_cells": subset.n_obs, "n_genes": subset.n_vars, "studies": studies,
        "n_steps": posterior.n_steps, "converged": posterior.converged, "seconds": round(posterior.seconds, 1),
        "elbo": png_metadata(plot_elbo(posterior.elbo_history)),
        "global_parameters": table_preview(global_parameter_summary(posterior.idata), n_rows=20),
        "posterior_predictive": png_metadata(plot_ppc(ppc)),
    })
    yield dg.AssetCheckResult(check_name="posterior_predictive_fits", passed=bool(misfit["passed"]),
                              metadata={k: v for k, v in misfit.items() if k != "passed"})


@dg.asset(group_name="nb_model", io_manager_key="artefact_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "nb_model"})
def condition_effects(context: dg.AssetExecutionContext, storage: ScgrnStorage, nb_posterior):
    """One row per gene: posterior mean, sd and 94% interval of beta1 (natural-log fold change,
    AD vs control), P(beta1 > 0), local false sign rate, dispersion; DuckDB table ``condition_effects``."""
    posterior = load_posterior(nb_posterior)
    table = condition_effect_table(posterior.idata)
    path = artefact_path(storage.layout, "condition_effects", None)
    write_parquet(table, path)
    register_view(storage.layout.duckdb_path, "condition_effects", path)
    return dg.Output(path, metadata={
        "n_genes": len(table), "called_lfsr_0.05": int((table["lfsr"] < 0.05).sum()),
        "volcano": png_metadata(plot_volcano(table)),
        "top_genes": table_preview(table.sort_values("lfsr"), n_rows=15),
    })

"""Condition effects: per-animal pseudobulk, the Bayesian NB model, adaptive shrinkage, the peer
(PyDESeq2), calibration on structured simulations.

Modules:

- ``adaptive_shrinkage``: Adaptive shrinkage (Stephens 2017, ``ashr``): let "no effect" be an answer,
  and call at a stated error rate.
- ``calibration``: Calibration of condition-effect methods on simulated designs: coverage, false
  discovery rate, power.
- ``cell_model``: The hierarchical Negative-Binomial model of condition effects, cell by cell.
- ``cell_model_data``: The cell-level NB model's inputs: which cells and genes, as arrays the model
  reads, and its exact count tables.
- ``cell_model_inference``: Minibatch ADVI for the hierarchical NB model: initialisation, training loop,
  stopping rule, draws.
- ``cell_model_plots``: Figures of a cell-level NB fit for the asset metadata (PNG bytes): ELBO,
  volcano, PPC.
- ``cell_model_ppc``: Posterior predictive checks of the cell-level NB model: does data drawn from the
  fit look like the counts?
- ``cell_model_readout``: What we read off the cell-level NB posterior (per-gene effects, global
  parameters), and saving it.
- ``model``: The default condition-effect model: a Bayesian Negative-Binomial GLM on per-animal
  pseudobulk.
- ``peer``: PyDESeq2 on the same per-animal pseudobulk: the peer a user puts beside our answer.
- ``pipeline``: From a corpus to "which genes change with condition, and how sure are we": the path the
  assets share.
- ``pseudobulk``: Cells summed per animal (the replicate of a condition study) and the checks a design
  must pass.
- ``simulate``: Designs with the structure real condition studies have, for calibrating condition
  effects.

Public names are importable from the package (``from scgrn_assets.lib.condition_effects import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "adaptive_shrinkage": ("AshResult", "mixture_grid", "component_likelihoods", "fit_mixture_weights",
        "svalues", "adaptive_shrinkage", "mixture_cdf", "mixture_quantile"),
    "calibration": ("score_calls", "simulated_pseudobulk", "run_methods", "run_cell_advi"),
    "cell_model": ("NBFitConfig", "NBPosterior", "build_nb_model", "nb_log_likelihood"),
    "cell_model_data": ("NBData", "NBSufficientStatistics", "select_model_genes", "ModelInputs",
        "select_model_inputs", "prepare_nb_data", "sufficient_statistics"),
    "cell_model_inference": ("initial_estimates", "jax_device", "windowed_elbo_converged",
        "CompiledAdviStep", "compile_advi_step", "fit_nb_posterior", "draw_from_mean_field",
        "posterior_to_inference_data"),
    "cell_model_plots": ("plot_elbo", "plot_cell_model_volcano", "plot_ppc"),
    "cell_model_ppc": ("posterior_predictive_check", "ppc_misfit_summary"),
    "cell_model_readout": ("highest_density_interval", "condition_effect_table", "global_parameter_summary",
        "save_posterior", "load_posterior"),
    "model": ("PosteriorConfig", "PseudobulkPosterior", "log_mean_expression", "build_pseudobulk_model",
        "fit_pseudobulk_model", "stacked_draws", "posterior_diagnostics", "replicated_pseudobulk",
        "effect_draws", "base_mean", "effect_table"),
    "peer": ("pydeseq2_effects", "agreement_with_peer"),
    "pipeline": ("CorpusPseudobulk", "corpus_pseudobulk", "select_expressed_genes",
        "between_animal_variance", "sample_level_ppc", "ppc_summary", "replicated_pseudobulk_from_cells",
        "save_pseudobulk_posterior", "load_pseudobulk_posterior", "effects_by_study", "plot_volcano",
        "plot_ma", "plot_sample_ppc"),
    "pseudobulk": ("Pseudobulk", "pseudobulk_by_animal", "DesignReport", "check_design"),
    "simulate": ("DesignConfig", "SimulatedComparison", "simulate_comparison"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)

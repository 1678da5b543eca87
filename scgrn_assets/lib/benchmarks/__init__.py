"""Benchmarks: reference networks, co-expression and peer baselines, one implementation of each metric, the
GRN path end to end.

Modules:

- ``baselines``: Baseline gene networks on the same genes as ours: co-expression, tree-based regression,
  random.
- ``expression``: Expression values shared by the co-expression, MI and benchmark stages.
- ``expression_files``: Expression matrices given as files, for running the GRN path on data we did not
  simulate.
- ``grn_benchmark``: The whole GRN path in memory on one expression matrix (``scgrn benchmark``):
  tokens, model, attention, cross-cell networks, baselines, MI / CMI, and every metric against every
  reference.
- ``metrics``: GRN benchmark metrics: one implementation of each, on explicitly named universes of gene
  pairs.
- ``network_metrics``: Network-level GRN metrics: degree correlation and top-K enrichment against two
  degree-keeping nulls.
- ``outputs``: The files a benchmark run writes: the long metric table, the headline summary, every
  method's predictions, the intermediate edge tables and ``run.json``, each through a temporary name.
- ``pipeline``: The GRN path's settings and the steps the Dagster assets and ``scgrn benchmark`` share.
- ``ranking``: Ranking metrics on (labels, scores, weights): AUROC, both AUPRCs, early precision.
- ``reference_files``: Readers of reference network files (TRRUST, DoRothEA / CollecTRI regulon tables,
  plain edge lists, STRING v12), each into the normalised form of :func:`normalise_reference`.
- ``references``: Which reference networks apply, read through the configuration; ground truths and TF
  lists for a run.
- ``universes``: Universes of gene pairs for the GRN metrics: which pairs are ranked, with which labels
  and directions.

Public names are importable from the package (``from scgrn_assets.lib.benchmarks import X``); each
module loads on first use, so importing the package stays cheap.
"""

from scgrn_assets.lib._lazy import lazy_exports

# Each module and the public names it holds.
_PUBLIC = {
    "baselines": ("within_group_centred", "pearson_edges", "spearman_edges", "tree_edges",
        "grnboost2_edges", "regdiffusion_edges", "gene_level_null_edges", "random_edges"),
    "expression": ("log_normalized",),
    "expression_files": ("ExpressionData", "read_expression", "genes_missing_from"),
    "grn_benchmark": ("GrnBenchmarkResult", "PreparedModel", "prepare_model", "attention_edges_of",
        "model_training_report", "attention_network", "cell_studies", "feature_moments_by_study",
        "validation_tables", "run_grn_benchmark"),
    "metrics": ("ranking_metrics", "cutoff_sweep", "benchmark_table", "pr_curves_png", "epr_bar_chart_png"),
    "network_metrics": ("degree_correlation", "top_k_network", "empirical_p_value", "in_degree_null_hits",
        "rewire_network", "rewired_null_hits", "top_k_enrichment"),
    "outputs": ("predictions_long", "headline_table", "headline_markdown", "failures_markdown",
        "write_benchmark_outputs"),
    "pipeline": ("GrnPathSettings", "MethodFailure", "MethodTimeout", "check_scores", "run_method",
        "method_notes", "failure_rows", "score_methods", "settings_profile", "method_settings_note",
        "stable_edges", "network_genes", "tree_regulators", "baseline_predictions", "baseline_table",
        "network_predictions", "prediction_tables", "union_candidates", "model_genes", "network_universe",
        "study_feature_moments", "cross_cell_tables", "chosen_networks"),
    "ranking": ("auroc", "precision_recall_points", "average_precision", "auprc_trapezoid",
        "early_selection", "early_precision"),
    "reference_files": ("normalise_reference", "load_trrust", "load_regulon_table", "load_edge_list",
        "load_string_v12"),
    "references": ("ReferenceSource", "references_for_species", "load_reference", "load_ground_truth",
        "load_tf_list"),
    "universes": ("EvaluationPairs", "method_is_directed", "evaluation_pairs"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _PUBLIC)

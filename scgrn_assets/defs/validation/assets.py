"""Expression-based validation of a candidate network: mutual information and conditional MI."""

import dagster as dg
import numpy as np
import pandas as pd

from scgrn_assets.metadata import png_metadata, table_preview
from scgrn_assets.io_managers import asset_folder
from scgrn_assets.lib.benchmarks import chosen_networks, network_predictions, union_candidates
from scgrn_assets.lib.benchmarks.pipeline import BASELINE_METHODS, CROSS_CELL_METHODS

KNOWN_NETWORKS = {*BASELINE_METHODS, *CROSS_CELL_METHODS.values()}
"""Networks mi_edges may take as candidates (a name outside them is a settings error, not a failed method)."""
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.validation import cmi_tables, discretize_expression, mi_edge_table
from scgrn_assets.lib.plotting import plot_histogram
from scgrn_assets.lib.sql_store import write_table
from scgrn_assets.resources import ScgrnStorage, ValidationSettings
from scgrn_assets.run_console import asset_progress


def _discretized(combined_corpus, candidates: pd.DataFrame, settings: ValidationSettings):
    corpus = read_corpus(combined_corpus)
    genes = sorted(set(candidates["target"]) | set(candidates["parent"]))
    return discretize_expression(corpus.X, corpus.obs["n_counts"].to_numpy(), corpus.var_names.tolist(),
                                 genes=genes, n_bins=settings.n_bins)


@dg.asset(group_name="validation", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "validation"})
def mi_edges(context: dg.AssetExecutionContext, validation: ValidationSettings,
             combined_corpus, network_edges: pd.DataFrame, baseline_edges: pd.DataFrame):
    """Each gene's top-K neighbours in each candidate network (``ValidationSettings.candidates``, default
    the rank-value partial-correlation network and Pearson, united) scored by mutual information of
    discretised log1p-normalised expression (nats), with permutation p-values and BH q-values."""
    networks = network_predictions(None, baseline_edges, network=network_edges)
    # A candidate that failed upstream (absent from baseline_edges / network_edges) does not take MI down: MI
    # uses the others and says so. A name that is no method at all is a settings error, and so is none left.
    absent = [method for method in validation.candidates if method not in networks and method in KNOWN_NETWORKS]
    usable = [method for method in validation.candidates if method not in absent]
    for method in absent:
        context.log.warning(f"mi_edges: candidate network {method} is absent (it failed upstream; see "
                            f"baseline_edges' or network_edges' metadata); MI uses {usable or 'none'}")
    candidates = union_candidates(chosen_networks(networks, usable or validation.candidates), top_k=validation.top_k)
    discretized = _discretized(combined_corpus, candidates, validation)
    table = mi_edge_table(discretized, candidates, n_permutations=validation.n_permutations, alpha=validation.alpha,
                          miller_madow=validation.miller_madow, seed=validation.seed,
                          progress=asset_progress(context, "MI permutation tests", "edges"))
    return dg.Output(table, metadata={
        "candidates_used": usable, "candidates_failed_upstream": absent,
        "n_edges": len(table), "significant_q_0.05": int((table["q_value"] <= 0.05).sum()),
        "top_edges": table_preview(table.sort_values("mi", ascending=False), n_rows=15),
        "mi": png_metadata(plot_histogram(table["mi"].to_numpy(), "mutual information (nats)")),
    })


@dg.asset(group_name="validation", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "validation"})
def cmi_edges(context: dg.AssetExecutionContext, storage: ScgrnStorage, validation: ValidationSettings,
              combined_corpus, mi_edges: pd.DataFrame):
    """Conditional MI of each edge given every other candidate parent of its target; the minimum
    over conditioners decides directness (an edge explained away by some Z is indirect)."""
    mi_table = mi_edges
    discretized = _discretized(combined_corpus, mi_table, validation)
    triplets, edges = cmi_tables(discretized, mi_table, n_permutations=validation.n_permutations,
                                 alpha=validation.alpha, min_cmi_ratio=validation.min_cmi_ratio,
                                 miller_madow=validation.miller_madow, seed=validation.seed,
                                 progress=asset_progress(context, "CMI permutation tests", "targets"))
    write_table(storage.layout.duckdb_path, triplets, asset_folder(context, storage.layout) / "cmi_triplets.parquet",
                "cmi_triplets")
    ratio = edges["cmi_ratio"].replace([np.inf, -np.inf], np.nan).dropna().to_numpy()
    return dg.Output(edges, metadata={
        "n_edges": len(edges), "n_triplets": len(triplets), "direct": int(edges["direct"].sum()),
        "direct_rule": f"q(MI) <= {validation.alpha} and q(CMI min) <= {validation.alpha} and "
                       f"CMI min / MI >= {validation.min_cmi_ratio}",
        "preview": table_preview(edges.sort_values("cmi_min", ascending=False), n_rows=15),
        "cmi_ratio": png_metadata(plot_histogram(ratio, "min over conditioners of CMI / MI")),
    })

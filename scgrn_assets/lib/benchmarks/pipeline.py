"""The GRN path's settings and the steps the Dagster assets and ``scgrn benchmark`` share.

attention (tokenise → train a small Geneformer-architecture model → last-layer attention →
partial correlation → edge stability); cross-cell partial correlations of the model's rank-value
tokens, of its hidden states and of log expression (:mod:`scgrn_assets.lib.network.cross_cell`,
per study, merged with study-wise centring); MI and CMI-pruned edges on a candidate network the
user chooses (default: the rank-value network and Pearson together); Pearson / Spearman / tree
(GENIE3-style) / GRNBoost2 / RegDiffusion baselines centred within study, a gene-level null and
random, on the same genes; and the metrics of :mod:`scgrn_assets.lib.benchmarks.metrics` against every
reference.

The Dagster assets run these steps one asset at a time (with storage between them and
attention per study, merged exactly); :func:`scgrn_assets.lib.benchmarks.grn_benchmark.run_grn_benchmark`
runs them in memory on one expression matrix and :mod:`scgrn_assets.lib.benchmarks.outputs` writes what
it found. Each step below is the one function both use, with the same settings
(:class:`GrnPathSettings`; the Dagster resources take their defaults from it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.benchmarks.baselines import (gene_level_null_edges, grnboost2_edges, pearson_edges, random_edges,
                                                  regdiffusion_edges, spearman_edges, tree_edges)
from scgrn_assets.lib.benchmarks.references import load_tf_list
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.cell_features import (FEATURE_KINDS, genes_seen_with_others, hidden_state_chunks,
                                                    log_expression_chunks, rank_value_chunks, select_gene_universe)
from scgrn_assets.lib.network.cross_cell import COMPOSITIONAL_FEATURES, cross_cell_network
from scgrn_assets.lib.network.feature_moments import FeatureMoments, accumulate_feature_moments
from scgrn_assets.lib.network.dictionaries import GeneformerDictionaries
from scgrn_assets.lib.network.tokens import TokenizedCells
from scgrn_assets.lib.progress import Progress, for_stage
from scgrn_assets.lib.validation.mutual_information import candidate_edges

CROSS_CELL_METHODS = {kind: f"pcorr_{kind}" for kind in FEATURE_KINDS}
"""Feature kind → method name of its cross-cell partial-correlation network."""
MODEL_DERIVED_METHODS = ("attention_stability", "pcorr_rank_value", "pcorr_hidden_state")
"""Methods whose network comes from the model (its tokens, attention or hidden states)."""
BASELINE_METHODS = ("pearson", "spearman", "tree", "grnboost2", "regdiffusion", "gene_level_null", "random")

METHOD_LABELS = {
    "pcorr_rank_value": "partial corr. of rank-value tokens",
    "pcorr_hidden_state": "partial corr. of hidden states",
    "pcorr_log_expression": "partial corr. of log expression",
    "attention_stability": "attention stability",
    "mi": "MI (candidates)",
    "cmi_pruned": "CMI-pruned",
    "pearson": "Pearson (within study)",
    "spearman": "Spearman (within study)",
    "tree": "tree (GENIE3-style)",
    "grnboost2": "GRNBoost2",
    "regdiffusion": "RegDiffusion",
    "gene_level_null": "gene-level null",
    "random": "random",
}


@dataclass(frozen=True)
class GrnPathSettings:
    """Every setting of the GRN path, with its default: the one place those defaults live (the
    Dagster resources ``GeneformerSettings``, ``ValidationSettings`` and ``BenchmarkSettings`` read
    theirs from here)."""

    # attention network
    convention: str = "V1"
    train_steps: int = 1000
    train_batch_size: int = 16
    min_loss_margin: float | None = 0.25
    max_genes_per_cell: int = 256
    pcorr_method: str = "cosine_shrunk_pinv"
    attention_layers: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None
    attention_batch_size: int = 32
    min_cells_per_edge: int = 20
    device: str | None = None
    model_seed: int = 0
    # cross-cell partial correlation
    network_features: tuple[str, ...] = FEATURE_KINDS
    max_universe_genes: int = 5000
    # MI / CMI validation
    mi_candidates: tuple[str, ...] = ("pcorr_rank_value", "pearson")
    mi_top_k: int = 15
    n_bins: int = 5
    n_permutations: int = 1000
    alpha: float = 0.05
    min_cmi_ratio: float = 0.2
    miller_madow: bool = False
    validation_seed: int = 0
    # baselines and metrics
    tree_max_cells: int = 1000
    tree_n_trees: int = 20
    tree_max_features: str = "sqrt"
    tf_list: str | None = None  # a TF list file for the tree baseline's regulators (None: every gene)
    grnboost2_max_cells: int = 1000
    grnboost2_max_estimators: int = 5000
    regdiffusion_n_steps: int = 1000
    regdiffusion_max_cells: int = 2000
    n_null: int = 200
    top_k: int | None = None
    benchmark_seed: int = 0


def stable_edges(edges: pd.DataFrame, min_cells: int) -> pd.DataFrame:
    """The edge table without pairs seen in fewer than ``min_cells`` cells: with n = 2 or 3 the
    sample sd is tiny by chance and mean/sd explodes, which would put noise at the top."""
    return edges[edges["n_cells"] >= min_cells].reset_index(drop=True)


def network_genes(edges: pd.DataFrame) -> list[str]:
    """Genes of the attention network (every gene in some edge), sorted: the methods' common genes."""
    return sorted(set(edges["gene_i"]) | set(edges["gene_j"]))


def tree_regulators(tf_list_file: str | Path | None, genes: Sequence[str]) -> list[str] | None:
    """The tree baseline's candidate regulators: the genes whose symbol is in ``tf_list_file``, ignoring
    case (e.g. BEELINE's ``mouse-tfs.csv`` / ``human-tfs.csv``), in ``genes`` order; or None, every gene,
    when no file is given (GENIE3's default without a TF list).

    Never the benchmark's reference: a baseline whose regulators were the truth's would rank only
    truth-rooted pairs while every other method ranks all pairs, i.e. it would have read the answer
    key. The ``tf_rooted`` universe gives every method the reference's regulators at evaluation time.

    Raises
    ------
    ScgrnInputError
        When none of the file's symbols is among ``genes``.
    """
    if tf_list_file is None or str(tf_list_file) == "":
        return None
    # Case-insensitive: BEELINE's mouse list is upper-case (SOX2), mouse data title-case (Sox2).
    listed = {symbol.upper() for symbol in load_tf_list(tf_list_file)}
    present = [gene for gene in genes if str(gene).upper() in listed]
    if not present:
        raise ScgrnInputError(f"none of the {len(listed)} TFs in the TF list is among the {len(genes)} genes",
                              file=str(tf_list_file), fix="check the TF list's species and symbol case")
    return present


def baseline_predictions(expression: np.ndarray, genes: Sequence[str], tf_list: Sequence[str] | None = None, *,
                         tree_n_trees: int, tree_max_cells: int, seed: int, tree_max_features: str | float = "sqrt",
                         groups: Sequence | None = None, grnboost2_max_cells: int = 1000,
                         grnboost2_max_estimators: int = 5000, regdiffusion_n_steps: int = 1000,
                         regdiffusion_max_cells: int = 2000, methods: Sequence[str] = BASELINE_METHODS,
                         progress: Progress | None = None) -> dict[str, pd.DataFrame]:
    """The baselines (``BASELINE_METHODS``) on ``genes``: co-expression and regressions within study,
    the tools people use (GRNBoost2, RegDiffusion), a gene-level null and random.

    Nothing here sees a reference network: every baseline is a function of the expression alone
    (and of ``tf_list`` when the user gives one).

    Parameters
    ----------
    expression
        Cells x genes, log-normalised (:func:`scgrn_assets.lib.benchmarks.expression.log_normalized`), columns = ``genes``.
    tf_list
        Candidate regulators of the tree and GRNBoost2 (:func:`tree_regulators`); None: every gene, so in the
        ``all_pairs`` universe they rank the same pairs as every other method.
    groups
        Shape (n_cells,): each cell's study (None: one study). Co-expression, the tree and GRNBoost2 centre
        each gene within its study; RegDiffusion gets the studies as its cell types.
    tree_n_trees, tree_max_cells, tree_max_features
        The tree baseline's trees per target, cell subsample and features tried per split
        (:func:`scgrn_assets.lib.benchmarks.baselines.tree_edges`).
    grnboost2_max_cells, grnboost2_max_estimators, regdiffusion_n_steps, regdiffusion_max_cells
        Bounds on the two tools' run time (cells subsampled, trees per target, training epochs).
    methods
        Which baselines to run (a subset of ``BASELINE_METHODS``).
    progress
        Optional; each call carries ``stage="tree"`` or ``stage="grnboost2"``.
    """
    unknown = sorted(set(methods) - set(BASELINE_METHODS))
    if unknown:
        raise ScgrnInputError(f"unknown baseline methods {unknown}", fix=f"choose from {list(BASELINE_METHODS)}")
    builders = {
        "pearson": lambda: pearson_edges(expression, genes, groups=groups),
        "spearman": lambda: spearman_edges(expression, genes, groups=groups),
        "tree": lambda: tree_edges(expression, genes, tf_list=tf_list, n_trees=tree_n_trees, max_cells=tree_max_cells,
                                   max_features=tree_max_features, seed=seed, groups=groups,
                                   progress=for_stage(progress, "tree")),
        "grnboost2": lambda: grnboost2_edges(expression, genes, tf_list=tf_list, max_cells=grnboost2_max_cells,
                                             max_estimators=grnboost2_max_estimators, seed=seed, groups=groups,
                                             progress=for_stage(progress, "grnboost2")),
        "regdiffusion": lambda: regdiffusion_edges(expression, genes, n_steps=regdiffusion_n_steps,
                                                   max_cells=regdiffusion_max_cells, seed=seed, groups=groups),
        "gene_level_null": lambda: gene_level_null_edges(expression, genes, groups=groups),
        # A uniform null over all pairs: a TF prior would credit the baseline with the reference's regulators.
        "random": lambda: random_edges(genes, seed=seed),
    }
    return {method: builders[method]() for method in BASELINE_METHODS if method in methods}


def baseline_table(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The baselines as one long table (``method``, ``directed`` columns), as stored by ``baseline_edges``."""
    return pd.concat([p.assign(method=m, directed=bool(p.attrs.get("directed", True)))
                      for m, p in predictions.items()], ignore_index=True)


def network_predictions(edges: pd.DataFrame | None, baselines: pd.DataFrame,
                        network: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """The networks before MI: cross-cell, attention and baselines, as DataFrame[source, target, score]
    with attrs["directed"].

    ``edges`` is the attention edge table (already filtered by :func:`stable_edges`; None leaves it out),
    ``network`` the cross-cell table of :func:`cross_cell_tables` (a ``method`` column), ``baselines``
    the long table of :func:`baseline_table`.
    """
    predictions = {}
    if network is not None:
        for method, group in network.groupby("method", sort=False):
            predictions[method] = _undirected(group["gene_i"], group["gene_j"], group["abs_pcorr"])
    if edges is not None:
        predictions["attention_stability"] = _undirected(
            edges["gene_i"], edges["gene_j"], edges["abs_stability"].replace([np.inf, -np.inf], np.nan).fillna(0.0))
    for method, group in baselines.groupby("method", sort=False):
        table = group[["source", "target", "score"]].reset_index(drop=True)
        table.attrs["directed"] = bool(group["directed"].iloc[0])
        predictions[method] = table
    return predictions


def prediction_tables(edges: pd.DataFrame | None, baselines: pd.DataFrame, mi: pd.DataFrame,
                      cmi: pd.DataFrame, network: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every method's predictions: :func:`network_predictions` plus MI (its candidate edges scored by
    MI) and "cmi_pruned" (only the edges flagged direct, scored by CMI min), so it shows what
    explaining away does to precision."""
    predictions = network_predictions(edges, baselines, network)
    predictions["mi"] = _undirected(mi["parent"], mi["target"], mi["mi"])
    direct = cmi[cmi["direct"]]
    predictions["cmi_pruned"] = _undirected(direct["parent"], direct["target"], direct["cmi_min"])
    return predictions


def union_candidates(networks: Mapping[str, pd.DataFrame], top_k: int) -> pd.DataFrame:
    """MI candidates: each gene's ``top_k`` neighbours in each network, united.

    Parameters
    ----------
    networks
        Method → predictions (``source``, ``target``, ``score``).

    Returns
    -------
    pandas.DataFrame
        ``target``, ``parent``, ``attention_score`` (the candidate score: the best over networks of the
        pair's score divided by its network's largest score, so networks on different scales unite
        fairly), as :func:`scgrn_assets.lib.validation.mutual_information.candidate_edges` returns.
    """
    parts = []
    for method, table in networks.items():
        score = np.abs(table["score"].to_numpy(dtype=np.float64))
        top = score.max(initial=0.0)
        edge_table_of = pd.DataFrame({"gene_i": table["source"].astype(str), "gene_j": table["target"].astype(str),
                                      "stability": score / top if top > 0 else score})
        parts.append(candidate_edges(edge_table_of, top_k=top_k))
    if not parts:
        raise ScgrnInputError("no candidate network for MI", fix="name at least one method in mi_candidates")
    both = pd.concat(parts, ignore_index=True).groupby(["target", "parent"], as_index=False, sort=False)[
        "attention_score"].max()
    return both.sort_values(["target", "attention_score", "parent"], ascending=[True, False, True],
                            kind="mergesort", ignore_index=True)


def _undirected(source, target, score) -> pd.DataFrame:
    # MI is symmetric: candidate direction (parent -> target) is not evidence of regulation.
    table = pd.DataFrame({"source": np.asarray(source), "target": np.asarray(target),
                          "score": np.asarray(score, dtype=float)})
    table.attrs["directed"] = False
    return table


def model_genes(prepared_cells: TokenizedCells, dictionaries: GeneformerDictionaries, symbols: Mapping[str, str],
                max_genes: int) -> list[str]:
    """Symbols of the genes the attention step can pair (:func:`genes_seen_with_others`), sorted: the
    attention edge table's genes, known before any attention is computed."""
    return sorted(symbols.get(key, key) for key in genes_seen_with_others(prepared_cells, dictionaries, max_genes))


def network_universe(candidate_genes: Sequence[str], expression, max_universe_genes: int,
                     transcription_factors: Sequence[str] = ()) -> list[str]:
    """The genes every method is run and scored on: ``candidate_genes`` (:func:`model_genes`), capped at
    ``max_universe_genes`` by :func:`scgrn_assets.lib.network.cell_features.select_gene_universe`
    (listed TFs first, then the most variable; ``expression``: cells x candidate genes, log-normalised,
    dense or sparse)."""
    if len(candidate_genes) <= max_universe_genes:
        return list(candidate_genes)
    import scipy.sparse as sp

    matrix = sp.csr_matrix(expression, dtype=np.float64)
    detected = np.diff(sp.csc_matrix(matrix).indptr)
    mean = np.asarray(matrix.mean(axis=0)).ravel()
    variance = np.asarray(matrix.multiply(matrix).mean(axis=0)).ravel() - mean ** 2
    # Genes are already required to be seen with others by the attention step: no further detection filter.
    return select_gene_universe(candidate_genes, variance, detected, max_genes=max_universe_genes,
                                min_cells=0, transcription_factors=transcription_factors)


def study_feature_moments(kind: str, genes: Sequence[str], gene_keys: Sequence[str], *, cells: TokenizedCells,
                          dictionaries: GeneformerDictionaries, model, values, n_counts: np.ndarray,
                          columns: np.ndarray, max_genes: int, max_input_length: int | None, batch_size: int,
                          device: str | None, progress: Progress | None = None) -> FeatureMoments:
    """The moments of one feature kind over one study's cells (the ``network_moments[study]`` step).

    Parameters
    ----------
    kind
        One of :data:`scgrn_assets.lib.network.cell_features.FEATURE_KINDS`.
    genes, gene_keys
        The universe's symbols and their dictionary keys (same order).
    cells, dictionaries, model
        The study's tokenised cells, the dictionaries and the model (``hidden_state`` only).
    values, n_counts, columns
        The study's cells x all-genes counts, library sizes, and the universe's columns in ``values``
        (``log_expression`` only).
    """
    if kind == "log_expression":
        chunks = log_expression_chunks(values, n_counts, columns, progress=progress)
    elif kind == "rank_value":
        chunks = rank_value_chunks(cells, dictionaries, gene_keys, max_genes=max_genes, progress=progress)
    elif kind == "hidden_state":
        chunks = hidden_state_chunks(model, cells, dictionaries, gene_keys, max_input_length=max_input_length,
                                     batch_size=batch_size, device=device, progress=progress)
    else:
        raise ScgrnInputError(f"unknown network feature {kind!r}", fix=f"choose from {list(FEATURE_KINDS)}")
    return accumulate_feature_moments(chunks, genes)


def cross_cell_tables(moments_by_kind: Mapping[str, Mapping[str, FeatureMoments]],
                      gene_symbols: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per feature kind, the merged cross-cell network; one long table with a ``method`` column
    (``pcorr_<kind>``) and the Ledoit–Wolf intensity per method."""
    tables, shrinkage = [], {}
    for kind, moments in moments_by_kind.items():
        table, shrinkage[CROSS_CELL_METHODS[kind]] = cross_cell_network(
            moments, gene_symbols, compositional=kind in COMPOSITIONAL_FEATURES)
        tables.append(table.assign(method=CROSS_CELL_METHODS[kind]))
    return pd.concat(tables, ignore_index=True), shrinkage


def chosen_networks(predictions: Mapping[str, pd.DataFrame], methods: Sequence[str]) -> dict[str, pd.DataFrame]:
    missing = [m for m in methods if m not in predictions]
    if missing:
        raise ScgrnInputError(f"MI candidate networks {missing} were not computed",
                              fix=f"choose mi_candidates among {sorted(predictions)}")
    return {method: predictions[method] for method in methods}

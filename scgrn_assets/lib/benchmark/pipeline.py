"""The GRN path, end to end, in one place: the assets and ``scgrn benchmark`` both call it.

attention (tokenise → train a small Geneformer-architecture model → last-layer attention →
partial correlation → edge stability); cross-cell partial correlations of the model's rank-value
tokens, of its hidden states and of log expression (:mod:`scgrn_assets.lib.network.cross_cell`,
per study, merged with study-wise centring); MI and CMI-pruned edges on a candidate network the
user chooses (default: the rank-value network and Pearson together); Pearson / Spearman / tree
(GENIE3-style) / GRNBoost2 / RegDiffusion baselines centred within study, a gene-level null and
random, on the same genes; and the metrics of :mod:`scgrn_assets.lib.benchmark.metrics` against every
reference.

The Dagster assets run the same steps one asset at a time (with storage between them and
attention per study, merged exactly); :func:`run_grn_benchmark` runs them in memory on one
expression matrix. Each step below is the one function both use, with the same settings
(:class:`GrnPathSettings`, whose defaults are the Dagster resources' defaults; a test keeps them equal).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.network.attention import attention_edge_moments, edge_table
from scgrn_assets.lib.benchmark.baselines import (gene_level_null_edges, grnboost2_edges, pearson_edges, random_edges,
                                        regdiffusion_edges, spearman_edges, tree_edges)
from scgrn_assets.lib.network.cross_cell import (COMPOSITIONAL_FEATURES, FEATURE_KINDS, FeatureMoments, accumulate_feature_moments,
                                                 cross_cell_network, genes_seen_with_others, hidden_state_chunks,
                                                 log_expression_chunks, rank_value_chunks, select_gene_universe)
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmark.expression import log_normalized
from scgrn_assets.lib.benchmark.expression_files import ExpressionData
from scgrn_assets.lib.network.model import (SmallGeneformerConfig, TrainedGeneformer, position_only_entropy,
                                         train_small_geneformer, training_report)
from scgrn_assets.lib.benchmark.metrics import benchmark_table
from scgrn_assets.lib.validation.discretization import discretize_expression
from scgrn_assets.lib.validation.mutual_information import candidate_edges, cmi_tables, mi_edge_table
from scgrn_assets.lib.benchmark.references import load_tf_list
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.network.tokens import (GeneformerDictionaries, TokenizedCells, build_corpus_dictionaries,
                                       convention_named, corpus_gene_keys, tokenize_cells)

ProgressCallback = Callable[[int, int], None]
StageProgress = Callable[[str, int, int], None]
"""Called as ``progress(stage, n_done, n_total)``; stages: tokenize, train, attention, features (one per
feature kind), mi, cmi, tree, grnboost2, metrics."""

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
HEADLINE_COLUMNS = (("all_pairs", "epr"), ("all_pairs", "auprc_ratio"), ("all_pairs", "auroc"),
                    ("all_pairs", "auprc_ap"), ("all_pairs", "early_precision"),
                    ("tf_rooted", "epr"), ("tf_rooted", "auprc_ratio"))
"""The summary's columns: (universe, metric)."""


@dataclass(frozen=True)
class GrnPathSettings:
    """Every setting of the GRN path. Defaults = the Dagster resources' defaults
    (``GeneformerSettings``, ``ValidationSettings``, ``BenchmarkSettings``)."""

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


# ---------------------------------------------------------------------------------------------
# Steps shared with the assets
# ---------------------------------------------------------------------------------------------


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
                         progress: StageProgress | None = None) -> dict[str, pd.DataFrame]:
    """The baselines (``BASELINE_METHODS``) on ``genes``: co-expression and regressions within study,
    the tools people use (GRNBoost2, RegDiffusion), a gene-level null and random.

    Nothing here sees a reference network: every baseline is a function of the expression alone
    (and of ``tf_list`` when the user gives one).

    Parameters
    ----------
    expression
        Cells x genes, log-normalised (:func:`scgrn_assets.lib.benchmark.expression.log_normalized`), columns = ``genes``.
    tf_list
        Candidate regulators of the tree and GRNBoost2 (:func:`tree_regulators`); None: every gene, so in the
        ``all_pairs`` universe they rank the same pairs as every other method.
    groups
        Shape (n_cells,): each cell's study (None: one study). Co-expression, the tree and GRNBoost2 centre
        each gene within its study; RegDiffusion gets the studies as its cell types.
    tree_n_trees, tree_max_cells, tree_max_features
        The tree baseline's trees per target, cell subsample and features tried per split
        (:func:`scgrn_assets.lib.benchmark.baselines.tree_edges`).
    grnboost2_max_cells, grnboost2_max_estimators, regdiffusion_n_steps, regdiffusion_max_cells
        Bounds on the two tools' run time (cells subsampled, trees per target, training epochs).
    methods
        Which baselines to run (a subset of ``BASELINE_METHODS``).
    progress
        Optional ``progress(stage, n_done, n_total)`` (stages ``tree``, ``grnboost2``).
    """
    report = _stage_reporter(progress)
    unknown = sorted(set(methods) - set(BASELINE_METHODS))
    if unknown:
        raise ScgrnInputError(f"unknown baseline methods {unknown}", fix=f"choose from {list(BASELINE_METHODS)}")
    builders = {
        "pearson": lambda: pearson_edges(expression, genes, groups=groups),
        "spearman": lambda: spearman_edges(expression, genes, groups=groups),
        "tree": lambda: tree_edges(expression, genes, tf_list=tf_list, n_trees=tree_n_trees, max_cells=tree_max_cells,
                                   max_features=tree_max_features, seed=seed, groups=groups,
                                   progress=report("tree")),
        "grnboost2": lambda: grnboost2_edges(expression, genes, tf_list=tf_list, max_cells=grnboost2_max_cells,
                                             max_estimators=grnboost2_max_estimators, seed=seed, groups=groups,
                                             progress=report("grnboost2")),
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


# ---------------------------------------------------------------------------------------------
# The whole path on one expression matrix
# ---------------------------------------------------------------------------------------------


@dataclass
class GrnBenchmarkResult:
    """What :func:`run_grn_benchmark` computed: every intermediate table and the metrics."""

    genes: list[str]
    attention_edges: pd.DataFrame
    loss_curve: np.ndarray
    mi_edges: pd.DataFrame
    cmi_edges: pd.DataFrame
    baselines: pd.DataFrame
    predictions: dict[str, pd.DataFrame]
    metrics: pd.DataFrame
    settings: dict = field(default_factory=dict)
    tree_regulators: list[str] | None = None
    """The tree baseline's candidate regulators among ``genes`` (None: every gene)."""
    network_edges: pd.DataFrame | None = None
    """The cross-cell networks (:func:`cross_cell_tables`), one ``method`` per feature kind."""
    training: dict = field(default_factory=dict)
    """The model's training report (:func:`training_report`)."""


@dataclass
class PreparedModel:
    """Tokens and the model trained on them: what the attention and feature steps read."""

    keys: np.ndarray
    """Shape (n_genes,): each expression column's dictionary key."""
    dictionaries: GeneformerDictionaries
    cells: TokenizedCells
    trained: TrainedGeneformer
    config: SmallGeneformerConfig
    symbols: dict[str, str]
    """Dictionary key → gene symbol."""


def prepare_model(data: ExpressionData, settings: GrnPathSettings,
                  progress: StageProgress | None = None) -> PreparedModel:
    """Tokenise the cells and train the small Geneformer on them (the ``tokenized_cells`` and
    ``geneformer_model`` assets)."""
    report = _stage_reporter(progress)
    keys = corpus_gene_keys(data.var)
    dictionaries = build_corpus_dictionaries(data.values, data.n_counts, keys, convention_named(settings.convention))
    keys = corpus_gene_keys(data.var, dictionaries.gene_name_id)
    cells = tokenize_cells(data.values, data.n_counts, keys, dictionaries, progress=report("tokenize"))
    if cells.lengths.max(initial=0) < 2:
        raise ScgrnInputError("no cell expresses two genes: attention has no pairs to read", file=data.path,
                              fix="check --values and the matrix orientation")
    config = SmallGeneformerConfig(n_steps=settings.train_steps, batch_size=settings.train_batch_size,
                                   seed=settings.model_seed)
    train_report = report("train")
    # No callback, no wrapper: a lambda around None would raise TypeError on the first training step.
    train_progress = None if train_report is None else (lambda step, n_steps, loss: train_report(step, n_steps))
    trained = train_small_geneformer(cells, dictionaries, config, device=settings.device, progress=train_progress)
    return PreparedModel(keys=keys, dictionaries=dictionaries, cells=cells, trained=trained, config=config,
                         symbols=dict(zip(map(str, keys), data.gene_names)))


def attention_edges_of(prepared: PreparedModel, settings: GrnPathSettings,
                       progress: StageProgress | None = None) -> pd.DataFrame:
    """The full attention edge table of a prepared model (not yet filtered by :func:`stable_edges`)."""
    # A model trained here saw only each cell's top-ranked tokens: later positions are untrained.
    moments = attention_edge_moments(prepared.trained.model, prepared.cells, prepared.dictionaries,
                                     max_genes=settings.max_genes_per_cell,
                                     max_input_length=prepared.config.max_train_length, method=settings.pcorr_method,
                                     batch_size=settings.attention_batch_size, device=settings.device,
                                     layers=settings.attention_layers, heads=settings.attention_heads,
                                     progress=_stage_reporter(progress)("attention"))
    return edge_table(moments, prepared.symbols)


def model_training_report(prepared: PreparedModel, min_loss_margin: float | None) -> dict:
    """:func:`scgrn_assets.lib.network.model.training_report` of a model trained here."""
    entropy = position_only_entropy(prepared.cells, prepared.dictionaries, prepared.config.max_train_length)
    return training_report(prepared.trained.loss_curve, entropy, min_loss_margin)


def attention_network(data: ExpressionData, settings: GrnPathSettings,
                      progress: StageProgress | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Tokenise, train the small Geneformer, and read edges from its attention (what the
    ``tokenized_cells`` → ``geneformer_model`` → ``attention_moments`` → ``edge_stability`` assets do).

    Returns
    -------
    edges, loss_curve
        The full edge table (:func:`scgrn_assets.lib.network.attention.edge_table`, not yet filtered
        by :func:`stable_edges`) and the masked-LM loss per step.
    """
    prepared = prepare_model(data, settings, progress)
    return attention_edges_of(prepared, settings, progress), prepared.trained.loss_curve


def cell_studies(data: ExpressionData) -> np.ndarray:
    """Shape (n_cells,): each cell's study, or one study ("all") when the data has none."""
    return np.full(data.n_cells, "all") if data.study is None else np.asarray(data.study).astype(str)


def model_genes(prepared_cells: TokenizedCells, dictionaries: GeneformerDictionaries, symbols: Mapping[str, str],
                max_genes: int) -> list[str]:
    """Symbols of the genes the attention step can pair (:func:`genes_seen_with_others`), sorted: the
    attention edge table's genes, known before any attention is computed."""
    return sorted(symbols.get(key, key) for key in genes_seen_with_others(prepared_cells, dictionaries, max_genes))


def network_universe(candidate_genes: Sequence[str], expression, max_universe_genes: int,
                     transcription_factors: Sequence[str] = ()) -> list[str]:
    """The genes every method is run and scored on: ``candidate_genes`` (:func:`model_genes`), capped at
    ``max_universe_genes`` by :func:`scgrn_assets.lib.network.cross_cell.select_gene_universe`
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
                          device: str | None, progress: ProgressCallback | None = None) -> FeatureMoments:
    """The moments of one feature kind over one study's cells (the ``network_moments[study]`` step).

    Parameters
    ----------
    kind
        One of :data:`scgrn_assets.lib.network.cross_cell.FEATURE_KINDS`.
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


def feature_moments_by_study(data: ExpressionData, prepared: PreparedModel, genes: Sequence[str], kind: str,
                             settings: GrnPathSettings,
                             progress: StageProgress | None = None) -> dict[str, FeatureMoments]:
    """Per study of ``data``, :func:`study_feature_moments` over ``genes`` (symbols)."""
    key_of = dict(zip(data.gene_names, map(str, prepared.keys)))
    gene_keys = [key_of[gene] for gene in genes]
    columns = pd.Index(data.gene_names).get_indexer(genes)
    studies = cell_studies(data)
    report = _stage_reporter(progress)(f"features:{kind}")
    moments = {}
    for study in sorted(set(studies)):
        selected = np.flatnonzero(studies == study)
        moments[study] = study_feature_moments(
            kind, genes, gene_keys, cells=prepared.cells.subset(selected), dictionaries=prepared.dictionaries,
            model=prepared.trained.model, values=data.values[selected], n_counts=data.n_counts[selected],
            columns=columns, max_genes=settings.max_genes_per_cell, max_input_length=prepared.config.max_train_length,
            batch_size=settings.attention_batch_size, device=settings.device, progress=report)
    return moments


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


def validation_tables(data: ExpressionData, candidates: pd.DataFrame, settings: GrnPathSettings,
                      progress: StageProgress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MI of the candidate edges (:func:`union_candidates`) and the CMI table (the ``mi_edges`` and
    ``cmi_edges`` assets)."""
    report = _stage_reporter(progress)
    genes = sorted(set(candidates["target"]) | set(candidates["parent"]))
    discretized = discretize_expression(data.values, data.n_counts, np.asarray(data.gene_names), genes=genes,
                                        n_bins=settings.n_bins)
    mi = mi_edge_table(discretized, candidates, n_permutations=settings.n_permutations, alpha=settings.alpha,
                       miller_madow=settings.miller_madow, seed=settings.validation_seed, progress=report("mi"))
    _, cmi = cmi_tables(discretized, mi, n_permutations=settings.n_permutations, alpha=settings.alpha,
                        min_cmi_ratio=settings.min_cmi_ratio, miller_madow=settings.miller_madow,
                        seed=settings.validation_seed, progress=report("cmi"))
    return mi, cmi


def run_grn_benchmark(data: ExpressionData, references: Mapping[str, pd.DataFrame],
                      settings: GrnPathSettings = GrnPathSettings(),
                      progress: StageProgress | None = None) -> GrnBenchmarkResult:
    """Run the whole GRN path on one expression matrix and score every method against every reference.

    Parameters
    ----------
    data
        Cells x genes (:func:`scgrn_assets.lib.benchmark.expression_files.read_expression`); ``data.study`` (when
        present) is the study every within-study step centres on.
    references
        Name -> normalised reference (:mod:`scgrn_assets.lib.benchmark.references`).
    settings
        The path's settings (defaults: the assets').
    progress
        Optional ``progress(stage, n_done, n_total)``.

    Returns
    -------
    GrnBenchmarkResult
        ``metrics`` has :func:`scgrn_assets.lib.benchmark.metrics.benchmark_table`'s columns.
    """
    report = _stage_reporter(progress)
    prepared = prepare_model(data, settings, progress)
    all_edges = attention_edges_of(prepared, settings, progress)
    edges = stable_edges(all_edges, settings.min_cells_per_edge)
    if edges.empty:
        raise ScgrnInputError(f"no gene pair was seen together in {settings.min_cells_per_edge} or more cells",
                              file=data.path, fix="pass more cells or a smaller --min-cells-per-edge")
    candidate_genes = model_genes(prepared.cells, prepared.dictionaries, prepared.symbols,
                                  settings.max_genes_per_cell)
    columns = pd.Index(data.gene_names).get_indexer(candidate_genes)
    candidate_expression = log_normalized(data.values[:, columns], data.n_counts)
    tf_symbols = [] if settings.tf_list is None else tree_regulators(settings.tf_list, candidate_genes) or []
    genes = network_universe(candidate_genes, candidate_expression, settings.max_universe_genes, tf_symbols)
    expression = candidate_expression[:, pd.Index(candidate_genes).get_indexer(genes)].toarray()
    moments = {kind: feature_moments_by_study(data, prepared, genes, kind, settings, progress)
               for kind in settings.network_features}
    network, _ = cross_cell_tables(moments)
    # The baselines never see ``references``: the tree's regulators are every gene or the user's TF list.
    tf_list = tree_regulators(settings.tf_list, genes)
    baselines = baseline_table(baseline_predictions(
        expression, genes, tf_list, tree_n_trees=settings.tree_n_trees, tree_max_cells=settings.tree_max_cells,
        tree_max_features=settings.tree_max_features, seed=settings.benchmark_seed, groups=cell_studies(data),
        grnboost2_max_cells=settings.grnboost2_max_cells, grnboost2_max_estimators=settings.grnboost2_max_estimators,
        regdiffusion_n_steps=settings.regdiffusion_n_steps, regdiffusion_max_cells=settings.regdiffusion_max_cells,
        progress=progress))
    networks = network_predictions(edges, baselines, network)
    candidates = union_candidates(chosen_networks(networks, settings.mi_candidates), top_k=settings.mi_top_k)
    mi, cmi = validation_tables(data, candidates, settings, progress)
    predictions = prediction_tables(edges, baselines, mi, cmi, network=network)
    metrics = benchmark_table(predictions, references, genes, top_k=settings.top_k, n_null=settings.n_null,
                              seed=settings.benchmark_seed, progress=report("metrics"))
    return GrnBenchmarkResult(genes=genes, attention_edges=edges, loss_curve=prepared.trained.loss_curve, mi_edges=mi,
                              cmi_edges=cmi, baselines=baselines, predictions=predictions, metrics=metrics,
                              settings=asdict(settings), tree_regulators=tf_list, network_edges=network,
                              training=model_training_report(prepared, settings.min_loss_margin))


def chosen_networks(predictions: Mapping[str, pd.DataFrame], methods: Sequence[str]) -> dict[str, pd.DataFrame]:
    missing = [m for m in methods if m not in predictions]
    if missing:
        raise ScgrnInputError(f"MI candidate networks {missing} were not computed",
                              fix=f"choose mi_candidates among {sorted(predictions)}")
    return {method: predictions[method] for method in methods}


def predictions_long(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every method's predictions in one table: method, source, target, score, directed."""
    return pd.concat([p[["source", "target", "score"]].assign(method=m, directed=bool(p.attrs.get("directed", True)))
                      for m, p in predictions.items()], ignore_index=True)[
        ["method", "source", "target", "score", "directed"]]


def predictions_from_long(table: pd.DataFrame, directed: Mapping[str, bool]) -> dict[str, pd.DataFrame]:
    """Inverse of :func:`predictions_long`; ``directed`` (method -> directed, e.g. ``run.json``'s
    ``methods``) gives the order and the methods that listed no pair."""
    predictions = {}
    for method, is_directed in directed.items():
        prediction = table.loc[table["method"] == method, ["source", "target", "score"]].reset_index(drop=True)
        prediction.attrs["directed"] = bool(is_directed)
        predictions[method] = prediction
    return predictions


def headline_table(metrics: pd.DataFrame, columns: Sequence[tuple[str, str]] = HEADLINE_COLUMNS) -> pd.DataFrame:
    """One row per reference x method, one column per (universe, metric): ``epr`` for ``all_pairs``,
    ``epr_tf_rooted`` for ``tf_rooted``; best all-pairs EPR first within a reference."""
    label = metrics["metric"].where(metrics["universe"] == "all_pairs",
                                    metrics["metric"] + "_" + metrics["universe"].astype(str))
    wanted = [metric if universe == "all_pairs" else f"{metric}_{universe}" for universe, metric in columns]
    chosen = metrics.assign(column=label)[lambda table: table["column"].isin(wanted)]
    wide = chosen.pivot_table(index=["reference", "method"], columns="column", values="value", sort=False)
    wide = wide.reindex(columns=[c for c in wanted if c in wide.columns]).reset_index()
    wide.columns.name = None
    if "epr" in wide.columns:
        wide = wide.sort_values(["reference", "epr"], ascending=[True, False], kind="stable")
    return wide.reset_index(drop=True)


SUMMARY_LEGEND = ("Columns without a suffix are the `all_pairs` universe, where every method ranks every pair "
                  "(the tree baseline's regulators are every gene unless a TF list was given); `_tf_rooted` "
                  "columns rank only pairs rooted at a regulator of the truth, the same TF prior for every "
                  "method. EPR and AUPRC ratio: 1 = random.")


def headline_markdown(headline: pd.DataFrame) -> str:
    """The headline table as Markdown, methods named in words."""
    shown = headline.assign(method=headline["method"].map(lambda m: METHOD_LABELS.get(m, m)))
    return shown.to_markdown(index=False, floatfmt=".3f")


def _stage_reporter(progress: StageProgress | None) -> Callable[[str], ProgressCallback | None]:
    def for_stage(stage: str) -> ProgressCallback | None:
        if progress is None:
            return None
        return lambda done, total: progress(stage, done, total)
    return for_stage


def write_benchmark_outputs(result: GrnBenchmarkResult, out_dir, *, dataset: str,
                            run_info: Mapping[str, object]) -> dict[str, Path]:
    """Write a benchmark run under ``out_dir``, every file through a temporary name and a rename.

    Files: ``benchmark_metrics.parquet`` / ``.csv`` (the long table with a ``dataset`` column),
    ``benchmark_summary.csv`` / ``.md`` (:func:`headline_table`), ``predictions.parquet`` (every method's scored pairs), the intermediate
    ``attention_edges``, ``mi_edges``, ``cmi_edges`` Parquet tables and ``run.json`` (inputs,
    settings, what was decided). Returns name -> path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = result.metrics.assign(dataset=dataset)[["dataset", *result.metrics.columns]]
    headline = headline_table(result.metrics)
    paths = {name: out_dir / name for name in (
        "benchmark_metrics.parquet", "benchmark_metrics.csv", "benchmark_summary.csv", "benchmark_summary.md",
        "predictions.parquet", "attention_edges.parquet", "network_edges.parquet", "mi_edges.parquet",
        "cmi_edges.parquet", "run.json")}
    writers = {
        "benchmark_metrics.parquet": lambda tmp: metrics.to_parquet(tmp, index=False),
        "benchmark_metrics.csv": lambda tmp: metrics.to_csv(tmp, index=False),
        "benchmark_summary.csv": lambda tmp: headline.assign(dataset=dataset).to_csv(tmp, index=False),
        "benchmark_summary.md": lambda tmp: Path(tmp).write_text(
            f"# {dataset}: GRN benchmark\n\n{SUMMARY_LEGEND}\n\n{headline_markdown(headline)}\n"),
        "predictions.parquet": lambda tmp: predictions_long(result.predictions).to_parquet(tmp, index=False),
        "attention_edges.parquet": lambda tmp: result.attention_edges.to_parquet(tmp, index=False),
        "network_edges.parquet": lambda tmp: (result.network_edges if result.network_edges is not None
                                              else pd.DataFrame()).to_parquet(tmp, index=False),
        "mi_edges.parquet": lambda tmp: result.mi_edges.to_parquet(tmp, index=False),
        "cmi_edges.parquet": lambda tmp: result.cmi_edges.to_parquet(tmp, index=False),
        "run.json": lambda tmp: Path(tmp).write_text(json.dumps(
            {"dataset": dataset, **run_info, "settings": result.settings, "genes_benchmarked": result.genes,
             "methods": {m: bool(p.attrs.get("directed", True)) for m, p in result.predictions.items()},
             "tree_regulators": ("all genes" if result.tree_regulators is None
                                 else {"tf_list": result.settings.get("tf_list"),
                                       "n_in_genes": len(result.tree_regulators), "genes": result.tree_regulators}),
             "final_training_loss": float(np.nanmean(result.loss_curve[-20:])) if len(result.loss_curve) else None,
             "training": result.training},
            indent=2, default=str) + "\n"),
    }
    for name, write in writers.items():
        with atomic_path(paths[name]) as tmp:
            write(tmp)
    return paths

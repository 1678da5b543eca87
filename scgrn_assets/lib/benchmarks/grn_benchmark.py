"""The whole GRN path in memory on one expression matrix (``scgrn benchmark``): tokens, model,
attention, cross-cell networks, baselines, MI / CMI, and every metric against every reference.

Each step is the one in :mod:`scgrn_assets.lib.benchmarks.pipeline` that the Dagster assets run too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd

from scgrn_assets.lib.benchmarks.expression import log_normalized
from scgrn_assets.lib.benchmarks.expression_files import ExpressionData
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.attention import attention_edge_moments, edge_table
from scgrn_assets.lib.network.feature_moments import FeatureMoments
from scgrn_assets.lib.network.model import (SmallGeneformerConfig, TrainedGeneformer, train_small_geneformer,
                                            training_report)
from scgrn_assets.lib.network.dictionaries import (GeneformerDictionaries, build_corpus_dictionaries,
                                                   convention_named, corpus_gene_keys)
from scgrn_assets.lib.network.tokens import TokenizedCells, tokenize_cells
from scgrn_assets.lib.progress import Progress, for_stage
from scgrn_assets.lib.validation.discretization import discretize_expression
from scgrn_assets.lib.validation.mutual_information import cmi_tables, mi_edge_table
from scgrn_assets.lib.benchmarks.pipeline import (CROSS_CELL_METHODS, GrnPathSettings, MethodFailure,
                                                 baseline_predictions, baseline_table, chosen_networks,
                                                 cross_cell_tables, method_notes, model_genes, network_predictions,
                                                 network_universe, prediction_tables, run_method, score_methods,
                                                 stable_edges, study_feature_moments, tree_regulators,
                                                 union_candidates)


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
    """The cross-cell networks (:func:`~scgrn_assets.lib.benchmarks.pipeline.cross_cell_tables`), one ``method``
    per feature kind."""
    training: dict = field(default_factory=dict)
    """The model's training report (:func:`~scgrn_assets.lib.network.model.training_report`)."""
    failures: list[MethodFailure] = field(default_factory=list)
    """Methods that produced no network or could not be scored, with the step and the reason; every other
    method is in ``predictions`` and ``metrics``."""
    method_notes: dict = field(default_factory=dict)
    """Method -> what it recorded about its run (e.g. RegDiffusion's ``n_cells_dropped``; MI's candidates)."""


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
                  progress: Progress | None = None) -> PreparedModel:
    """Tokenise the cells and train the small Geneformer on them (the ``tokenized_cells`` and
    ``geneformer_model`` assets)."""
    keys = corpus_gene_keys(data.var)
    dictionaries = build_corpus_dictionaries(data.values, data.n_counts, keys, convention_named(settings.convention))
    keys = corpus_gene_keys(data.var, dictionaries.gene_name_id)
    cells = tokenize_cells(data.values, data.n_counts, keys, dictionaries, progress=for_stage(progress, "tokenize"))
    if cells.lengths.max(initial=0) < 2:
        raise ScgrnInputError("no cell expresses two genes: attention has no pairs to read", file=data.path,
                              fix="check --values and the matrix orientation")
    config = SmallGeneformerConfig(max_steps=settings.train_steps, batch_size=settings.train_batch_size,
                                   min_loss_margin=settings.min_loss_margin,
                                   seed=settings.model_seed)
    trained = train_small_geneformer(cells, dictionaries, config, device=settings.device,
                                     progress=for_stage(progress, "train"))
    return PreparedModel(keys=keys, dictionaries=dictionaries, cells=cells, trained=trained, config=config,
                         symbols=dict(zip(map(str, keys), data.gene_names)))


def attention_edges_of(prepared: PreparedModel, settings: GrnPathSettings,
                       progress: Progress | None = None) -> pd.DataFrame:
    """The full attention edge table of a prepared model (not yet filtered by
    :func:`~scgrn_assets.lib.benchmarks.pipeline.stable_edges`)."""
    # Cells without a gene token hold no pair; a batch of only such cells has no slot to read.
    cells = prepared.cells
    if (cells.lengths == 0).any():
        cells = cells.subset(np.flatnonzero(cells.lengths > 0))
    # A model trained here saw only each cell's top-ranked tokens: later positions are untrained.
    moments = attention_edge_moments(prepared.trained.model, cells, prepared.dictionaries,
                                     max_genes=settings.max_genes_per_cell,
                                     max_input_length=prepared.config.max_train_length, method=settings.pcorr_method,
                                     batch_size=settings.attention_batch_size, device=settings.device,
                                     layers=settings.attention_layers, heads=settings.attention_heads,
                                     progress=for_stage(progress, "attention"))
    return edge_table(moments, prepared.symbols)


def model_training_report(prepared: PreparedModel, min_loss_margin: float | None) -> dict:
    """:func:`scgrn_assets.lib.network.model.training_report` of a model trained here."""
    return training_report(prepared.trained, min_loss_margin)


def attention_network(data: ExpressionData, settings: GrnPathSettings,
                      progress: Progress | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Tokenise, train the small Geneformer, and read edges from its attention (what the
    ``tokenized_cells`` → ``geneformer_model`` → ``attention_moments`` → ``edge_stability`` assets do).

    Returns
    -------
    edges, loss_curve
        The full edge table (:func:`scgrn_assets.lib.network.attention.edge_table`, not yet filtered
        by :func:`~scgrn_assets.lib.benchmarks.pipeline.stable_edges`) and the masked-LM loss per step.
    """
    prepared = prepare_model(data, settings, progress)
    return attention_edges_of(prepared, settings, progress), prepared.trained.loss_curve


def cell_studies(data: ExpressionData) -> np.ndarray:
    """Shape (n_cells,): each cell's study, or one study ("all") when the data has none."""
    return np.full(data.n_cells, "all") if data.study is None else np.asarray(data.study).astype(str)


def feature_moments_by_study(data: ExpressionData, prepared: PreparedModel, genes: Sequence[str], kind: str,
                             settings: GrnPathSettings,
                             progress: Progress | None = None) -> dict[str, FeatureMoments]:
    """Per study of ``data``, :func:`~scgrn_assets.lib.benchmarks.pipeline.study_feature_moments` over ``genes``
    (symbols)."""
    key_of = dict(zip(data.gene_names, map(str, prepared.keys)))
    gene_keys = [key_of[gene] for gene in genes]
    columns = pd.Index(data.gene_names).get_indexer(genes)
    studies = cell_studies(data)
    report = for_stage(progress, f"features:{kind}")
    moments = {}
    for study in sorted(set(studies)):
        selected = np.flatnonzero(studies == study)
        moments[study] = study_feature_moments(
            kind, genes, gene_keys, cells=prepared.cells.subset(selected), dictionaries=prepared.dictionaries,
            model=prepared.trained.model, values=data.values[selected], n_counts=data.n_counts[selected],
            columns=columns, max_genes=settings.max_genes_per_cell, max_input_length=prepared.config.max_train_length,
            batch_size=settings.attention_batch_size, device=settings.device, progress=report)
    return moments


def validation_tables(data: ExpressionData, candidates: pd.DataFrame, settings: GrnPathSettings,
                      progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MI of the candidate edges (:func:`~scgrn_assets.lib.benchmarks.pipeline.union_candidates`) and the CMI
    table (the ``mi_edges`` and ``cmi_edges`` assets)."""
    genes = sorted(set(candidates["target"]) | set(candidates["parent"]))
    discretized = discretize_expression(data.values, data.n_counts, np.asarray(data.gene_names), genes=genes,
                                        n_bins=settings.n_bins)
    mi = mi_edge_table(discretized, candidates, n_permutations=settings.n_permutations, alpha=settings.alpha,
                       miller_madow=settings.miller_madow, seed=settings.validation_seed, progress=for_stage(progress, "mi"))
    _, cmi = cmi_tables(discretized, mi, n_permutations=settings.n_permutations, alpha=settings.alpha,
                        min_cmi_ratio=settings.min_cmi_ratio, miller_madow=settings.miller_madow,
                        seed=settings.validation_seed, progress=for_stage(progress, "cmi"))
    return mi, cmi


def run_grn_benchmark(data: ExpressionData, references: Mapping[str, pd.DataFrame],
                      settings: GrnPathSettings = GrnPathSettings(),
                      progress: Progress | None = None) -> GrnBenchmarkResult:
    """Run the whole GRN path on one expression matrix and score every method against every reference.

    Parameters
    ----------
    data
        Cells x genes (:func:`scgrn_assets.lib.benchmarks.expression_files.read_expression`); ``data.study`` (when
        present) is the study every within-study step centres on.
    references
        Name -> normalised reference (:mod:`scgrn_assets.lib.benchmarks.references`).
    settings
        The path's settings (defaults: the assets').
    progress
        Optional; each call carries ``stage=``: tokenize, train (with ``loss=``), attention,
        ``features:<kind>``, mi, cmi, tree, grnboost2, metrics.

    Returns
    -------
    GrnBenchmarkResult
        ``metrics`` has :func:`scgrn_assets.lib.benchmarks.metrics.benchmark_table`'s columns plus ``error``
        (:func:`~scgrn_assets.lib.benchmarks.pipeline.score_methods`). A model readout, baseline or MI / CMI that
        raises, returns NaN / infinite scores or runs past ``settings.method_time_limit_s`` is in ``failures``
        (with its step and reason) and every other method is scored; tokenisation, training and bad input
        still stop the run.
    """
    limit = settings.method_time_limit_s
    failures: list[MethodFailure] = []

    def isolated(method: str, build, step: str, score_column: str | None = None):
        result, failure = run_method(method, build, step=step, time_limit_s=limit, progress=progress,
                                     score_column=score_column)
        failures.extend([failure] if failure else [])
        return result

    prepared = prepare_model(data, settings, progress)
    # Each model readout, each baseline and MI / CMI is one method: its failure is recorded, the rest go on.
    all_edges = isolated("attention_stability", lambda report_to: attention_edges_of(prepared, settings, report_to),
                         "network")
    edges = None if all_edges is None else stable_edges(all_edges, settings.min_cells_per_edge)
    if edges is not None and edges.empty:
        raise ScgrnInputError(f"no gene pair was seen together in {settings.min_cells_per_edge} or more cells",
                              file=data.path, fix="pass more cells or a smaller --min-cells-per-edge")
    candidate_genes = model_genes(prepared.cells, prepared.dictionaries, prepared.symbols,
                                  settings.max_genes_per_cell)
    columns = pd.Index(data.gene_names).get_indexer(candidate_genes)
    candidate_expression = log_normalized(data.values[:, columns], data.n_counts)
    tf_symbols = [] if settings.tf_list is None else tree_regulators(settings.tf_list, candidate_genes) or []
    genes = network_universe(candidate_genes, candidate_expression, settings.max_universe_genes, tf_symbols)
    expression = candidate_expression[:, pd.Index(candidate_genes).get_indexer(genes)].toarray()
    network_parts = [isolated(CROSS_CELL_METHODS[kind], lambda report_to, kind=kind: cross_cell_tables(
        {kind: feature_moments_by_study(data, prepared, genes, kind, settings, report_to)})[0], "network",
        score_column="abs_pcorr") for kind in settings.network_features]
    network_parts = [part for part in network_parts if part is not None]
    network = pd.concat(network_parts, ignore_index=True) if network_parts else None
    # The baselines never see ``references``: the tree's regulators are every gene or the user's TF list.
    tf_list = tree_regulators(settings.tf_list, genes)
    baseline_runs, baseline_failures = baseline_predictions(
        expression, genes, tf_list, tree_n_trees=settings.tree_n_trees, tree_max_cells=settings.tree_max_cells,
        tree_max_features=settings.tree_max_features, seed=settings.benchmark_seed, groups=cell_studies(data),
        grnboost2_max_cells=settings.grnboost2_max_cells, grnboost2_max_estimators=settings.grnboost2_max_estimators,
        regdiffusion_n_steps=settings.regdiffusion_n_steps, regdiffusion_max_cells=settings.regdiffusion_max_cells,
        time_limit_s=limit, progress=progress)
    failures.extend(baseline_failures)
    notes = method_notes(baseline_runs)
    baselines = baseline_table(baseline_runs)
    networks = network_predictions(edges, baselines, network)
    failed = {failure.method for failure in failures}
    # MI tests the candidate networks that were built; a failed one is named in the notes.
    usable = [method for method in settings.mi_candidates if method not in failed]
    notes["mi"] = {"candidates": usable, "candidates_failed": [m for m in settings.mi_candidates if m in failed]}
    tables = None
    if usable:
        candidates = union_candidates(chosen_networks(networks, usable), top_k=settings.mi_top_k)
        tables = isolated("mi", lambda report_to: validation_tables(data, candidates, settings, report_to), "mi")
    else:
        named = ", ".join(settings.mi_candidates)
        failures.append(MethodFailure("mi", "mi", f"every MI candidate network failed ({named})"))
    if tables is None:  # CMI prunes MI's edges: it fails with MI
        failures.append(replace(failures[-1], method="cmi_pruned"))
    mi, cmi = tables or (None, None)
    predictions = prediction_tables(edges, baselines, mi, cmi, network=network)
    metrics, failures = score_methods(predictions, references, genes, failures, top_k=settings.top_k,
                                      n_null=settings.n_null, seed=settings.benchmark_seed,
                                      progress=for_stage(progress, "metrics"))
    failed = {failure.method for failure in failures}
    return GrnBenchmarkResult(genes=genes, attention_edges=edges if edges is not None else pd.DataFrame(),
                              loss_curve=prepared.trained.loss_curve,
                              mi_edges=mi if mi is not None else pd.DataFrame(),
                              cmi_edges=cmi if cmi is not None else pd.DataFrame(), baselines=baselines,
                              predictions={m: p for m, p in predictions.items() if m not in failed}, metrics=metrics,
                              settings=asdict(settings), tree_regulators=tf_list, network_edges=network,
                              training=model_training_report(prepared, settings.min_loss_margin), failures=failures,
                              method_notes=notes)

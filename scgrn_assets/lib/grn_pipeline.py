"""The GRN path, end to end, in one place: the assets and ``scgrn benchmark`` both call it.

attention (tokenise → train a small Geneformer-architecture model → last-layer attention →
partial correlation → edge stability), MI and CMI-pruned edges on the attention candidates,
Pearson / Spearman / tree (GENIE3-style) / random baselines on the same genes, and the metrics
of :mod:`scgrn_assets.lib.grn_metrics` against every reference.

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

from scgrn_assets.lib.attention_network import attention_edge_moments, edge_table
from scgrn_assets.lib.baselines import pearson_edges, random_edges, spearman_edges, tree_edges
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.expression import log_normalized
from scgrn_assets.lib.expression_files import ExpressionData
from scgrn_assets.lib.geneformer import SmallGeneformerConfig, train_small_geneformer
from scgrn_assets.lib.grn_metrics import benchmark_table
from scgrn_assets.lib.mutual_information import (candidate_edges, cmi_tables, discretize_expression,
                                                 mi_edge_table)
from scgrn_assets.lib.references import load_tf_list
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.tokenize import (build_corpus_dictionaries, convention_named, corpus_gene_keys,
                                       tokenize_cells)

ProgressCallback = Callable[[int, int], None]
StageProgress = Callable[[str, int, int], None]
"""Called as ``progress(stage, n_done, n_total)``; stages: tokenize, train, attention, mi, cmi, tree, metrics."""

METHOD_LABELS = {
    "attention_stability": "attention stability",
    "mi": "MI (attention candidates)",
    "cmi_pruned": "CMI-pruned",
    "pearson": "Pearson",
    "spearman": "Spearman",
    "tree": "tree (GENIE3-style)",
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
    train_steps: int = 300
    train_batch_size: int = 16
    max_genes_per_cell: int = 256
    pcorr_method: str = "cosine_shrunk_pinv"
    attention_batch_size: int = 32
    min_cells_per_edge: int = 20
    device: str | None = None
    model_seed: int = 0
    # MI / CMI validation
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
                         progress: ProgressCallback | None = None) -> dict[str, pd.DataFrame]:
    """Pearson, Spearman, tree (GENIE3-style) and random predictions on ``genes``.

    Nothing here sees a reference network: every baseline is a function of the expression alone
    (and of ``tf_list`` when the user gives one).

    Parameters
    ----------
    expression
        Cells x genes, log-normalised (:func:`scgrn_assets.lib.expression.log_normalized`), columns = ``genes``.
    tf_list
        Candidate regulators of the tree baseline (:func:`tree_regulators`); None: every gene, so in the
        ``all_pairs`` universe the tree ranks the same pairs as every other method.
    tree_n_trees, tree_max_cells, tree_max_features
        The tree baseline's trees per target, cell subsample and features tried per split
        (:func:`scgrn_assets.lib.baselines.tree_edges`).
    """
    return {
        "pearson": pearson_edges(expression, genes),
        "spearman": spearman_edges(expression, genes),
        "tree": tree_edges(expression, genes, tf_list=tf_list, n_trees=tree_n_trees, max_cells=tree_max_cells,
                           max_features=tree_max_features, seed=seed, progress=progress),
        # A uniform null over all pairs: a TF prior would credit the baseline with the reference's regulators.
        "random": random_edges(genes, seed=seed),
    }


def baseline_table(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The baselines as one long table (``method``, ``directed`` columns), as stored by ``baseline_edges``."""
    return pd.concat([p.assign(method=m, directed=bool(p.attrs.get("directed", True)))
                      for m, p in predictions.items()], ignore_index=True)


def prediction_tables(edges: pd.DataFrame, baselines: pd.DataFrame, mi: pd.DataFrame,
                      cmi: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every method's predictions as DataFrame[source, target, score] with attrs["directed"].

    ``edges`` is the attention edge table (already filtered by :func:`stable_edges`), ``baselines``
    the long table of :func:`baseline_table`. MI scores its candidate edges by MI; "cmi_pruned"
    keeps only the edges flagged direct (scored by CMI min), so it shows what explaining away
    does to precision.
    """
    attention = pd.DataFrame({"source": edges["gene_i"], "target": edges["gene_j"],
                              "score": edges["abs_stability"].replace([np.inf, -np.inf], np.nan).fillna(0.0)})
    attention.attrs["directed"] = False
    predictions = {"attention_stability": attention}
    for method, group in baselines.groupby("method", sort=False):
        table = group[["source", "target", "score"]].reset_index(drop=True)
        table.attrs["directed"] = bool(group["directed"].iloc[0])
        predictions[method] = table
    predictions["mi"] = _undirected(mi["parent"], mi["target"], mi["mi"])
    direct = cmi[cmi["direct"]]
    predictions["cmi_pruned"] = _undirected(direct["parent"], direct["target"], direct["cmi_min"])
    return predictions


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


def attention_network(data: ExpressionData, settings: GrnPathSettings,
                      progress: StageProgress | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Tokenise, train the small Geneformer, and read edges from its attention (what the
    ``tokenized_cells`` → ``geneformer_model`` → ``attention_moments`` → ``edge_stability`` assets do).

    Returns
    -------
    edges, loss_curve
        The full edge table (:func:`scgrn_assets.lib.attention_network.edge_table`, not yet filtered
        by :func:`stable_edges`) and the masked-LM loss per step.
    """
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
    # A model trained here saw only each cell's top-ranked tokens: later positions are untrained.
    moments = attention_edge_moments(trained.model, cells, dictionaries, max_genes=settings.max_genes_per_cell,
                                     max_input_length=config.max_train_length, method=settings.pcorr_method,
                                     batch_size=settings.attention_batch_size, device=settings.device,
                                     progress=report("attention"))
    symbols = dict(zip(map(str, keys), data.gene_names))
    return edge_table(moments, symbols), trained.loss_curve


def validation_tables(data: ExpressionData, edges: pd.DataFrame, settings: GrnPathSettings,
                      progress: StageProgress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MI of each gene's top-K attention neighbours and the CMI table (the ``mi_edges`` and
    ``cmi_edges`` assets), on ``edges`` filtered by :func:`stable_edges`."""
    report = _stage_reporter(progress)
    candidates = candidate_edges(edges, top_k=settings.mi_top_k)
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
        Cells x genes (:func:`scgrn_assets.lib.expression_files.read_expression`).
    references
        Name -> normalised reference (:mod:`scgrn_assets.lib.references`).
    settings
        The path's settings (defaults: the assets').
    progress
        Optional ``progress(stage, n_done, n_total)``.

    Returns
    -------
    GrnBenchmarkResult
        ``metrics`` has :func:`scgrn_assets.lib.grn_metrics.benchmark_table`'s columns.
    """
    report = _stage_reporter(progress)
    all_edges, loss_curve = attention_network(data, settings, progress)
    edges = stable_edges(all_edges, settings.min_cells_per_edge)
    if edges.empty:
        raise ScgrnInputError(f"no gene pair was seen together in {settings.min_cells_per_edge} or more cells",
                              file=data.path, fix="pass more cells or a smaller --min-cells-per-edge")
    mi, cmi = validation_tables(data, edges, settings, progress)
    genes = network_genes(all_edges)
    columns = pd.Index(data.gene_names).get_indexer(genes)
    expression = log_normalized(data.values[:, columns], data.n_counts).toarray()
    # The baselines never see ``references``: the tree's regulators are every gene or the user's TF list.
    tf_list = tree_regulators(settings.tf_list, genes)
    baselines = baseline_table(baseline_predictions(
        expression, genes, tf_list, tree_n_trees=settings.tree_n_trees, tree_max_cells=settings.tree_max_cells,
        tree_max_features=settings.tree_max_features, seed=settings.benchmark_seed, progress=report("tree")))
    predictions = prediction_tables(edges, baselines, mi, cmi)
    metrics = benchmark_table(predictions, references, genes, top_k=settings.top_k, n_null=settings.n_null,
                              seed=settings.benchmark_seed, progress=report("metrics"))
    return GrnBenchmarkResult(genes=genes, attention_edges=edges, loss_curve=loss_curve, mi_edges=mi, cmi_edges=cmi,
                              baselines=baselines, predictions=predictions, metrics=metrics, settings=asdict(settings),
                              tree_regulators=tf_list)


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
        "predictions.parquet", "attention_edges.parquet", "mi_edges.parquet", "cmi_edges.parquet", "run.json")}
    writers = {
        "benchmark_metrics.parquet": lambda tmp: metrics.to_parquet(tmp, index=False),
        "benchmark_metrics.csv": lambda tmp: metrics.to_csv(tmp, index=False),
        "benchmark_summary.csv": lambda tmp: headline.assign(dataset=dataset).to_csv(tmp, index=False),
        "benchmark_summary.md": lambda tmp: Path(tmp).write_text(
            f"# {dataset}: GRN benchmark\n\n{SUMMARY_LEGEND}\n\n{headline_markdown(headline)}\n"),
        "predictions.parquet": lambda tmp: predictions_long(result.predictions).to_parquet(tmp, index=False),
        "attention_edges.parquet": lambda tmp: result.attention_edges.to_parquet(tmp, index=False),
        "mi_edges.parquet": lambda tmp: result.mi_edges.to_parquet(tmp, index=False),
        "cmi_edges.parquet": lambda tmp: result.cmi_edges.to_parquet(tmp, index=False),
        "run.json": lambda tmp: Path(tmp).write_text(json.dumps(
            {"dataset": dataset, **run_info, "settings": result.settings, "genes_benchmarked": result.genes,
             "methods": {m: bool(p.attrs.get("directed", True)) for m, p in result.predictions.items()},
             "tree_regulators": ("all genes" if result.tree_regulators is None
                                 else {"tf_list": result.settings.get("tf_list"),
                                       "n_in_genes": len(result.tree_regulators), "genes": result.tree_regulators}),
             "final_training_loss": float(np.nanmean(result.loss_curve[-20:])) if len(result.loss_curve) else None},
            indent=2, default=str) + "\n"),
    }
    for name, write in writers.items():
        with atomic_path(paths[name]) as tmp:
            write(tmp)
    return paths

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

import threading
import time
import traceback as tracebacks
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
from scgrn_assets.lib.network.model import SmallGeneformerConfig
from scgrn_assets.lib.network.tokens import TokenizedCells
from scgrn_assets.lib.progress import Progress, for_stage, report
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


_MODEL = SmallGeneformerConfig()


@dataclass(frozen=True)
class GrnPathSettings:
    """Every setting of the GRN path, with its default: the one place those defaults live (the
    Dagster resources ``GeneformerSettings``, ``ValidationSettings`` and ``BenchmarkSettings`` read
    theirs from here)."""

    # attention network
    convention: str = "V1"
    # The model's own defaults live in SmallGeneformerConfig: a ceiling on steps (training stops at the
    # held-out gate), the batch and the gate's margin.
    train_steps: int = _MODEL.max_steps
    train_batch_size: int = _MODEL.batch_size
    min_loss_margin: float | None = _MODEL.min_loss_margin
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
    # isolation: a method past this many seconds is recorded as failed (None: no limit, run in the caller's thread)
    method_time_limit_s: float | None = None


# --- one method must not take the others down -------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class MethodFailure:
    """A method that produced no network, so it is not scored: where (``step``: baselines, network, mi, metrics)
    and why (``reason``: one line, the exception or what was wrong with its scores); ``traceback`` for the
    record (``run.json``), never printed."""

    method: str
    step: str
    reason: str
    traceback: str = ""


class MethodTimeout(RuntimeError):
    """A method ran past ``GrnPathSettings.method_time_limit_s``."""


def check_scores(table: pd.DataFrame, column: str = "score") -> None:
    """Raise ``ValueError`` naming how many of ``table[column]`` are NaN or infinite (such scores cannot be
    ranked; a method that returns them has failed, e.g. RegDiffusion dividing by a zero range)."""
    if column not in table.columns:
        raise ValueError(f"the method returned no {column!r} column (columns: {list(table.columns)})")
    scores = table[column].to_numpy(dtype=np.float64)
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{bad} of {len(scores)} scores are NaN or infinite")


def run_method(method: str, build: Callable[[Progress | None], T], *, step: str, time_limit_s: float | None = None,
               progress: Progress | None = None,
               score_column: str | None = "score") -> tuple[T | None, MethodFailure | None]:
    """``build(progress)`` with its failure recorded instead of raised: (result, None) or (None, failure).

    A failure is any ``Exception`` (not ``KeyboardInterrupt``), a result whose ``score_column`` holds NaN or
    infinite values (:func:`check_scores`; None skips the check), or a run past ``time_limit_s``.

    Without a time limit ``build`` runs in the caller's thread: nothing is added to a normal run. With one,
    it runs in a worker thread; a method that reports progress is stopped at its first report past the
    limit, one that never reports is abandoned (Python cannot stop a thread): it runs on in the background
    and its result is discarded.
    """
    try:
        result = build(progress) if time_limit_s is None else _within_time_limit(build, time_limit_s, progress)
        if score_column is not None:
            check_scores(result, score_column)
    except Exception as exc:  # noqa: BLE001 - any failure of one method is recorded; the others go on
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return None, MethodFailure(method, step, reason[:500], "".join(tracebacks.format_exception(exc))[-4000:])
    return result, None


def _within_time_limit(build: Callable[[Progress | None], T], time_limit_s: float, progress: Progress | None) -> T:
    deadline = time.monotonic() + time_limit_s
    message = f"did not finish within the time limit of {time_limit_s:g} s (method_time_limit_s)"
    outcome: dict = {}

    def checked(done: int, total: int, /, **detail: object) -> None:
        if time.monotonic() > deadline:
            raise MethodTimeout(message)
        report(progress, done, total, **detail)

    def work() -> None:
        try:
            outcome["result"] = build(checked)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="scgrn-method", daemon=True)
    worker.start()
    worker.join(time_limit_s)
    if worker.is_alive():
        raise MethodTimeout(message + "; it was left running in the background and its result is discarded")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def method_notes(predictions: Mapping[str, pd.DataFrame]) -> dict[str, dict]:
    """What a method recorded about its own run (``attrs`` other than ``directed``, e.g. RegDiffusion's
    ``n_cells_dropped``), by method; methods without notes are left out."""
    notes = {method: {key: value for key, value in table.attrs.items() if key != "directed"}
             for method, table in predictions.items()}
    return {method: note for method, note in notes.items() if note}


def failure_rows(failures: Iterable[MethodFailure], reference_names: Iterable[str]) -> pd.DataFrame:
    """One row per failed method x reference in the metric table's shape: ``metric`` = "failed", ``value`` and
    ``universe`` empty, ``error`` = the reason (``step: reason``)."""
    from scgrn_assets.lib.benchmarks.metrics import METRIC_COLUMNS  # here: metrics imports matplotlib

    references = list(reference_names)
    rows = [(f.method, reference, None, "failed", np.nan, np.nan, f"{f.step}: {f.reason}")
            for f in failures for reference in references]
    table = pd.DataFrame(rows, columns=[*METRIC_COLUMNS, "error"])
    return table.astype({"method": object, "reference": object, "universe": object, "metric": object,
                         "value": float, "cutoff": float, "error": "string"})


def score_methods(predictions: Mapping[str, pd.DataFrame], references: Mapping[str, pd.DataFrame],
                  genes: Sequence[str], failures: Sequence[MethodFailure] = (), *, top_k: int | None, n_null: int,
                  seed: int, progress: Progress | None = None) -> tuple[pd.DataFrame, list[MethodFailure]]:
    """:func:`~scgrn_assets.lib.benchmarks.metrics.benchmark_table` method by method, so that a method whose
    scores cannot be ranked (NaN, infinite) or whose evaluation raises is recorded as failed (step "metrics")
    and every other method is still scored.

    Parameters
    ----------
    failures
        Methods that already failed upstream (their network was never built): listed in the table too.

    Returns
    -------
    table, failures
        :data:`~scgrn_assets.lib.benchmarks.metrics.METRIC_COLUMNS` plus ``error``: empty on scored rows; each
        failed method gets one row per reference with ``metric`` = "failed" and ``error`` = "step: reason"
        (:func:`failure_rows`). ``failures``: the given ones, then those of this step. Each method's rows are
        exactly those :func:`benchmark_table` gives it among the others (its nulls' seed does not depend on them).
    """
    from scgrn_assets.lib.benchmarks.metrics import METRIC_COLUMNS, benchmark_table  # here: it imports matplotlib

    failures = list(failures)
    parts = []
    n_methods = max(len(predictions), 1)
    for index, (method, prediction) in enumerate(predictions.items()):
        def offset(done: int, total: int, /, index: int = index, **detail: object) -> None:
            report(progress, index * total + done, n_methods * total, **detail)

        def score(_, method: str = method, prediction: pd.DataFrame = prediction) -> pd.DataFrame:
            check_scores(prediction)
            return benchmark_table({method: prediction}, references, genes, top_k=top_k, n_null=n_null, seed=seed,
                                   progress=offset if progress is not None else None)

        table, failure = run_method(method, score, step="metrics", score_column=None)
        if failure is None:
            parts.append(table)
        else:
            failures.append(failure)
    scored = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=METRIC_COLUMNS)
    scored = scored.assign(error=pd.Series(pd.NA, index=scored.index, dtype="string"))
    failed = failure_rows(failures, references)
    table = pd.concat([scored, failed], ignore_index=True) if len(failed) else scored
    return table, failures


DEMO_SETTINGS = {
    "grnboost2_max_estimators": 100,
    "grnboost2_max_cells": 300,
    "regdiffusion_n_steps": 300,
    "tree_max_cells": 500,
    "tree_n_trees": 10,
}
"""The built-in demo catalog's settings where they differ from :class:`GrnPathSettings` ("demo settings").

The peers keep their published defaults for real data (GRNBoost2 up to 5,000 trees per target on 1,000
cells, RegDiffusion's 1,000 epochs); on the demo's 6,000 simulated cells those alone took minutes, so the
demo runs them smaller and says so in its output and in ``benchmark_metrics`` (``settings_profile``)."""


def settings_profile(catalog: str | None) -> str:
    """``"demo"`` for the built-in demo catalog (:data:`DEMO_SETTINGS` apply), else ``"default"``."""
    return "demo" if str(catalog or "") == "demo" else "default"


METHOD_SETTINGS = {
    "tree": ("tree_n_trees", "tree_max_cells", "tree_max_features"),
    "grnboost2": ("grnboost2_max_estimators", "grnboost2_max_cells"),
    "regdiffusion": ("regdiffusion_n_steps", "regdiffusion_max_cells"),
}
"""The settings that bound each peer's run time (and so its quality)."""


def method_settings_note(method: str, values: Mapping[str, object]) -> str:
    """What a benchmark row should say about how ``method`` was run: "" with the defaults, "demo settings
    (…)" with :data:`DEMO_SETTINGS`, else "settings (…)": the non-default values, from ``values``."""
    defaults = GrnPathSettings()
    changed = {name: values[name] for name in METHOD_SETTINGS.get(method, ())
               if name in values and values[name] != getattr(defaults, name)}
    if not changed:
        return ""
    listed = ", ".join(f"{name}={value}" for name, value in changed.items())
    is_demo = all(DEMO_SETTINGS.get(name) == value for name, value in changed.items())
    return f"{'demo settings' if is_demo else 'settings'} ({listed})"


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
                         time_limit_s: float | None = None,
                         progress: Progress | None = None) -> tuple[dict[str, pd.DataFrame], list[MethodFailure]]:
    """The baselines (``BASELINE_METHODS``) on ``genes``: co-expression and regressions within study,
    the tools people use (GRNBoost2, RegDiffusion), a gene-level null and random.

    Nothing here sees a reference network: every baseline is a function of the expression alone
    (and of ``tf_list`` when the user gives one). Each runs through :func:`run_method`: one that raises,
    returns NaN or infinite scores or runs past ``time_limit_s`` is returned as a failure, and the others
    are still run.

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
    time_limit_s
        Seconds each method may take (None: no limit).
    progress
        Optional; each call carries ``stage=`` the method (tree and GRNBoost2 per target, RegDiffusion per
        epoch).

    Returns
    -------
    predictions, failures
        Method -> predictions for the methods that succeeded (in ``BASELINE_METHODS`` order), and a
        :class:`MethodFailure` for each that did not.
    """
    unknown = sorted(set(methods) - set(BASELINE_METHODS))
    if unknown:
        raise ScgrnInputError(f"unknown baseline methods {unknown}", fix=f"choose from {list(BASELINE_METHODS)}")
    # Looked up here, not bound at import: a test can swap one method for a failing one.
    builders = {
        "pearson": lambda _: pearson_edges(expression, genes, groups=groups),
        "spearman": lambda _: spearman_edges(expression, genes, groups=groups),
        "tree": lambda report_to: tree_edges(expression, genes, tf_list=tf_list, n_trees=tree_n_trees,
                                             max_cells=tree_max_cells, max_features=tree_max_features, seed=seed,
                                             groups=groups, progress=report_to),
        "grnboost2": lambda report_to: grnboost2_edges(expression, genes, tf_list=tf_list,
                                                       max_cells=grnboost2_max_cells,
                                                       max_estimators=grnboost2_max_estimators, seed=seed,
                                                       groups=groups, progress=report_to),
        "regdiffusion": lambda report_to: regdiffusion_edges(expression, genes, n_steps=regdiffusion_n_steps,
                                                             max_cells=regdiffusion_max_cells, seed=seed,
                                                             groups=groups, progress=report_to),
        "gene_level_null": lambda _: gene_level_null_edges(expression, genes, groups=groups),
        # A uniform null over all pairs: a TF prior would credit the baseline with the reference's regulators.
        "random": lambda _: random_edges(genes, seed=seed),
    }
    predictions, failures = {}, []
    for method in BASELINE_METHODS:
        if method not in methods:
            continue
        table, failure = run_method(method, builders[method], step="baselines", time_limit_s=time_limit_s,
                                    progress=for_stage(progress, method))
        if failure is None:
            predictions[method] = table
        else:
            failures.append(failure)
    return predictions, failures


def baseline_table(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The baselines as one long table (``method``, ``directed`` columns), as stored by ``baseline_edges``
    (no rows, with those columns, when every baseline failed)."""
    if not predictions:
        return pd.DataFrame({"source": pd.Series(dtype=object), "target": pd.Series(dtype=object),
                             "score": pd.Series(dtype=float), "method": pd.Series(dtype=object),
                             "directed": pd.Series(dtype=bool)})
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


def prediction_tables(edges: pd.DataFrame | None, baselines: pd.DataFrame, mi: pd.DataFrame | None,
                      cmi: pd.DataFrame | None, network: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Every method's predictions: :func:`network_predictions` plus MI (its candidate edges scored by
    MI) and "cmi_pruned" (only the edges flagged direct, scored by CMI min), so it shows what
    explaining away does to precision. ``mi`` / ``cmi`` None (the step failed) leaves that method out."""
    predictions = network_predictions(edges, baselines, network)
    if mi is not None:
        predictions["mi"] = _undirected(mi["parent"], mi["target"], mi["mi"])
    if cmi is not None:
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

"""GRN benchmark metrics: one implementation of each, on explicitly named universes of gene pairs.

Conventions (BEELINE's, unless stated):

- Scores are ranked by absolute value; a pair a method did not list has score 0, and a score of 0
  never counts as a prediction (early precision, top-K, cutoff sweeps).
- Self-loops are excluded everywhere; reference edges and predictions are deduplicated.
- **Direction.** A (method, reference) pair is evaluated directed only when both are directed.
  Otherwise both sides become unordered pairs: a pair {a, b} is true when the reference has
  a -> b or b -> a, and its score is the larger |score| the method gave either orientation.
  So undirected co-expression is compared with a TF-target set on unordered pairs.
- **Universes** (the pairs that are ranked; the data's genes G = reference genes present in the data):

  ``all_pairs``  every pair of distinct genes of G.
  ``tf_rooted``  pairs whose source is a TF of G (``tf_list`` when given, else the reference's
                 regulators, as BEELINE does); undirected: pairs with at least one TF.
  ``predicted``  only the pairs the method listed (both genes in G), as the original pipeline did.

- Early precision (EP): k = number of true edges in the universe; the predicted set is every
  pair whose score is >= the k-th highest score (ties at the k-th score kept) and > 0.
  EPR = EP / (k / n_pairs), the random predictor's precision.
- AUPRC is given both as average precision (step integral, scikit-learn's
  ``average_precision_score``) and as the trapezoid under the PR curve that starts at
  (recall 0, precision 1) (scikit-learn's ``auc(recall, precision)``); the AUPRC ratio divides
  average precision by the base rate (the random predictor's expected AUPRC).
- Enrichment: the top-K listed pairs by score (K defaults to the number of true edges); two nulls
  keep the predicted network's out-degrees: targets redrawn with probability proportional to
  their reference in-degree without replacement, and degree-preserving rewiring (double-edge
  swaps) of the predicted network. Empirical p = (1 + #null >= observed) / (1 + n_null).

Pairs not listed by a method are never materialised: they enter the ranking as two weighted
rows with score 0 (true and false), so universes of millions of pairs stay cheap.

Where each part lives: the universes in :mod:`~scgrn_assets.lib.benchmarks.universes`, the ranking
metrics in :mod:`~scgrn_assets.lib.benchmarks.ranking`, degree correlation and enrichment in
:mod:`~scgrn_assets.lib.benchmarks.network_metrics`; this module puts them in one table and draws them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from scgrn_assets.lib.benchmarks.network_metrics import degree_correlation, top_k_enrichment
from scgrn_assets.lib.benchmarks.ranking import (auprc_trapezoid, auroc, average_precision, early_precision,
                                                precision_recall_points)
from scgrn_assets.lib.benchmarks.universes import UNIVERSES, EvaluationPairs, evaluation_pairs
from scgrn_assets.lib.plotting import figure_png, plt
from scgrn_assets.lib.progress import Progress, report

METRIC_COLUMNS = ["method", "reference", "universe", "metric", "value", "cutoff"]
SIGNIFICANCE_LEVEL = 0.05


def ranking_metrics(pairs: EvaluationPairs) -> dict[str, float]:
    """AUROC, both AUPRCs, AUPRC ratios, early precision, EPR and degree correlation of one universe."""
    labels, scores, weights = pairs.ranking()
    average = average_precision(labels, scores, weights)
    trapezoid = auprc_trapezoid(labels, scores, weights)
    early = early_precision(labels, scores, weights)
    return {
        "auroc": auroc(labels, scores, weights),
        "auprc_ap": average,
        "auprc_trapezoid": trapezoid,
        "auprc_ratio": average / pairs.base_rate,
        "auprc_trapezoid_ratio": trapezoid / pairs.base_rate,
        "early_precision": early,
        "epr": early / pairs.base_rate,
        "degree_correlation": degree_correlation(pairs),
    }


def cutoff_sweep(pairs: EvaluationPairs, cutoffs: Sequence[float]) -> pd.DataFrame:
    """Metrics of the network |score| >= cutoff, for each cutoff (MI / CMI thresholds, TF-target scans).

    Returns
    -------
    pandas.DataFrame
        One row per cutoff: ``cutoff``, ``n_predicted``, ``precision``, ``recall``, and ``auroc`` /
        ``auprc_ap`` of the ranking where scores below the cutoff are set to 0.
    """
    rows = []
    for cutoff in cutoffs:
        labels, scores, weights = pairs.ranking(cutoff=cutoff)
        predicted = scores > 0
        n_predicted = int(weights[predicted].sum())
        hits = float(weights[predicted & labels].sum())
        rows.append({
            "cutoff": float(cutoff),
            "n_predicted": n_predicted,
            "precision": hits / n_predicted if n_predicted else float("nan"),
            "recall": hits / pairs.n_true if pairs.n_true else float("nan"),
            "auroc": auroc(labels, scores, weights),
            "auprc_ap": average_precision(labels, scores, weights),
        })
    return pd.DataFrame(rows, columns=["cutoff", "n_predicted", "precision", "recall", "auroc", "auprc_ap"])


def benchmark_table(
    predictions: Mapping[str, pd.DataFrame],
    references: Mapping[str, pd.DataFrame],
    gene_universe: Sequence[str],
    tf_list: Sequence[str] | None = None,
    *,
    universes: Sequence[str] = UNIVERSES,
    method_directed: Mapping[str, bool] | None = None,
    top_k: int | None = None,
    n_null: int = 1000,
    sweep_cutoffs: Mapping[str, Sequence[float]] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Every metric for every method x reference x universe, in one long table.

    Parameters
    ----------
    predictions
        Method name -> DataFrame[source, target, score].
    references
        Reference name -> normalised reference.
    gene_universe
        The genes the methods were run on.
    tf_list
        Regulators of the ``tf_rooted`` universe (None: each reference's regulators).
    universes
        Which of :data:`~scgrn_assets.lib.benchmarks.universes.UNIVERSES` to evaluate.
    method_directed
        Method -> directed; methods not named here use ``attrs["directed"]`` (default True).
    top_k
        Size of the enrichment network; None = the number of true pairs of each universe.
    n_null
        Replicates of each enrichment null (0 skips the enrichment).
    sweep_cutoffs
        Method -> score cutoffs for :func:`cutoff_sweep` (e.g. MI / CMI thresholds).
    progress
        Optional ``progress(n_done, n_total)`` over method x reference x universe.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`METRIC_COLUMNS`. ``cutoff`` is NaN for whole-ranking metrics, K for the
        ``top_k_*`` metrics and the score cutoff for ``sweep_*`` metrics. Also per universe:
        ``n_pairs``, ``n_true``, ``base_rate``, ``directed`` (1/0), and, for directed evaluations,
        ``tfs_tested`` / ``tfs_enriched_in_degree`` / ``tfs_enriched_rewired`` (sources with p < 0.05).
        Universes without a true or without a false pair only get the counts.
    """
    method_directed = dict(method_directed or {})
    sweep_cutoffs = dict(sweep_cutoffs or {})
    rows: list[tuple] = []
    n_total = len(predictions) * len(references) * len(universes)
    n_done = 0
    for method, prediction in predictions.items():
        for reference_name, reference in references.items():
            for universe in universes:
                pairs = evaluation_pairs(
                    prediction, reference, gene_universe, universe=universe, tf_list=tf_list,
                    prediction_directed=method_directed.get(method),
                )

                def add(metric: str, value: float, cutoff: float = float("nan")) -> None:
                    rows.append((method, reference_name, universe, metric, float(value), float(cutoff)))

                add("n_pairs", pairs.n_pairs)
                add("n_true", pairs.n_true)
                add("base_rate", pairs.base_rate)
                add("directed", pairs.directed)
                if 0 < pairs.n_true < pairs.n_pairs:
                    for metric, value in ranking_metrics(pairs).items():
                        add(metric, value)
                    if n_null > 0:
                        global_metrics, per_source = top_k_enrichment(pairs, top_k=top_k, n_null=n_null, seed=seed)
                        k_used = global_metrics.pop("top_k")
                        for metric, value in global_metrics.items():
                            add(metric, value, k_used)
                        if pairs.directed:  # unordered pairs have no regulator to summarise by
                            add("tfs_tested", len(per_source), k_used)
                            add("tfs_enriched_in_degree", (per_source["p_in_degree"] < SIGNIFICANCE_LEVEL).sum(),
                                k_used)
                            add("tfs_enriched_rewired", (per_source["p_rewired"] < SIGNIFICANCE_LEVEL).sum(), k_used)
                    if method in sweep_cutoffs:
                        sweep = cutoff_sweep(pairs, sweep_cutoffs[method])
                        for record in sweep.to_dict("records"):
                            for metric in ("n_predicted", "precision", "recall", "auroc", "auprc_ap"):
                                add(f"sweep_{metric}", record[metric], record["cutoff"])
                n_done += 1
                report(progress, n_done, n_total)
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def pr_curves_png(
    predictions: Mapping[str, pd.DataFrame],
    reference: pd.DataFrame,
    gene_universe: Sequence[str],
    tf_list: Sequence[str] | None = None,
    *,
    reference_name: str = "",
    universe: str = "all_pairs",
    method_directed: Mapping[str, bool] | None = None,
) -> bytes:
    """PNG of every method's precision-recall curve against one reference, with the random baseline."""
    method_directed = dict(method_directed or {})
    figure, axes = plt.subplots(figsize=(5.5, 4.5))
    base_rates = set()
    for method, prediction in predictions.items():
        pairs = evaluation_pairs(
            prediction, reference, gene_universe, universe=universe, tf_list=tf_list,
            prediction_directed=method_directed.get(method),
        )
        if pairs.n_true == 0:
            continue
        ranking = pairs.ranking()
        precision, recall, _ = precision_recall_points(*ranking)
        base_rates.add(round(pairs.base_rate, 6))  # directed and undirected evaluations differ
        axes.plot(np.r_[0.0, recall], np.r_[1.0, precision], label=f"{method} (AP {average_precision(*ranking):.3f})")
    for base_rate in sorted(base_rates):
        axes.axhline(base_rate, color="grey", linestyle="--", label=f"random ({base_rate:.3f})")
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"PR curves vs {reference_name or 'reference'} ({universe})")
    axes.legend(fontsize="small")
    return figure_png(figure)


def epr_bar_chart_png(table: pd.DataFrame, reference_name: str, *, universe: str = "all_pairs") -> bytes:
    """PNG bar chart of each method's EPR against one reference (from :func:`benchmark_table`'s output);
    the dashed line at 1 is the random predictor."""
    rows = table[(table["reference"] == reference_name) & (table["universe"] == universe) & (table["metric"] == "epr")]
    figure, axes = plt.subplots(figsize=(max(4.0, 0.8 * len(rows) + 2), 3.5))
    axes.bar(rows["method"].astype(str), rows["value"], color="tab:blue")
    axes.axhline(1.0, color="grey", linestyle="--")
    axes.set(ylabel="early precision ratio", title=f"EPR vs {reference_name} ({universe})")
    axes.tick_params(axis="x", rotation=45)
    return figure_png(figure)

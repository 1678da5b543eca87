"""The files a benchmark run writes: the long metric table, the headline summary, every method's
predictions, the intermediate edge tables and ``run.json``, each through a temporary name."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from scgrn_assets.lib.benchmarks.grn_benchmark import GrnBenchmarkResult
from scgrn_assets.lib.benchmarks.pipeline import METHOD_LABELS, MethodFailure
from scgrn_assets.lib.storage import atomic_path


def predictions_long(predictions: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Every method's predictions in one table: method, source, target, score, directed."""
    return pd.concat([p[["source", "target", "score"]].assign(method=m, directed=bool(p.attrs.get("directed", True)))
                      for m, p in predictions.items()], ignore_index=True)[
        ["method", "source", "target", "score", "directed"]]


HEADLINE_COLUMNS = (("all_pairs", "epr"), ("all_pairs", "auprc_ratio"), ("all_pairs", "auroc"),
                    ("all_pairs", "auprc_ap"), ("all_pairs", "early_precision"),
                    ("tf_rooted", "epr"), ("tf_rooted", "auprc_ratio"))
"""The summary's columns: (universe, metric)."""


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


def failures_markdown(failures: Sequence[MethodFailure]) -> str:
    """The failed methods as a Markdown list (method in words, step, reason); empty when none failed."""
    return "\n".join(f"- {METHOD_LABELS.get(f.method, f.method)} (`{f.method}`, {f.step}): {f.reason}"
                     for f in failures)


def write_benchmark_outputs(result: GrnBenchmarkResult, out_dir, *, dataset: str,
                            run_info: Mapping[str, object]) -> dict[str, Path]:
    """Write a benchmark run under ``out_dir``, every file through a temporary name and a rename.

    Files: ``benchmark_metrics.parquet`` / ``.csv`` (the long table with a ``dataset`` column),
    ``benchmark_summary.csv`` / ``.md`` (:func:`headline_table`), ``predictions.parquet`` (every method's scored pairs), the intermediate
    ``attention_edges``, ``mi_edges``, ``cmi_edges`` Parquet tables and ``run.json`` (inputs,
    settings, what was decided). Failed methods (``result.failures``) are rows with ``metric`` = "failed" and
    their ``error`` in the metric table, a "Failed" list in the summary, and ``failed_methods`` (step, reason,
    traceback) in ``run.json``. Returns name -> path.
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
            f"# {dataset}: GRN benchmark\n\n{SUMMARY_LEGEND}\n\n{headline_markdown(headline)}\n"
            + (f"\n## Failed (not scored)\n\n{failures_markdown(result.failures)}\n" if result.failures else "")),
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
             "training": result.training,
             "failed_methods": {f.method: {"step": f.step, "reason": f.reason, "traceback": f.traceback}
                                for f in result.failures},
             "method_notes": result.method_notes},
            indent=2, default=str) + "\n"),
    }
    for name, write in writers.items():
        with atomic_path(paths[name]) as tmp:
            write(tmp)
    return paths

"""Reference networks, co-expression baselines and the benchmark metrics that compare methods."""

import dagster as dg
import pandas as pd

from scgrn_assets.metadata import png_metadata, table_preview
from scgrn_assets.io_managers import asset_folder, table_artefact
from scgrn_assets.lib.benchmarks import (MethodFailure, baseline_predictions, baseline_table, epr_bar_chart_png,
                                        load_reference, log_normalized, method_notes, pr_curves_png,
                                        prediction_tables, ReferenceSource, score_methods, stable_edges,
                                        tree_regulators)
from scgrn_assets.lib.benchmarks.pipeline import BASELINE_METHODS, method_settings_note
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.ingest import fetch_file
from scgrn_assets.defs.network.assets import read_gene_universe
from scgrn_assets.resources import BenchmarkSettings, GeneformerSettings, ScgrnStorage


@dg.asset(group_name="benchmarks", io_manager_key="table_io_manager", metadata=table_artefact("reference_edges"),
          kinds={"parquet", "duckdb"}, tags={"stage": "benchmarks"})
def reference_networks(context: dg.AssetExecutionContext, storage: ScgrnStorage, combined_corpus):
    """The catalog's reference networks for the corpus species (STRING, TRRUST, ...), downloaded,
    checksum-verified and normalised to (source, target, sign, directed, reference)."""
    catalog = storage.load_catalog()
    species = {s.species for s in catalog.studies}
    corpus_genes = read_corpus(combined_corpus).var_names.tolist()
    folder = asset_folder(context, storage.layout)
    tables = []
    for entry in catalog.references:
        if entry.species not in species:
            context.log.info(f"{entry.name}: species {entry.species} not in the corpus ({sorted(species)}); skipped")
            continue
        files = {}
        for role, study_file in entry.files.items():
            destination = folder / entry.name / study_file.name
            destination.parent.mkdir(parents=True, exist_ok=True)
            fetch_file(study_file.url, destination, sha256=study_file.sha256, study=entry.name)
            files[role] = str(destination)
        source = ReferenceSource(name=entry.name, format=entry.format, species=entry.species, files=files,
                                 options=entry.options)
        tables.append(load_reference(source, gene_symbols=corpus_genes))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["source", "target", "sign", "directed", "reference"])
    counts = table.groupby("reference").size().to_dict() if len(table) else {}
    return dg.Output(table, metadata={"edges_per_reference": dg.MetadataValue.json(counts),
                                     "preview": table_preview(table)})


@dg.asset(group_name="benchmarks", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "benchmarks"})
def baseline_edges(context: dg.AssetExecutionContext, benchmark: BenchmarkSettings,
                   combined_corpus, gene_universe):
    """Pearson, Spearman, tree-based (GENIE3-style), GRNBoost2 and RegDiffusion predictions, a gene-level
    null and random, on the gene universe, from log1p-normalised expression; co-expression and the
    regressions centre each gene within its study (RegDiffusion gets the studies as cell types).

    Independent of the reference networks (not an input): the regressions' candidate regulators
    are every gene, or ``BenchmarkSettings.tf_list`` (a TF list file such as BEELINE's
    ``mouse-tfs.csv``) when set, never the benchmark's truth.

    A method that raises or returns NaN / infinite scores does not fail the asset: it is left out of the
    table, listed in ``failed_methods`` (metadata) with its reason and logged as a warning."""
    corpus = read_corpus(combined_corpus)
    genes, _ = read_gene_universe(gene_universe)
    columns = corpus.var_names.get_indexer(genes)
    expression = log_normalized(corpus.X[:, columns], corpus.obs["n_counts"].to_numpy()).toarray()
    tf_list = tree_regulators(benchmark.tf_list, genes)

    def progress(done: int, total: int, /, *, stage: str, **detail: object) -> None:
        if done % 100 == 0 or done == total:
            context.log.info(f"{stage}: {done}/{total}")

    predictions, failures = baseline_predictions(
        expression, genes, tf_list, tree_n_trees=benchmark.tree_n_trees, tree_max_cells=benchmark.tree_max_cells,
        tree_max_features=benchmark.tree_max_features, seed=benchmark.seed,
        groups=corpus.obs["study"].astype(str).to_numpy(), grnboost2_max_cells=benchmark.grnboost2_max_cells,
        grnboost2_max_estimators=benchmark.grnboost2_max_estimators,
        regdiffusion_n_steps=benchmark.regdiffusion_n_steps, regdiffusion_max_cells=benchmark.regdiffusion_max_cells,
        progress=progress)
    _warn_failures(context, "baseline_edges", failures)
    table = baseline_table(predictions)
    return dg.Output(table, metadata={"n_genes": len(genes), "n_regulators": len(tf_list or genes),
                                     "tree_regulators": benchmark.tf_list or "all genes",
                                     "edges_per_method": dg.MetadataValue.json(table.groupby("method").size().to_dict()),
                                     "failed_methods": _failures_metadata(failures),
                                     "method_notes": dg.MetadataValue.json(method_notes(predictions))})


def _warn_failures(context: dg.AssetExecutionContext, asset: str, failures: list[MethodFailure]) -> None:
    # One method's failure does not fail the asset: the others are kept, and it is said here and in metadata.
    for failure in failures:
        context.log.warning(f"{asset}: method {failure.method} failed ({failure.step}) and is left out: "
                            f"{failure.reason}\n{failure.traceback}")


def _failures_metadata(failures: list[MethodFailure]) -> dg.MetadataValue:
    return dg.MetadataValue.json({f.method: {"step": f.step, "reason": f.reason} for f in failures})


@dg.asset(group_name="benchmarks", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          tags={"stage": "benchmarks"})
def benchmark_metrics(context: dg.AssetExecutionContext, benchmark: BenchmarkSettings,
                      geneformer: GeneformerSettings, edge_stability, network_edges, baseline_edges, mi_edges,
                      cmi_edges, reference_networks, gene_universe):
    """AUROC, AUPRC (average precision and trapezoid), AUPRC ratio, EPR, degree correlation and
    top-K enrichment with two nulls, for every method x reference x universe, on the gene universe.

    A method that cannot be scored (NaN / infinite scores, an error), or a baseline absent from
    ``baseline_edges`` (it failed there), gets rows with ``metric`` = "failed" and its ``error``, is listed in
    ``failed_methods`` (metadata) and logged as a warning; the others are scored as usual."""
    # Pairs seen in fewer than min_cells_per_edge cells are left out: with n = 2 or 3 the sample sd is
    # tiny by chance and mean/sd explodes, which would put noise at the top.
    predictions = prediction_tables(stable_edges(edge_stability, geneformer.min_cells_per_edge), baseline_edges,
                                    mi_edges, cmi_edges, network=network_edges)
    genes, _ = read_gene_universe(gene_universe)
    references_table = reference_networks
    references = {name: group.reset_index(drop=True) for name, group in references_table.groupby("reference")}
    # A baseline absent from baseline_edges failed there (every baseline is run): listed as failed here too.
    absent = [MethodFailure(method, "baselines", "absent from baseline_edges: it failed there (the reason is in "
                            "baseline_edges' metadata and run log)")
              for method in BASELINE_METHODS if method not in set(baseline_edges["method"])]
    table, failures = score_methods(predictions, references, genes, absent, top_k=benchmark.top_k,
                                    n_null=benchmark.n_null, seed=benchmark.seed)
    _warn_failures(context, "benchmark_metrics", failures)
    # How each peer was run, on every row: the demo runs GRNBoost2, RegDiffusion and the tree smaller.
    table["settings"] = table["method"].map(lambda method: method_settings_note(method, benchmark.model_dump()))
    failed = {failure.method for failure in failures}
    predictions = {method: prediction for method, prediction in predictions.items() if method not in failed}
    metadata = {"n_rows": len(table), "failed_methods": _failures_metadata(failures)}
    headline = table[(table["universe"] == "all_pairs") & table["metric"].isin(["epr", "auprc_ratio"])]
    if len(headline):
        metadata["headline"] = dg.MetadataValue.md(
            headline.pivot_table(index=["reference", "method"], columns="metric", values="value").round(3).to_markdown())
    for name, reference in references.items():
        metadata[f"pr_curves_{name}"] = png_metadata(pr_curves_png(predictions, reference, genes, reference_name=name))
        metadata[f"epr_{name}"] = png_metadata(epr_bar_chart_png(table, name))
    return dg.Output(table, metadata=metadata)

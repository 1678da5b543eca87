"""The model-derived gene networks: tokens, a Geneformer, per-study attention moments and attention edges,
and the cross-cell partial-correlation networks (per-study feature moments merged across studies)."""

import json
from pathlib import Path

import dagster as dg
import numpy as np

from scgrn_assets.metadata import plots_metadata, png_metadata, table_preview
from scgrn_assets.io_managers import file_artefact, output_path, table_artefact
from scgrn_assets.jobs import GPU_POOL, gpu_op_tags
from scgrn_assets.lib.benchmarks import (cross_cell_tables, log_normalized, model_genes, network_universe,
                                        study_feature_moments, tree_regulators)
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.network import (attention_edge_moments, build_corpus_dictionaries, convention_named,
                                      corpus_gene_keys, edge_table, EdgeMoments, FeatureMoments, load_geneformer,
                                      load_geneformer_dictionaries, merge_edge_moments, position_only_entropy,
                                      pick_device, save_geneformer, SmallGeneformerConfig, tokenize_cells, TokenizedCells,
                                      train_small_geneformer, TrainedGeneformer, training_report)
from scgrn_assets.lib.plotting import plot_histogram, plot_loss_curve
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.partitions import STUDY
from scgrn_assets.resources import BenchmarkSettings, GeneformerSettings, ScgrnStorage
from scgrn_assets.run_console import asset_progress



@dg.asset(group_name="network", io_manager_key="artefact_io_manager", kinds={"numpy"}, tags={"stage": "network"})
def tokenized_cells(context: dg.AssetExecutionContext, storage: ScgrnStorage, geneformer: GeneformerSettings,
                    combined_corpus):
    """Geneformer rank-value encoding of every corpus cell, with the dictionaries used
    (a pretrained model's, or built from the corpus's non-zero medians)."""
    corpus = read_corpus(combined_corpus)
    if geneformer.dictionary_dir:
        dictionaries = load_geneformer_dictionaries(geneformer.dictionary_dir)
    else:
        keys = corpus_gene_keys(corpus.var)
        dictionaries = build_corpus_dictionaries(corpus.X, corpus.obs["n_counts"].to_numpy(), keys,
                                                 convention_named(geneformer.convention))
    keys = corpus_gene_keys(corpus.var, dictionaries.gene_name_id)
    cells = tokenize_cells(corpus.X, corpus.obs["n_counts"].to_numpy(), keys, dictionaries,
                           progress=asset_progress(context, "tokenize", "cells"))
    folder = output_path(context, storage.layout)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        cells.save_npz(tmp / "cells.npz")
        dictionaries.save(tmp)
        np.save(tmp / "cell_study.npy", np.asarray(corpus.obs["study"].astype(str), dtype=str))
        (tmp / "gene_symbols.json").write_text(json.dumps(dict(zip(map(str, keys), corpus.var_names))))
    lengths = cells.lengths
    return dg.Output(folder, metadata={
        "n_cells": cells.n_cells, "vocabulary": dictionaries.vocab_size,
        "convention": dictionaries.convention.name,
        "median_tokens_per_cell": float(np.median(lengths)) if len(lengths) else 0.0,
        "tokens_per_cell": png_metadata(plot_histogram(lengths, "tokens per cell")),
    })


def load_tokenized(folder: Path) -> tuple[TokenizedCells, object, np.ndarray, dict]:
    cells = TokenizedCells.load_npz(folder / "cells.npz")
    dictionaries = load_geneformer_dictionaries(folder)
    dictionaries.convention = cells.convention
    studies = np.load(folder / "cell_study.npy", allow_pickle=False)
    symbols = json.loads((folder / "gene_symbols.json").read_text())
    return cells, dictionaries, studies, symbols


@dg.asset(group_name="network", io_manager_key="artefact_io_manager", kinds={"pytorch"}, pool=GPU_POOL,
          op_tags=gpu_op_tags(), tags={"stage": "network"})
def geneformer_model(context: dg.AssetExecutionContext, storage: ScgrnStorage, geneformer: GeneformerSettings,
                     tokenized_cells):
    """The Geneformer whose attention we read: a configured pretrained checkpoint, or (demo)
    a small Geneformer-architecture masked-LM trained here and saved with ``save_pretrained``."""
    folder = output_path(context, storage.layout)
    if geneformer.pretrained_model_dir:
        loaded = load_geneformer(geneformer.pretrained_model_dir, geneformer.dictionary_dir, device="cpu")
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            # A published checkpoint stays where it is: the artefact records which one was used.
            (tmp / "pretrained.json").write_text(json.dumps({
                "model_dir": str(Path(geneformer.pretrained_model_dir).resolve()),
                "dictionary_dir": geneformer.dictionary_dir}))
        return dg.Output(folder, metadata={"source": geneformer.pretrained_model_dir,
                                           "n_parameters": sum(p.numel() for p in loaded.model.parameters())})
    cells, dictionaries, _, _ = load_tokenized(tokenized_cells)
    config = SmallGeneformerConfig(max_steps=geneformer.train_steps, batch_size=geneformer.train_batch_size,
                                   min_loss_margin=geneformer.min_loss_margin)
    trained: TrainedGeneformer = train_small_geneformer(
        cells, dictionaries, config, device=geneformer.device,
        progress=asset_progress(context, "training (stops at the held-out gate)", "steps"))
    report = training_report(trained, geneformer.min_loss_margin)
    context.log.info(
        f"trained {report['n_steps']} steps in {report['seconds']:.0f} s: held-out masked-LM loss "
        f"{report['final_loss']:.3f} vs position-only entropy {report['position_only_entropy']:.3f} (margin "
        f"{report['margin']:.3f}, required {geneformer.min_loss_margin}); gate cleared at step "
        f"{report['cleared_at_step']}")
    save_geneformer(trained, folder)
    with atomic_path(folder / TRAINING_REPORT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    curve = trained.loss_curve
    return dg.Output(folder, metadata={
        "n_steps": len(curve), "final_loss": report["final_loss"], "held_out_cells": report["n_held_out_cells"],
        "cleared_at_step": report["cleared_at_step"] if report["cleared_at_step"] is not None else "not cleared",
        "position_only_entropy": report["position_only_entropy"], "loss_margin": report["margin"],
        "required_margin": geneformer.min_loss_margin if geneformer.min_loss_margin is not None else "none (gate off)",
        "training_seconds": report["seconds"], "device": str(pick_device(geneformer.device)),
        "n_parameters": sum(p.numel() for p in trained.model.parameters()),
        **plots_metadata(("loss_curve", plot_loss_curve, curve, "masked-LM loss (nats per masked token)",
                          trained.held_out_curve, report["position_only_entropy"])),
    })


TRAINING_REPORT = "training_report.json"
"""In a trained model's folder: :func:`scgrn_assets.lib.network.model.training_report`."""


def open_model(folder: Path, geneformer: GeneformerSettings):
    pretrained = folder / "pretrained.json"
    if pretrained.exists():
        source = json.loads(pretrained.read_text())
        return load_geneformer(source["model_dir"], source["dictionary_dir"], device=geneformer.device)
    return load_geneformer(folder, device=geneformer.device)


@dg.asset(partitions_def=STUDY, group_name="network", io_manager_key="artefact_io_manager",
          metadata=file_artefact(".npz"), kinds={"pytorch"}, pool=GPU_POOL, op_tags=gpu_op_tags(), tags={"stage": "network"})
def attention_moments(context: dg.AssetExecutionContext, storage: ScgrnStorage, geneformer: GeneformerSettings,
                      tokenized_cells, geneformer_model):
    """Per study: each cell's last-layer attention (summed over heads) on its first
    ``max_genes_per_cell`` genes → partial correlation → per-edge streaming moments (n, mean, M2),
    mergeable exactly across studies and machines."""
    cells, dictionaries, studies, _ = load_tokenized(tokenized_cells)
    selected = np.flatnonzero(studies == context.partition_key)
    loaded = open_model(geneformer_model, geneformer)
    # A model trained here saw only each cell's top-ranked tokens: later positions are untrained.
    max_input_length = None if geneformer.pretrained_model_dir else SmallGeneformerConfig().max_train_length
    moments = attention_edge_moments(
        loaded.model, cells.subset(selected), dictionaries, max_genes=geneformer.max_genes_per_cell,
        max_input_length=max_input_length,
        method=geneformer.pcorr_method, batch_size=geneformer.attention_batch_size, device=geneformer.device,
        layers=geneformer.attention_layers, heads=geneformer.attention_heads,
        progress=asset_progress(context, f"{context.partition_key} attention", "cells"))
    path = output_path(context, storage.layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    moments.save_npz(path)
    return dg.Output(path, metadata={"n_cells": len(selected), "n_edges": moments.n_edges,
                                     "n_genes": len(moments.gene_names)})


@dg.asset(group_name="network", io_manager_key="table_io_manager", metadata=table_artefact("edges"),
          kinds={"parquet", "duckdb"},
          ins={"attention_moments": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          tags={"stage": "network"})
def edge_stability(context: dg.AssetExecutionContext, attention_moments: dict,
                   tokenized_cells):
    """Moments merged across studies → one edge table (gene_i < gene_j, n_cells, pcorr mean/sd,
    stability = mean/sd); Parquet and DuckDB table ``edges``."""
    merged = merge_edge_moments([EdgeMoments.load_npz(path) for path in attention_moments.values()])
    _, _, _, symbols = load_tokenized(tokenized_cells)
    edges = edge_table(merged, symbols)
    finite = edges["stability"].replace([np.inf, -np.inf], np.nan).dropna()
    return dg.Output(edges, metadata={
        "n_edges": len(edges), "studies": sorted(attention_moments),
        "top_edges": table_preview(edges, n_rows=15),
        "stability": png_metadata(plot_histogram(finite.to_numpy(), "edge stability (mean / sd of pcorr)")),
    })


# ---------------------------------------------------------------------------------------------
# Cross-cell partial correlation
# ---------------------------------------------------------------------------------------------


@dg.asset(group_name="network", io_manager_key="artefact_io_manager", metadata=file_artefact(".json"), kinds={"json"},
          tags={"stage": "network"})
def gene_universe(context: dg.AssetExecutionContext, storage: ScgrnStorage, geneformer: GeneformerSettings,
                  benchmark: BenchmarkSettings, combined_corpus, tokenized_cells):
    """The genes every network method is computed and scored on: those the model can pair (among some
    cell's first ``max_genes_per_cell`` genes with another), at most ``max_universe_genes`` (TFs of
    ``benchmark.tf_list`` first, then the most variable by log-normalised expression)."""
    cells, dictionaries, _, symbols = load_tokenized(tokenized_cells)
    candidates = model_genes(cells, dictionaries, symbols, geneformer.max_genes_per_cell)
    corpus = read_corpus(combined_corpus)
    expression = log_normalized(corpus.X[:, corpus.var_names.get_indexer(candidates)],
                                corpus.obs["n_counts"].to_numpy())
    transcription_factors = (tree_regulators(benchmark.tf_list, candidates) or []) if benchmark.tf_list else []
    genes = network_universe(candidates, expression, geneformer.max_universe_genes, transcription_factors)
    key_of = {symbol: key for key, symbol in symbols.items()}
    path = output_path(context, storage.layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"genes": genes, "keys": [key_of.get(g, g) for g in genes]}))
    return dg.Output(path, metadata={"n_genes": len(genes), "n_model_genes": len(candidates),
                                     "n_transcription_factors": len(transcription_factors)})


def read_gene_universe(path: Path) -> tuple[list[str], list[str]]:
    """(symbols, dictionary keys) of the ``gene_universe`` artefact."""
    universe = json.loads(Path(path).read_text())
    return universe["genes"], universe["keys"]


@dg.asset(partitions_def=STUDY, group_name="network", io_manager_key="artefact_io_manager",
          kinds={"pytorch", "numpy"}, pool=GPU_POOL, op_tags=gpu_op_tags(), tags={"stage": "network"})
def network_moments(context: dg.AssetExecutionContext, storage: ScgrnStorage, geneformer: GeneformerSettings,
                    combined_corpus, tokenized_cells, geneformer_model, gene_universe):
    """Per study and per feature kind (rank-value tokens, hidden states, log expression), the mergeable
    sums n, Σx, Σxxᵀ (plus the Ledoit–Wolf fourth-moment sums) over the gene universe."""
    cells, dictionaries, studies, _ = load_tokenized(tokenized_cells)
    selected = np.flatnonzero(studies == context.partition_key)
    genes, keys = read_gene_universe(gene_universe)
    corpus = read_corpus(combined_corpus)
    study_cells = cells.subset(selected)
    model = open_model(geneformer_model, geneformer).model if "hidden_state" in geneformer.network_features else None
    max_input_length = None if geneformer.pretrained_model_dir else SmallGeneformerConfig().max_train_length
    folder = output_path(context, storage.layout)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        for kind in geneformer.network_features:
            moments = study_feature_moments(
                kind, genes, keys, cells=study_cells, dictionaries=dictionaries, model=model,
                values=corpus.X[selected], n_counts=corpus.obs["n_counts"].to_numpy()[selected],
                columns=corpus.var_names.get_indexer(genes), max_genes=geneformer.max_genes_per_cell,
                max_input_length=max_input_length, batch_size=geneformer.attention_batch_size,
                device=geneformer.device,
                progress=asset_progress(context, f"{context.partition_key} {kind}", "cells"))
            moments.save_npz(tmp / f"{kind}.npz")
    return dg.Output(folder, metadata={"n_cells": len(selected), "n_genes": len(genes),
                                       "features": list(geneformer.network_features)})


@dg.asset(group_name="network", io_manager_key="table_io_manager", kinds={"parquet", "duckdb"},
          ins={"network_moments": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          tags={"stage": "network"})
def network_edges(context: dg.AssetExecutionContext, geneformer: GeneformerSettings,
                  network_moments: dict, gene_universe):
    """Studies merged (each centred on its own mean) → Ledoit–Wolf shrunk covariance → partial correlations,
    one network per feature kind (``method`` = ``pcorr_<kind>``), with a leave-one-study-out stability;
    Parquet and DuckDB table ``network_edges``."""
    moments_by_kind = {kind: {study: FeatureMoments.load_npz(Path(folder) / f"{kind}.npz")
                              for study, folder in network_moments.items()}
                       for kind in geneformer.network_features}
    genes, keys = read_gene_universe(gene_universe)
    table, shrinkage = cross_cell_tables(moments_by_kind, dict(zip(keys, genes)))
    metadata = {"n_edges": len(table), "studies": sorted(network_moments),
                "ledoit_wolf_shrinkage": dg.MetadataValue.json(shrinkage)}
    for method, group in table.groupby("method"):
        metadata[f"top_edges_{method}"] = table_preview(group, n_rows=15)
        metadata[f"pcorr_{method}"] = png_metadata(plot_histogram(group["pcorr"].to_numpy(),
                                                                  f"{method}: partial correlation"))
    return dg.Output(table, metadata=metadata)

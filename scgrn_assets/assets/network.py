"""The attention-derived gene network: tokens, a Geneformer, per-study attention moments, edges."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd

from scgrn_assets.assets.metadata import png_metadata, table_preview
from scgrn_assets.io_managers import artefact_path
from scgrn_assets.jobs import GPU_POOL, gpu_op_tags
from scgrn_assets.lib.attention_network import attention_edge_moments, edge_table, merge_edge_moments, EdgeMoments
from scgrn_assets.lib.corpus import read_corpus
from scgrn_assets.lib.geneformer import (SmallGeneformerConfig, TrainedGeneformer, load_geneformer, save_geneformer,
                                         train_small_geneformer)
from scgrn_assets.lib.grn_pipeline import stable_edges
from scgrn_assets.lib.plots import plot_histogram, plot_loss_curve
from scgrn_assets.lib.sql_store import register_view, write_parquet
from scgrn_assets.lib.storage import atomic_path
from scgrn_assets.lib.tokenize import (TokenizedCells, build_corpus_dictionaries, convention_named, corpus_gene_keys,
                                       load_geneformer_dictionaries, tokenize_cells)
from scgrn_assets.partitions import study_partitions
from scgrn_assets.resources import GeneformerSettings, ScgrnStorage



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
                           progress=lambda done, total: context.log.info(f"tokenized {done}/{total} cells"))
    folder = artefact_path(storage.layout, "tokenized_cells", None)
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
    folder = artefact_path(storage.layout, "geneformer_model", None)
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
    config = SmallGeneformerConfig(n_steps=geneformer.train_steps, batch_size=geneformer.train_batch_size)

    def progress(step: int, n_steps: int, loss: float) -> None:
        if step % 25 == 0 or step == n_steps:
            context.log.info(f"step {step}/{n_steps}: masked-LM loss {loss:.3f}")

    trained: TrainedGeneformer = train_small_geneformer(cells, dictionaries, config, device=geneformer.device,
                                                        progress=progress)
    save_geneformer(trained, folder)
    curve = trained.loss_curve
    return dg.Output(folder, metadata={
        "n_steps": len(curve), "final_loss": float(np.nanmean(curve[-20:])) if len(curve) else float("nan"),
        "n_parameters": sum(p.numel() for p in trained.model.parameters()),
        "loss_curve": png_metadata(plot_loss_curve(curve, "masked-LM loss (nats per masked token)")),
    })


def open_model(folder: Path, geneformer: GeneformerSettings):
    pretrained = folder / "pretrained.json"
    if pretrained.exists():
        source = json.loads(pretrained.read_text())
        return load_geneformer(source["model_dir"], source["dictionary_dir"], device=geneformer.device)
    return load_geneformer(folder, device=geneformer.device)


@dg.asset(partitions_def=study_partitions, group_name="network", io_manager_key="artefact_io_manager",
          kinds={"pytorch"}, pool=GPU_POOL, op_tags=gpu_op_tags(), tags={"stage": "network"})
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
        progress=lambda done, total: context.log.info(f"{context.partition_key}: {done}/{total} cells"))
    path = artefact_path(storage.layout, "attention_moments", context.partition_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    moments.save_npz(path)
    return dg.Output(path, metadata={"n_cells": len(selected), "n_edges": moments.n_edges,
                                     "n_genes": len(moments.gene_names)})


@dg.asset(group_name="network", io_manager_key="artefact_io_manager", kinds={"parquet", "duckdb"},
          ins={"attention_moments": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          tags={"stage": "network"})
def edge_stability(context: dg.AssetExecutionContext, storage: ScgrnStorage, attention_moments: dict,
                   tokenized_cells):
    """Moments merged across studies → one edge table (gene_i < gene_j, n_cells, pcorr mean/sd,
    stability = mean/sd); Parquet and DuckDB table ``edges``."""
    merged = merge_edge_moments([EdgeMoments.load_npz(path) for path in attention_moments.values()])
    _, _, _, symbols = load_tokenized(tokenized_cells)
    edges = edge_table(merged, symbols)
    path = artefact_path(storage.layout, "edge_stability", None)
    write_parquet(edges, path)
    register_view(storage.layout.duckdb_path, "edges", path)
    finite = edges["stability"].replace([np.inf, -np.inf], np.nan).dropna()
    return dg.Output(path, metadata={
        "n_edges": len(edges), "studies": sorted(attention_moments),
        "top_edges": table_preview(edges, n_rows=15),
        "stability": png_metadata(plot_histogram(finite.to_numpy(), "edge stability (mean / sd of pcorr)")),
    })


def read_edges(path: Path, min_cells: int) -> pd.DataFrame:
    """The edge table without pairs seen in fewer than ``min_cells`` cells: with n = 2 or 3 the
    sample sd is tiny by chance and mean/sd explodes, which would put noise at the top."""
    return stable_edges(pd.read_parquet(path), min_cells)

"""The library's writers, each rewriting one deterministic artefact, for kill -9 tests.

``python -m scgrn_assets_tests.reliability.writers NAME OUT INPUTS`` prints ``ready`` and then
rewrites artefact ``NAME`` under ``OUT`` until it is killed, so that a SIGKILL lands mid-write.
:data:`WRITERS` names, for each, the final name it writes, how to write it and how to read it
back as a digest (what a user would read), so a test can compare a killed-then-rerun folder
with an uninterrupted write.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scgrn_assets_tests.reliability import scenarios


@dataclass(frozen=True)
class Writer:
    final_name: str
    write: Callable[[Path, Path], None]   # (out folder, inputs folder)
    read: Callable[[Path], str]
    slow: bool = False                    # imports transformers: ~30 s on a loaded 2-core machine


def prepare_inputs(inputs: Path) -> None:
    """The folder of inputs a writer may read (none reads any since tar extraction went)."""
    inputs.mkdir(parents=True, exist_ok=True)


def _edge_moments(out: Path, _inputs: Path) -> None:
    from scgrn_assets.lib.network.edge_moments import EdgeMoments

    rng = np.random.default_rng(1)
    n_edges = 600_000
    gene_i = np.sort(rng.integers(0, 1000, n_edges)).astype(np.int32)
    gene_j = gene_i + 1 + rng.integers(0, 999, n_edges).astype(np.int32)
    moments = EdgeMoments(np.array([f"g{index}" for index in range(2000)]), gene_i, gene_j,
                          rng.integers(1, 500, n_edges), rng.normal(size=n_edges), rng.random(n_edges))
    moments.save_npz(out / "moments.npz")


def _tokenized_cells(out: Path, _inputs: Path) -> None:
    from scgrn_assets.lib.network.dictionaries import V2
    from scgrn_assets.lib.network.tokens import TokenizedCells

    rng = np.random.default_rng(2)
    lengths = rng.integers(50, 2048, 2000)
    TokenizedCells(rng.integers(4, 20_000, lengths.sum()).astype(np.int32),
                   np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), V2).save_npz(out / "cells.npz")


def _parquet(out: Path, _inputs: Path) -> None:
    import pandas as pd

    from scgrn_assets.lib.sql_store import write_parquet

    rng = np.random.default_rng(3)
    n_rows = 400_000
    write_parquet(pd.DataFrame({"gene_i": rng.integers(0, 3000, n_rows), "gene_j": rng.integers(0, 3000, n_rows),
                                "weight": rng.normal(size=n_rows)}), out / "edges.parquet")


def _pickle(out: Path, _inputs: Path) -> None:
    from scgrn_assets.lib.network.dictionaries import save_pickle_atomic

    save_pickle_atomic({f"ENSMUSG{index:011d}": index for index in range(300_000)}, out / "token_dictionary.pkl")


def _geneformer_model(out: Path, _inputs: Path) -> None:
    import torch

    from scgrn_assets.lib.network.model import SmallGeneformerConfig, TrainedGeneformer, build_masked_lm, save_geneformer
    from scgrn_assets.lib.network.dictionaries import V2, GeneformerDictionaries

    torch.manual_seed(0)
    tokens = {name: index for index, name in enumerate(V2.special_tokens)}
    tokens.update({f"ENSMUSG{index:011d}": len(V2.special_tokens) + index for index in range(2000)})
    dictionaries = GeneformerDictionaries(tokens, {name: 1.0 for name in list(tokens)[len(V2.special_tokens):]}, V2)
    config = SmallGeneformerConfig(n_layers=4, hidden_size=256, n_heads=4, intermediate_size=512)
    model = build_masked_lm(dictionaries.vocab_size, V2.model_input_size, config)
    save_geneformer(TrainedGeneformer(model, dictionaries, np.linspace(1.0, 0.1, 50)), out / "geneformer_model")


WRITERS: dict[str, Writer] = {
    "edge_moments": Writer("moments.npz", _edge_moments, scenarios._read_npz),
    "tokenized_cells": Writer("cells.npz", _tokenized_cells, scenarios._read_npz),
    "parquet": Writer("edges.parquet", _parquet, scenarios._read_parquet),
    "pickle": Writer("token_dictionary.pkl", _pickle, scenarios._read_file_content),
    "geneformer_model": Writer("geneformer_model", _geneformer_model, scenarios._read_folder, slow=True),
}


def main(name: str, out: Path, inputs: Path) -> None:
    writer = WRITERS[name]
    writer.write(out.parent / f"{out.name}-warm-up", inputs)  # imports done before "ready"
    print("ready", flush=True)
    while True:  # rewrite until killed
        writer.write(out, inputs)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))

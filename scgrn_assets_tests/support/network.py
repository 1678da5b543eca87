"""Network-stage test support: partial-correlation references, random attention blocks, edge-moment frames,
a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from scgrn_assets.lib.network.dictionaries import V2, GeneformerDictionaries
from scgrn_assets.lib.network.edge_moments import EdgeMoments
from scgrn_assets.lib.network.model import SmallGeneformerConfig, build_masked_lm
from scgrn_assets.lib.network.tokens import TokenizedCells


SHRINKAGE = 1e-3


# Both backends compute in float64 (Cholesky of the SPD shrunk matrix); against the float64
# numpy pinv reference they agree to ~1e-13 on these inputs. The tolerance leaves headroom
# for the condition number (up to ~1e5 with λ = 1e-3), not for a lower precision.
PCORR_RTOL, PCORR_ATOL = 1e-9, 1e-10


BACKENDS = ["lapack", "torch"]


def numpy_pcorr(block: np.ndarray, shrinkage: float = SHRINKAGE) -> np.ndarray:
    """The original pipeline for one cell: cosine of rows, shrink to identity, pinv, normalise."""
    shrunk = (1 - shrinkage) * cosine_similarity(block) + shrinkage * np.eye(len(block))
    precision = np.linalg.pinv(shrunk)
    pcorr = -precision / np.sqrt(np.outer(np.diag(precision), np.diag(precision)))
    np.fill_diagonal(pcorr, 1.0)
    return pcorr


def random_blocks(n_cells: int, n_slots: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n_cells, n_slots, n_slots))
    return np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)


def random_cells(n_cells: int, n_slots: int, n_genes: int, seed: int):
    """Attention blocks, the gene in each slot (distinct, in no order) and a validity mask
    with 0, 1, a prefix or scattered valid slots per cell (padding holds garbage)."""
    rng = np.random.default_rng(seed)
    blocks = random_blocks(n_cells, n_slots, seed + 1000).astype(np.float32)
    gene_index = np.stack([rng.choice(n_genes, n_slots, replace=False) for _cell in range(n_cells)])
    valid = rng.random((n_cells, n_slots)) < rng.uniform(0.3, 1.0, size=(n_cells, 1))
    valid[0] = False
    valid[1] = np.arange(n_slots) == 2
    valid[2] = np.arange(n_slots) < n_slots - 3
    valid[3] = True
    blocks[~valid] = 7.0
    gene_index[~valid] = -5  # never read
    return blocks, gene_index, valid


ACCUMULATORS = [pytest.param(2**24, "numba", id="dense-numba"), pytest.param(2**24, "torch", id="dense-torch"),
                pytest.param(0, "auto", id="hash")]


def moments_frame(moments: EdgeMoments) -> pd.DataFrame:
    first, second = moments.gene_names[moments.gene_i], moments.gene_names[moments.gene_j]
    frame = pd.DataFrame({"i": np.where(first < second, first, second), "j": np.where(first < second, second, first),
                          "n": moments.n, "mean": moments.mean, "m2": moments.m2})
    return frame.set_index(["i", "j"]).sort_index()


def tiny_model_and_cells(n_cells=12, seed=0):
    rng = np.random.default_rng(seed)
    n_genes = 25
    token_dictionary = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3} | {f"ENSG{gene}": gene + 4
                                                                             for gene in range(n_genes)}
    dictionaries = GeneformerDictionaries(token_dictionary, {}, V2)
    cells = []
    for _cell in range(n_cells):
        genes = rng.choice(np.arange(4, 4 + n_genes), size=rng.integers(3, 16), replace=False)
        cells.append([2, *genes, 3])
    offsets = np.concatenate([[0], np.cumsum([len(cell) for cell in cells])])
    tokenized = TokenizedCells(np.concatenate(cells).astype(np.int32), offsets, V2)
    config = SmallGeneformerConfig(n_layers=2, hidden_size=32, n_heads=4, intermediate_size=64, seed=seed)
    model = build_masked_lm(dictionaries.vocab_size, 64, config).eval()
    return model, tokenized, dictionaries

"""Per-cell gene features for the cross-cell network, chunk by chunk, and the gene universe they cover.

The features, each a named method (:data:`FEATURE_KINDS`):

- ``rank_value``: the Geneformer rank-value encoding as a number, 1 − r / L for the gene at
  0-based rank r among a cell's first L gene tokens (L = min(gene tokens, ``max_genes``)), 0 when
  absent; what the model reads.
- ``hidden_state``: the model's last-layer hidden state of the gene's token, projected on the
  gene's own (unit-normalised) input embedding, 0 when absent; a fixed, data-free direction per
  gene, the same in every study, so studies merge.
- ``log_expression``: log1p(counts / n_counts × 10⁴), the classical Gaussian graphical model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.progress import Progress, report

FEATURE_KINDS = ("rank_value", "hidden_state", "log_expression")
"""The per-cell gene features, each a named method (see the module docstring)."""

# ---------------------------------------------------------------------------------------------
# Per-cell features
# ---------------------------------------------------------------------------------------------


def token_columns(token_names: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """Shape (vocab_size,), int64: the universe column of each token id, −1 for tokens outside it
    (special tokens included)."""
    column_of = {str(gene): index for index, gene in enumerate(genes)}
    return np.array([column_of.get(str(name), -1) if name is not None else -1 for name in token_names],
                    dtype=np.int64)


def rank_value_features(token_ids: np.ndarray, offsets: np.ndarray, columns_of_token: np.ndarray,
                        is_gene_token: np.ndarray, n_genes: int, max_genes: int) -> sp.csr_matrix:
    """Rank-value scores (``FEATURE_KINDS``' ``rank_value``) of a run of tokenised cells.

    Parameters
    ----------
    token_ids, offsets
        CSR-style cells (:class:`scgrn_assets.lib.network.tokens.TokenizedCells` fields, or a slice with
        offsets starting at 0).
    columns_of_token
        Shape (vocab_size,): :func:`token_columns`.
    is_gene_token
        Shape (vocab_size,), bool: False for special tokens (they take no rank).
    max_genes
        Gene tokens per cell that count (the attention path's ``max_genes_per_cell``).

    Returns
    -------
    scipy.sparse.csr_matrix
        Shape (n_cells, n_genes), float64: 1 − r / L at the gene's column, 0 elsewhere.
    """
    n_cells = len(offsets) - 1
    offsets = np.asarray(offsets, dtype=np.int64) - offsets[0]
    cell_of_token = np.repeat(np.arange(n_cells), np.diff(offsets))
    genes_only = is_gene_token[token_ids]
    cell_of_token, tokens = cell_of_token[genes_only], token_ids[genes_only]
    gene_counts = np.bincount(cell_of_token, minlength=n_cells)
    starts = np.r_[0, np.cumsum(gene_counts)[:-1]]
    rank = np.arange(len(tokens)) - starts[cell_of_token]
    length = np.minimum(gene_counts, max_genes)[cell_of_token]
    column = columns_of_token[tokens]
    keep = (rank < max_genes) & (column >= 0)
    values = 1.0 - rank[keep] / length[keep]
    return sp.csr_matrix((values, (cell_of_token[keep], column[keep])), shape=(n_cells, n_genes))


def rank_value_chunks(cells, dictionaries, genes: Sequence[str], *, max_genes: int, chunk_size: int = 2048,
                      progress: Progress | None = None):
    """Yield rank-value feature chunks (:func:`rank_value_features`) of ``cells``, ``chunk_size`` at a time."""
    columns = token_columns(dictionaries.token_names(), genes)
    is_gene = np.ones(dictionaries.vocab_size, dtype=bool)
    is_gene[dictionaries.special_token_ids] = False
    for start in range(0, cells.n_cells, chunk_size):
        stop = min(start + chunk_size, cells.n_cells)
        offsets = cells.offsets[start: stop + 1]
        yield rank_value_features(cells.token_ids[offsets[0]: offsets[-1]], offsets, columns, is_gene, len(genes),
                                  max_genes)
        report(progress, stop, cells.n_cells)


def log_expression_chunks(values: sp.spmatrix, n_counts: np.ndarray, columns: np.ndarray, *, chunk_size: int = 2048,
                          progress: Progress | None = None):
    """Yield log1p(counts / n_counts × 10⁴) of the ``columns`` of ``values`` (cells × all genes), by chunk."""
    from scgrn_assets.lib.benchmarks.expression import log_normalized

    values = sp.csr_matrix(values)
    for start in range(0, values.shape[0], chunk_size):
        stop = min(start + chunk_size, values.shape[0])
        yield log_normalized(values[start:stop][:, columns], n_counts[start:stop], dtype=np.float64)
        report(progress, stop, values.shape[0])


def hidden_state_chunks(model, cells, dictionaries, genes: Sequence[str], *, max_input_length: int | None = None,
                        batch_size: int = 32, device=None, progress: Progress | None = None):
    """Yield hidden-state features (``FEATURE_KINDS``' ``hidden_state``) of ``cells``, one batch at a time.

    The last layer's hidden state of each gene token, projected on the unit vector of that gene's
    input embedding: a fixed direction per gene that does not depend on the data, so every study
    is measured on the same axis and studies merge.
    """
    import torch

    from scgrn_assets.lib.network.model import pick_device

    device = pick_device(device)
    model = model.to(device).eval()
    encoder_model = getattr(model, "bert", model)
    embedding = encoder_model.embeddings.word_embeddings.weight.detach()
    direction = embedding / embedding.norm(dim=1, keepdim=True).clamp_min(1e-12)
    columns = torch.as_tensor(token_columns(dictionaries.token_names(), genes), device=device)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_input_length is not None:
        max_length = min(max_length, max_input_length) if max_length else max_input_length
    with torch.inference_mode():
        for start in range(0, cells.n_cells, batch_size):
            batch = np.arange(start, min(start + batch_size, cells.n_cells))
            input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                         for array in cells.padded(batch, max_length=max_length))
            hidden = encoder_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            projection = (hidden * direction[input_ids]).sum(dim=-1)
            column = columns[input_ids]
            keep = attention_mask.bool() & (column >= 0)
            row, position = torch.nonzero(keep, as_tuple=True)
            yield sp.csr_matrix((projection[row, position].double().cpu().numpy(),
                                 (row.cpu().numpy(), column[row, position].cpu().numpy())),
                                shape=(len(batch), len(genes)))
            report(progress, int(batch[-1]) + 1, cells.n_cells)


# ---------------------------------------------------------------------------------------------
# Gene universe
# ---------------------------------------------------------------------------------------------


def select_gene_universe(genes: Sequence[str], variance: np.ndarray, n_cells_detected: np.ndarray, *,
                         max_genes: int = 5000, min_cells: int = 20,
                         transcription_factors: Iterable[str] = ()) -> list[str]:
    """The genes a cross-cell network is computed over.

    Genes detected in at least ``min_cells`` cells; every listed TF among them first, then the
    most variable others (``variance``, e.g. of log-normalised expression) up to ``max_genes``.
    Returned in the order of ``genes``.
    """
    genes = np.asarray(genes, dtype=object)
    variance = np.asarray(variance, dtype=np.float64)
    candidates = np.flatnonzero(np.asarray(n_cells_detected) >= min_cells)
    tf_set = {str(t).upper() for t in transcription_factors}
    is_tf = np.array([str(genes[i]).upper() in tf_set for i in candidates], dtype=bool)
    # TFs first, then by descending variance; ties by column order (stable).
    order = np.lexsort((np.arange(len(candidates)), -variance[candidates], ~is_tf))
    chosen = np.sort(candidates[order[:max_genes]])
    return [str(g) for g in genes[chosen]]


def genes_seen_with_others(cells, dictionaries, max_genes: int) -> np.ndarray:
    """Dictionary keys of the genes among some cell's first ``max_genes`` gene tokens in a cell with at least
    two such tokens: the genes the attention step can pair (its edge table's genes), sorted by token id.

    Returns
    -------
    numpy.ndarray
        Shape (n_seen,), str.
    """
    is_gene = np.ones(dictionaries.vocab_size, dtype=bool)
    is_gene[dictionaries.special_token_ids] = False
    columns = np.arange(dictionaries.vocab_size)
    seen = np.zeros(dictionaries.vocab_size, dtype=bool)
    for start in range(0, cells.n_cells, 8192):
        stop = min(start + 8192, cells.n_cells)
        offsets = cells.offsets[start: stop + 1]
        features = rank_value_features(cells.token_ids[offsets[0]: offsets[-1]], offsets, columns, is_gene,
                                       dictionaries.vocab_size, max_genes)
        paired = np.diff(features.indptr) >= 2
        seen[features[paired].indices] = True
    return dictionaries.token_names()[np.flatnonzero(seen)].astype(str)

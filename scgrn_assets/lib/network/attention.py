"""Gene networks from Geneformer attention: attention → partial correlation → streaming edge moments → edge table.

Per cell, the last layer's attention (summed over heads) is restricted to the genes present
(first occurrence, at most ``max_genes``, highest-ranked first); a partial correlation
matrix is computed from that gene × gene block by a named method
(:mod:`scgrn_assets.lib.network.partial_correlation`); every gene pair's value updates
per-edge moments (n, mean, M2; :mod:`scgrn_assets.lib.network.edge_moments`). Moments merge
exactly with Chan et al.'s parallel formula, so batches, studies and machines combine into one
edge table (:func:`edge_table`).

On a GPU everything runs batched on torch. On the CPU the partial correlation runs one cell
at a time through LAPACK and the moments through a numba loop, one pass over the values:
about 2.5× less CPU time per cell there than the batched torch path (measured side by side).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.edge_moments import DEFAULT_MAX_DENSE_PAIRS, EdgeMomentAccumulator, EdgeMoments
from scgrn_assets.lib.network.model import pick_device
from scgrn_assets.lib.network.partial_correlation import partial_correlation_triangle
from scgrn_assets.lib.network.dictionaries import GeneformerDictionaries
from scgrn_assets.lib.network.tokens import TokenizedCells
from scgrn_assets.lib.progress import Progress, report

DEFAULT_MAX_GENES = 256


def first_gene_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_token_ids: torch.Tensor,
                     max_genes: int = DEFAULT_MAX_GENES) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first ``max_genes`` distinct gene tokens of each cell.

    A position qualifies when it is not padding, not a special token and its token has not
    appeared earlier in the cell. Cells are in rank order, so these are the top-ranked genes.

    Returns
    -------
    positions
        Shape (n_cells, max_genes), int64; 0 in unused slots.
    valid
        Shape (n_cells, max_genes), bool.
    """
    n_cells, length = input_ids.shape
    sorted_ids, order = torch.sort(input_ids, dim=1, stable=True)
    repeat_sorted = torch.zeros_like(input_ids, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    is_repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
    keep = attention_mask.bool() & ~torch.isin(input_ids, special_token_ids) & ~is_repeat
    slot = torch.cumsum(keep.to(torch.int64), dim=1) - 1
    keep &= slot < max_genes
    cell_index, position = torch.nonzero(keep, as_tuple=True)
    positions = torch.zeros((n_cells, max_genes), dtype=torch.int64, device=input_ids.device)
    valid = torch.zeros((n_cells, max_genes), dtype=torch.bool, device=input_ids.device)
    positions[cell_index, slot[cell_index, position]] = position
    valid[cell_index, slot[cell_index, position]] = True
    return positions, valid


def last_layer_attention_block(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               positions: torch.Tensor, layers: Sequence[int] | None = None,
                               heads: Sequence[int] | None = None) -> torch.Tensor:
    """Last-layer attention, summed over heads, between the tokens at ``positions``.

    The softmax runs over all (unpadded) keys as in the model; only the rows and columns
    at ``positions`` are kept, so memory is ``n_slots × length`` per head, not
    ``length²``. Computed from the last layer's input hidden state and its query/key
    projections, it equals the model's own eager attention weights (tested) and works
    whatever attention kernel the model runs with.

    Parameters
    ----------
    model
        A BERT (``BertModel`` or ``BertForMaskedLM``) in eval mode.
    input_ids, attention_mask
        Shape (n_cells, length), int64.
    positions
        Shape (n_cells, n_slots), int64.

    layers, heads
        Which layers (indices into the encoder's layers, negative from the end; default the last)
        and heads (default all) to read: heads are summed, layers averaged (the geneRNIB recipe
        averages every layer and head: pass ``range(n_layers)``; cosine similarity downstream
        makes sum and mean over heads equivalent).

    Returns
    -------
    torch.Tensor
        Shape (n_cells, n_slots, n_slots), float32: attention from slot row to slot column.
    """
    encoder_model = getattr(model, "bert", model)
    hidden_states = encoder_model(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=True).hidden_states
    n_layers = len(encoder_model.encoder.layer)
    chosen = [-1] if layers is None else list(layers)
    if not chosen or any(not -n_layers <= layer < n_layers for layer in chosen):
        raise ScgrnInputError(f"attention layers {chosen} are not among the model's {n_layers} layers",
                              fix=f"pass layer indices in [-{n_layers}, {n_layers - 1}]")
    blocks = [_layer_attention_block(encoder_model, hidden_states, layer % n_layers, attention_mask, positions, heads)
              for layer in chosen]
    return blocks[0] if len(blocks) == 1 else torch.stack(blocks).mean(dim=0)


def _layer_attention_block(encoder_model, hidden_states, layer: int, attention_mask: torch.Tensor,
                           positions: torch.Tensor, heads: Sequence[int] | None) -> torch.Tensor:
    last_input = hidden_states[layer]  # hidden_states[0] is the embeddings: the input of layer 0
    attention = encoder_model.encoder.layer[layer].attention.self
    n_cells, length, hidden_size = last_input.shape
    n_slots = positions.shape[1]
    n_heads, head_size = attention.num_attention_heads, attention.attention_head_size
    slot_states = last_input.gather(1, positions[:, :, None].expand(-1, -1, hidden_size))
    queries = attention.query(slot_states).view(n_cells, n_slots, n_heads, head_size).transpose(1, 2)
    keys = attention.key(last_input).view(n_cells, length, n_heads, head_size).transpose(1, 2)
    scores = (queries @ keys.transpose(-1, -2)) * attention.scaling
    scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores.float(), dim=-1)
    columns = positions[:, None, None, :].expand(-1, n_heads, n_slots, -1)
    per_head = probabilities.gather(-1, columns)
    if heads is not None:
        if not heads or any(not 0 <= head < n_heads for head in heads):
            raise ScgrnInputError(f"attention heads {list(heads)} are not among the layer's {n_heads} heads",
                                  fix=f"pass head indices in [0, {n_heads - 1}]")
        per_head = per_head[:, list(heads)]
    return per_head.sum(dim=1)


def sort_slots_by_gene(gene_index: torch.Tensor, valid: torch.Tensor,
                       n_genes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each cell's slots by gene, invalid slots last (as gene ``n_genes``).

    Returns
    -------
    sorted_genes, order, valid
        Shape (n_cells, n_slots) each: genes in ascending order, the slot each came from,
        and which sorted slots are valid (a prefix).
    """
    sorted_genes, order = torch.sort(torch.where(valid, gene_index, n_genes), dim=1)
    return sorted_genes, order, sorted_genes < n_genes


def add_attention_blocks(accumulator: EdgeMomentAccumulator, blocks: torch.Tensor, gene_index: torch.Tensor,
                         valid: torch.Tensor, method: str = "cosine_shrunk_pinv",
                         dtype: torch.dtype = torch.float64, **options) -> None:
    """One batch of the step: partial correlation of each cell's block, added to ``accumulator``.

    Slots are put in gene order (the partial correlation is read out in that order, the block
    is not permuted; nothing to do when the caller already extracted the block in that order,
    as :func:`attention_edge_moments` does), so the triangle form comes out in the
    accumulator's key order.

    Parameters
    ----------
    blocks
        Shape (n_cells, n_slots, n_slots): attention from gene (row) to gene (column).
    gene_index
        Shape (n_cells, n_slots), int64: the gene in each slot (distinct within a cell's valid slots).
    valid
        Shape (n_cells, n_slots), bool.
    method, options
        As in :func:`~scgrn_assets.lib.network.partial_correlation.partial_correlation`.
    dtype
        Precision of the partial correlation (float64 keeps λ = 1e-3 inversions accurate);
        ``blocks`` may be float32, the method casts it.
    """
    n_slots = valid.shape[1]
    sorted_genes, order, sorted_valid = sort_slots_by_gene(gene_index, valid, accumulator.n_genes)
    if bool((order == torch.arange(n_slots, device=order.device)).all()):
        order = None
    values = partial_correlation_triangle(blocks, valid, method, order=order, dtype=dtype, **options)
    accumulator.add_triangles(values, sorted_genes, sorted_valid.sum(dim=1))


def attention_edge_moments(
    model: torch.nn.Module,
    cells: TokenizedCells,
    dictionaries: GeneformerDictionaries,
    *,
    max_genes: int = DEFAULT_MAX_GENES,
    method: str = "cosine_shrunk_pinv",
    method_options: Mapping[str, object] | None = None,
    batch_size: int = 32,
    max_input_length: int | None = None,
    device: str | torch.device | None = None,
    pcorr_dtype: torch.dtype = torch.float64,
    attn_implementation: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    max_dense_pairs: int = DEFAULT_MAX_DENSE_PAIRS,
    threads: int | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> EdgeMoments:
    """Attention → partial correlation → per-edge moments for a set of cells (e.g. one study).

    Parameters
    ----------
    model
        A Geneformer BERT (:func:`scgrn_assets.lib.network.model.load_geneformer`); moved to ``device``.
    cells
        Tokenized cells, encoded with ``dictionaries``.
    dictionaries
        Gives the special tokens (never genes) and the gene name of each token.
    max_genes
        Genes per cell entering the block (first occurrence, highest rank first).
    method, method_options
        A name in :data:`~scgrn_assets.lib.network.partial_correlation.PCORR_METHODS` and its keyword
        options (default shrinkage 1e-3).
    batch_size
        Cells per forward pass; cells are batched by similar length to limit padding.
    max_input_length
        Tokens per cell fed to the model (the top-ranked ones); default the model's
        ``max_position_embeddings``. Pass the training length for a model trained here
        (``SmallGeneformerConfig.max_train_length``): later positions were never trained.
    pcorr_dtype
        Precision of the partial correlation (float64 keeps λ = 1e-3 inversions accurate).
    attn_implementation
        If given (e.g. ``"sdpa"``), the model is switched to that attention kernel first:
        the block is recomputed from the last layer's input, so eager weights are not needed
        and the fused kernel is much faster on a GPU.
    autocast_dtype
        If given (e.g. ``torch.bfloat16`` on a GPU), the model forward runs under autocast;
        the softmax and the partial correlation stay in float32/``pcorr_dtype``.
    max_dense_pairs
        Gene universes with ``n_genes² ≤ max_dense_pairs`` use the dense accumulator, larger
        ones the pair hash map.
    threads
        CPU threads (default ``torch.get_num_threads()``): the BLAS/LAPACK libraries are held
        to this many for the duration (threadpoolctl; ``torch.set_num_threads`` does not reach
        the OpenBLAS that numpy and scipy bring, which otherwise starts one busy-waiting thread
        per core for every per-cell ``syrk``/``potrf``/``potri``), and the hash map gets this
        many shards, each updated by its own numba thread.
    layers, heads
        Which layers and heads are read (:func:`last_layer_attention_block`); default the last
        layer, every head summed.
    progress
        Called as ``progress(n_cells_done, n_cells_total)`` after each batch.

    Returns
    -------
    EdgeMoments
        Over the genes present in ``cells``, named by dictionary key.
    """
    device = pick_device(device)
    model = model.to(device).eval()
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    method_options = dict(method_options or {})
    special_ids = torch.as_tensor(dictionaries.special_token_ids, device=device)
    is_gene_token = np.ones(dictionaries.vocab_size, dtype=bool)
    is_gene_token[dictionaries.special_token_ids] = False
    present_tokens = np.unique(cells.token_ids)
    present_tokens = present_tokens[is_gene_token[present_tokens]]
    # Compact gene index over the tokens present: keeps the dense accumulator small.
    token_to_gene = torch.full((dictionaries.vocab_size,), -1, dtype=torch.int64, device=device)
    token_to_gene[torch.as_tensor(present_tokens, dtype=torch.int64, device=device)] = torch.arange(
        len(present_tokens), device=device)
    gene_names = dictionaries.token_names()[present_tokens].astype(str)
    threads = max(1, int(threads or torch.get_num_threads()))
    accumulator = EdgeMomentAccumulator(gene_names, device, max_dense_pairs=max_dense_pairs, threads=threads)
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_input_length is not None:
        max_length = min(max_length, max_input_length) if max_length else max_input_length
    by_length = np.argsort(-cells.lengths, kind="stable")
    with torch.inference_mode(), threadpool_limits(limits=threads, user_api="blas"):
        for start in range(0, cells.n_cells, batch_size):
            batch = by_length[start: start + batch_size]
            input_ids, attention_mask = (torch.as_tensor(array, device=device)
                                         for array in cells.padded(batch, max_length=max_length))
            positions, valid = first_gene_slots(input_ids, attention_mask, special_ids, max_genes)
            # Cells are batched by length, so most batches need far fewer than max_genes slots.
            n_slots = max(int(valid.sum(dim=1).max()), 1)
            positions, valid = positions[:, :n_slots], valid[:, :n_slots]
            # Slots in gene order: the block comes out in the accumulator's key order, no permuting later.
            gene_index, order, valid = sort_slots_by_gene(
                token_to_gene[input_ids.gather(1, positions)], valid, accumulator.n_genes)
            positions = positions.gather(1, order)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                blocks = last_layer_attention_block(model, input_ids, attention_mask, positions, layers=layers,
                                                    heads=heads)
            add_attention_blocks(accumulator, blocks, gene_index, valid, method, dtype=pcorr_dtype, **method_options)
            report(progress, min(start + batch_size, cells.n_cells), cells.n_cells)
    return accumulator.result()


EDGE_COLUMNS = ["gene_i", "gene_j", "n_cells", "pcorr_mean", "pcorr_std", "stability", "abs_stability"]


def edge_table(moments: EdgeMoments, gene_symbols: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per gene pair: the stability of its partial correlation across cells.

    Parameters
    ----------
    moments
        Merged moments (all studies).
    gene_symbols
        Gene key (Ensembl ID) → symbol; keys without an entry are shown as they are.

    Returns
    -------
    pd.DataFrame
        Columns ``gene_i``, ``gene_j`` (symbols, ``gene_i < gene_j``), ``n_cells``,
        ``pcorr_mean``, ``pcorr_std`` (sample sd, ddof=1), ``stability`` = mean/std and
        ``abs_stability``; both NaN when ``n_cells < 2`` (±inf when std is 0). Sorted by
        descending ``abs_stability``, NaN last.
    """
    gene_symbols = gene_symbols or {}
    symbols = np.array([gene_symbols.get(name, name) for name in moments.gene_names.astype(str)], dtype=object)
    first, second = symbols[moments.gene_i], symbols[moments.gene_j]
    swap = second < first
    gene_i = np.where(swap, second, first)
    gene_j = np.where(swap, first, second)
    n_cells = moments.n.astype(np.int64)
    enough = n_cells >= 2
    variance = np.divide(moments.m2, n_cells - 1, out=np.full(len(n_cells), np.nan), where=enough)
    pcorr_std = np.sqrt(variance)
    with np.errstate(divide="ignore", invalid="ignore"):
        stability = np.where(enough, moments.mean / pcorr_std, np.nan)
    table = pd.DataFrame({
        "gene_i": gene_i.astype(str), "gene_j": gene_j.astype(str), "n_cells": n_cells,
        "pcorr_mean": moments.mean.astype(np.float64), "pcorr_std": pcorr_std,
        "stability": stability, "abs_stability": np.abs(stability),
    }, columns=EDGE_COLUMNS)
    return table.sort_values("abs_stability", ascending=False, na_position="last", kind="stable",
                             ignore_index=True)
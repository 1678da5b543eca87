"""Attention → partial correlation → edge moments, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from scgrn_assets.lib.network.attention import (
    EDGE_COLUMNS,
    add_attention_blocks,
    attention_edge_moments,
    edge_table,
    first_gene_slots,
    last_layer_attention_block,
)
from scgrn_assets.lib.network.edge_moments import EdgeMomentAccumulator, EdgeMoments, merge_edge_moments
from scgrn_assets.lib.network.partial_correlation import partial_correlation
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dictionaries import V2
from scgrn_assets.lib.network.tokens import TokenizedCells
from scgrn_assets_tests.support.network import (ACCUMULATORS, BACKENDS, PCORR_ATOL, PCORR_RTOL, SHRINKAGE,
                                                moments_frame, numpy_pcorr, random_cells, tiny_model_and_cells)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_moments(blocks, gene_index, valid, names):
    """One cell at a time: numpy pinv partial correlation, every valid pair, two-pass moments."""
    values: dict[tuple[str, str], list[float]] = {}
    for cell in range(len(blocks)):
        kept = np.flatnonzero(valid[cell])
        if len(kept) < 2:
            continue
        pcorr = numpy_pcorr(blocks[cell][np.ix_(kept, kept)].astype(np.float64))
        for row in range(len(kept)):
            for column in range(row + 1, len(kept)):
                pair = tuple(sorted((names[gene_index[cell, kept[row]]], names[gene_index[cell, kept[column]]])))
                values.setdefault(pair, []).append(pcorr[row, column])
    frame = pd.DataFrame([(i, j, len(v), np.mean(v), np.sum((np.array(v) - np.mean(v)) ** 2))
                          for (i, j), v in values.items()], columns=["i", "j", "n", "mean", "m2"])
    return frame.set_index(["i", "j"]).sort_index()


@pytest.mark.parametrize(("max_dense_pairs", "backend"), ACCUMULATORS)
@pytest.mark.parametrize("pcorr_backend", BACKENDS)
def test_attention_blocks_in_random_batches_and_splits_match_per_cell_reference(max_dense_pairs, backend,
                                                                                 pcorr_backend):
    # 40 genes, 11 slots per cell: genes absent from many cells, pairs seen 0 to ~10 times.
    blocks, gene_index, valid = random_cells(60, 11, 40, seed=7)
    names = np.array([f"gene{index:02d}" for index in range(40)])
    reference = reference_moments(blocks, gene_index, valid, names)
    rng = np.random.default_rng(8)
    parts = []
    for part in np.split(rng.permutation(60), [17, 41]):  # machines, each with its own gene numbering
        numbering = rng.permutation(40)
        local = np.where(valid[part], np.argsort(numbering)[np.clip(gene_index[part], 0, None)], -1)
        accumulator = EdgeMomentAccumulator(names[numbering], max_dense_pairs=max_dense_pairs, backend=backend)
        for batch in np.array_split(np.arange(len(part)), 3):
            add_attention_blocks(accumulator, torch.as_tensor(blocks[part][batch]), torch.as_tensor(local[batch]),
                                 torch.as_tensor(valid[part][batch]), shrinkage=SHRINKAGE, backend=pcorr_backend)
        result = accumulator.result()
        # Lexicographically sorted pairs, low < high.
        assert np.all(np.diff(result.gene_i.astype(np.int64) * 40 + result.gene_j) > 0)
        parts.append(result)
    got = moments_frame(merge_edge_moments(parts))
    assert got.index.equals(reference.index)
    np.testing.assert_array_equal(got["n"], reference["n"])
    np.testing.assert_allclose(got["mean"], reference["mean"], rtol=PCORR_RTOL, atol=PCORR_ATOL)
    np.testing.assert_allclose(got["m2"], reference["m2"], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("max_dense_pairs", "backend"), ACCUMULATORS)
def test_add_pcorr_blocks_equals_add_attention_blocks(max_dense_pairs, backend):
    blocks, gene_index, valid = random_cells(12, 9, 20, seed=9)
    names = [f"g{index}" for index in range(20)]
    genes, valid_t = torch.as_tensor(np.clip(gene_index, 0, None)), torch.as_tensor(valid)
    full = EdgeMomentAccumulator(names, max_dense_pairs=max_dense_pairs, backend=backend)
    full.add_pcorr_blocks(partial_correlation(torch.as_tensor(blocks), valid_t, dtype=torch.float64), genes, valid_t)
    fused = EdgeMomentAccumulator(names, max_dense_pairs=max_dense_pairs, backend=backend)
    add_attention_blocks(fused, torch.as_tensor(blocks), genes, valid_t)
    first, second = moments_frame(full.result()), moments_frame(fused.result())
    assert first.index.equals(second.index)
    np.testing.assert_array_equal(first["n"], second["n"])
    np.testing.assert_allclose(first[["mean", "m2"]], second[["mean", "m2"]], rtol=1e-12, atol=1e-13)


def test_edge_table_columns_and_statistics():
    names = np.array(["ENSG3", "ENSG1", "ENSG2"])
    rng = np.random.default_rng(7)
    samples = {(0, 1): rng.normal(0.2, 0.05, 9), (0, 2): rng.normal(-0.4, 0.05, 30), (1, 2): np.array([0.3])}
    moments = EdgeMoments(
        names, np.array([0, 0, 1], np.int32), np.array([1, 2, 2], np.int32),
        np.array([len(value) for value in samples.values()]), np.array([value.mean() for value in samples.values()]),
        np.array([((value - value.mean()) ** 2).sum() for value in samples.values()]))
    table = edge_table(moments, {"ENSG1": "Zfp1", "ENSG2": "Actb", "ENSG3": "Gapdh"})
    assert list(table.columns) == EDGE_COLUMNS
    assert (table["gene_i"] < table["gene_j"]).all()
    row = table.set_index(["gene_i", "gene_j"]).loc[("Actb", "Gapdh")]
    values = samples[(0, 2)]
    assert row["n_cells"] == 30
    assert row["pcorr_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert row["stability"] == pytest.approx(values.mean() / np.std(values, ddof=1), rel=1e-12)
    assert row["abs_stability"] == pytest.approx(abs(row["stability"]))
    single = table.set_index(["gene_i", "gene_j"]).loc[("Actb", "Zfp1")]
    assert np.isnan(single["pcorr_std"]) and np.isnan(single["stability"]) and np.isnan(single["abs_stability"])
    assert table["abs_stability"].iloc[0] >= table["abs_stability"].iloc[1]
    assert np.isnan(table["abs_stability"].iloc[-1])


def brute_force_first_slots(input_ids, attention_mask, special, max_genes):
    positions = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        seen, kept = set(), []
        for position, (token, unmasked) in enumerate(zip(ids, mask)):
            if unmasked and token not in special and token not in seen and len(kept) < max_genes:
                kept.append(position)
            seen.add(token)
        positions.append(kept)
    return positions


def test_first_gene_slots_against_loop():
    rng = np.random.default_rng(8)
    input_ids = torch.as_tensor(rng.integers(0, 12, size=(20, 15)))
    attention_mask = torch.as_tensor((np.arange(15)[None, :] < rng.integers(1, 16, size=(20, 1))).astype(np.int64))
    special = {0, 1, 2, 3}
    positions, valid = first_gene_slots(input_ids, attention_mask, torch.tensor(sorted(special)), max_genes=5)
    expected = brute_force_first_slots(input_ids, attention_mask, special, 5)
    for cell, kept in enumerate(expected):
        assert positions[cell][valid[cell]].tolist() == kept
        assert valid[cell].sum() == len(kept)


def test_last_layer_block_equals_eager_attention_weights():
    model, cells, dictionaries = tiny_model_and_cells()
    input_ids, attention_mask = (torch.as_tensor(array) for array in cells.padded(np.arange(cells.n_cells)))
    positions, valid = first_gene_slots(input_ids, attention_mask, torch.as_tensor(dictionaries.special_token_ids),
                                        max_genes=8)
    with torch.no_grad():
        block = last_layer_attention_block(model, input_ids, attention_mask, positions)
        eager = model.bert(input_ids=input_ids, attention_mask=attention_mask,
                           output_attentions=True).attentions[-1].sum(dim=1)
    for cell in range(cells.n_cells):
        kept = positions[cell][valid[cell]]
        n_kept = len(kept)
        torch.testing.assert_close(block[cell, :n_kept, :n_kept], eager[cell][kept][:, kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_dense_pairs", [2**24, 0], ids=["dense", "hash"])
def test_attention_edge_moments_match_one_cell_at_a_time(max_dense_pairs):
    model, cells, dictionaries = tiny_model_and_cells(n_cells=14, seed=1)
    max_genes = 6
    names = dictionaries.token_names()
    welford: dict[tuple[str, str], list[float]] = {}
    with torch.no_grad():
        for cell in range(cells.n_cells):
            ids = torch.as_tensor(cells.cell(cell), dtype=torch.int64)[None]
            attention = model.bert(input_ids=ids, output_attentions=True).attentions[-1][0].sum(dim=0).numpy()
            kept = brute_force_first_slots(ids, torch.ones_like(ids), {0, 1, 2, 3}, max_genes)[0]
            pcorr = numpy_pcorr(attention[np.ix_(kept, kept)].astype(np.float64))
            for row in range(len(kept)):
                for column in range(row + 1, len(kept)):
                    pair = tuple(sorted((names[ids[0, kept[row]]], names[ids[0, kept[column]]])))
                    welford.setdefault(pair, []).append(pcorr[row, column])
    progress = []
    moments = attention_edge_moments(model, cells, dictionaries, max_genes=max_genes, batch_size=4, device="cpu",
                                     max_dense_pairs=max_dense_pairs,
                                     progress=lambda done, total: progress.append((done, total)))
    got = moments_frame(moments)
    assert len(got) == len(welford)
    assert progress[-1] == (14, 14)
    for pair, values in welford.items():
        row = got.loc[pair]
        assert row["n"] == len(values)
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert row["m2"] == pytest.approx(np.sum((np.array(values) - np.mean(values)) ** 2), abs=1e-6)


def test_max_input_length_reads_only_the_top_ranked_tokens():
    model, cells, dictionaries = tiny_model_and_cells(n_cells=10, seed=2)
    truncated_lists = [cells.cell(cell)[:7] for cell in range(cells.n_cells)]
    truncated = TokenizedCells(np.concatenate(truncated_lists),
                               np.concatenate([[0], np.cumsum([len(tokens) for tokens in truncated_lists])]), V2)
    capped = attention_edge_moments(model, cells, dictionaries, max_genes=10, max_input_length=7, device="cpu")
    expected = attention_edge_moments(model, truncated, dictionaries, max_genes=10, device="cpu")
    full = attention_edge_moments(model, cells, dictionaries, max_genes=10, device="cpu")
    got, want = moments_frame(capped), moments_frame(expected)
    assert got.index.equals(want.index)
    np.testing.assert_allclose(got["mean"], want["mean"], atol=1e-6)
    assert len(moments_frame(full)) > len(got)


def test_chosen_layers_and_heads_equal_the_eager_weights_averaged():
    model, cells, dictionaries = tiny_model_and_cells()
    input_ids, attention_mask = (torch.as_tensor(array) for array in cells.padded(np.arange(cells.n_cells)))
    positions, valid = first_gene_slots(input_ids, attention_mask, torch.as_tensor(dictionaries.special_token_ids),
                                        max_genes=8)
    with torch.no_grad():
        eager = model.bert(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
        every = last_layer_attention_block(model, input_ids, attention_mask, positions, layers=[0, 1])
        some = last_layer_attention_block(model, input_ids, attention_mask, positions, layers=[0], heads=[1, 3])
    expected_every = (eager[0].sum(dim=1) + eager[1].sum(dim=1)) / 2
    expected_some = eager[0][:, [1, 3]].sum(dim=1)
    for cell in range(cells.n_cells):
        kept = positions[cell][valid[cell]]
        n_kept = len(kept)
        torch.testing.assert_close(every[cell, :n_kept, :n_kept], expected_every[cell][kept][:, kept],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(some[cell, :n_kept, :n_kept], expected_some[cell][kept][:, kept],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ScgrnInputError, match="layers"):
        last_layer_attention_block(model, input_ids, attention_mask, positions, layers=[5])
    with pytest.raises(ScgrnInputError, match="heads"):
        last_layer_attention_block(model, input_ids, attention_mask, positions, heads=[4])



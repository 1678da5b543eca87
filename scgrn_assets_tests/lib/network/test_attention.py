"""Attention → partial correlation → edge moments, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

from scgrn_assets.lib.network.attention import (
    EDGE_COLUMNS,
    add_attention_blocks,
    attention_edge_moments,
    edge_table,
    first_gene_slots,
    last_layer_attention_block,
)
from scgrn_assets.lib.network.edge_moments import EdgeMomentAccumulator, EdgeMoments, merge_edge_moments
from scgrn_assets.lib.network.partial_correlation import (
    PCORR_METHODS,
    partial_correlation,
    partial_correlation_triangle,
    triangle_pairs,
)
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.model import SmallGeneformerConfig, build_masked_lm
from scgrn_assets.lib.network.dictionaries import V2, GeneformerDictionaries
from scgrn_assets.lib.network.tokens import TokenizedCells

SHRINKAGE = 1e-3
# Both backends compute in float64 (Cholesky of the SPD shrunk matrix); against the float64
# numpy pinv reference they agree to ~1e-13 on these inputs. The tolerance leaves headroom
# for the condition number (up to ~1e5 with λ = 1e-3), not for a lower precision.
PCORR_RTOL, PCORR_ATOL = 1e-9, 1e-10
BACKENDS = ["lapack", "torch"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_matches_numpy_pinv(backend):
    blocks = random_blocks(6, 12, seed=0)
    pcorr = partial_correlation(torch.as_tensor(blocks), backend=backend).numpy()
    for cell in range(6):
        np.testing.assert_allclose(pcorr[cell], numpy_pcorr(blocks[cell]), rtol=PCORR_RTOL, atol=PCORR_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_ignores_invalid_slots(backend):
    blocks = random_blocks(3, 10, seed=1)
    valid = np.ones((3, 10), dtype=bool)
    valid[0, 6:] = False
    valid[2, [1, 4, 9]] = False
    blocks[~valid] = 123.0  # garbage in padded rows must not leak
    pcorr = partial_correlation(torch.as_tensor(blocks), torch.as_tensor(valid), backend=backend).numpy()
    for cell in range(3):
        kept = np.flatnonzero(valid[cell])
        expected = numpy_pcorr(blocks[cell][np.ix_(kept, kept)])
        np.testing.assert_allclose(pcorr[cell][np.ix_(kept, kept)], expected, rtol=PCORR_RTOL, atol=PCORR_ATOL)
        dropped = np.flatnonzero(~valid[cell])
        assert np.all(pcorr[cell][dropped, :] == 0) and np.all(pcorr[cell][:, dropped] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_correlation_of_a_singular_block_still_matches_pinv(backend):
    # Identical attention rows: the cosine matrix is rank-deficient, shrinkage keeps it invertible.
    block = np.tile(random_blocks(1, 8, seed=2)[0, :1], (8, 1))
    pcorr = partial_correlation(torch.as_tensor(block[None]), backend=backend).numpy()[0]
    np.testing.assert_allclose(pcorr, numpy_pcorr(block), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_cholesky_falls_back_to_pinv(backend):
    # λ = 0 and an all-zero attention row: the cosine matrix has a zero row and column, the
    # Cholesky factorisation fails at that pivot, and the pseudo-inverse is the inverse of the
    # cosine matrix of the other rows (plus zeros). Pairs with the zero gene are 0/0, not compared.
    blocks = random_blocks(2, 8, seed=4)
    blocks[1, 3, :] = 0.0
    cosine = blocks[1] / np.linalg.norm(blocks[1], axis=1, keepdims=True).clip(1e-300)
    assert np.linalg.cholesky(cosine @ cosine.T + np.eye(8) * np.eye(8)[3]) is not None  # only the pivot is 0
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(cosine @ cosine.T)
    pcorr = partial_correlation(torch.as_tensor(blocks), shrinkage=0.0, backend=backend).numpy()
    np.testing.assert_allclose(pcorr[0], numpy_pcorr(blocks[0], shrinkage=0.0), rtol=1e-6, atol=1e-8)
    others = np.array([0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_allclose(pcorr[1][np.ix_(others, others)],
                               numpy_pcorr(blocks[1][others], shrinkage=0.0), rtol=1e-6, atol=1e-8)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("permuted", [False, True], ids=["slot_order", "permuted"])
def test_triangle_form_matches_numpy_per_cell(backend, permuted):
    blocks, _genes, valid = random_cells(9, 11, 50, seed=5)
    rng = np.random.default_rng(6)
    order = np.stack([rng.permutation(11) for _cell in range(9)]) if permuted else None
    rows, columns = (index.numpy() for index in triangle_pairs(11))
    # float32 blocks, float64 computation: the cast happens per cell and changes nothing.
    got = partial_correlation_triangle(torch.as_tensor(blocks), torch.as_tensor(valid), backend=backend,
                                       order=None if order is None else torch.as_tensor(order),
                                       dtype=torch.float64).numpy()
    assert got.shape == (9, 55) and got.dtype == np.float64
    for cell in range(9):
        kept = np.flatnonzero(valid[cell])
        expected = np.zeros((11, 11))
        if len(kept):
            expected[np.ix_(kept, kept)] = numpy_pcorr(blocks[cell][np.ix_(kept, kept)].astype(np.float64))
        slots = np.arange(11) if order is None else order[cell]
        np.testing.assert_allclose(got[cell], expected[slots[rows], slots[columns]], rtol=PCORR_RTOL, atol=PCORR_ATOL)
    same = partial_correlation_triangle(torch.as_tensor(blocks.astype(np.float64)), torch.as_tensor(valid),
                                        backend=backend, order=None if order is None else torch.as_tensor(order))
    np.testing.assert_array_equal(same.numpy(), got)


def test_partial_correlation_methods_are_named():
    assert "cosine_shrunk_pinv" in PCORR_METHODS
    blocks = torch.as_tensor(random_blocks(2, 5, seed=3))
    stronger = partial_correlation(blocks, method="cosine_shrunk_pinv", shrinkage=0.5).numpy()
    np.testing.assert_allclose(stronger[1], numpy_pcorr(blocks[1].numpy(), shrinkage=0.5), rtol=1e-9)
    with pytest.raises(ScgrnInputError, match="cosine_shrunk_pinv"):
        partial_correlation(blocks, method="no_such_method")


def random_observations(seed: int, n_genes: int = 15, n_values: int = 3000):
    rng = np.random.default_rng(seed)
    gene_a = rng.integers(0, n_genes, n_values)
    gene_b = rng.integers(0, n_genes, n_values)
    distinct = gene_a != gene_b
    gene_a, gene_b = gene_a[distinct], gene_b[distinct]
    # A large common offset makes naive sum-of-squares formulas lose precision; two-pass does not.
    values = 5.0 + rng.normal(0, 0.01, len(gene_a)) + 0.001 * gene_a
    return gene_a, gene_b, values


def two_pass_reference(names: np.ndarray, gene_a, gene_b, values) -> pd.DataFrame:
    first, second = names[gene_a], names[gene_b]
    frame = pd.DataFrame({"i": np.where(first < second, first, second), "j": np.where(first < second, second, first),
                          "value": values})
    grouped = frame.groupby(["i", "j"])["value"]
    return pd.DataFrame({"n": grouped.size(), "mean": grouped.mean(), "sd": grouped.std(ddof=1),
                         "m2": grouped.apply(lambda column: float(((column - column.mean()) ** 2).sum()))})


def moments_frame(moments: EdgeMoments) -> pd.DataFrame:
    first, second = moments.gene_names[moments.gene_i], moments.gene_names[moments.gene_j]
    frame = pd.DataFrame({"i": np.where(first < second, first, second), "j": np.where(first < second, second, first),
                          "n": moments.n, "mean": moments.mean, "m2": moments.m2})
    return frame.set_index(["i", "j"]).sort_index()


ACCUMULATORS = [pytest.param(2**24, "numba", id="dense-numba"), pytest.param(2**24, "torch", id="dense-torch"),
                pytest.param(0, "auto", id="hash")]


@pytest.mark.parametrize(("max_dense_pairs", "backend"), ACCUMULATORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merged_moments_equal_two_pass_of_concatenated_data(seed, max_dense_pairs, backend):
    names = np.array([f"gene{index:02d}" for index in range(15)])
    gene_a, gene_b, values = random_observations(seed)
    reference = two_pass_reference(names, gene_a, gene_b, values)
    rng = np.random.default_rng(seed + 100)
    cuts = np.sort(rng.choice(np.arange(1, len(values)), size=5, replace=False))
    parts = []
    for part_index, part in enumerate(np.split(rng.permutation(len(values)), cuts)):
        # Each part (study/machine) numbers genes its own way: a shuffled universe.
        order = rng.permutation(len(names))
        position = np.argsort(order)
        # Odd parts start the hash map at 2 slots: it is rebuilt many times, mid-batch.
        accumulator = EdgeMomentAccumulator(names[order], max_dense_pairs=max_dense_pairs,
                                            initial_capacity=2 if part_index % 2 else 2**16, backend=backend)
        for batch in np.array_split(part, 3):
            accumulator.add(torch.as_tensor(position[gene_a[batch]]), torch.as_tensor(position[gene_b[batch]]),
                            torch.as_tensor(values[batch]))
        parts.append(accumulator.result())
    merged = merge_edge_moments(parts)
    assert np.all(merged.gene_i < merged.gene_j)
    got = moments_frame(merged)
    assert got.index.equals(reference.index)
    np.testing.assert_array_equal(got["n"], reference["n"])
    np.testing.assert_allclose(got["mean"], reference["mean"], rtol=1e-13)
    np.testing.assert_allclose(got["m2"], reference["m2"], rtol=1e-8, atol=1e-14)
    # Pairwise merge (EdgeMoments.merge) agrees with the k-way merge.
    pairwise = parts[0]
    for part in parts[1:]:
        pairwise = pairwise.merge(part)
    np.testing.assert_allclose(moments_frame(pairwise)["m2"], got["m2"], rtol=1e-10, atol=1e-14)


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


def test_add_triangles_refuses_unsorted_genes():
    accumulator = EdgeMomentAccumulator([f"g{index}" for index in range(5)])
    with pytest.raises(ValueError, match="ascending"):
        accumulator.add_triangles(torch.zeros(1, 3, dtype=torch.float64), torch.tensor([[0, 3, 2]]), torch.tensor([3]))


def test_moments_npz_roundtrip(tmp_path):
    names = np.array(["a", "b", "c"])
    moments = EdgeMoments(names, np.array([0, 1], np.int32), np.array([2, 2], np.int32), np.array([3, 1]),
                          np.array([0.5, -0.25]), np.array([0.1, 0.0]))
    loaded = EdgeMoments.load_npz(moments.save_npz(tmp_path / "moments.npz"))
    for field in ("gene_names", "gene_i", "gene_j", "n", "mean", "m2"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(moments, field))
    assert [path.name for path in tmp_path.iterdir()] == ["moments.npz"]


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


def test_within_cell_standardised_pcorr_matches_numpy_and_its_spread_does_not_depend_on_cell_length():
    from scgrn_assets.lib.network.partial_correlation import standardized_within_cell

    # Against a per-cell numpy computation, with invalid slots.
    blocks = torch.as_tensor(random_blocks(3, 7, seed=12))
    valid = torch.ones((3, 7), dtype=torch.bool)
    valid[1, 5:] = False
    z = partial_correlation(blocks, valid, method="cosine_shrunk_pinv_cell_z", shrinkage=SHRINKAGE).numpy()
    for cell in range(3):
        n = int(valid[cell].sum())
        raw = numpy_pcorr(blocks[cell, :n, :n].numpy(), shrinkage=SHRINKAGE)
        off = ~np.eye(n, dtype=bool)
        expected = (raw - raw[off].mean()) / raw[off].std(ddof=1)
        np.testing.assert_allclose(z[cell, :n, :n][off], expected[off], rtol=1e-9, atol=1e-10)
        assert (z[cell, n:, :] == 0).all() and (np.diag(z[cell])[:n] == 1).all()
    assert (standardized_within_cell(torch.zeros((1, 3, 3)), torch.ones((1, 3), dtype=torch.bool))[0, 0, 1] == 0)

    # Raw per-cell pcorr spreads less in longer cells; the standardised statistic does not.
    spreads_raw, spreads_z = {}, {}
    for length in (20, 80):
        blocks = torch.as_tensor(random_blocks(30, length, seed=length))
        full_valid = torch.ones((30, length), dtype=torch.bool)
        raw = partial_correlation(blocks, full_valid, shrinkage=SHRINKAGE).numpy()
        standardised = partial_correlation(blocks, full_valid, method="cosine_shrunk_pinv_cell_z",
                                           shrinkage=SHRINKAGE).numpy()
        off = ~np.eye(length, dtype=bool)
        spreads_raw[length] = np.median([cell[off].std() for cell in raw])
        spreads_z[length] = np.median([cell[off].std() for cell in standardised])
    assert spreads_raw[20] > 1.5 * spreads_raw[80]
    assert spreads_z[20] == pytest.approx(spreads_z[80], rel=0.05)

"""Cross-cell partial correlation from mergeable per-study moments, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.covariance import ledoit_wolf

from scgrn_assets.lib.network.cell_features import rank_value_features, select_gene_universe
from scgrn_assets.lib.network.cross_cell import (cross_cell_edge_table, jackknife_stability, ledoit_wolf_shrunk,
                                                 partial_correlation_from_covariance, study_partial_correlation,
                                                 within_study_covariance)
from scgrn_assets.lib.network.feature_moments import FeatureMoments, accumulate_feature_moments


def sparse_features(n_cells: int, n_genes: int, density: float, seed: int, shift: float = 0.0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.random((n_cells, n_genes)) + shift
    dense[rng.random((n_cells, n_genes)) > density] = 0.0
    dense[:, 1] += 0.8 * dense[:, 0]  # some covariance to find
    return sp.csr_matrix(dense)


def chunks_of(matrix: sp.csr_matrix, size: int):
    return [matrix[start: start + size] for start in range(0, matrix.shape[0], size)]


def studies(seed: int = 0) -> dict[str, sp.csr_matrix]:
    # Studies differ in level and density, as plate and droplet studies do.
    return {"A": sparse_features(150, 9, 0.3, seed, shift=0.0), "B": sparse_features(90, 9, 0.8, seed + 1, shift=2.0),
            "C": sparse_features(60, 9, 0.6, seed + 2, shift=-0.5)}


GENES = [f"g{i}" for i in range(9)]


def moments_by_study(data: dict[str, sp.csr_matrix]) -> dict[str, FeatureMoments]:
    return {name: accumulate_feature_moments(chunks_of(matrix, 37), GENES) for name, matrix in data.items()}


def centred_stack(data: dict[str, sp.csr_matrix], leave_out: str | None = None) -> np.ndarray:
    return np.vstack([m.toarray() - m.toarray().mean(axis=0) for name, m in data.items() if name != leave_out])


def numpy_pcorr(covariance: np.ndarray) -> np.ndarray:
    precision = np.linalg.inv(covariance)
    scale = 1 / np.sqrt(np.diag(precision))
    pcorr = -precision * np.outer(scale, scale)
    np.fill_diagonal(pcorr, 1.0)
    return pcorr


def test_accumulated_sums_equal_numpy_on_the_dense_matrix():
    matrix = sparse_features(200, 7, 0.4, seed=1)
    moments = accumulate_feature_moments(chunks_of(matrix, 33), [f"g{i}" for i in range(7)])
    dense = matrix.toarray()
    norm2 = (dense ** 2).sum(axis=1)
    assert moments.n_cells == 200
    np.testing.assert_allclose(moments.cross_product, dense.T @ dense, rtol=1e-12)
    np.testing.assert_allclose(moments.feature_sum, dense.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.norm2_weighted_sum, norm2 @ dense, rtol=1e-12)
    assert moments.norm4_sum == pytest.approx((norm2 ** 2).sum(), rel=1e-12)
    np.testing.assert_allclose(moments.scatter() / 200, np.cov(dense.T, bias=True), atol=1e-12)
    centred = dense - dense.mean(axis=0)
    assert moments.centred_norm4_sum() == pytest.approx(((centred ** 2).sum(axis=1) ** 2).sum(), rel=1e-10)


def test_random_splits_merge_to_the_one_pass_result():
    matrix = sparse_features(500, 12, 0.5, seed=2)
    genes = [f"g{i}" for i in range(12)]
    one_pass = accumulate_feature_moments([matrix], genes)
    part_of = np.random.default_rng(3).integers(0, 4, size=500)
    parts = [accumulate_feature_moments(chunks_of(matrix[np.flatnonzero(part_of == p)], 17), genes) for p in range(4)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merged(part)
    assert merged.n_cells == one_pass.n_cells
    for field in ("feature_sum", "cross_product", "norm2_weighted_sum"):
        np.testing.assert_allclose(getattr(merged, field), getattr(one_pass, field), rtol=1e-9, atol=1e-9)
    assert merged.norm4_sum == pytest.approx(one_pass.norm4_sum, rel=1e-9)


def test_moments_survive_a_save_and_load(tmp_path):
    moments = accumulate_feature_moments([sparse_features(50, 5, 0.5, seed=4)], [f"g{i}" for i in range(5)])
    loaded = FeatureMoments.load_npz(moments.save_npz(tmp_path / "m.npz"))
    np.testing.assert_array_equal(loaded.cross_product, moments.cross_product)
    assert loaded.genes.tolist() == moments.genes.tolist() and loaded.norm4_sum == moments.norm4_sum


def test_within_study_covariance_and_ledoit_wolf_match_numpy_and_sklearn_on_the_centred_cells():
    data = studies()
    moments = moments_by_study(data)
    for leave_out in (None, "B"):
        centred = centred_stack(data, leave_out)
        covariance = within_study_covariance(moments, leave_out=leave_out)
        np.testing.assert_allclose(covariance.covariance, centred.T @ centred / len(centred), atol=1e-12)
        shrunk, shrinkage = ledoit_wolf_shrunk(covariance)
        expected, expected_shrinkage = ledoit_wolf(centred, assume_centered=True)
        assert shrinkage == pytest.approx(expected_shrinkage, rel=1e-9)
        assert 0 < shrinkage < 1
        np.testing.assert_allclose(shrunk, expected, atol=1e-12)


def test_partial_correlation_matches_the_numpy_inverse_and_zeroes_constant_genes():
    rng = np.random.default_rng(5)
    factor = rng.normal(size=(6, 6))
    covariance = factor @ factor.T + 0.5 * np.eye(6)
    np.testing.assert_allclose(partial_correlation_from_covariance(covariance), numpy_pcorr(covariance), atol=1e-12)
    padded = np.zeros((7, 7))
    padded[1:, 1:] = covariance
    pcorr = partial_correlation_from_covariance(padded)
    assert (pcorr[0, 1:] == 0).all() and pcorr[0, 0] == 1
    np.testing.assert_allclose(pcorr[1:, 1:], numpy_pcorr(covariance), atol=1e-12)


def test_jackknife_stability_equals_the_brute_force_leave_one_study_out_minimum():
    data = studies(seed=6)
    moments = moments_by_study(data)
    pcorr, _ = study_partial_correlation(moments)
    np.testing.assert_allclose(pcorr, numpy_pcorr(ledoit_wolf(centred_stack(data), assume_centered=True)[0]),
                               atol=1e-10)
    left_out = [numpy_pcorr(ledoit_wolf(centred_stack(data, s), assume_centered=True)[0]) for s in data]
    agree = np.all([np.sign(p) == np.sign(pcorr) for p in left_out], axis=0)
    expected = np.where(agree, np.minimum(np.abs(pcorr), np.min(np.abs(left_out), axis=0)), 0.0)
    stability = jackknife_stability(moments, pcorr)
    np.testing.assert_allclose(stability, expected, atol=1e-10)
    assert stability[0, 1] > 0.1  # the planted covariance survives leaving out any study
    assert np.isnan(jackknife_stability({"A": moments["A"]}, pcorr)).all()


def test_edge_table_lists_each_unordered_pair_once_best_first():
    rng = np.random.default_rng(7)
    pcorr = rng.uniform(-1, 1, size=(5, 5))
    pcorr = (pcorr + pcorr.T) / 2
    table = cross_cell_edge_table(pcorr, np.abs(pcorr), ["e", "d", "c", "b", "a"])
    assert len(table) == 10 and (table["gene_i"] < table["gene_j"]).all()
    assert table["abs_pcorr"].is_monotonic_decreasing
    assert table["abs_pcorr"].iloc[0] == pytest.approx(np.abs(pcorr[np.triu_indices(5, 1)]).max())
    top = cross_cell_edge_table(pcorr, np.abs(pcorr), list("edcba"), max_edges=3)
    assert top["pcorr"].tolist() == table["pcorr"].iloc[:3].tolist()


def test_rank_value_features_match_a_loop_over_cells():
    rng = np.random.default_rng(8)
    vocab, special = 30, np.array([0, 1])
    is_gene = np.ones(vocab, dtype=bool)
    is_gene[special] = False
    columns = np.full(vocab, -1)
    universe_tokens = rng.choice(np.arange(2, vocab), size=15, replace=False)
    columns[universe_tokens] = np.arange(15)
    cells = [np.r_[0, rng.choice(np.arange(2, vocab), size=n, replace=False), 1] for n in (3, 10, 20, 1)]
    offsets = np.r_[0, np.cumsum([len(c) for c in cells])]
    max_genes = 12
    features = rank_value_features(np.concatenate(cells), offsets, columns, is_gene, 15, max_genes).toarray()
    expected = np.zeros((len(cells), 15))
    for row, cell in enumerate(cells):
        genes = [t for t in cell if is_gene[t]][:max_genes]
        for rank, token in enumerate(genes):
            if columns[token] >= 0:
                expected[row, columns[token]] = 1 - rank / len(genes)
    np.testing.assert_allclose(features, expected)


def test_gene_universe_keeps_tfs_then_the_most_variable_detected_genes():
    genes = ["a", "b", "c", "d", "e", "f"]
    variance = np.array([5.0, 1.0, 4.0, 3.0, 9.0, 0.5])
    detected = np.array([30, 30, 30, 30, 5, 30])  # e is too rarely detected
    assert select_gene_universe(genes, variance, detected, max_genes=3, min_cells=20,
                                transcription_factors=["F"]) == ["a", "c", "f"]
    assert select_gene_universe(genes, variance, detected, max_genes=10, min_cells=20) == ["a", "b", "c", "d", "f"]


def test_genes_seen_with_others_are_the_attention_edge_tables_genes():
    from scgrn_assets.lib.network.attention import attention_edge_moments, edge_table
    from scgrn_assets.lib.network.cell_features import genes_seen_with_others
    from scgrn_assets.lib.network.model import SmallGeneformerConfig, build_masked_lm
    from scgrn_assets.lib.network.dictionaries import build_corpus_dictionaries, convention_named
    from scgrn_assets.lib.network.tokens import tokenize_cells

    rng = np.random.default_rng(9)
    counts = rng.poisson(0.4, size=(60, 25)).astype(float)
    counts[0, :] = 0
    counts[0, 3] = 5  # a cell with one gene: pairs nothing
    counts[:, 7] = 0
    counts[1, 7] = 2  # gene 7 only in a cell of its own... with others (row 1 has other genes)
    n_counts = counts.sum(axis=1) + 1
    keys = np.array([f"G{i}" for i in range(25)])
    dictionaries = build_corpus_dictionaries(sp.csr_matrix(counts), n_counts, keys, convention_named("V1"))
    cells = tokenize_cells(sp.csr_matrix(counts), n_counts, keys, dictionaries)
    config = SmallGeneformerConfig(n_layers=1, hidden_size=16, n_heads=2, intermediate_size=16)
    model = build_masked_lm(dictionaries.vocab_size, 64, config)
    edges = edge_table(attention_edge_moments(model, cells, dictionaries, max_genes=6, device="cpu"))
    expected = sorted(set(edges["gene_i"]) | set(edges["gene_j"]))
    assert sorted(genes_seen_with_others(cells, dictionaries, max_genes=6)) == expected


def test_rank_scores_of_cells_with_every_gene_need_the_constant_direction_filled():
    from scgrn_assets.lib.network.cross_cell import filled_constant_direction

    rng = np.random.default_rng(10)
    latent = rng.normal(size=(2000, 12))
    latent[:, 1] += 1.5 * latent[:, 0]  # the one real edge
    # Every gene present in every cell: rank scores 1 - r/L sum to the same value in each cell.
    ranks = np.argsort(np.argsort(-latent, axis=1), axis=1)
    scores = 1 - ranks / 12
    moments = {"one": accumulate_feature_moments([scores], [f"g{i}" for i in range(12)])}
    covariance = within_study_covariance(moments).covariance
    assert np.linalg.eigvalsh(covariance)[0] < 1e-10  # singular along the all-ones direction
    filled = filled_constant_direction(covariance)
    np.testing.assert_allclose(filled - covariance, np.trace(covariance) / 144, rtol=1e-12)
    plain, _ = study_partial_correlation(moments)
    compositional, _ = study_partial_correlation(moments, compositional=True)
    off_diagonal = ~np.eye(12, dtype=bool)
    assert abs(compositional[0, 1]) == np.abs(compositional[off_diagonal]).max()  # the real edge comes first
    # Without the fill a large common negative offset sits on every pair.
    assert np.median(plain[off_diagonal]) < np.median(compositional[off_diagonal]) - 0.05


@pytest.mark.parametrize("threads", [1, 3])
def test_sparse_and_dense_accumulation_paths_agree_with_numpy(threads):
    # 5% density takes the sparse outer-product loop; the same cells made dense take dsyrk.
    matrix = sparse_features(300, 40, 0.05, seed=13)
    genes = [f"g{i}" for i in range(40)]
    sparse_path = accumulate_feature_moments(chunks_of(matrix, 64), genes, threads=threads)
    dense_path = accumulate_feature_moments([chunk.toarray() for chunk in chunks_of(matrix, 64)], genes)
    dense = matrix.toarray()
    np.testing.assert_allclose(sparse_path.cross_product, dense.T @ dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sparse_path.cross_product, dense_path.cross_product, rtol=1e-12, atol=1e-12)
    norm2 = (dense ** 2).sum(axis=1)
    np.testing.assert_allclose(sparse_path.norm2_weighted_sum, norm2 @ dense, rtol=1e-12)
    assert sparse_path.norm4_sum == pytest.approx((norm2 ** 2).sum(), rel=1e-12)


def test_one_accumulator_fed_sparse_dense_and_unsorted_chunks_equals_numpy():
    # Sparse and dense chunks land in two different accumulators inside; CSR rows whose column
    # indices are out of order (as a hand-built matrix may be) must still reach the upper triangle.
    matrix = sparse_features(200, 30, 0.08, seed=21)
    genes = [f"g{i}" for i in range(30)]
    chunks = chunks_of(matrix, 50)
    shuffled = chunks[1].copy()
    rng = np.random.default_rng(0)
    for row in range(shuffled.shape[0]):
        start, stop = shuffled.indptr[row], shuffled.indptr[row + 1]
        order = rng.permutation(stop - start)
        shuffled.indices[start:stop] = shuffled.indices[start:stop][order]
        shuffled.data[start:stop] = shuffled.data[start:stop][order]
    shuffled.has_sorted_indices = False
    mixed = [chunks[0], shuffled, chunks[2].toarray(), chunks[3]]
    moments = accumulate_feature_moments(mixed, genes, threads=2)
    dense = matrix.toarray()
    np.testing.assert_allclose(moments.cross_product, dense.T @ dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.feature_sum, dense.sum(axis=0), rtol=1e-12)
    assert moments.n_cells == 200

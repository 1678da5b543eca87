"""Gene identifier harmonisation against brute-force equivalents."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.genes import harmonise_gene_ids, strip_r_prefix, sum_duplicate_genes


def test_strip_r_prefix_only_before_a_digit():
    assert strip_r_prefix(["X0610007P14Rik", "Xist", "X1", "XX1", "Apoe", "X"]) == \
        ["0610007P14Rik", "Xist", "1", "XX1", "Apoe", "X"]


@pytest.mark.parametrize("seed", range(4))
def test_sum_duplicate_genes_matches_a_dense_groupby(seed):
    rng = np.random.default_rng(seed)
    symbols = list(rng.choice(["a", "b", "c", "d", "e"], size=12))
    ensembl = [f"E{i}" for i in range(12)]
    dense = rng.poisson(1.0, size=(7, 12))
    summed, names, ids = sum_duplicate_genes(sp.csr_matrix(dense), symbols, ensembl)
    expected_names = list(dict.fromkeys(symbols))  # first-occurrence order
    assert names == expected_names
    for j, name in enumerate(names):
        columns = [i for i, s in enumerate(symbols) if s == name]
        np.testing.assert_array_equal(summed.toarray()[:, j], dense[:, columns].sum(axis=1))
        assert ids[j] == ensembl[columns[0]]


INT32_MAX = int(np.iinfo(np.int32).max)


@pytest.mark.parametrize("seed", range(3))
def test_duplicate_sums_near_the_int32_limit_equal_a_brute_force_python_sum(seed):
    """Large int32 counts: every summed entry equals Python's exact integer sum, none wraps."""
    rng = np.random.default_rng(seed)
    symbols = ["a", "b", "a", "c", "b", "a"]
    # Each group of duplicates stays within int32 in total (so the result is representable)...
    dense = rng.integers(0, INT32_MAX // 3, size=(5, 6)).astype(np.int32)
    dense[rng.random(dense.shape) < 0.3] = 0
    dense[0, [0, 2, 5]] = INT32_MAX // 3  # ...up to the limit, in int64 terms
    summed, names, _ids = sum_duplicate_genes(sp.csr_matrix(dense), symbols, [None] * 6)
    assert summed.dtype == np.int32 and names == ["a", "b", "c"]
    got = summed.toarray()
    for row in range(dense.shape[0]):
        for j, name in enumerate(names):
            exact = sum(int(dense[row, i]) for i, s in enumerate(symbols) if s == name)
            assert int(got[row, j]) == exact


def test_duplicate_sums_past_int32_are_refused_naming_the_gene_not_wrapped():
    """Found by review: the aggregation matrix was int32, so 2^31-1 + 1 came out as -2^31, silently."""
    dense = np.array([[INT32_MAX, 5, 1], [1, 2, 3]], dtype=np.int32)
    assert int(dense[0, 0]) + int(dense[0, 2]) > INT32_MAX  # the brute-force sum does not fit int32
    with pytest.raises(ScgrnInputError, match=r"Apoe.*int32") as error:
        sum_duplicate_genes(sp.csr_matrix(dense), ["Apoe", "Trem2", "Apoe"], ["E1", "E2", "E3"], study="GSE1",
                            file="GSM1_counts.txt.gz")
    assert error.value.study == "GSE1" and error.value.file == "GSM1_counts.txt.gz" and error.value.fix


def test_int64_counts_sum_exactly_past_2_to_the_31():
    """Counts already held as int64 keep int64 and sum exactly beyond the int32 range."""
    dense = np.array([[INT32_MAX, 7, INT32_MAX]], dtype=np.int64)
    summed, names, _ids = sum_duplicate_genes(sp.csr_matrix(dense), ["a", "b", "a"], [None] * 3)
    assert summed.dtype == np.int64 and names == ["a", "b"]
    assert summed.toarray().tolist() == [[2 * INT32_MAX, 7]]


def test_ensembl_ids_map_through_the_gene_map_and_keep_unmapped_ids():
    symbols, ids = harmonise_gene_ids(["ENSMUSG1.3", "ENSMUSG2"], gene_id_type="ensembl", symbols=None,
                                      strip_r=False, ensembl_to_symbol={"ENSMUSG1": "Apoe"}, study="S", file="f")
    assert symbols == ["Apoe", "ENSMUSG2"] and ids == ["ENSMUSG1", "ENSMUSG2"]


def test_ensembl_ids_without_symbols_or_map_is_a_clear_error():
    with pytest.raises(ScgrnInputError, match="gene_map"):
        harmonise_gene_ids(["ENSMUSG1"], gene_id_type="ensembl", symbols=None, strip_r=False,
                           ensembl_to_symbol=None, study="S", file="f")


def test_empty_gene_names_are_rejected():
    with pytest.raises(ScgrnInputError, match="without a name"):
        harmonise_gene_ids(["Apoe", ""], gene_id_type="symbol", symbols=None, strip_r=False,
                           ensembl_to_symbol=None, study="S", file="f")

"""Gene identifier harmonisation against brute-force equivalents."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.genes import harmonise_gene_ids, strip_r_prefix, sum_duplicate_genes


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

"""Rank-value encoding against a brute-force exact reference; TokenizedCells storage."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dictionaries import V1, V2, GeneformerDictionaries, TokenizerConvention
from scgrn_assets.lib.network.tokens import TokenizedCells, tokenize_cells


def brute_force_tokens(counts: np.ndarray, n_counts: np.ndarray, keys: list[str],
                       dictionaries: GeneformerDictionaries) -> list[list[int]]:
    """Exact rational values, one cell and one gene at a time; ties broken by column order."""
    convention = dictionaries.convention
    cells = []
    for cell in range(counts.shape[0]):
        ranked = []
        for column, key in enumerate(keys):
            if counts[cell, column] == 0 or key not in dictionaries.token_dictionary \
                    or key not in dictionaries.gene_median:
                continue
            value = (Fraction(float(counts[cell, column])) / Fraction(float(n_counts[cell])) * 10_000
                     / Fraction(dictionaries.gene_median[key]))
            ranked.append((-value, column, dictionaries.token_dictionary[key]))
        ranked.sort()
        tokens = [token for _, _, token in ranked][: convention.max_genes_per_cell]
        if convention.add_cls_eos:
            tokens = [dictionaries.token_dictionary["<cls>"], *tokens, dictionaries.token_dictionary["<eos>"]]
        cells.append(tokens)
    return cells


def random_case(seed: int, convention: TokenizerConvention):
    """Counts with many ties; some genes lack a token, some a median; medians are powers of two.

    Powers of two keep float scaling exact, so float ranking must equal the exact ranking.
    """
    rng = np.random.default_rng(seed)
    n_cells, n_genes = 40, 25
    counts = rng.integers(0, 4, size=(n_cells, n_genes)).astype(np.float32)
    counts[rng.random(counts.shape) < 0.4] = 0
    n_counts = counts.sum(axis=1) + rng.integers(1, 50, size=n_cells)
    keys = [f"ENSG{column:05d}" for column in range(n_genes)]
    token_dictionary = {name: token_id for token_id, name in enumerate(convention.special_tokens)}
    gene_median = {}
    for column, key in enumerate(keys):
        if column % 7 != 3:  # missing from the token dictionary
            token_dictionary[key] = len(token_dictionary) + 5
        if column % 5 != 1:  # missing from the median dictionary
            gene_median[key] = float(2.0 ** rng.integers(-2, 3))
    gene_median["ENSG_NOT_IN_CORPUS"] = 1.0
    token_dictionary["ENSG_NOT_IN_CORPUS"] = 999
    return counts, n_counts, keys, GeneformerDictionaries(token_dictionary, gene_median, convention)


@pytest.mark.parametrize("convention", [
    V1, V2,
    TokenizerConvention("V1-short", 6, V1.special_tokens, add_cls_eos=False),
    TokenizerConvention("V2-short", 6, V2.special_tokens, add_cls_eos=True),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokenize_cells_matches_brute_force(convention, seed):
    counts, n_counts, keys, dictionaries = random_case(seed, convention)
    expected = brute_force_tokens(counts, n_counts, keys, dictionaries)
    cells = tokenize_cells(sp.csr_matrix(counts), n_counts, keys, dictionaries, chunk_size=7)
    assert cells.n_cells == len(expected)
    for cell, tokens in enumerate(expected):
        assert cells.cell(cell).tolist() == tokens, f"cell {cell}"


def test_tokenize_cells_reports_progress_per_chunk():
    counts, n_counts, keys, dictionaries = random_case(0, V1)
    calls = []
    tokenize_cells(sp.csr_matrix(counts), n_counts, keys, dictionaries, chunk_size=15,
                   progress=lambda done, total: calls.append((done, total)))
    assert calls == [(15, 40), (30, 40), (40, 40)]


def test_duplicate_keys_are_summed_before_ranking():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 6, size=(30, 6)).astype(np.float64)
    n_counts = counts.sum(axis=1) + 10
    keys = ["A", "B", "C", "A", "D", "B"]
    dictionaries = GeneformerDictionaries({"<pad>": 0, "<mask>": 1, "A": 2, "B": 3, "C": 4, "D": 5},
                                          {"A": 1.0, "B": 2.0, "C": 0.5, "D": 4.0}, V1)
    collapsed = np.stack([counts[:, 0] + counts[:, 3], counts[:, 1] + counts[:, 5], counts[:, 2], counts[:, 4]], 1)
    expected = brute_force_tokens(collapsed, n_counts, ["A", "B", "C", "D"], dictionaries)
    cells = tokenize_cells(counts, n_counts, keys, dictionaries)
    assert [cells.cell(cell).tolist() for cell in range(30)] == expected


def test_tokenize_cells_rejects_bad_inputs():
    counts, n_counts, keys, dictionaries = random_case(0, V1)
    with pytest.raises(ScgrnInputError, match="gene keys"):
        tokenize_cells(counts, n_counts, keys[:-1], dictionaries)
    with pytest.raises(ScgrnInputError, match="n_counts"):
        tokenize_cells(counts, np.zeros_like(n_counts), keys, dictionaries)
    no_cls = GeneformerDictionaries({"<pad>": 0, "<mask>": 1, **{key: 2 + i for i, key in enumerate(keys)}},
                                    dict.fromkeys(keys, 1.0), V2)
    with pytest.raises(ScgrnInputError, match="<cls>"):
        tokenize_cells(counts, n_counts, keys, no_cls)


def test_tokenized_cells_roundtrip_padding_and_subset(tmp_path):
    cells = TokenizedCells(np.array([5, 6, 7, 8, 9, 10], dtype=np.int32), np.array([0, 3, 4, 6]), V1)
    path = cells.save_npz(tmp_path / "cells.npz")
    loaded = TokenizedCells.load_npz(path)
    assert loaded.convention is V1
    np.testing.assert_array_equal(loaded.token_ids, cells.token_ids)
    np.testing.assert_array_equal(loaded.offsets, cells.offsets)
    input_ids, attention_mask = loaded.padded(np.array([1, 0]), max_length=2)
    np.testing.assert_array_equal(input_ids, [[8, 0], [5, 6]])
    np.testing.assert_array_equal(attention_mask, [[1, 0], [1, 1]])
    subset = loaded.subset(np.array([2, 0]))
    assert [subset.cell(0).tolist(), subset.cell(1).tolist()] == [[9, 10], [5, 6, 7]]
    assert not list(tmp_path.glob(".*tmp*"))



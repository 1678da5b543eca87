"""Rank-value encoding against a brute-force exact reference; dictionaries and the restricted unpickler."""

from __future__ import annotations

import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dictionaries import (V1, V2, GeneformerDictionaries, TokenizerConvention,
                                                   build_corpus_dictionaries, corpus_gene_keys,
                                                   gene_nonzero_medians, load_geneformer_dictionaries,
                                                   load_pickle_restricted)
from scgrn_assets.lib.network.tokens import TokenizedCells, tokenize_cells

SHARED_GENEFORMER = Path(__file__).resolve().parents[3] / "shared" / "data" / "geneformer"


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


def test_gene_nonzero_medians_against_dense_loop():
    rng = np.random.default_rng(4)
    counts = rng.poisson(0.7, size=(50, 8)).astype(np.float32)
    counts[:, 5] = 0
    n_counts = counts.sum(axis=1) + 3
    medians = gene_nonzero_medians(sp.csr_matrix(counts), n_counts)
    for gene in range(8):
        normalised = counts[:, gene].astype(np.float64) / n_counts * 10_000
        nonzero = normalised[counts[:, gene] > 0]
        if nonzero.size:
            assert medians[gene] == pytest.approx(np.median(nonzero), rel=1e-12)
        else:
            assert np.isnan(medians[gene])


@pytest.mark.parametrize("convention", [V1, V2])
def test_corpus_dictionaries_mirror_published_special_tokens(convention):
    rng = np.random.default_rng(5)
    counts = rng.poisson(1.0, size=(20, 5)).astype(np.float32)
    counts[:, 2] = 0
    n_counts = counts.sum(axis=1) + 1
    keys = ["ENSG1", "ENSG2", "NEVER", "Sym4", "ENSG5"]
    dictionaries = build_corpus_dictionaries(sp.csr_matrix(counts), n_counts, keys, convention)
    assert dictionaries.convention is convention
    special = {"<pad>": 0, "<mask>": 1} if convention is V1 else {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert {name: dictionaries.token_dictionary[name] for name in special} == special
    assert "NEVER" not in dictionaries.token_dictionary and "NEVER" not in dictionaries.gene_median
    gene_ids = [dictionaries.token_dictionary[key] for key in ("ENSG1", "ENSG2", "Sym4", "ENSG5")]
    assert gene_ids == list(range(len(special), len(special) + 4))
    assert set(dictionaries.special_token_ids.tolist()) == set(special.values())


def test_corpus_dictionaries_reject_duplicate_keys():
    with pytest.raises(ScgrnInputError, match="not unique"):
        build_corpus_dictionaries(sp.csr_matrix(np.ones((2, 2))), np.array([4.0, 4.0]), ["A", "A"])


def test_corpus_gene_keys_prefer_ensembl_then_name_map_then_symbol():
    var = pd.DataFrame({"ensembl_id": ["ENSG1", None, "", np.nan]}, index=["A", "B", "C", "D"])
    keys = corpus_gene_keys(var, gene_name_id={"B": "ENSG2", "A": "ENSG_OTHER"})
    assert keys.tolist() == ["ENSG1", "ENSG2", "C", "D"]
    assert corpus_gene_keys(pd.DataFrame(index=["X"])).tolist() == ["X"]


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


class _RunsCode:
    def __reduce__(self):
        return (print, ("pickle executed code",))


def test_restricted_unpickler_refuses_code(tmp_path, capsys):
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "x": _RunsCode()}))
    with pytest.raises(ScgrnInputError, match="not allowed"):
        load_pickle_restricted(path)
    assert "executed" not in capsys.readouterr().out
    object_scalar = tmp_path / "object.pkl"
    object_scalar.write_bytes(pickle.dumps({"a": np.array(["text"], dtype=object)}))
    with pytest.raises(ScgrnInputError):
        load_pickle_restricted(object_scalar)


def test_restricted_unpickler_reads_numpy_scalars(tmp_path):
    path = tmp_path / "gene_median_dictionary.pkl"
    path.write_bytes(pickle.dumps({"ENSG1": np.float64(2.5), "ENSG2": np.int16(3)}, protocol=4))
    assert load_pickle_restricted(path) == {"ENSG1": 2.5, "ENSG2": 3}


def test_saved_dictionaries_reload(tmp_path):
    dictionaries = GeneformerDictionaries({"<pad>": 0, "<mask>": 1, "G": 2}, {"G": 1.5}, V1, {"sym": "G"})
    dictionaries.save(tmp_path)
    reloaded = load_geneformer_dictionaries(tmp_path)
    assert reloaded.token_dictionary == dictionaries.token_dictionary
    assert reloaded.gene_median == dictionaries.gene_median
    assert reloaded.gene_name_id == dictionaries.gene_name_id
    assert reloaded.convention is V1


def test_missing_dictionary_names_the_folder(tmp_path):
    with pytest.raises(ScgrnInputError, match=str(tmp_path)):
        load_geneformer_dictionaries(tmp_path)


@pytest.mark.skipif(not SHARED_GENEFORMER.is_dir(), reason="../shared/data/geneformer is absent")
@pytest.mark.parametrize("folder, convention, n_tokens, n_medians", [
    ("gc30M", V1, 25_426, 25_424),
    ("gc95M_eq_gc104M", V2, 20_275, 42_005),
])
def test_real_geneformer_dictionaries_load(folder, convention, n_tokens, n_medians):
    dictionaries = load_geneformer_dictionaries(SHARED_GENEFORMER / folder)
    assert dictionaries.convention is convention
    assert len(dictionaries.token_dictionary) == n_tokens == dictionaries.vocab_size
    assert len(dictionaries.gene_median) == n_medians
    assert dictionaries.token_dictionary["<pad>"] == 0 and dictionaries.token_dictionary["<mask>"] == 1
    if convention is V2:
        assert dictionaries.token_dictionary["<cls>"] == 2 and dictionaries.token_dictionary["<eos>"] == 3
    assert all(isinstance(value, int) for value in dictionaries.token_dictionary.values())
    assert min(dictionaries.gene_median.values()) > 0
    assert dictionaries.gene_name_id and all(value.startswith("ENSG") for value in
                                             list(dictionaries.gene_name_id.values())[:100])

"""Geneformer dictionaries: built from a corpus, saved and reloaded, the published ones, and the restricted unpickler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.network.dictionaries import (V1, V2, GeneformerDictionaries, build_corpus_dictionaries,
                                                   corpus_gene_keys, gene_nonzero_medians,
                                                   load_geneformer_dictionaries, load_pickle_restricted)


SHARED_GENEFORMER = Path(__file__).resolve().parents[3] / "shared" / "data" / "geneformer"


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

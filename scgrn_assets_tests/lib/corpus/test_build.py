"""The combine step against an independent dense computation (pandas outer join)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.corpus.build import QCThresholds, combine_studies, read_corpus
from scgrn_assets.lib.errors import ScgrnInputError


def random_study(rng, accession: str, genes: list[str]) -> ad.AnnData:
    n_cells = int(rng.integers(5, 40))
    counts = rng.poisson(rng.uniform(0.1, 3.0, size=len(genes)), size=(n_cells, len(genes)))
    obs = pd.DataFrame({"study": accession, "sample": [f"{accession}_s{i % 3}" for i in range(n_cells)],
                        "barcode": [f"bc{i}" for i in range(n_cells)],
                        "condition": pd.Categorical(rng.choice(["AD", "control", None], size=n_cells),
                                                    categories=["control", "AD"])},
                       index=[f"{accession}:{i}" for i in range(n_cells)])
    obs["n_counts"] = counts.sum(axis=1)
    obs["n_genes"] = (counts > 0).sum(axis=1)
    var = pd.DataFrame({"gene_symbol": genes, "ensembl_id": pd.Categorical([f"E{g}" for g in genes])}, index=genes)
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)


def dense_frame(adata: ad.AnnData) -> pd.DataFrame:
    return pd.DataFrame(adata.X.toarray(), index=adata.obs_names, columns=adata.var_names)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_combine_equals_dense_outer_join_with_qc(tmp_path, seed):
    rng = np.random.default_rng(seed)
    universe = [f"g{i}" for i in range(40)]
    studies = {}
    for k in range(3):
        genes = list(rng.choice(universe, size=int(rng.integers(10, 30)), replace=False))
        studies[f"GSE{k}"] = random_study(rng, f"GSE{k}", genes)
    paths = {}
    for accession, adata in studies.items():
        paths[accession] = tmp_path / f"{accession}.h5ad"
        adata.write_h5ad(paths[accession])
    qc = QCThresholds(min_counts_per_cell=int(rng.integers(0, 20)), min_genes_per_cell=int(rng.integers(0, 8)),
                      min_cells_per_gene=int(rng.integers(0, 4)))
    output = tmp_path / "corpus.zarr"
    summary = combine_studies(paths, output, qc=qc, chunk_cells=int(rng.integers(1, 9)))
    corpus = read_corpus(output)

    # Independent computation: dense outer join, zeros for unmeasured genes, then the same filters.
    joined = pd.concat([dense_frame(a) for a in studies.values()], axis=0, join="outer").fillna(0)
    obs = pd.concat([a.obs for a in studies.values()])
    keep_cells = (obs["n_counts"] >= qc.min_counts_per_cell) & (obs["n_genes"] >= qc.min_genes_per_cell)
    joined = joined.loc[keep_cells.to_numpy()]
    keep_genes = (joined > 0).sum(axis=0) >= qc.min_cells_per_gene
    expected = joined.loc[:, keep_genes]

    assert list(corpus.obs_names) == list(expected.index)
    assert set(corpus.var_names) == set(expected.columns)
    np.testing.assert_array_equal(corpus.X.toarray(), expected[corpus.var_names].to_numpy())
    assert summary.n_cells == corpus.n_obs and summary.n_genes == corpus.n_vars
    assert set(summary.union_genes) == set().union(*(a.var_names for a in studies.values()))
    # Which study measured which gene survives the zero padding.
    for accession, adata in studies.items():
        assert set(corpus.var_names[corpus.var[f"measured_in_{accession}"]]) == \
            set(adata.var_names) & set(corpus.var_names)
    assert (corpus.obs["n_counts"].to_numpy() == obs.loc[keep_cells.to_numpy(), "n_counts"].to_numpy()).all()
    assert corpus.obs["condition"].isna().sum() == obs.loc[keep_cells.to_numpy(), "condition"].isna().sum()
    assert list(corpus.obs["condition"].cat.categories) == ["control", "AD"]


def test_gene_lengths_and_ensembl_ids_come_from_the_annotation(tmp_path):
    rng = np.random.default_rng(3)
    adata = random_study(rng, "GSE1", ["Apoe", "Cd74", "Trem2"])
    adata.var["ensembl_id"] = pd.Categorical(["E1", None, None])
    adata.write_h5ad(tmp_path / "s.h5ad")
    annotation = pd.DataFrame({"gene_symbol": ["Apoe", "Cd74"], "ensembl_id": ["EX", "E2"],
                               "gene_length_bp": [1200, 3400]}).set_index("gene_symbol", drop=False)
    combine_studies({"GSE1": tmp_path / "s.h5ad"}, tmp_path / "c.zarr", gene_annotation=annotation,
                    qc=QCThresholds(0, 0, 0))
    var = read_corpus(tmp_path / "c.zarr").var
    assert var.loc["Apoe", "ensembl_id"] == "E1"   # the study's own ID wins
    assert var.loc["Cd74", "ensembl_id"] == "E2"   # the annotation fills the gap
    assert pd.isna(var.loc["Trem2", "ensembl_id"])
    assert var.loc["Cd74", "gene_length_bp"] == 3400 and np.isnan(var.loc["Trem2", "gene_length_bp"])


def test_failed_combine_leaves_the_previous_corpus_untouched(tmp_path):
    rng = np.random.default_rng(4)
    adata = random_study(rng, "GSE1", ["a", "b", "c"])
    adata.write_h5ad(tmp_path / "s.h5ad")
    output = tmp_path / "c.zarr"
    combine_studies({"GSE1": tmp_path / "s.h5ad"}, output, qc=QCThresholds(0, 0, 0))
    before = read_corpus(output).X.toarray()
    with pytest.raises(ScgrnInputError, match="QC removed every cell"):
        combine_studies({"GSE1": tmp_path / "s.h5ad"}, output, qc=QCThresholds(10**9, 0, 0))
    np.testing.assert_array_equal(read_corpus(output).X.toarray(), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("seed", [5, 6])
def test_small_blocks_and_chunks_and_a_dense_study_give_the_same_corpus(tmp_path, seed, monkeypatch):
    # Blocks of a few values and zarr chunks of a few values: every block and chunk boundary case;
    # one study stored with a dense X (anndata's other encoding) goes through the general reader.
    import scgrn_assets.lib.corpus.build as corpus
    rng = np.random.default_rng(seed)
    universe = [f"g{i}" for i in range(30)]
    studies = {f"GSE{k}": random_study(rng, f"GSE{k}", list(rng.choice(universe, size=20, replace=False)))
               for k in range(3)}
    studies["GSE2"].X = studies["GSE2"].X.toarray()
    paths = {}
    for accession, adata in studies.items():
        paths[accession] = tmp_path / f"{accession}.h5ad"
        adata.write_h5ad(paths[accession])
    qc = QCThresholds(min_counts_per_cell=5, min_genes_per_cell=2, min_cells_per_gene=2)
    reference = combine_studies(paths, tmp_path / "reference.zarr", qc=qc)
    monkeypatch.setattr(corpus, "BLOCK_VALUES", int(rng.integers(1, 40)))
    monkeypatch.setattr(corpus, "X_CHUNK_VALUES", int(rng.integers(1, 50)))
    summary = combine_studies(paths, tmp_path / "small.zarr", qc=qc, chunk_cells=int(rng.integers(1, 7)))
    small, expected = read_corpus(tmp_path / "small.zarr"), read_corpus(tmp_path / "reference.zarr")
    assert summary == reference
    assert small.X.dtype == np.float32 and small.X.has_sorted_indices
    np.testing.assert_array_equal(small.X.toarray(), expected.X.toarray())
    pd.testing.assert_frame_equal(small.obs, expected.obs)
    pd.testing.assert_frame_equal(small.var, expected.var)
    # And both equal the studies themselves, gene by gene.
    for accession, adata in studies.items():
        cells = small.obs_names.intersection(adata.obs_names)
        genes = small.var_names.intersection(adata.var_names)
        np.testing.assert_array_equal(small[cells, genes].X.toarray(),
                                      np.asarray(adata[cells, genes].X if not sp.issparse(adata.X)
                                                 else adata[cells, genes].X.toarray()))


def test_align_csr_remaps_drops_and_sorts_like_scipy():
    from scgrn_assets.lib.corpus.build import align_csr
    rng = np.random.default_rng(7)
    block = sp.random(40, 25, density=0.3, format="csr", random_state=8, dtype=np.float64)
    block.data = np.ceil(block.data * 9).astype(np.int32)
    column_map = rng.permutation(30)[:25].astype(np.int32)  # not monotone: rows need sorting
    column_map[rng.random(25) < 0.3] = -1
    indptr, indices, data = align_csr(block.indptr.astype(np.int64), block.indices, block.data, column_map)
    got = sp.csr_matrix((data, indices, indptr), shape=(40, 30))
    expected = np.zeros((40, 30), dtype=np.float32)
    kept = column_map >= 0
    expected[:, column_map[kept]] = block.toarray()[:, kept]
    assert got.has_sorted_indices and data.dtype == np.float32
    np.testing.assert_array_equal(got.toarray(), expected)


def test_a_gene_index_outside_the_study_is_refused():
    from scgrn_assets.lib.corpus.build import align_csr
    with pytest.raises(ScgrnInputError, match="gene index outside its 2 genes"):
        align_csr(np.array([0, 2]), np.array([0, 5], dtype=np.int32), np.array([1, 1], dtype=np.int32),
                  np.array([0, 1], dtype=np.int32), study="GSE1", file="x.h5ad")


@pytest.mark.parametrize("qc, message", [
    (QCThresholds(10**9, 0, 3), r"QC removed every cell of the corpus: of \d+ cells, \d+ have fewer than "
                                r"min_counts_per_cell=1000000000 counts \(the largest library has \d+\)"),
    (QCThresholds(0, 10**6, 3), r"QC removed every cell .* detect fewer than min_genes_per_cell=1000000 genes"),
    (QCThresholds(0, 0, 10**6), r"QC removed every gene of the corpus: no gene is detected in "
                                r"min_cells_per_gene=1000000 of the \d+ cells"),
], ids=["counts", "genes-per-cell", "cells-per-gene"])
def test_an_empty_corpus_names_the_threshold_that_emptied_it(tmp_path, qc, message):
    adata = random_study(np.random.default_rng(5), "GSE1", ["a", "b", "c"])
    adata.write_h5ad(tmp_path / "s.h5ad")
    with pytest.raises(ScgrnInputError, match=message):
        combine_studies({"GSE1": tmp_path / "s.h5ad"}, tmp_path / "c.zarr", qc=qc)


def test_progress_counts_each_studys_kept_cells_up_to_its_total(tmp_path):
    rng = np.random.default_rng(5)
    genes = [f"g{i}" for i in range(20)]
    paths = {}
    for accession in ("GSE1", "GSE2"):
        paths[accession] = tmp_path / f"{accession}.h5ad"
        random_study(rng, accession, genes).write_h5ad(paths[accession])
    calls = []
    summary = combine_studies(paths, tmp_path / "corpus.zarr", qc=QCThresholds(0, 0, 0), chunk_cells=4,
                              progress=lambda done, total, **detail: calls.append((detail["study"], done, total)))
    for study, n_cells in summary.cells_per_study.items():
        mine = [(done, total) for name, done, total in calls if name == study]
        assert [done for done, _ in mine] == sorted(done for done, _ in mine)
        assert all(total == n_cells for _, total in mine) and mine[-1][0] == n_cells

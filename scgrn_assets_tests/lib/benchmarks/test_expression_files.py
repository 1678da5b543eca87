"""Expression matrix files for `scgrn benchmark`: layouts, the orientation rule, the value kinds."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.benchmarks.expression_files import read_expression
from scgrn_assets.lib.benchmarks.references import load_ground_truth
from scgrn_assets_tests.conftest import shared_data


def test_genes_x_cells_csv_is_read_as_cells_x_genes_without_library_size_scaling(tmp_path):
    path = tmp_path / "ExpressionData.csv"
    path.write_text(",c1,c2,c3\nA,0.5,0,2.25\nB,1,3,0\n")
    data = read_expression(path, values="normalized", truth_genes=["A", "B"])
    assert data.gene_names == ["A", "B"]
    assert data.orientation.startswith("genes-x-cells (auto: 2 of 2 distinct row labels and 0 of 3 distinct column labels")
    np.testing.assert_array_equal(data.values.toarray(), [[0.5, 1.0], [0.0, 3.0], [2.25, 0.0]])
    # 10,000 per cell: the shared value / n_counts x 10,000 leaves normalised values as they are.
    np.testing.assert_array_equal(data.n_counts, [1e4, 1e4, 1e4])


def test_counts_keep_their_library_sizes_and_must_be_integers(tmp_path):
    path = tmp_path / "counts.tsv.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("gene\tc1\tc2\nA\t3\t0\nB\t1\t5\nC\t0\t2\n")
    data = read_expression(path, values="counts", orientation="genes-x-cells")
    np.testing.assert_array_equal(data.n_counts, [4, 7])
    broken = tmp_path / "fractional.csv"
    broken.write_text(",c1,c2\nA,3,0.5\nB,1,5\n")
    with pytest.raises(ScgrnInputError, match="non-integer values .* pass --values normalized"):
        read_expression(broken, values="counts", orientation="genes-x-cells")


def test_orientation_rule_skips_an_axis_with_repeated_labels(tmp_path):
    # SERGIO-like: gene ids are integers and the header repeats cell-type labels that are also gene ids.
    path = tmp_path / "sergio_like.csv"
    path.write_text(",0,0,1,1\n0,1,2,3,4\n1,5,6,7,8\n2,1,1,1,1\n")
    data = read_expression(path, values="normalized", truth_genes=["0", "1", "2"])
    assert data.gene_names == ["0", "1", "2"] and data.n_cells == 4
    # Cells x genes with a repeated row label (a time step), the scanpy text layout.
    scanpy_like = tmp_path / "scanpy_like.txt"
    scanpy_like.write_text("# tmax = 2\n# it  A  B\n 0  0.1  0.2\n 1  0.3  0.4\n 0  0.5  0.6\n")
    data = read_expression(scanpy_like, values="normalized", truth_genes=["A", "B"])
    assert data.gene_names == ["A", "B"]
    np.testing.assert_allclose(data.values.toarray(), [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    assert data.orientation.startswith("cells-x-genes (auto")


def test_negative_values_fail_or_are_clipped_on_request(tmp_path):
    path = tmp_path / "negative.csv"
    path.write_text(",c1,c2\nA,-0.01,1\nB,1,2\n")
    with pytest.raises(ScgrnInputError, match="1 negative values .* --clip-negative"):
        read_expression(path, values="normalized", truth_genes=["A"])
    data = read_expression(path, values="normalized", truth_genes=["A"], clip_negative=True)
    np.testing.assert_array_equal(data.values.toarray(), [[0.0, 1.0], [1.0, 2.0]])


@pytest.mark.parametrize("text, message", [
    (",c1,c2\nA,1\nB,1,2\n", "line 2 has 2 fields, expected 3"),
    (",c1,c2\nA,1,x\nB,1,2\n", "not a number"),
    (",c1,c2\nA,1,nan\nB,1,2\n", "NaN or infinite"),
    (",c1,c2\nA,1,2\nA,1,2\n", "gene labels repeat"),
])
def test_malformed_tables_are_refused_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ScgrnInputError, match=message) as error:
        read_expression(path, values="normalized", orientation="genes-x-cells")
    assert "bad.csv" in str(error.value)


def test_anndata_input_is_cells_x_genes_with_its_library_sizes(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.AnnData(sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0]])),
                       obs=pd.DataFrame({"n_counts": [10.0, 20.0]}, index=["c1", "c2"]),
                       var=pd.DataFrame({"ensembl_id": ["ENSMUSG1", None]}, index=["A", "B"]))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    data = read_expression(tmp_path / "cells.h5ad", values="counts")
    np.testing.assert_array_equal(data.n_counts, [10.0, 20.0])  # the corpus's, over all of a cell's genes
    assert data.var["ensembl_id"].tolist()[0] == "ENSMUSG1"
    with pytest.raises(ScgrnInputError, match="AnnData is cells x genes"):
        read_expression(tmp_path / "cells.h5ad", values="counts", orientation="genes-x-cells")


def test_shared_simulations_read_in_their_own_orientation():
    krumsiek = shared_data("reference", "krumsiek11")
    truth = load_ground_truth(krumsiek / "krumsiek11_edges_derived.csv")
    assert len(truth) == 30 and (truth["source"] != truth["target"]).sum() == 26  # SOURCE.md
    assert set(truth["sign"]) == {-1, 1}
    genes = sorted(set(truth["source"]) | set(truth["target"]))
    data = read_expression(krumsiek / "datasets__krumsiek11.txt", values="normalized", truth_genes=genes,
                           clip_negative=True)
    assert (data.n_cells, data.n_genes) == (640, 11)
    assert data.orientation.startswith("cells-x-genes")
    assert data.gene_names[:3] == ["Gata2", "Gata1", "Fog1"]

    sergio = shared_data("reference", "sergio", "data_sets", "De-noised_100G_3T_300cPerT_dynamics_9_DS4")
    truth = load_ground_truth(sergio / "gt_GRN.csv")
    assert len(truth) == 137 and truth["source"].nunique() == 10  # SOURCE.md: 137 edges, 10 regulators
    genes = sorted(set(truth["source"]) | set(truth["target"]))
    data = read_expression(sergio / "simulated_noNoise_T_0.csv", values="normalized", truth_genes=genes)
    assert (data.n_cells, data.n_genes) == (900, 100)
    assert data.orientation.startswith("genes-x-cells")

    gsd = shared_data("reference", "beeline_example_gsd")
    truth = load_ground_truth(gsd / "GroundTruthNetwork.csv")
    assert len(truth) == 79 and (truth["source"] != truth["target"]).sum() == 76  # SOURCE.md


def test_anndata_with_mixed_index_types_reads_with_its_studies(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    counts = sp.random(30, 6, density=0.5, format="csr", random_state=0)
    counts.data = np.ceil(counts.data * 5)
    # How the combined corpus reads back: int64 indptr, int32 indices (scipy's eliminate_zeros refused it).
    counts.indptr = counts.indptr.astype(np.int64)
    counts.indices = counts.indices.astype(np.int32)
    obs = pd.DataFrame({"study": ["A"] * 15 + ["B"] * 15, "n_counts": np.asarray(counts.sum(axis=1)).ravel() + 1},
                       index=[f"c{i}" for i in range(30)])
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(6)])).write_zarr(tmp_path / "x.zarr")
    data = read_expression(tmp_path / "x.zarr", values="counts")
    assert data.study.tolist() == obs["study"].tolist()
    np.testing.assert_array_equal(data.values.toarray(), counts.toarray())

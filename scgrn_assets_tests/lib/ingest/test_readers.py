"""Each study reader against the simulator's files and tiny hand-written files with real quirks."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.ingest.catalog import ConditionRule, MetadataJoin, Study, StudyFile
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.readers import read_dense_count_block, read_study_samples
from scgrn_assets.lib.demo.simulator import simulate_sample_counts
from scgrn_assets.lib.ingest.study_anndata import build_study_anndata, write_study_h5ad
from scgrn_assets_tests.support.archives import write_tar
from scgrn_assets_tests.conftest import shared_data
from scgrn_assets_tests.reliability import ledger

SHA = "0" * 64


def make_study(fmt: str, counts_name: str, *, gene_id_type: str = "symbol", condition=None,
               extra_files=(), strip_r_prefix=None) -> Study:
    files = (StudyFile(counts_name, "file:///x", SHA, "counts"), StudyFile("meta.csv", "file:///x", SHA, "metadata"),
             *extra_files)
    return Study(accession="GSE1", title="t", species="mouse", format=fmt, gene_id_type=gene_id_type, files=files,
                 metadata=MetadataJoin(file="meta.csv"), condition=condition,
                 strip_r_prefix=fmt == "raw_tar_dropseq_dge" if strip_r_prefix is None else strip_r_prefix)


# --- against the simulator's files: every reader recovers the simulated counts exactly ---------------

@pytest.mark.parametrize("accession", ["GSE900001", "GSE900002", "GSE900003", "GSE900004"])
def test_study_reader_recovers_simulated_counts(demo_files, accession):
    study = demo_files.catalog().study(accession)
    adata = build_study_anndata(study, demo_files.study_dir(accession))
    truth = demo_files.truth
    samples = truth.samples[truth.samples["study"] == accession]
    symbols = truth.genes["gene_symbol"].to_numpy()
    start = 0
    for sample in samples["sample"]:
        counts, cells, genes = simulate_sample_counts(truth, accession, sample)
        block = adata[start:start + counts.shape[0]]
        start += counts.shape[0]
        # Harmonised symbols (R's X prefix undone) land on the simulator's genes, counts unchanged.
        observed = block[:, list(symbols[genes])].X.toarray()
        np.testing.assert_array_equal(observed, counts.toarray())
    assert start == adata.n_obs
    assert not any(g.startswith("X") and g[1:2].isdigit() for g in adata.var_names)
    expected = samples.set_index("sample")["condition"]
    if study.condition is None:
        assert adata.obs["condition"].isna().all()
    else:
        per_cell = expected.reindex(adata.obs["sample"]).to_numpy() if accession != "GSE900002" else None
        if per_cell is not None:
            assert (adata.obs["condition"].astype(str).to_numpy() == per_cell.astype(str)).all()
        assert set(adata.obs["condition"].dropna().unique()) == {"AD", "control"}


def test_ensembl_study_keeps_ids_and_symbols(demo_files):
    adata = build_study_anndata(demo_files.catalog().study("GSE900004"), demo_files.study_dir("GSE900004"))
    truth = demo_files.truth.genes.set_index("gene_symbol")
    assert (adata.var["ensembl_id"].astype(str) == truth.loc[adata.var_names, "ensembl_id"].to_numpy()).all()


# --- tiny hand-written files with the real quirks -----------------------------------------------------

def test_dropseq_x_prefix_and_duplicate_genes_are_summed(tmp_path):
    dge = b"GENE\tAAAC\tCCCG\nX0610007P14Rik\t1\t0\nXist\t2\t3\n0610007P14Rik\t4\t1\n"
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM11_P5.dge.txt.gz": gzip.compress(dge), "GSM11_notes.txt": b"x"})
    (tmp_path / "meta.csv").write_text("Run,Sample Name,age\nSRR1,GSM11,P5\n")
    adata = build_study_anndata(make_study("raw_tar_dropseq_dge", "GSE1_RAW.tar"), tmp_path)
    assert list(adata.var_names) == ["0610007P14Rik", "Xist"]  # Xist keeps its X: a letter follows
    np.testing.assert_array_equal(adata.X.toarray(), [[5, 2], [1, 3]])
    assert adata.obs["condition"].isna().all()
    assert list(adata.obs["n_counts"]) == [7, 4]


def test_processed_csv_joins_well_and_float_plate_ids(tmp_path):
    csv = b'"","A1.1","B2.1","A1.2"\n"Apoe",1,0,5\n"Cd74",0,2,1\n'
    (tmp_path / "proc.csv.gz").write_bytes(gzip.compress(csv))
    # The empty plate_id of the bulk row makes pandas read plate ids as 1.0, 2.0.
    pd.DataFrame({"Run": ["r1", "r2", "r3", "r4"], "well_id": ["A1", "b2", "A1", "bulk"],
                  "plate_id": [1.0, 1.0, 2.0, None], "genotype": ["5XFAD", "5XFAD", "wild type", "wild type"]}
                 ).to_csv(tmp_path / "meta.csv", index=False)
    rule = ConditionRule("genotype", {"5XFAD": "AD", "wild type": "control"})
    adata = build_study_anndata(make_study("processed_csv_well_plate", "proc.csv.gz", condition=rule), tmp_path)
    assert list(adata.obs["condition"].astype(str)) == ["AD", "AD", "control"]
    assert list(adata.obs["sample"]) == ["plate1", "plate1", "plate2"]
    np.testing.assert_array_equal(adata.X.toarray(), [[1, 0], [0, 2], [5, 1]])


def _well_plate_study(tmp_path: Path, header: str, metadata: pd.DataFrame, **join) -> Study:
    n_cells = header.count(",") + 1
    body = f'"",{header}\n"Apoe",' + ",".join(str(i + 1) for i in range(n_cells)) + "\n"
    (tmp_path / "proc.csv.gz").write_bytes(gzip.compress(body.encode()))
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    study = make_study("processed_csv_well_plate", "proc.csv.gz",
                       condition=ConditionRule("genotype", {"5XFAD": "AD", "wild type": "control"}))
    return dataclasses.replace(study, metadata=dataclasses.replace(study.metadata, **join))


def test_well_plate_cell_with_a_float_plate_is_well_a1_of_plate_7_not_plate_0(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _well_plate_study(tmp_path, '"A1.7.0","B2.7"', pd.DataFrame(
        {"well_id": ["A1", "B2"], "plate_id": ["7", "7"], "genotype": ["5XFAD", "wild type"]}))
    adata = build_study_anndata(study, tmp_path)
    assert list(adata.obs_names) == ["GSE1:plate7:A1", "GSE1:plate7:B2"]
    assert list(adata.obs["condition"].astype(str)) == ["AD", "control"]


def test_zero_padded_wells_join_their_metadata(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _well_plate_study(tmp_path, '"A01.1","b02.1","C3.1"', pd.DataFrame(
        {"well_id": ["A1", "B2", "c03"], "plate_id": ["1", "1", "1"], "genotype": ["5XFAD", "wild type", "5XFAD"]}),
        cells_without_metadata="na")
    adata = build_study_anndata(study, tmp_path)
    assert list(adata.obs["barcode"]) == ["A1", "B2", "C3"]
    assert list(adata.obs["condition"].astype(str)) == ["AD", "control", "AD"]  # none NA


def test_plate_ids_above_2_to_the_53_stay_distinct(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    big = 2 ** 53
    study = _well_plate_study(tmp_path, f'"A1.{big}","A1.{big + 1}"', pd.DataFrame(
        {"well_id": ["A1", "A1"], "plate_id": [str(big), f"{big + 1}.0"], "genotype": ["5XFAD", "wild type"]}))
    adata = build_study_anndata(study, tmp_path)
    assert list(adata.obs["sample"]) == [f"plate{big}", f"plate{big + 1}"]
    assert list(adata.obs["condition"].astype(str)) == ["AD", "control"]


def test_duplicate_well_plate_rows_that_disagree_are_refused(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _well_plate_study(tmp_path, '"A1.1","B2.1"', pd.DataFrame(
        {"Run": ["r1", "r2", "r3", "r4", "r5"], "well_id": ["A1", "A01", "B2", "B2", ""],
         "plate_id": ["1", "1.0", "1", "1", ""], "genotype": ["5XFAD", "wild type", "5XFAD", "5XFAD", "wild type"]}))
    with pytest.raises(ScgrnInputError, match=r"1 well_id\+plate_id pairs have rows with different 'genotype' "
                                              r"values \(e.g. \{'A1.1': \['5XFAD', 'wild type'\]\}\)"):
        build_study_anndata(study, tmp_path)


def test_10x_members_in_any_order_v2_genes_and_antibody_features(tmp_path):
    matrix = b"%%MatrixMarket matrix coordinate integer general\n%c\n3 2 3\n1 1 4\n3 2 7\n2 2 1\n"
    features = b"ENSMUSG01.2\tApoe\tGene Expression\nENSMUSG02\tCd74\tGene Expression\nCD45\tCD45\tAntibody Capture\n"
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(matrix),
        "GSM21_wt_barcodes.tsv.gz": gzip.compress(b"AAA-1\nCCC-1\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(features),
        "GSM22_ad_genes.tsv.gz": gzip.compress(b"ENSMUSG01\tApoe\nENSMUSG02\tCd74\n"),
        "GSM22_ad_barcodes.tsv.gz": gzip.compress(b"AAA-1\n"),
        "GSM22_ad_matrix.mtx.gz": gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n2 1 1\n2 1 9\n"),
    })
    (tmp_path / "meta.csv").write_text("Sample Name,genotype\nGSM21,WT\nGSM22,5XFAD\n")
    rule = ConditionRule("genotype", {"5XFAD": "AD", "WT": "control"})
    adata = build_study_anndata(make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl", condition=rule),
                                tmp_path)
    assert list(adata.var_names) == ["Apoe", "Cd74"]  # the antibody capture is dropped
    assert list(adata.var["ensembl_id"].astype(str)) == ["ENSMUSG01", "ENSMUSG02"]  # version stripped
    np.testing.assert_array_equal(adata.X.toarray(), [[4, 0], [0, 1], [0, 9]])
    assert list(adata.obs["condition"].astype(str)) == ["control", "control", "AD"]


def test_quoted_or_space_padded_gene_names_are_one_gene_in_every_reader(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    matrix = b"%%MatrixMarket matrix coordinate integer general\n2 1 2\n1 1 4\n2 1 1\n"
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(matrix),
        "GSM21_wt_barcodes.tsv.gz": gzip.compress(b"AAA-1\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(b'"Apoe"\t"Apoe"\nCd74\tCd74\n'),
        "GSM22_ad_matrix.mtx.gz": gzip.compress(matrix),
        "GSM22_ad_barcodes.tsv.gz": gzip.compress(b" CCC-1 \n"),
        "GSM22_ad_features.tsv.gz": gzip.compress(b" Apoe \t Apoe \nCd74 \tCd74 \n"),
    })
    (tmp_path / "meta.csv").write_text("Sample Name,genotype\nGSM21,WT\nGSM22,5XFAD\n")
    adata = build_study_anndata(make_study("raw_tar_10x_mtx", "GSE1_RAW.tar"), tmp_path)
    assert list(adata.var_names) == ["Apoe", "Cd74"]
    assert list(adata.obs["barcode"]) == ["AAA-1", "CCC-1"]
    np.testing.assert_array_equal(adata.X.toarray(), [[4, 1], [4, 1]])


def test_a_byte_order_mark_does_not_stay_in_the_first_barcode_of_a_short_header(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    body = "\ufeffAAAC\tAAAG\nApoe\t1\t2\n".encode()
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(body)})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
    adata = build_study_anndata(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path)
    assert list(adata.obs["barcode"]) == ["AAAC", "AAAG"]


def test_a_nul_in_a_gene_name_is_an_error_naming_the_file(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(b"AAAC\tAAAG\nAp\x00oe\t1\t2\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSM1_a.txt.gz: gene name 'Ap\\x00oe' \(entry 1\) holds a "
                                              "control character"):
        build_study_anndata(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path)


@pytest.mark.parametrize("declared, features, found", [
    ("symbol", b"ENSMUSG00000002985\tApoe\nENSMUSG00000024610\tCd74\n", "Ensembl IDs"),
    ("ensembl", b"Apoe\tApoe\nCd74\tCd74\n", "symbols"),
], ids=["symbol-declared-ensembl-found", "ensembl-declared-symbols-found"])
def test_gene_identifiers_are_checked_against_the_declared_type(tmp_path, declared, features, found):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n2 1 1\n1 1 4\n"),
        "GSM21_wt_barcodes.tsv.gz": gzip.compress(b"AAA-1\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(features)})
    (tmp_path / "meta.csv").write_text("Sample Name,genotype\nGSM21,WT\n")
    study = make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type=declared)
    right = "ensembl" if declared == "symbol" else "symbol"
    with pytest.raises(ScgrnInputError, match=f"declares gene_id_type: {declared}, but its gene identifiers are "
                                              f"{found}.*set gene_id_type: {right}"):
        build_study_anndata(study, tmp_path)


# --- bad inputs: a clear error naming study, file and fix --------------------------------------------

def _dense_study(tmp_path: Path, body: bytes, *, gz: bool = True, meta: str = "Sample Name,strain\nGSM1,5XFAD\n",
                 members: dict[str, bytes] | None = None) -> Study:
    data = gzip.compress(body) if gz else body
    write_tar(tmp_path / "GSE1_RAW.tar", members or {"GSM1_a.txt.gz": data})
    (tmp_path / "meta.csv").write_text(meta)
    return make_study("raw_tar_dense_tsv", "GSE1_RAW.tar", condition=ConditionRule("strain", {"5XFAD": "AD"}))


@pytest.mark.parametrize("case, expected", [
    ("malformed_row", "line 3 has 2 fields, expected 1+2"),
    ("negative", "negative count"),
    ("non_integer", "non-integer count"),
    ("duplicate_barcodes", "duplicate cell barcodes"),
    ("truncated_gzip", "truncated or corrupt"),
    ("metadata_does_not_join", "has no row for sample GSM1"),
    ("condition_column_missing", "has no column 'strain'"),
])
def test_bad_study_inputs_raise_clear_errors(tmp_path, case, expected):
    good = b"\tc1\tc2\nApoe\t1\t0\nCd74\t0\t2\n"
    bodies = {
        "malformed_row": b"\tc1\tc2\nApoe\t1\t0\nCd74\t0\n",
        "negative": b"\tc1\tc2\nApoe\t1\t-1\n",
        "non_integer": b"\tc1\tc2\nApoe\t1\t0.5\n",
        "duplicate_barcodes": b"\tc1\tc1\nApoe\t1\t0\n",
    }
    kwargs = {}
    if case == "truncated_gzip":
        kwargs["members"] = {"GSM1_a.txt.gz": gzip.compress(good * 50)[:-30]}
    if case == "metadata_does_not_join":
        kwargs["meta"] = "Sample Name,strain\nGSM999,5XFAD\n"
    if case == "condition_column_missing":
        kwargs["meta"] = "Sample Name,genotype\nGSM1,5XFAD\n"
    study = _dense_study(tmp_path, bodies.get(case, good), **kwargs)
    with pytest.raises(ScgrnInputError) as error:
        build_study_anndata(study, tmp_path)
    message = str(error.value)
    assert expected in message
    assert message.startswith("GSE1: ")
    assert "; " in message  # the fix follows the problem
    assert ("GSM1_a.txt.gz" in message) or ("meta.csv" in message)


def test_archive_without_sample_files_says_what_was_expected(tmp_path):
    study = _dense_study(tmp_path, b"", members={"README.txt": b"hello"})
    with pytest.raises(ScgrnInputError, match="holds no GSM….txt.gz sample files"):
        list(read_study_samples(study, tmp_path))


def test_10x_sample_missing_its_barcodes_is_named(tmp_path):
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 4\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(b"E1\tApoe\tGene Expression\n")})
    study = make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl")
    with pytest.raises(ScgrnInputError, match="GSM21_wt lacks its barcodes"):
        list(read_study_samples(study, tmp_path))


def test_mtx_with_fewer_entries_than_declared_is_truncated(tmp_path):
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n1 2 3\n1 1 4\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(b"E1\tApoe\tGene Expression\n"),
        "GSM21_wt_barcodes.tsv.gz": gzip.compress(b"A\nB\n")})
    study = make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl")
    with pytest.raises(ScgrnInputError, match="declares 3 entries but holds 1"):
        list(read_study_samples(study, tmp_path))


# --- the real merged GEO counts: INT64_MIN columns are "not measured", never counts ------------------

def test_real_merged_counts_treat_int64_min_columns_as_unmeasured():
    zarr = pytest.importorskip("zarr")
    store = shared_data("geo", "merged_dataset_zarr_subset")
    array = zarr.open_array(str(store / "X"), mode="r")
    # Rows 25,000-25,499 (GSE121654, per SOURCE.md) hold 7,111 whole INT64_MIN gene columns.
    counts, measured = read_dense_count_block(array, slice(25_000, 25_500), study="GSE121654", file=str(store))
    assert (~measured).sum() == 7_111
    assert counts.shape == (500, measured.sum())
    assert counts.data.min() > 0
    totals = np.asarray(counts.sum(axis=1)).ravel()
    assert 800 < np.median(totals) < 3_000  # UMI-scale, as SOURCE.md states (median 1,908)


def test_partial_sentinel_columns_are_rejected():
    block = np.array([[1, np.iinfo(np.int64).min], [2, 3]], dtype=np.int64)
    with pytest.raises(ScgrnInputError, match="INT64_MIN for some cells only"):
        read_dense_count_block(block, slice(0, 2), study="S", file="f")


def test_study_dataclass_is_frozen():
    study = make_study("raw_tar_dense_tsv", "x.tar")
    with pytest.raises(dataclasses.FrozenInstanceError):
        study.accession = "other"  # type: ignore[misc]


@pytest.mark.parametrize("accession", ["GSE900001", "GSE900004"])
def test_streamed_h5ad_equals_the_in_memory_study(demo_files, tmp_path, accession):
    import anndata as ad

    from scgrn_assets.lib.ingest.study_anndata import write_study_h5ad

    study = demo_files.catalog().study(accession)
    in_memory = build_study_anndata(study, demo_files.study_dir(accession))
    write_study_h5ad(study, demo_files.study_dir(accession), tmp_path / "s.h5ad")
    on_disk = ad.read_h5ad(tmp_path / "s.h5ad")
    assert (on_disk.X != in_memory.X).nnz == 0 and on_disk.X.dtype == np.int32
    pd.testing.assert_frame_equal(on_disk.obs, in_memory.obs)
    pd.testing.assert_frame_equal(on_disk.var, in_memory.var)


def test_metadata_rows_wider_than_the_header_are_refused(tmp_path):
    from scgrn_assets.lib.ingest.readers import read_metadata_table

    (tmp_path / "runs.csv").write_bytes(b"well_id,plate_id\n,,,\n")  # found by the reader fuzz
    with pytest.raises(ScgrnInputError, match="more fields than its header"):
        read_metadata_table(tmp_path / "runs.csv", study="GSE1")


def test_a_bad_sample_error_names_the_catalog_switch_that_skips_it(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _dense_study(tmp_path, b"\tc1\tc2\nApoe\t1\t0\nCd74\t0\n")
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSE1_RAW.tar:GSM1_a.txt.gz: line 3 has 2 fields.*re-download "
                                              r".*add exclude_samples: \[GSM1\] to GSE1's catalog entry, or "
                                              r"skip_bad_samples: true"):
        build_study_anndata(study, tmp_path)
    skipping = dataclasses.replace(study, skip_bad_samples=True)
    with pytest.raises(ScgrnInputError, match="every sample file failed to parse"):
        build_study_anndata(skipping, tmp_path)


def test_a_study_without_a_metadata_table_gets_na_metadata_and_says_so(tmp_path):
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t0\nCd74\t0\t2\n")})
    study = dataclasses.replace(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), metadata=None,
                                files=(StudyFile("GSE1_RAW.tar", "file:///x", SHA, "counts"),))
    adata = build_study_anndata(study, tmp_path)
    assert adata.n_obs == 2 and adata.obs["condition"].isna().all() and adata.obs["condition_source"].isna().all()
    assert adata.uns["ingest"]["metadata_table"].startswith("none")
    assert adata.uns["ingest"]["n_cells_without_metadata"] == 0


def test_cr_only_line_endings_are_named_not_taken_for_duplicate_barcodes(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _dense_study(tmp_path, b"c1\tc2\rApoe\t1\t0\rCd74\t0\t2\r")
    with pytest.raises(ScgrnInputError, match=r"GSM1_a.txt.gz: uses CR-only line endings .*tr '\\r' '\\n'"):
        build_study_anndata(study, tmp_path)


def test_a_10x_features_problem_names_the_features_member_not_the_last_one_read(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM21_wt_matrix.mtx.gz": gzip.compress(b"%%MatrixMarket matrix coordinate integer general\n2 1 1\n1 1 4\n"),
        "GSM21_wt_features.tsv.gz": gzip.compress(b"ENSMUSG01\tApoe\nENSMUSG02\t\n"),
        "GSM21_wt_barcodes.tsv.gz": gzip.compress(b"AAA-1\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,genotype\nGSM21,WT\n")
    study = make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl")
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSE1_RAW.tar:GSM21_wt_features.tsv.gz: has 1 genes without a "
                                              r"name \(first at row 2\)"):
        build_study_anndata(study, tmp_path)


def test_a_study_with_samples_without_metadata_reads_without_pandas_warnings(tmp_path):
    import warnings

    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t0\nCd74\t0\t2\n"),
                                          "GSM2_b.txt.gz": gzip.compress(b"c1\tc2\nApoe\t3\t0\nCd74\t0\t2\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM2,5XFAD\n")
    study = make_study("raw_tar_dense_tsv", "GSE1_RAW.tar", condition=ConditionRule("strain", {"5XFAD": "AD"}))
    study = dataclasses.replace(study, metadata=dataclasses.replace(study.metadata, cells_without_metadata="na"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        adata = build_study_anndata(study, tmp_path)
    assert list(adata.obs["condition"].astype(object).fillna("NA")) == ["NA", "NA", "AD", "AD"]
    assert list(adata.obs["n_counts"]) == [1, 2, 3, 2]


def test_excluded_samples_are_never_read_and_are_listed(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    good = gzip.compress(b"c1\tc2\nApoe\t1\t0\nCd74\t0\t2\n")
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": good, "GSM2_b.txt.gz": b"not gzip, not a matrix"})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\nGSM2,5XFAD\n")
    study = make_study("raw_tar_dense_tsv", "GSE1_RAW.tar")
    adata = build_study_anndata(dataclasses.replace(study, exclude_samples=("GSM2",)), tmp_path)
    assert list(adata.obs["sample"]) == ["GSM1", "GSM1"]
    assert adata.uns["ingest"]["skipped_samples"] == "GSM2 (GSM2_b.txt.gz): excluded by the catalog (exclude_samples)"
    with pytest.raises(ScgrnInputError, match=r"exclude_samples lists \['GSM9'\], which the study's count files do "
                                              "not hold"):
        build_study_anndata(dataclasses.replace(study, exclude_samples=("GSM2", "GSM9")), tmp_path)


def test_excluded_plates_of_a_well_plate_study_are_dropped(tmp_path):
    study = _well_plate_study(tmp_path, '"A1.1","B2.2"', pd.DataFrame(
        {"well_id": ["A1", "B2"], "plate_id": ["1", "2"], "genotype": ["5XFAD", "wild type"]}))
    adata = build_study_anndata(dataclasses.replace(study, exclude_samples=("plate2",)), tmp_path)
    assert list(adata.obs["sample"]) == ["plate1"]


def test_a_metadata_join_that_matches_no_cell_is_an_error_even_under_na(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    study = _well_plate_study(tmp_path, '"A1.1","B2.1"', pd.DataFrame(
        {"well_id": ["A1", "B2"], "plate_id": ["7", "7"], "genotype": ["5XFAD", "wild type"]}),
        cells_without_metadata="na")
    with pytest.raises(ScgrnInputError, match=r"meta.csv: none of the study's 2 cells joined a row of the metadata "
                                              r"table.*check metadata.sample_column"):
        build_study_anndata(study, tmp_path)


@pytest.mark.parametrize("accession", ["GSE900001", "GSE900002", "GSE900004"])
def test_progress_names_each_sample_file_as_it_is_read(demo_files, accession, tmp_path):
    study = demo_files.catalog().study(accession)
    calls = []
    write_study_h5ad(study, demo_files.study_dir(accession), tmp_path / "study.h5ad",
                     progress=lambda done, total, **detail: calls.append((done, total, detail["file"])))
    sources = build_study_anndata(study, demo_files.study_dir(accession)).obs["sample"].unique()
    if study.format == "processed_csv_well_plate":  # one file holds every plate
        assert calls == [(0, 1, study.files_with_role("counts")[0].name)]
    else:  # one call per sample file, in archive order, counting the samples read before it
        assert [done for done, _, _ in calls] == list(range(len(sources)))
        assert all(total == 0 for _, total, _ in calls)  # a RAW tar is read in one pass: no total
        assert [name.split("_")[0] for _, _, name in calls] == list(sources)

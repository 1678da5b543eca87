"""Inputs that used to be read without a word and come out wrong (issue #24): each is now an error or a warning.

Undecodable bytes, invisible characters in names, sample files the layout cannot read, condition
values that differ from the rule only in case, header-only dense members, repeated Matrix Market
coordinates, and metadata tables separated by ``;`` or written in UTF-16.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging

import numpy as np
import pytest

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.catalog import ConditionRule, MetadataJoin, Study, StudyFile
from scgrn_assets.lib.ingest.dense_text import read_dense_text_matrix
from scgrn_assets.lib.ingest.genes import normalise_name
from scgrn_assets.lib.ingest.metadata_tables import read_metadata_table
from scgrn_assets.lib.ingest.mtx_text import read_mtx_coo
from scgrn_assets.lib.ingest.study_anndata import build_study_anndata, write_study_h5ad
from scgrn_assets_tests.reliability import ledger
from scgrn_assets_tests.support.archives import write_tar

SHA = "0" * 64
MTX_HEADER = b"%%MatrixMarket matrix coordinate integer general\n"


def make_study(fmt: str = "raw_tar_dense_tsv", *, gene_id_type: str = "symbol", condition=None,
               metadata_name: str = "meta.csv") -> Study:
    files = (StudyFile("GSE1_RAW.tar", "file:///x", SHA, "counts"),
             StudyFile(metadata_name, "file:///x", SHA, "metadata"))
    return Study(accession="GSE1", title="t", species="mouse", format=fmt, gene_id_type=gene_id_type, files=files,
                 metadata=MetadataJoin(file=metadata_name), condition=condition, strip_r_prefix=False)


def tenx_members(sample: str, features: bytes, *, barcodes: bytes = b"AAA-1\n") -> dict[str, bytes]:
    n_genes = features.count(b"\n")
    matrix = MTX_HEADER + f"{n_genes} 1 {n_genes}\n".encode() + b"".join(
        f"{i + 1} 1 {i + 1}\n".encode() for i in range(n_genes))
    return {f"{sample}_s_matrix.mtx.gz": gzip.compress(matrix), f"{sample}_s_barcodes.tsv.gz": gzip.compress(barcodes),
            f"{sample}_s_features.tsv.gz": gzip.compress(features)}


# --- 1. undecodable bytes: refused naming file, line and encoding, or decoded by the declared encoding ----

LATIN1_DENSE = b"c1\tc2\nCd74\t3\t3\n\xc1poe\t1\t0\n\xc9poe\t0\t2\n"


def test_latin1_gene_names_are_refused_naming_file_line_and_encoding_not_merged(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(LATIN1_DENSE)})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSE1_RAW.tar:GSM1_a.txt.gz: line 3 is not valid utf-8 "
                                              r"\(byte 0xc1 at column 1\).*encoding: latin-1"):
        build_study_anndata(make_study(), tmp_path)


def test_a_declared_latin1_encoding_decodes_each_name_as_itself(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(LATIN1_DENSE)})
    (tmp_path / "meta.csv").write_bytes("Sample Name,strain\nGSM1,5XF\u00c1D\n".encode("latin-1"))
    study = dataclasses.replace(make_study(condition=ConditionRule("strain", {"5XF\u00c1D": "AD"})),
                                encoding="latin-1")
    adata = build_study_anndata(study, tmp_path)
    assert list(adata.var_names) == ["Cd74", "\u00c1poe", "\u00c9poe"]
    np.testing.assert_array_equal(adata.X.toarray(), [[3, 1, 0], [3, 0, 2]])
    assert list(adata.obs["condition"].astype(str)) == ["AD", "AD"]


def test_latin1_bytes_in_a_header_or_10x_names_are_refused_naming_the_line(tmp_path):
    ledger.record("bad_input", 2)  # counted by bench/reliability.py
    with pytest.raises(ScgrnInputError, match=r"GSM1_a.txt.gz: line 1 is not valid utf-8 \(byte 0xe9 at column 5\)"):
        read_dense_text_matrix(io.BytesIO(b"c1\tc\xe9\nApoe\t1\t0\n"), sep="\t", study="GSE1", file="GSM1_a.txt.gz")
    write_tar(tmp_path / "GSE1_RAW.tar", tenx_members("GSM1", b"E1\tApoe\nE2\tCd74\nE3\t\xc1poe\n"))
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
    with pytest.raises(ScgrnInputError, match=r"GSM1_s_features.tsv.gz: line 3 is not valid utf-8 \(byte 0xc1"):
        build_study_anndata(make_study("raw_tar_10x_mtx", gene_id_type="ensembl"), tmp_path)


def test_latin1_bytes_in_a_metadata_table_are_refused_naming_the_line(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    (tmp_path / "meta.csv").write_bytes(b"Sample Name,strain\nGSM1,5XFAD\nGSM2,C57BL/6 \xe9\n")
    with pytest.raises(ScgrnInputError, match=r"GSE1: meta.csv: line 3 is not valid utf-8 \(byte 0xe9 at column "
                                              r"14\)"):
        read_metadata_table(tmp_path / "meta.csv", study="GSE1")


def test_the_catalog_accepts_a_known_encoding_and_refuses_an_unknown_one(tmp_path):
    import yaml

    from scgrn_assets.lib.ingest.catalog import load_catalog

    entry = {"accession": "GSE1", "species": "mouse", "format": "raw_tar_dense_tsv", "gene_id_type": "symbol",
             "files": [{"name": "GSE1_RAW.tar", "url": "https://example.org/GSE1_RAW.tar", "role": "counts"}],
             "encoding": "latin-1"}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"studies": [entry]}))
    assert load_catalog(path).study("GSE1").encoding == "latin-1"
    path.write_text(yaml.safe_dump({"studies": [{k: v for k, v in entry.items() if k != "encoding"}]}))
    assert load_catalog(path).study("GSE1").encoding == "utf-8"
    path.write_text(yaml.safe_dump({"studies": [{**entry, "encoding": "ebcdic"}]}))
    with pytest.raises(ScgrnInputError, match=r"unknown encoding 'ebcdic'.*utf-8"):
        load_catalog(path)


# --- 2. invisible characters: format characters and NBSP never make a second gene -----------------------

def test_normalise_name_strips_format_characters_and_nbsp():
    assert normalise_name("Apo\u200be") == "Apoe"  # zero-width space
    assert normalise_name("\u200eCd74\u2060") == "Cd74"  # left-to-right mark, word joiner
    assert normalise_name("\u00a0Apoe\u00a0") == "Apoe"
    assert normalise_name("Apoe\u00a0\u00a0\u200b") == "Apoe"
    assert normalise_name("\ufeff\"Apoe\"") == "Apoe"
    assert normalise_name("H2-K1") == "H2-K1" and normalise_name("\u00c1poe") == "\u00c1poe"


def test_a_zero_width_space_does_not_make_a_second_gene_in_the_dense_path(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM1_a.txt.gz": gzip.compress(b"c1\nApoe\t1\nCd74\t2\n"),
        "GSM2_b.txt.gz": gzip.compress("c1\nApo\u200be\t3\nCd74\u00a0\t4\n".encode())})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\nGSM2,5XFAD\n")
    adata = build_study_anndata(make_study(), tmp_path)
    assert list(adata.var_names) == ["Apoe", "Cd74"]
    np.testing.assert_array_equal(adata.X.toarray(), [[1, 2], [3, 4]])


def test_a_zero_width_space_does_not_split_one_ensembl_id_in_the_10x_path(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {
        **tenx_members("GSM1", b"ENSMUSG01\tApoe\nENSMUSG02\tCd74\n"),
        **tenx_members("GSM2", "ENSMUSG01\tApo\u200be\nENSMUSG02\tCd74\u00a0\n".encode(), barcodes=b"CCC-1\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\nGSM2,5XFAD\n")
    adata = build_study_anndata(make_study("raw_tar_10x_mtx", gene_id_type="ensembl"), tmp_path)
    assert list(adata.var_names) == ["Apoe", "Cd74"]
    assert list(adata.var["ensembl_id"].astype(str)) == ["ENSMUSG01", "ENSMUSG02"]
    assert adata.uns["ingest"]["ensembl_ids_with_two_symbols"] == ""


def test_one_ensembl_id_with_two_symbols_across_samples_is_reported(tmp_path, caplog):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {
        **tenx_members("GSM1", b"ENSMUSG01\tApoe\nENSMUSG02\tCd74\n"),
        **tenx_members("GSM2", b"ENSMUSG01\tApoE\nENSMUSG02\tCd74\n", barcodes=b"CCC-1\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\nGSM2,5XFAD\n")
    with caplog.at_level(logging.WARNING):
        adata = build_study_anndata(make_study("raw_tar_10x_mtx", gene_id_type="ensembl"), tmp_path)
    assert adata.uns["ingest"]["ensembl_ids_with_two_symbols"] == "ENSMUSG01: Apoe, ApoE"
    assert "ENSMUSG01" in adata.uns["ingest"]["warnings"]
    assert any("ENSMUSG01" in record.getMessage() and "Apoe" in record.getMessage() for record in caplog.records)


# --- 5. sample files the layout cannot read, metadata samples without counts ------------------------------

def _two_sample_tar(tmp_path, members: dict[str, bytes], meta: str = "Sample Name,strain\nGSM1,5XFAD\nGSM2,5XFAD\n"):
    write_tar(tmp_path / "GSE1_RAW.tar", members)
    (tmp_path / "meta.csv").write_text(meta)


def test_a_sample_whose_only_member_has_another_suffix_is_not_silently_dropped(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    _two_sample_tar(tmp_path, {"GSM1_a.txt.gz": gzip.compress(b"c1\nApoe\t1\n"), "GSM2_b.txt": b"c1\nApoe\t5\n"})
    study = make_study()
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSE1_RAW.tar:GSM2_b.txt: sample GSM2's only file is not a "
                                              r"GSM….txt.gz file.*exclude_samples: \[GSM2\].*skip_bad_samples"):
        build_study_anndata(study, tmp_path)
    skipping = build_study_anndata(dataclasses.replace(study, skip_bad_samples=True), tmp_path)
    assert skipping.uns["ingest"]["n_skipped_samples"] == 1
    assert skipping.uns["ingest"]["skipped_samples"].startswith("GSM2 (GSM2_b.txt): sample GSM2's only file")
    excluded = build_study_anndata(dataclasses.replace(study, exclude_samples=("GSM2",)), tmp_path)
    assert excluded.uns["ingest"]["skipped_samples"] == "GSM2 (GSM2_b.txt): excluded by the catalog (exclude_samples)"


def test_extra_members_and_metadata_samples_without_counts_are_listed_and_warned(tmp_path, caplog):
    ledger.record("bad_input")  # counted by bench/reliability.py
    _two_sample_tar(tmp_path, {"GSM1_a.txt.gz": gzip.compress(b"c1\nApoe\t1\n"), "GSM1_notes.csv": b"x",
                               "filelist.txt": b"Archive\tName\n"},
                    meta="Sample Name,strain\nGSM1,5XFAD\nGSM3,5XFAD\nGSM3,5XFAD\n")
    with caplog.at_level(logging.WARNING):
        adata = build_study_anndata(make_study(), tmp_path)
    ingest = adata.uns["ingest"]
    assert adata.n_obs == 1 and ingest["n_skipped_samples"] == 0
    assert ingest["unread_members"] == "GSM1_notes.csv"
    assert ingest["metadata_samples_without_counts"] == "GSM3"
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "GSM1_notes.csv" in messages and "GSM3" in messages


def test_a_10x_sample_with_an_unreadable_member_only_is_not_silently_dropped(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    _two_sample_tar(tmp_path, {**tenx_members("GSM1", b"ENSMUSG01\tApoe\n"),
                               "GSM2_filtered_feature_bc_matrix.h5": b"x"})
    with pytest.raises(ScgrnInputError, match=r"GSM2_filtered_feature_bc_matrix.h5: sample GSM2's only file is not"):
        build_study_anndata(make_study("raw_tar_10x_mtx", gene_id_type="ensembl"), tmp_path)


# --- 6. condition values that miss the rule -----------------------------------------------------------

def test_a_condition_value_differing_only_in_case_is_warned_with_its_cells_and_the_near_match(tmp_path, caplog):
    ledger.record("bad_input")  # counted by bench/reliability.py
    _two_sample_tar(tmp_path, {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t2\n"),
                               "GSM2_b.txt.gz": gzip.compress(b"c1\nApoe\t5\n")},
                    meta="Sample Name,strain\nGSM1,5xFAD\nGSM2,C57BL/6\n")
    study = make_study(condition=ConditionRule("strain", {"5XFAD": "AD", "C57BL/6": "control"}))
    with caplog.at_level(logging.WARNING):
        adata = build_study_anndata(study, tmp_path)
    assert list(adata.obs["condition"].astype(object).fillna("NA")) == ["NA", "NA", "control"]
    expected = "'5xFAD': 2 cells (did you mean '5XFAD'?)"
    assert adata.uns["ingest"]["unmatched_condition_values"] == expected
    assert any(expected in record.getMessage() for record in caplog.records)


# --- 7. header-only dense members, repeated MTX coordinates --------------------------------------------

def test_a_dense_member_with_a_header_and_no_gene_lines_is_refused(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    _two_sample_tar(tmp_path, {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t2\n"),
                               "GSM2_b.txt.gz": gzip.compress(b"c1\tc2\tc3\n\n")})
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSE1_RAW.tar:GSM2_b.txt.gz: has a header of 3 cells but no "
                                              r"gene lines"):
        build_study_anndata(make_study(), tmp_path)


def test_a_repeated_mtx_coordinate_is_refused_naming_it(tmp_path):
    ledger.record("bad_input", 2)  # counted by bench/reliability.py
    body = MTX_HEADER + b"3 2 4\n1 1 4\n2 1 1\n3 2 7\n2 1 5\n"
    with pytest.raises(ScgrnInputError, match=r"GSE1: GSM1_matrix.mtx.gz: entry 4 repeats the coordinate \(row 2, "
                                              r"column 1\) of an earlier entry"):
        read_mtx_coo(io.BytesIO(body), study="GSE1", file="GSM1_matrix.mtx.gz")
    write_tar(tmp_path / "GSE1_RAW.tar", {
        "GSM1_s_matrix.mtx.gz": gzip.compress(MTX_HEADER + b"2 1 2\n1 1 4\n1 1 4\n"),
        "GSM1_s_barcodes.tsv.gz": gzip.compress(b"AAA-1\n"),
        "GSM1_s_features.tsv.gz": gzip.compress(b"E1\tApoe\nE2\tCd74\n")})
    (tmp_path / "meta.csv").write_text("Sample Name,strain\nGSM1,5XFAD\n")
    with pytest.raises(ScgrnInputError, match=r"GSM1_s_matrix.mtx.gz: entry 2 repeats the coordinate \(row 1, "
                                              r"column 1\)"):
        build_study_anndata(make_study("raw_tar_10x_mtx", gene_id_type="ensembl"), tmp_path)


def test_unsorted_mtx_entries_without_repeats_read_as_written():
    body = MTX_HEADER + b"3 2 4\n3 2 7\n1 1 4\n2 2 1\n2 1 5\n"
    matrix = read_mtx_coo(io.BytesIO(body), study="GSE1", file="m")
    np.testing.assert_array_equal(matrix.toarray(), [[4, 0], [5, 1], [0, 7]])


# --- unclear: ;-separated or UTF-16 metadata tables ------------------------------------------------------

@pytest.mark.parametrize("encoding, text", [
    ("utf-8", "Sample Name;strain\nGSM1;5XFAD\n"),
    ("utf-16", "Sample Name,strain\nGSM1,5XFAD\n"),
    ("utf-16", "Sample Name;strain\r\nGSM1;5XFAD\r\n"),
    ("utf-8-sig", "Sample Name\tstrain\nGSM1\t5XFAD\n"),
], ids=["semicolon", "utf-16", "utf-16-semicolon", "utf-8-bom-tab-in-a-csv"])
def test_semicolon_tab_or_utf16_metadata_tables_join(tmp_path, encoding, text):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t2\n")})
    (tmp_path / "meta.csv").write_bytes(text.encode(encoding))
    adata = build_study_anndata(make_study(condition=ConditionRule("strain", {"5XFAD": "AD"})), tmp_path)
    assert list(adata.obs["condition"].astype(str)) == ["AD", "AD"]


def test_a_metadata_table_without_the_join_column_says_what_it_saw(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_a.txt.gz": gzip.compress(b"c1\tc2\nApoe\t1\t2\n")})
    (tmp_path / "meta.csv").write_text("Sample Name|strain\nGSM1|5XFAD\n")
    with pytest.raises(ScgrnInputError, match=r"meta.csv: has no column 'Sample Name' to join samples on \(read as "
                                              r"utf-8, separated by ','; columns: \['Sample Name\|strain'\]\)"):
        build_study_anndata(make_study(), tmp_path)


def test_streamed_h5ad_holds_the_new_ingest_fields(tmp_path):
    import anndata as ad

    _two_sample_tar(tmp_path, {"GSM1_a.txt.gz": gzip.compress(b"c1\nApoe\t1\n"), "GSM1_notes.csv": b"x"},
                    meta="Sample Name,strain\nGSM1,5xFAD\nGSM3,5XFAD\n")
    study = make_study(condition=ConditionRule("strain", {"5XFAD": "AD"}))
    write_study_h5ad(study, tmp_path, tmp_path / "s.h5ad")
    ingest = ad.read_h5ad(tmp_path / "s.h5ad").uns["ingest"]
    assert ingest["unread_members"] == "GSM1_notes.csv"
    assert ingest["metadata_samples_without_counts"] == "GSM3"
    assert ingest["unmatched_condition_values"] == "'5xFAD': 1 cells (did you mean '5XFAD'?)"
    assert ingest["n_warnings"] == 3


def test_a_series_matrix_is_decoded_strictly_line_by_line_or_as_utf16(tmp_path):
    ledger.record("bad_input")  # counted by bench/reliability.py
    text = ('!Series_title\t"t"\n!Sample_title\t"a"\t"b"\n!Sample_geo_accession\t"GSM1"\t"GSM2"\n'
            '!Sample_characteristics_ch1\t"strain: 5XF\u00c1D"\t"strain: C57BL/6"\n!series_matrix_table_begin\n')
    path = tmp_path / "GSE1_series_matrix.txt.gz"
    path.write_bytes(gzip.compress(text.encode("latin-1")))
    with pytest.raises(ScgrnInputError, match=r"GSE1_series_matrix.txt.gz: line 4 is not valid utf-8 \(byte 0xc1 at "
                                              r"column 41\)"):
        read_metadata_table(path, study="GSE1")
    assert list(read_metadata_table(path, study="GSE1", encoding="latin-1")["strain"]) == ["5XF\u00c1D", "C57BL/6"]
    path.write_bytes(gzip.compress(text.encode("utf-16")))
    table = read_metadata_table(path, study="GSE1")
    assert list(table["geo_accession"]) == ["GSM1", "GSM2"] and list(table["strain"]) == ["5XF\u00c1D", "C57BL/6"]


def test_the_demo_studies_ingest_without_a_warning(demo_files):
    # The warnings above must stay quiet on clean files (the demo tars carry a filelist.txt, the
    # well/plate table a bulk run without a plate, two SRA runs per sample).
    for study in demo_files.catalog().studies:
        ingest = build_study_anndata(study, demo_files.study_dir(study.accession)).uns["ingest"]
        assert (ingest["n_warnings"], ingest["warnings"]) == (0, ""), study.accession
        assert ingest["unread_members"] == ingest["metadata_samples_without_counts"] == ""

"""The real-GEO layouts: series matrices, NCBI counts, MARS-seq headers, bad samples, cells without metadata.

Expectations are computed by brute force from what each test writes, not by the readers.
"""

from __future__ import annotations

import dataclasses
import gzip

import numpy as np
import pandas as pd
import pytest

from scgrn_assets.lib.ingest.catalog import ConditionRule, MetadataJoin, Study, StudyFile
from scgrn_assets.lib.demo.geo_layouts import write_demo_geo
from scgrn_assets.lib.demo.simulator import DemoConfig
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.readers import read_metadata_table
from scgrn_assets.lib.ingest.study_anndata import build_study_anndata
from scgrn_assets_tests.support.archives import write_tar

MATRIX = "GSE1_series_matrix.txt.gz"


def _study(fmt: str, counts_name: str, *, gene_id_type="symbol", condition=None, extra_files=(),
           skip_bad_samples=False, **join) -> Study:
    files = (StudyFile(counts_name, "https://example.org/c", None, "counts"),
             StudyFile(MATRIX, "https://example.org/m", None, "metadata"), *extra_files)
    return Study(accession="GSE1", title="t", species="mouse", format=fmt, gene_id_type=gene_id_type, files=files,
                 metadata=MetadataJoin(file=MATRIX, **{"sample_column": "geo_accession", **join}),
                 condition=condition, skip_bad_samples=skip_bad_samples)


def _series_matrix(samples: list[dict], *, lines: list[list[str]]) -> bytes:
    """``samples``: gsm and title; ``lines``: characteristic lines, one cell per sample (as GEO aligns them)."""
    def line(key, values):
        return "\t".join([key, *(f'"{v}"' for v in values)]) + "\n"
    text = line("!Series_geo_accession", ["GSE1"]) + "\n"
    text += line("!Sample_title", [s["title"] for s in samples])
    text += line("!Sample_geo_accession", [s["gsm"] for s in samples])
    text += "".join(line("!Sample_characteristics_ch1", cells) for cells in lines)
    text += line("!Sample_data_processing", ["step one"] * len(samples))
    text += line("!Sample_data_processing", ["step two"] * len(samples))
    # The expression table is never read: garbage there must not matter.
    text += '!series_matrix_table_begin\n"ID_REF"\t"x"\nnot\ta\ttable\t"\n!series_matrix_table_end\n'
    return gzip.compress(text.encode())


def test_series_matrix_reads_characteristics_by_key_not_by_line(tmp_path):
    samples = [{"gsm": "GSM1", "title": "AB1"}, {"gsm": "GSM2", "title": "AB2"}, {"gsm": "GSM3", "title": "AB3"}]
    lines = [["strain: 5XFAD", "strain: C57BL/6", "age: P100"],       # GSM3 has no strain: its line 1 is its age
             ["age: 6 months", "age: 6 months", "treatment: LPC"],
             ["time: 10:30", "unlabelled note", ""],                  # a value with ':'; a cell without a key
             ["tissue: cortex", "tissue: cortex", "tissue: cortex"],
             ["tissue: hippocampus", "", ""]]                          # a key twice for one sample
    (tmp_path / MATRIX).write_bytes(_series_matrix(samples, lines=lines))
    table = read_metadata_table(tmp_path / MATRIX, study="GSE1")

    expected = pd.DataFrame({
        "title": ["AB1", "AB2", "AB3"], "geo_accession": ["GSM1", "GSM2", "GSM3"],
        "data_processing": ["step one; step two"] * 3,
        "strain": ["5XFAD", "C57BL/6", ""], "age": ["6 months", "6 months", "P100"],
        "treatment": ["", "", "LPC"], "time": ["10:30", "", ""],
        "tissue": ["cortex; hippocampus", "cortex", "cortex"], "characteristics_ch1": ["", "unlabelled note", ""],
    })
    pd.testing.assert_frame_equal(table[sorted(table.columns)], expected[sorted(expected.columns)])


@pytest.mark.parametrize("text, expected", [
    ('!Sample_title\t"a"\n!series_matrix_table_begin\n', "no !Sample_geo_accession line"),
    ('!Sample_geo_accession\t"GSM1"\n!Sample_characteristics_ch1\t"a: 1"\t"a: 2"\n', "2 values for 1 samples"),
])
def test_malformed_series_matrix_is_named(tmp_path, text, expected):
    (tmp_path / MATRIX).write_bytes(gzip.compress(text.encode()))
    with pytest.raises(ScgrnInputError) as error:
        read_metadata_table(tmp_path / MATRIX, study="GSE1")
    assert expected in str(error.value) and MATRIX in str(error.value) and "GSE1" in str(error.value)


def _mars_seq_member(genes: list[str], wells: list[str], counts: np.ndarray) -> bytes:
    """R write.table: the header lists the wells only, one field shorter than the rows."""
    rows = "".join("\t".join([g, *map(str, row)]) + "\n" for g, row in zip(genes, counts))
    return gzip.compress(("\t".join(wells) + "\n" + rows).encode())


def _mars_seq_files(tmp_path, *, bad: bool):
    rng = np.random.default_rng(3)
    genes = ["Apoe", "0610005C13Rik", "ERCC-00002", "Cst7", "ERCC-00130"]
    members, expected = {}, {}
    for gsm, batch, n_wells in (("GSM2629355", "AB1550", 3), ("GSM2629430", "AB2425", 2), ("GSM2629361", "AB1556", 4)):
        wells = [f"W{gsm[-3:]}{i}" for i in range(n_wells)]
        counts = rng.poisson(3, size=(len(genes), n_wells))
        data = _mars_seq_member(genes, wells, counts)
        if bad and gsm == "GSM2629430":
            data = gzip.compress(gzip.decompress(data).replace(b"\nCst7\t", b"\nCst7\t1\n", 1))  # a short row
        members[f"{gsm}_{batch}.txt.gz"] = data
        expected[gsm] = (wells, counts)
    write_tar(tmp_path / "GSE1_RAW.tar", members)
    (tmp_path / MATRIX).write_bytes(_series_matrix(
        [{"gsm": g, "title": g} for g in expected],
        lines=[["strain: 5XFAD", "strain: C57BL/6", "strain: C57BL/6"], ["treatment: Alzheimer's disease"] * 3]))
    return genes, expected


def test_mars_seq_header_spike_ins_and_series_matrix_condition(tmp_path):
    genes, expected = _mars_seq_files(tmp_path, bad=False)
    rule = ConditionRule("strain", {"5XFAD": "AD", "C57BL/6": "control"})
    adata = build_study_anndata(_study("raw_tar_dense_tsv", "GSE1_RAW.tar", condition=rule), tmp_path)

    keep = [i for i, g in enumerate(genes) if not g.startswith("ERCC-")]
    assert list(adata.var_names) == [genes[i] for i in keep]  # spike-ins dropped, Rik name kept as written
    brute = np.vstack([counts[keep].T for _, counts in expected.values()])
    np.testing.assert_array_equal(adata.X.toarray(), brute)
    assert list(adata.obs["barcode"]) == [w for wells, _ in expected.values() for w in wells]
    assert list(adata.obs["condition"].astype(str)) == ["AD"] * 3 + ["control"] * 6
    np.testing.assert_array_equal(adata.obs["n_counts"], brute.sum(axis=1))  # library size without spike-ins
    assert adata.uns["ingest"]["n_spike_ins_dropped"] == 2


def test_bad_sample_stops_the_study_by_default_naming_member_and_fix(tmp_path):
    _mars_seq_files(tmp_path, bad=True)
    with pytest.raises(ScgrnInputError) as error:
        build_study_anndata(_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path)
    message = str(error.value)
    assert "GSE1" in message and "GSM2629430_AB2425.txt.gz" in message and "line 5 has 2 fields" in message
    assert "exclude the sample" in error.value.fix


def test_skip_bad_samples_reads_the_others_and_lists_the_skipped(tmp_path, caplog):
    genes, expected = _mars_seq_files(tmp_path, bad=True)
    adata = build_study_anndata(_study("raw_tar_dense_tsv", "GSE1_RAW.tar", skip_bad_samples=True), tmp_path)
    assert sorted(adata.obs["sample"].unique()) == ["GSM2629355", "GSM2629361"]
    assert adata.n_obs == len(expected["GSM2629355"][0]) + len(expected["GSM2629361"][0])
    assert adata.uns["ingest"]["n_skipped_samples"] == 1
    assert "GSM2629430 (GSM2629430_AB2425.txt.gz): line 5 has 2 fields" in adata.uns["ingest"]["skipped_samples"]
    assert "skipping sample GSM2629430" in caplog.text


def test_every_sample_bad_is_still_an_error(tmp_path):
    write_tar(tmp_path / "GSE1_RAW.tar", {"GSM1_AB1.txt.gz": gzip.compress(b"W1\tW2\nApoe\t1\t2\nCd74\t1\n")})
    (tmp_path / MATRIX).write_bytes(_series_matrix([{"gsm": "GSM1", "title": "a"}], lines=[["strain: 5XFAD"]]))
    with pytest.raises(ScgrnInputError, match="every sample file failed to parse"):
        build_study_anndata(_study("raw_tar_dense_tsv", "GSE1_RAW.tar", skip_bad_samples=True), tmp_path)


def _ncbi_files(tmp_path, rng):
    gene_ids = ["11816", "83433", "22177", "999999", "13051", "13052"]
    symbols = {"11816": "Apoe", "83433": "Trem2", "22177": "Tyrobp", "13051": "Cx3cr1", "13052": "Cx3cr1"}
    gsms = ["GSM1941451", "GSM1941452", "GSM1941453"]
    counts = rng.integers(0, 100_000, size=(len(gene_ids), len(gsms)))
    text = "GeneID\t" + "\t".join(gsms) + "\n" + "".join(
        "\t".join([g, *map(str, row)]) + "\n" for g, row in zip(gene_ids, counts))
    (tmp_path / "GSE1_raw_counts_GRCm39_NCBI.tsv.gz").write_bytes(gzip.compress(text.encode()))
    annotation = "GeneID\tSymbol\tDescription\n" + "".join(f"{g}\t{s}\td\n" for g, s in symbols.items())
    (tmp_path / "Mouse.GRCm39.annot.tsv.gz").write_bytes(gzip.compress(annotation.encode()))
    (tmp_path / MATRIX).write_bytes(_series_matrix([{"gsm": g, "title": g} for g in gsms],
                                                   lines=[["age: 4 months"] * 3]))
    return gene_ids, symbols, gsms, counts


def test_ncbi_counts_are_one_profile_per_gsm_with_geneids_mapped_to_symbols(tmp_path):
    gene_ids, symbols, gsms, counts = _ncbi_files(tmp_path, np.random.default_rng(5))
    gene_map = StudyFile("Mouse.GRCm39.annot.tsv.gz", "https://example.org/a", None, "gene_map")
    adata = build_study_anndata(_study("ncbi_rnaseq_counts", "GSE1_raw_counts_GRCm39_NCBI.tsv.gz",
                                       gene_id_type="entrez", extra_files=(gene_map,)), tmp_path)

    # Brute force: map each GeneID (unmapped ones keep the ID), sum IDs that share a symbol.
    by_symbol: dict[str, np.ndarray] = {}
    for gene_id, row in zip(gene_ids, counts):
        symbol = symbols.get(gene_id, gene_id)
        by_symbol[symbol] = by_symbol.get(symbol, 0) + row
    assert list(adata.var_names) == list(by_symbol)
    np.testing.assert_array_equal(adata.X.toarray(), np.column_stack(list(by_symbol.values())))
    assert list(adata.obs["sample"]) == gsms and list(adata.obs["barcode"]) == gsms
    assert adata.var["ensembl_id"].isna().all()  # GeneIDs are not Ensembl IDs
    assert adata.obs["condition"].isna().all()


def test_ncbi_counts_with_non_gsm_columns_are_refused(tmp_path):
    (tmp_path / "c.tsv.gz").write_bytes(gzip.compress(b"GeneID\tsample_1\n11816\t5\n"))
    (tmp_path / MATRIX).write_bytes(_series_matrix([{"gsm": "GSM1", "title": "a"}], lines=[["a: b"]]))
    gene_map = StudyFile("m.tsv", "https://example.org/a", None, "gene_map")
    (tmp_path / "m.tsv").write_text("GeneID\tSymbol\n11816\tApoe\n")
    with pytest.raises(ScgrnInputError, match="not GSM accessions"):
        build_study_anndata(_study("ncbi_rnaseq_counts", "c.tsv.gz", gene_id_type="entrez",
                                   extra_files=(gene_map,)), tmp_path)


def _smart_seq_files(tmp_path):
    csv = b'"","C9.1001200107","B10.1001200106","H9.1001200141"\n"Apoe",1,0,5\n"100043387",0,2,1\n'
    (tmp_path / "proc.csv.gz").write_bytes(gzip.compress(csv))
    (tmp_path / MATRIX).write_bytes(_series_matrix(
        [{"gsm": "GSM1", "title": "a"}, {"gsm": "GSM2", "title": "b"}, {"gsm": "GSM3", "title": "c"}],
        lines=[["well_id: C9", "well_id: B10", "strain: C57BL6N"],
               ["plate_id: 1001200107.0", "plate_id: 1001200106.0", ""],
               ["tissue: HIP", "tissue: OB", ""]]))


def test_cells_without_metadata_stop_the_study_unless_the_catalog_keeps_them(tmp_path):
    _smart_seq_files(tmp_path)
    rule = ConditionRule("tissue", {"HIP": "AD", "OB": "control"})  # a test rule, to see NA where unmatched
    strict = _study("processed_csv_well_plate", "proc.csv.gz", condition=rule, well_column="well_id",
                    plate_column="plate_id")
    with pytest.raises(ScgrnInputError) as error:
        build_study_anndata(strict, tmp_path)
    assert "1 of 1 cells of plate1001200141" in str(error.value) and "cells_without_metadata: na" in error.value.fix

    lenient = dataclasses.replace(strict, metadata=dataclasses.replace(strict.metadata, cells_without_metadata="na"))
    adata = build_study_anndata(lenient, tmp_path)
    conditions = dict(zip(adata.obs["barcode"] + "." + adata.obs["sample"].str.removeprefix("plate"),
                          adata.obs["condition"].astype(object)))
    assert conditions["C9.1001200107"] == "AD" and conditions["B10.1001200106"] == "control"
    assert pd.isna(conditions["H9.1001200141"])
    assert adata.uns["ingest"]["n_cells_without_metadata"] == 1
    assert list(adata.var_names) == ["Apoe", "100043387"]  # a bare numeric name is kept as written


def test_animal_column_names_the_animal_and_the_sample_is_the_animal_otherwise(tmp_path):
    """One GSM per cell (plate layouts): the catalog's metadata.animal_column groups cells into animals."""
    csv = (b'"","C9.1","B10.1","H9.2","A1.2"\n"Apoe",1,0,5,2\n"Trem2",0,2,1,3\n')
    (tmp_path / "proc.csv.gz").write_bytes(gzip.compress(csv))
    (tmp_path / MATRIX).write_bytes(_series_matrix(
        [{"gsm": f"GSM{i}", "title": f"c{i}"} for i in range(4)],
        lines=[["well_id: C9", "well_id: B10", "well_id: H9", "well_id: A1"],
               ["plate_id: 1", "plate_id: 1", "plate_id: 2", "plate_id: 2"],
               ["mouse: m7", "mouse: m7", "mouse: m8", "mouse:  m9 "]]))
    study = _study("processed_csv_well_plate", "proc.csv.gz", well_column="well_id", plate_column="plate_id",
                   animal_column="mouse")
    adata = build_study_anndata(study, tmp_path)
    animals = dict(zip(adata.obs["barcode"] + "." + adata.obs["sample"].str.removeprefix("plate"),
                       adata.obs["animal"]))
    assert animals == {"C9.1": "m7", "B10.1": "m7", "H9.2": "m8", "A1.2": "m9"}
    without = build_study_anndata(dataclasses.replace(study, metadata=dataclasses.replace(study.metadata,
                                                                                          animal_column="")), tmp_path)
    assert (without.obs["animal"].astype(str) == without.obs["sample"].astype(str)).all()
    with pytest.raises(ScgrnInputError, match="animal_column"):
        build_study_anndata(dataclasses.replace(study, metadata=dataclasses.replace(study.metadata,
                                                                                    animal_column="donor")), tmp_path)


def test_progress_counts_each_studys_files_up_to_its_total(tmp_path):
    config = DemoConfig.scaled(n_cells=400, n_genes=400)
    calls = []
    write_demo_geo(tmp_path, config, progress=lambda done, total, **detail: calls.append((done, total, detail)))
    assert sorted({detail["stage"] for _, _, detail in calls}) == [design.accession for design in config.studies]
    for design in config.studies:
        mine = [(done, total) for done, total, detail in calls if detail["stage"] == design.accession]
        assert [done for done, _ in mine] == list(range(1, len(mine) + 1))
        assert all(total == len(mine) for _, total in mine)
    assert all(detail["file"].startswith(detail["stage"] + "/") for _, _, detail in calls)

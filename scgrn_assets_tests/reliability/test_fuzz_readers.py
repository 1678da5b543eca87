"""Property-based fuzz of every reader: any bytes give a valid result or ScgrnInputError.

Each reader is fed arbitrary bytes, bytes from a small alphabet of the characters count
matrices are made of, and valid files damaged at random (bytes flipped, cut, spliced with
awkward tokens), raw or gzip-compressed. The study layouts are driven end to end through
:func:`build_study_anndata` on a tar/CSV built from the fuzzed bytes. Any other exception
fails the property; a hang is caught by hypothesis' per-example deadline.
"""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scgrn_assets.lib.ingest import dense_text
from scgrn_assets.lib.ingest.archive import read_guard
from scgrn_assets.lib.ingest.catalog import ConditionRule, MetadataJoin, Study, StudyFile, load_catalog
from scgrn_assets.lib.ingest.dense_text import DenseTextMatrix, read_dense_text_matrix
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.readers import read_metadata_table
from scgrn_assets.lib.ingest.study_anndata import build_study_anndata
from scgrn_assets_tests.reliability import ledger
from scgrn_assets_tests.support.archives import tar_bytes

STUDY = "GSE1"
SHA = "0" * 64
# Examples per property: SCGRN_FUZZ_EXAMPLES raises it for long campaigns (bench/reliability.py --full).
N_EXAMPLES = int(os.environ.get("SCGRN_FUZZ_EXAMPLES", "60"))
# Generous deadline: the machine is shared; a real hang runs for minutes, not seconds.
FUZZ = settings(max_examples=N_EXAMPLES, deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

AWKWARD_TOKENS = [b"-", b".", b"e", b"E+", b"1e+05", b"1e-3", b"\r", b"\r\n", b"\"", b"\t", b",", b"\n", b"\n\n",
                  b"99999999999", b"2147483648", b"NA", b"nan", b"inf", b"\x00", b"\xff\xfe", b"%", b" ", b"GSM"]
COUNT_ALPHABET = "0123456789.eE+-\t,\n\r\"GxNA %"

VALID_DENSE_TSV = b"\tc1\tc2\tc3\nApoe\t1\t0\t3\nCd74\t0\t2\t0\nX0610007P14Rik\t5\t0\t1e+01\n"
VALID_DGE = b"GENE\tc1\tc2\nApoe\t1\t0\nX0610007P14Rik\t0\t2\n"
VALID_WELL_PLATE_CSV = b'"","A1.1","B2.1","A1.2"\n"Apoe",1,0,4\n"Cd74",3.0,0,0\n'
VALID_MTX = b"%%MatrixMarket matrix coordinate integer general\n%comment\n2 3 3\n1 1 4\n2 3 1\n1 2 2\n"
VALID_FEATURES = b"ENSMUSG01.2\tApoe\tGene Expression\nENSMUSG02\tCd74\tGene Expression\n"
VALID_BARCODES = b"AAAC-1\nAAAG-1\nAATT-1\n"
VALID_SAMPLE_METADATA = b"Sample Name,strain\nGSM1,5XFAD\nGSM2,C57BL/6\n"
VALID_WELL_METADATA = b"well_id,plate_id,strain\nA1,1,5XFAD\nB2,1.0,5XFAD\nA1,2,C57BL/6\n"


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, awkward tokens spliced in, and possibly cut short."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if draw(st.booleans()) and data:
            data[position] = draw(st.integers(0, 255))
        else:
            data[position:position] = draw(st.sampled_from(AWKWARD_TOKENS))
    return bytes(data[: draw(st.integers(0, len(data)))]) if draw(st.booleans()) else bytes(data)


def fuzzed_bytes(valid: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, count-matrix-like text, or ``valid`` damaged; each possibly gzipped (and cut)."""
    plain = st.one_of(
        st.binary(max_size=600),
        st.text(COUNT_ALPHABET, max_size=400).map(str.encode),
        damaged(valid),
        damaged(valid),
    )

    @st.composite
    def maybe_gzipped(draw) -> bytes:
        data = draw(plain)
        if draw(st.booleans()):
            compressed = gzip.compress(data)
            return compressed[: draw(st.integers(0, len(compressed)))] if draw(st.booleans()) else compressed
        return data

    return maybe_gzipped()


def make_study(fmt: str, counts_name: str, *, gene_id_type: str = "symbol", metadata_name: str = "meta.csv") -> Study:
    files = (StudyFile(counts_name, "file:///x", SHA, "counts"), StudyFile(metadata_name, "file:///x", SHA, "metadata"))
    return Study(accession=STUDY, title="fuzz", species="mouse", format=fmt, gene_id_type=gene_id_type, files=files,
                 metadata=MetadataJoin(file=metadata_name),
                 condition=ConditionRule(column="strain", values={"5XFAD": "AD", "C57BL/6": "control"}),
                 strip_r_prefix=fmt == "raw_tar_dropseq_dge")


def assert_valid_study_anndata(adata: ad.AnnData) -> None:
    """What every downstream step relies on: integer non-negative CSR counts that match obs and var."""
    assert isinstance(adata, ad.AnnData)
    assert sp.issparse(adata.X) and adata.X.dtype == np.int32
    assert adata.X.shape == (adata.n_obs, adata.n_vars)
    assert (adata.X.data >= 0).all()
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert (adata.obs["study"] == STUDY).all()
    assert set(adata.obs["condition"].dropna()) <= {"control", "AD"}
    np.testing.assert_array_equal(adata.obs["n_genes"].to_numpy(), np.diff(adata.X.indptr))


def build_or_refuse(study: Study, files: dict[str, bytes]) -> None:
    """Write ``files`` to a fresh folder, build the study: a valid AnnData or our error naming the study."""
    ledger.record("bad_input")
    with tempfile.TemporaryDirectory() as folder:
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
        try:
            adata = build_study_anndata(study, Path(folder))
        except ScgrnInputError as error:
            assert str(error).startswith(f"{STUDY}: "), str(error)
            return
    assert_valid_study_anndata(adata)


# --- the dense text parser -------------------------------------------------------------------------


@FUZZ
@given(data=fuzzed_bytes(VALID_DENSE_TSV), sep=st.sampled_from(["\t", ","]), block_bytes=st.integers(1, 64))
def test_dense_text_parser_gives_a_matrix_or_our_error(data, sep, block_bytes):
    ledger.record("bad_input")
    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
    original_block_bytes = dense_text.BLOCK_BYTES
    dense_text.BLOCK_BYTES = block_bytes  # tiny blocks: lines straddle block boundaries
    try:
        # As the readers call it: read_guard turns damaged gzip into our error.
        with read_guard(study=STUDY, file="GSM1_a.txt.gz"):
            matrix = read_dense_text_matrix(stream, sep=sep, study=STUDY, file="GSM1_a.txt.gz")
    except ScgrnInputError as error:
        assert str(error).startswith(f"{STUDY}: GSM1_a.txt.gz: "), str(error)
        return
    finally:
        dense_text.BLOCK_BYTES = original_block_bytes
    assert isinstance(matrix, DenseTextMatrix)
    assert matrix.counts.shape == (len(matrix.cell_names), len(matrix.gene_names))
    assert matrix.counts.dtype == np.int32 and (matrix.counts.data >= 0).all()


# --- every study layout, end to end ----------------------------------------------------------------


@FUZZ
@given(member=fuzzed_bytes(VALID_DENSE_TSV), metadata=st.one_of(st.just(VALID_SAMPLE_METADATA),
                                                                  fuzzed_bytes(VALID_SAMPLE_METADATA)))
def test_raw_tar_dense_tsv_gives_anndata_or_our_error(member, metadata):
    archive = tar_bytes({"GSM1_AD_rep1.txt.gz": member, "GSM2_WT.txt.gz": VALID_DENSE_TSV})
    build_or_refuse(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), {"GSE1_RAW.tar": archive, "meta.csv": metadata})


@FUZZ
@given(member=fuzzed_bytes(VALID_DGE))
def test_raw_tar_dropseq_dge_gives_anndata_or_our_error(member):
    archive = tar_bytes({"GSM1_young.dge.txt.gz": member})
    build_or_refuse(make_study("raw_tar_dropseq_dge", "GSE1_RAW.tar"),
                    {"GSE1_RAW.tar": archive, "meta.csv": VALID_SAMPLE_METADATA})


@FUZZ
@given(counts=fuzzed_bytes(VALID_WELL_PLATE_CSV), metadata=st.one_of(st.just(VALID_WELL_METADATA),
                                                                       fuzzed_bytes(VALID_WELL_METADATA)))
def test_processed_csv_well_plate_gives_anndata_or_our_error(counts, metadata):
    build_or_refuse(make_study("processed_csv_well_plate", "GSE1_processed.csv.gz"),
                    {"GSE1_processed.csv.gz": counts, "meta.csv": metadata})


@FUZZ
@given(part=st.sampled_from(["matrix.mtx", "features.tsv", "barcodes.tsv"]), data=st.data())
def test_raw_tar_10x_mtx_gives_anndata_or_our_error(part, data):
    valid = {"matrix.mtx": VALID_MTX, "features.tsv": VALID_FEATURES, "barcodes.tsv": VALID_BARCODES}
    members = {f"GSM1_wt_{name}.gz": gzip.compress(content) for name, content in valid.items()}
    members[f"GSM1_wt_{part}.gz"] = data.draw(fuzzed_bytes(valid[part]))
    build_or_refuse(make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl"),
                    {"GSE1_RAW.tar": tar_bytes(members), "meta.csv": VALID_SAMPLE_METADATA})


@FUZZ
@given(archive=fuzzed_bytes(tar_bytes({"GSM1_AD_rep1.txt.gz": gzip.compress(VALID_DENSE_TSV)})))
def test_whole_archive_bytes_give_anndata_or_our_error(archive):
    build_or_refuse(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"),
                    {"GSE1_RAW.tar": archive, "meta.csv": VALID_SAMPLE_METADATA})


def test_valid_inputs_of_the_fuzz_build_the_expected_anndata(tmp_path):
    # Guards the fuzz: its undamaged inputs must reach a real AnnData, not an early refusal.
    archive = tar_bytes({"GSM1_AD_rep1.txt.gz": gzip.compress(VALID_DENSE_TSV)})
    (tmp_path / "GSE1_RAW.tar").write_bytes(archive)
    (tmp_path / "meta.csv").write_bytes(VALID_SAMPLE_METADATA)
    adata = build_study_anndata(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path)
    assert_valid_study_anndata(adata)
    expected = pd.read_csv(io.BytesIO(VALID_DENSE_TSV), sep="\t", index_col=0).T
    assert list(adata.var_names) == ["Apoe", "Cd74", "X0610007P14Rik"]
    np.testing.assert_array_equal(adata.X.toarray(), expected.to_numpy(dtype=np.int64))
    assert list(adata.obs["condition"]) == ["AD"] * 3

    members = {f"GSM1_wt_{name}.gz": gzip.compress(content) for name, content in
               {"matrix.mtx": VALID_MTX, "features.tsv": VALID_FEATURES, "barcodes.tsv": VALID_BARCODES}.items()}
    (tmp_path / "GSE1_RAW.tar").write_bytes(tar_bytes(members))
    tenx = build_study_anndata(make_study("raw_tar_10x_mtx", "GSE1_RAW.tar", gene_id_type="ensembl"), tmp_path)
    assert_valid_study_anndata(tenx)
    assert tenx.X.toarray().tolist() == [[4, 0], [2, 0], [0, 1]]

    (tmp_path / "GSE1_processed.csv.gz").write_bytes(VALID_WELL_PLATE_CSV)
    (tmp_path / "meta.csv").write_bytes(VALID_WELL_METADATA)
    plates = build_study_anndata(make_study("processed_csv_well_plate", "GSE1_processed.csv.gz"), tmp_path)
    assert_valid_study_anndata(plates)
    assert plates.n_obs == 3


# --- metadata tables and catalogs ------------------------------------------------------------------


@FUZZ
@given(data=fuzzed_bytes(VALID_SAMPLE_METADATA), name=st.sampled_from(["meta.csv", "meta.tsv", "meta.txt.gz"]))
def test_metadata_table_reader_gives_strings_or_our_error(data, name):
    ledger.record("bad_input")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            table = read_metadata_table(path, study=STUDY)
        except ScgrnInputError as error:
            assert str(error).startswith(f"{STUDY}: {name}: "), str(error)
            return
    assert isinstance(table, pd.DataFrame)
    assert all(isinstance(column, str) for column in table.columns)


VALID_CATALOG = {
    "name": "fuzz",
    "condition_levels": ["control", "AD"],
    "studies": [{
        "accession": "GSE1", "title": "t", "species": "mouse", "format": "raw_tar_dense_tsv",
        "gene_id_type": "symbol",
        "files": [{"name": "GSE1_RAW.tar", "url": "https://example.org/GSE1_RAW.tar", "sha256": "a" * 64,
                   "role": "counts"},
                  {"name": "meta.csv", "url": "https://example.org/meta.csv", "sha256": "b" * 64, "role": "metadata"}],
        "metadata": {"file": "meta.csv", "sample_column": "Sample Name"},
        "condition": {"column": "strain", "values": {"5XFAD": "AD", "C57BL/6": "control"}},
    }],
}
YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(["ftp://x/y", "javascript:alert(1)", "${UNSET_VARIABLE_X}", "../../etc/passwd", "a/b", "GSE1"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def _leaf_paths(value, prefix=()):
    """Every path (tuple of keys/indices) to a node of a nested dict/list, the root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield (*prefix, key)
        yield from _leaf_paths(child, (*prefix, key))


@st.composite
def mutated_catalog_text(draw) -> str:
    """The valid catalog with one node replaced by an arbitrary YAML value (or deleted), as YAML text."""
    import copy

    catalog = copy.deepcopy(VALID_CATALOG)
    paths = list(_leaf_paths(catalog))
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(paths))
        parent = catalog
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) or not isinstance(parent, dict):
                parent[path[-1]] = draw(YAML_VALUES)
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return yaml.safe_dump(catalog)


@FUZZ
@given(text=st.one_of(st.text(max_size=400), mutated_catalog_text(), mutated_catalog_text()))
def test_catalog_yaml_gives_a_catalog_or_our_error(text):
    ledger.record("bad_input")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "catalog.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            catalog = load_catalog(path)
        except ScgrnInputError as error:
            assert "catalog" in str(error) or "URL" in str(error), str(error)
            return
    # sha256 is pinned (64 hex digits) or left to trust on first use (None), never anything else.
    assert catalog.studies and all(f.sha256 is None or len(f.sha256) == 64 for s in catalog.studies for f in s.files)
    assert all(f.url.split(":", 1)[0] in ("file", "https", "http") for s in catalog.studies for f in s.files)


def test_the_unmutated_catalog_of_the_fuzz_loads(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(VALID_CATALOG))
    assert load_catalog(path).accessions == ["GSE1"]

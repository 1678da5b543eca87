"""Hostile input beyond what test_archive/test_download/test_catalog cover.

Decompression bombs through the study reader path (a gzip member small enough for the
archive's limits that expands past them, an endless line), pickles only through the
restricted unpickler, model weights only from safetensors or ``torch.load(weights_only=True)``
(a static scan of the package plus a malicious checkpoint), SQL values bound as parameters
by the CLI, and catalog fields that used to slip past validation.
"""

from __future__ import annotations

import ast
import gzip
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from scgrn_assets.lib.ingest import dense_text
from scgrn_assets.lib.ingest.archive import ExtractionLimits
from scgrn_assets.lib.ingest.catalog import ConditionRule, MetadataJoin, Study, StudyFile, load_catalog
from scgrn_assets.lib.ingest.dense_text import read_dense_text_matrix
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.readers import read_metadata_table
from scgrn_assets.lib.sql_store import register_view, write_parquet
from scgrn_assets.lib.ingest.study_anndata import build_study_anndata, write_study_h5ad
from scgrn_assets_tests.reliability import ledger
from scgrn_assets_tests.support.archives import tar_bytes

PACKAGE = Path(__file__).resolve().parents[2] / "scgrn_assets"
SHA = "0" * 64
METADATA = b"Sample Name,strain\nGSM1,5XFAD\n"
MIB = 1 << 20


def make_study(fmt: str, counts_name: str) -> Study:
    files = (StudyFile(counts_name, "file:///x", SHA, "counts"), StudyFile("meta.csv.gz", "file:///x", SHA, "metadata"))
    return Study(accession="GSE1", title="bomb", species="mouse", format=fmt, gene_id_type="symbol", files=files,
                 metadata=MetadataJoin(file="meta.csv.gz"),
                 condition=ConditionRule(column="strain", values={"5XFAD": "AD"}))


def gzip_of_repeated(unit: bytes, n_bytes: int, *, prefix: bytes = b"") -> bytes:
    """gzip of ``prefix`` + ``unit`` repeated to ``n_bytes``, compressed without building it in memory."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    chunk = unit * (MIB // len(unit))
    parts = [compressor.compress(prefix)]
    for _ in range(n_bytes // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts)


class CountingStream(io.RawIOBase):
    """A readable stream over a gzip that counts the decompressed bytes handed out."""

    def __init__(self, compressed: bytes):
        super().__init__()
        self._inner = gzip.GzipFile(fileobj=io.BytesIO(compressed))
        self.n_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._inner.read(len(buffer))
        buffer[: len(data)] = data
        self.n_bytes += len(data)
        return len(data)


# --- decompression bombs through the study reader path ---------------------------------------------


BOMB_LIMITS = ExtractionLimits(max_member_bytes=MIB, max_total_bytes=2 * MIB)


@pytest.mark.parametrize("layout", ["raw_tar_dense_tsv", "raw_tar_10x_mtx", "processed_csv_well_plate"])
def test_gzip_member_expanding_past_the_limit_is_refused(tmp_path, layout):
    ledger.record("bad_input")
    # 8 MiB of zero counts: well-formed lines, ~1000x compression, far under the archive limits compressed.
    lines = gzip_of_repeated(b"G\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\t0\n", 8 * MIB,
                             prefix=b"GENE" + b"".join(b"\tc%d" % i for i in range(20)) + b"\n")
    assert len(lines) < BOMB_LIMITS.max_member_bytes / 10
    if layout == "raw_tar_dense_tsv":
        files = {"GSE1_RAW.tar": tar_bytes({"GSM1_a.txt.gz": lines})}
    elif layout == "raw_tar_10x_mtx":
        matrix = gzip_of_repeated(b"1 1 1\n", 8 * MIB, prefix=b"%%MatrixMarket matrix coordinate integer general\n"
                                                            b"1 1 11184810\n")
        files = {"GSE1_RAW.tar": tar_bytes({"GSM1_a_matrix.mtx.gz": matrix,
                                            "GSM1_a_features.tsv.gz": gzip.compress(b"E1\tApoe\n"),
                                            "GSM1_a_barcodes.tsv.gz": gzip.compress(b"AAAC\n")})}
    else:
        files = {"GSE1_RAW.tar": gzip_of_repeated(b"G,0,0,0,0,0,0,0,0,0\n", 8 * MIB, prefix=b'"",' + b",".join(b"A%d.1" % i for i in range(9)) + b"\n")}
    for name, data in {**files, "meta.csv.gz": gzip.compress(METADATA)}.items():
        (tmp_path / name).write_bytes(data)
    study = make_study(layout, "GSE1_RAW.tar")
    with pytest.raises(ScgrnInputError, match=f"decompresses to more than {BOMB_LIMITS.max_member_bytes} bytes") as error:
        build_study_anndata(study, tmp_path, limits=BOMB_LIMITS)
    assert str(error.value).startswith("GSE1: ") and "max_member_bytes" in str(error.value)


def test_metadata_table_bomb_is_refused(tmp_path):
    ledger.record("bad_input")
    path = tmp_path / "meta.csv.gz"
    path.write_bytes(gzip_of_repeated(b"GSM1,5XFAD\n", 8 * MIB, prefix=b"Sample Name,strain\n"))
    with pytest.raises(ScgrnInputError, match="decompresses to more than"):
        read_metadata_table(path, study="GSE1", limits=BOMB_LIMITS)


def test_bomb_leaves_no_study_file_and_no_temporary(tmp_path):
    ledger.record("bad_input")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "GSE1_RAW.tar").write_bytes(tar_bytes({"GSM1_a.txt.gz": gzip_of_repeated(b"G\t0\n", 8 * MIB,
                                                                                      prefix=b"GENE\tc1\n")}))
    (raw / "meta.csv.gz").write_bytes(gzip.compress(METADATA))
    output = tmp_path / "out" / "GSE1.h5ad"
    with pytest.raises(ScgrnInputError, match="decompresses to more than"):
        write_study_h5ad(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), raw, output, limits=BOMB_LIMITS)
    assert list(output.parent.iterdir()) == []


@pytest.mark.parametrize("where", ["header", "data line"])
def test_endless_line_stops_at_the_line_limit_without_reading_the_rest(monkeypatch, where):
    ledger.record("bad_input")
    monkeypatch.setattr(dense_text, "MAX_LINE_BYTES", MIB // 2)
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", 64 << 10)
    prefix = b"" if where == "header" else b"GENE\tc1\n"
    stream = CountingStream(gzip_of_repeated(b"1\t", 8 * MIB, prefix=prefix))
    with pytest.raises(ScgrnInputError, match=f"line {1 if where == 'header' else 2} is longer than"):
        read_dense_text_matrix(io.BufferedReader(stream, 1 << 16), sep="\t", study="GSE1", file="GSM1_a.txt.gz")
    # Memory stays bounded: the parser stopped near the limit, far from the 8 MiB line's end.
    assert stream.n_bytes < dense_text.MAX_LINE_BYTES + 8 * dense_text.BLOCK_BYTES


def test_files_just_under_the_limits_are_still_read(tmp_path):
    # Guards the limits against refusing honest files: the same layout at a few KiB reads fine.
    (tmp_path / "GSE1_RAW.tar").write_bytes(tar_bytes({"GSM1_a.txt.gz": gzip.compress(b"GENE\tc1\tc2\nApoe\t1\t2\n")}))
    (tmp_path / "meta.csv.gz").write_bytes(gzip.compress(METADATA))
    adata = build_study_anndata(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path, limits=BOMB_LIMITS)
    assert adata.X.toarray().tolist() == [[1], [2]]


# --- pickles and model weights ---------------------------------------------------------------------


class _RunsCode:
    """Unpickling this calls ``os.system`` (through ``__reduce__``): what a hostile pickle does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_loads_plain_dictionaries(tmp_path):
    tokenize = pytest.importorskip("scgrn_assets.lib.network.dictionaries")
    ledger.record("bad_input", 3)
    marker = tmp_path / "pwned"
    hostile = tmp_path / "token_dictionary.pkl"
    hostile.write_bytes(pickle.dumps({"<pad>": 0, "x": _RunsCode(marker)}))
    with pytest.raises(ScgrnInputError, match="posix.system|os.system|not allowed"):
        tokenize.load_pickle_restricted(hostile)
    assert not marker.exists()


    object_array = tmp_path / "object_array.pkl"
    object_array.write_bytes(pickle.dumps(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(ScgrnInputError):
        tokenize.load_pickle_restricted(object_array)

    plain = {"<pad>": 0, "<mask>": 1, "ENSMUSG1": np.int64(2), "nested": [1.5, ("a", None)]}
    plain_path = tmp_path / "plain.pkl"
    plain_path.write_bytes(pickle.dumps(plain))
    assert tokenize.load_pickle_restricted(plain_path) == plain


def _checkpoint_folder(folder: Path) -> Path:
    """config.json and dictionaries of a 3-token model, no weights yet."""
    geneformer = pytest.importorskip("scgrn_assets.lib.network.model")
    tokenize = pytest.importorskip("scgrn_assets.lib.network.dictionaries")
    folder.mkdir()
    tokenize.save_pickle_atomic({"<pad>": 0, "<mask>": 1, "Apoe": 2}, folder / "token_dictionary.pkl")
    tokenize.save_pickle_atomic({"Apoe": 1.0}, folder / "gene_median_dictionary.pkl")
    small = geneformer.SmallGeneformerConfig(n_layers=1, hidden_size=8, n_heads=2, intermediate_size=16)
    geneformer.bert_config(vocab_size=3, max_position_embeddings=8, config=small).save_pretrained(folder)
    return folder


def _hostile_bin(folder: Path, marker: Path) -> None:
    """A legacy .bin checkpoint whose pickle would run ``touch marker``: it must only go through weights_only."""
    torch = pytest.importorskip("torch")
    with open(folder / "pytorch_model.bin", "wb") as handle:
        torch.save({"bert.embeddings.word_embeddings.weight": _RunsCode(marker)}, handle)


def _safetensors(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(folder / "model.safetensors"))


WEIGHT_CASES = {
    "code-running pickle": lambda folder, marker: _hostile_bin(folder, marker),
    "garbage .bin": lambda folder, marker: (folder / "pytorch_model.bin").write_bytes(
        np.random.default_rng(0).bytes(4096)),
    "truncated .bin": lambda folder, marker: (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\0" * 20),
    "pickle of a list": lambda folder, marker: (folder / "pytorch_model.bin").write_bytes(pickle.dumps([1, 2, 3])),
    "garbage safetensors": lambda folder, marker: (folder / "model.safetensors").write_bytes(
        np.random.default_rng(1).bytes(4096)),
    "shard index escaping the folder": lambda folder, marker: (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "../../elsewhere.safetensors"}}'),
    # Valid files whose tensors do not fit: the model would silently keep random encoder weights.
    "tensors of other names": lambda folder, marker: _safetensors(folder, {"foo": np.zeros(3, np.float32)}),
    "tensors of the wrong shape": lambda folder, marker: _safetensors(
        folder, {"bert.embeddings.word_embeddings.weight": np.zeros((7, 3), np.float32)}),
}


@pytest.mark.slow  # importing transformers takes ~30 s on a loaded machine
@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_hostile_geneformer_weights_are_refused_naming_the_file_and_the_fix(tmp_path, case):
    geneformer = pytest.importorskip("scgrn_assets.lib.network.model")
    ledger.record("bad_input")
    folder = _checkpoint_folder(tmp_path / "checkpoint")
    marker = tmp_path / "pwned"
    WEIGHT_CASES[case](folder, marker)
    with pytest.raises(ScgrnInputError) as error:
        geneformer.load_geneformer(folder, device="cpu")
    assert not marker.exists(), "loading a checkpoint ran code from its pickle"
    assert error.value.file is not None and error.value.file.startswith(str(folder))
    assert "safetensors" in error.value.fix
    if case == "code-running pickle":
        assert error.value.file == str(folder / "pytorch_model.bin")
        assert "posix.system" in error.value.problem  # the reason, not torch's advice to drop weights_only
        assert "weights_only=False" not in error.value.problem


@pytest.mark.slow
def test_a_plain_tensor_bin_checkpoint_still_loads_through_weights_only(tmp_path):
    """The safe path is not a refusal of every .bin: plain tensors load, equal to what was saved."""
    geneformer = pytest.importorskip("scgrn_assets.lib.network.model")
    torch = pytest.importorskip("torch")
    from transformers import BertForMaskedLM

    folder = _checkpoint_folder(tmp_path / "checkpoint")
    torch.manual_seed(0)
    reference = BertForMaskedLM(geneformer.BertConfig.from_pretrained(folder))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    loaded = geneformer.load_geneformer(folder, device="cpu")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_package_loads_untrusted_data_only_through_safe_loaders():
    """Static policy: no bare pickle/joblib/torch.load/np.load(allow_pickle=True) anywhere in the package."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, name in _calls(tree):
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {ast.unparse(node)[:80]}"
            if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load", "pd.read_pickle",
                        "pandas.read_pickle", "yaml.load", "yaml.unsafe_load", "marshal.loads"):
                offences.append(where)
            if name.endswith("Unpickler") and name != "pickle.Unpickler" and "Restricted" not in name:
                offences.append(where)
            if name == "torch.load" and keywords.get("weights_only") != "True":
                offences.append(where)
            if name in ("np.load", "numpy.load") and keywords.get("allow_pickle", "False") != "False":
                offences.append(where)
            if name == "eval" or name == "exec":
                offences.append(where)
    assert offences == []


# --- SQL in the CLI: values are bound, statements are read-only ------------------------------------


@pytest.fixture
def sql_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    table = pd.DataFrame({"study": ["GSE1", "GSE2"], "n_cells": [10, 20]})
    parquet = write_parquet(table, home / "assets" / "combined_corpus" / "corpus_studies.parquet")
    register_view(home / "scgrn.duckdb", "corpus_studies", parquet)
    monkeypatch.setenv("SCGRN_HOME", str(home))
    return home


@pytest.mark.parametrize("value", ["x' OR '1'='1", "GSE1'; DROP VIEW corpus_studies; --", "GSE1\" OR 1=1 --",
                                   "') UNION SELECT table_name, 1 FROM information_schema.tables --"])
def test_sql_values_are_bound_never_pasted(sql_home, capsys, value):
    from scgrn_assets import cli

    ledger.record("bad_input")
    assert cli.main(["sql", "SELECT count(*) AS n FROM corpus_studies WHERE study = ?", "--param", value]) == 0
    assert capsys.readouterr().out.split()[-1] == "0"
    assert cli.main(["sql", "SELECT CAST(sum(n_cells) AS INTEGER) AS total FROM corpus_studies"]) == 0
    assert capsys.readouterr().out.split()[-1] == "30"


@pytest.mark.parametrize("params, expected", [
    (["9", "10"], "False"), (["10", "9"], "True"), (["2.5", "10"], "False"), (["'9'", "'10'"], "True"),
    (["b", "a"], "True"),
], ids=["ints", "ints-reversed", "float-int", "quoted-text", "text"])
def test_sql_params_that_look_like_numbers_are_bound_as_numbers(sql_home, capsys, params, expected):
    from scgrn_assets import cli

    ledger.record("bad_input")
    assert cli.main(["sql", "SELECT ? > ? AS bigger", "--param", params[0], "--param", params[1]]) == 0
    assert capsys.readouterr().out.split()[-1] == expected


@pytest.mark.parametrize("statement", ["DROP VIEW corpus_studies", "CREATE TABLE evil AS SELECT 1",
                                       "DELETE FROM corpus_studies", "SELECT 1; DROP VIEW corpus_studies"])
def test_sql_cannot_change_the_database(sql_home, capsys, statement):
    from scgrn_assets import cli

    ledger.record("bad_input")
    assert cli.main(["sql", statement]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main(["sql", "SELECT CAST(sum(n_cells) AS INTEGER) AS total FROM corpus_studies"]) == 0
    assert capsys.readouterr().out.split()[-1] == "30"


def test_sql_cannot_touch_files_outside_scgrn_home(sql_home, tmp_path, capsys):
    from scgrn_assets import cli

    outside = tmp_path / "outside.csv"
    outside.write_text("secret\n")
    written = tmp_path / "written.csv"
    for statement in [f"SELECT * FROM read_csv('{outside}')", f"COPY (SELECT 1) TO '{written}'",
                      f"ATTACH '{tmp_path / 'other.duckdb'}'"]:
        ledger.record("bad_input")
        assert cli.main(["sql", statement]) == 2
        err = capsys.readouterr().err
        assert "Permission" in err or "read-only" in err
    assert not written.exists() and not (tmp_path / "other.duckdb").exists()


def _home_files(home: Path) -> dict[str, bytes]:
    return {str(path.relative_to(home)): path.read_bytes() for path in sorted(home.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("statement", [
    "COPY (SELECT 'x' AS study) TO '{home}/assets/combined_corpus/corpus_studies.parquet' (FORMAT parquet)",
    "COPY (SELECT 'x' AS study) TO '{home}/assets/combined_corpus/corpus_studies.parquet' "
    "(FORMAT parquet, USE_TMP_FILE false)",
    "COPY (SELECT 'telemetry: 1' AS a) TO '{home}/dagster/dagster.yaml' (FORMAT csv, HEADER false)",
    "EXPLAIN ANALYZE COPY (SELECT 'x' AS study) TO '{home}/assets/combined_corpus/corpus_studies.parquet' "
    "(FORMAT parquet, USE_TMP_FILE false)",
    "ATTACH '{home}/n.duckdb' AS y (READ_WRITE); CREATE TABLE y.t AS SELECT 1 AS a",
    "EXPORT DATABASE '{home}/d'",
    "SET lock_configuration = false; SET enable_external_access = true",
    "PRAGMA enable_profiling = 'json'; PRAGMA profiling_output = '{home}/profile.json'; SELECT 1",
    "SELECT * FROM read_csv('{home}/dagster/dagster.yaml')",
    "SELECT * FROM read_text('{home}/assets/geo_raw_archive/GSE1/passwd')",
    "SELECT * FROM glob('{home}/**')",
    # A PIVOT that finds its columns in the data parses as MULTI, and so does any statement wrapping one.
    "COPY (PIVOT corpus_studies ON study USING sum(n_cells)) TO "
    "'{home}/assets/combined_corpus/corpus_studies.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (PIVOT corpus_studies ON study USING sum(n_cells)) TO "
    "'{home}/assets/combined_corpus/corpus_studies.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "CREATE TEMP TABLE t AS PIVOT corpus_studies ON study USING sum(n_cells)",
    "SET memory_limit = (SELECT '1GB' FROM (PIVOT corpus_studies ON study USING sum(n_cells)))",
    "PIVOT corpus_studies ON study USING sum(n_cells); COPY (SELECT 1) TO '{home}/dagster/dagster.yaml'",
], ids=["copy-over-a-table", "copy-no-tmp-file", "copy-over-instance-config", "explain-analyze-copy",
        "attach-read-write", "export-database", "unlock-configuration", "profiling-output",
        "read-instance-config", "read-downloaded-file", "glob-home", "copy-a-pivot", "explain-analyze-copy-a-pivot",
        "create-from-a-pivot", "set-from-a-pivot", "pivot-then-copy"])
def test_sql_cannot_write_anything_or_read_beyond_the_registered_tables(sql_home, capsys, statement):
    from scgrn_assets import cli

    ledger.record("bad_input")
    downloaded = sql_home / "assets" / "geo_raw_archive" / "GSE1" / "passwd"
    downloaded.parent.mkdir(parents=True, exist_ok=True)
    downloaded.write_text("root:x:0:0\n")
    (sql_home / "dagster").mkdir(exist_ok=True)
    (sql_home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    before = _home_files(sql_home)
    assert cli.main(["sql", statement.format(home=sql_home)]) == 2
    err = capsys.readouterr().err
    assert "root:x" not in err and "telemetry" not in err
    assert _home_files(sql_home) == before
    assert cli.main(["sql", "SELECT study, n_cells FROM corpus_studies ORDER BY study"]) == 0
    assert capsys.readouterr().out.split() == ["study", "n_cells", "GSE1", "10", "GSE2", "20"]


@pytest.mark.parametrize("statement", [
    "PIVOT corpus_studies ON study USING sum(n_cells)",
    "PIVOT corpus_studies ON study USING sum(n_cells);",
    "SELECT * FROM (PIVOT corpus_studies ON study USING sum(n_cells)) -- the columns come from the data",
    "WITH wide AS (PIVOT corpus_studies ON study USING sum(n_cells)) SELECT GSE1, GSE2 FROM wide",
    "UNPIVOT (PIVOT corpus_studies ON study USING sum(n_cells)) ON GSE1, GSE2 INTO NAME study VALUE n_cells "
    "ORDER BY study",
], ids=["pivot", "pivot-semicolon", "select-from-pivot", "cte-pivot", "unpivot-a-pivot"])
def test_sql_pivot_and_unpivot_read_and_are_allowed(sql_home, capsys, statement):
    from scgrn_assets import cli

    ledger.record("bad_input")
    before = _home_files(sql_home)
    assert cli.main(["sql", statement]) == 0, capsys.readouterr().err
    words = capsys.readouterr().out.split()
    assert {"GSE1", "GSE2", "10", "20"} <= set(word.removesuffix(".0") for word in words), words
    assert _home_files(sql_home) == before


@pytest.mark.parametrize("value, problem", [
    ("9" * 5000, "wider than SQL's 128-bit integers"), ("-" + "1" * 60, "wider than SQL's 128-bit integers"),
    (str(1 << 128), "wider than SQL's 128-bit integers"), ("1e400", "infinity"), ("-2.5e999", "infinity"),
], ids=["5000-digits", "60-digits-negative", "2^128", "float-overflow", "negative-float-overflow"])
def test_sql_numbers_sql_cannot_hold_are_a_clear_error_naming_the_param(sql_home, capsys, value, problem):
    from scgrn_assets import cli

    ledger.record("bad_input")
    assert cli.main(["sql", "SELECT ? AS a, ? AS b", "--param", "1", f"--param={value}"]) == 2
    err = capsys.readouterr().err
    assert "--param number 2" in err and problem in err and "quote it" in err, err
    assert len(err) < 600  # a 5,000-digit value is not echoed whole
    # The widest integers SQL holds still bind as numbers; quoted, any digits bind as text.
    assert cli.main(["sql", "SELECT CAST(? - 1 AS VARCHAR) AS a, length(?) AS n", "--param", str((1 << 127) - 1),
                     "--param", f"'{'9' * 5000}'"]) == 0
    assert capsys.readouterr().out.split()[-2:] == [str((1 << 127) - 2), "5000"]


@pytest.mark.parametrize("statement", [
    "SELECT count(*) AS n FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) AS n FROM r",
], ids=["cross-join", "endless-recursive-cte"])
def test_sql_runaway_query_stops_at_its_timeout_with_a_message(sql_home, capsys, statement):
    import time

    from scgrn_assets import cli

    ledger.record("bad_input")
    started = time.monotonic()
    assert cli.main(["sql", statement, "--timeout", "1"]) == 2
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert "stopped after 1 s" in err and "raise --timeout" in err, err
    assert elapsed < 30, elapsed
    # The connection is gone with its lock: the next query runs at once.
    assert cli.main(["sql", "SELECT CAST(sum(n_cells) AS INTEGER) AS total FROM corpus_studies"]) == 0
    assert capsys.readouterr().out.split()[-1] == "30"


def test_sql_query_over_its_memory_limit_stops_with_a_message_and_spills_nothing(sql_home, capsys):
    from scgrn_assets import cli

    ledger.record("bad_input")
    before = _home_files(sql_home)
    assert cli.main(["sql", "SELECT list(range) AS big FROM range(100000000)", "--memory-limit", "100MB"]) == 2
    err = capsys.readouterr().err
    assert "memory limit of 100MB" in err and "raise --memory-limit" in err, err
    assert cli.main(["sql", "SELECT 1", "--memory-limit", "lots"]) == 2
    assert "--memory-limit 2GB" in capsys.readouterr().err
    assert _home_files(sql_home) == before  # nothing spilled into SCGRN_HOME (scgrn.duckdb.tmp)


def test_sql_timeout_must_be_a_number_of_seconds(sql_home, capsys):
    from scgrn_assets import cli

    ledger.record("bad_input", 2)
    for value in ("soon", "-1"):
        with pytest.raises(SystemExit) as exited:
            cli.main(["sql", "SELECT 1", "--timeout", value])
        assert exited.value.code == 2
        assert "not a number of seconds" in capsys.readouterr().err
    assert cli.main(["sql", "SELECT 41 + 1 AS answer", "--timeout", "0"]) == 0  # 0: no time limit
    assert capsys.readouterr().out.split()[-1] == "42"


# --- catalog fields that slipped past validation ---------------------------------------------------


def _catalog(**study_changes) -> dict:
    study = {"accession": "GSE1", "title": "t", "species": "mouse", "format": "raw_tar_dense_tsv",
             "gene_id_type": "symbol",
             "files": [{"name": "GSE1_RAW.tar", "url": "https://example.org/GSE1_RAW.tar", "sha256": "a" * 64},
                       {"name": "meta.csv", "url": "https://example.org/meta.csv", "sha256": "b" * 64,
                        "role": "metadata"}],
             "metadata": {"file": "meta.csv"}}
    study.update(study_changes)
    return {"name": "hostile", "studies": [study]}


@pytest.mark.parametrize("raw, message", [
    (_catalog(accession="GSE1\n"), "not a valid partition key"),
    ({**_catalog(), "condition_levels": [[], "AD"]}, "condition_levels must be two distinct labels"),
    ({**_catalog(), "condition_levels": 5}, "condition_levels must be two distinct labels"),
    (_catalog(condition={"column": None, "values": {"a": "AD"}}), "condition must have 'column'"),
    (_catalog(files=[{"name": "a\\..\\b", "url": "https://x/a", "sha256": "a" * 64}]), "plain file name"),
    (_catalog(files=[{"name": "GSE1_RAW.tar", "url": "https://[::1/x", "sha256": "a" * 64}]), "malformed URL"),
    (_catalog(files=[{"name": "GSE1_RAW.tar", "url": "https://x/a", "sha256": "a" * 64, "role": ["counts"]}]),
     "unknown role"),
], ids=["accession-newline", "level-list", "levels-int", "column-none", "backslash-name", "bad-ipv6-url",
        "role-list"])
def test_catalog_fields_that_slipped_past_validation_get_clear_messages(tmp_path, raw, message):
    ledger.record("bad_input")
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ScgrnInputError, match=message) as error:
        load_catalog(path)
    assert str(path) in str(error.value)


# --- the same cells twice in one study ---------------------------------------------------------------


DENSE_SAMPLE = gzip.compress(b"AAAC\tAAAG\tAATT\nApoe\t1\t2\t3\nCd74\t0\t4\t1\n")


def _tar_appended(members: list[tuple[str, bytes]]) -> bytes:
    """A tar whose members may repeat a name, as ``tar -rf`` leaves it."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("members, first, second", [
    ([("GSM1_a.txt.gz", DENSE_SAMPLE), ("GSM1_a.txt.gz", DENSE_SAMPLE)], "GSM1_a.txt.gz", "GSM1_a.txt.gz"),
    ([("GSM1_a.txt.gz", DENSE_SAMPLE), ("GSM1_b.txt.gz", DENSE_SAMPLE)], "GSM1_a.txt.gz", "GSM1_b.txt.gz"),
], ids=["member-appended-again", "two-files-of-one-gsm-sharing-barcodes"])
def test_the_same_cells_twice_in_a_study_are_refused_naming_both_members(tmp_path, members, first, second):
    ledger.record("bad_input")
    (tmp_path / "GSE1_RAW.tar").write_bytes(_tar_appended(members))
    (tmp_path / "meta.csv.gz").write_bytes(gzip.compress(METADATA))
    with pytest.raises(ScgrnInputError, match=f"3 cells of sample GSM1 in {second} were already read from {first} "
                                              r"\(e.g. \['GSM1:AAAC', 'GSM1:AAAG', 'GSM1:AATT'\]\)") as error:
        build_study_anndata(make_study("raw_tar_dense_tsv", "GSE1_RAW.tar"), tmp_path)
    assert "GSE1" in str(error.value) and "remove" in str(error.value)


# --- catalogs that leak: environment variables, local files, URL tokens in the logs ---------------


def _catalog_with_url(url: str) -> dict:
    raw = _catalog()
    raw["studies"][0]["files"][0]["url"] = url
    return raw


def test_catalog_cannot_send_an_environment_secret_unless_the_user_allows_the_name(tmp_path, monkeypatch):
    ledger.record("bad_input")
    monkeypatch.setenv("SOME_SECRET", "hunter2")
    monkeypatch.delenv("SCGRN_CATALOG_ENV", raising=False)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(_catalog_with_url("http://127.0.0.1:9/collect?k=${SOME_SECRET}")))
    with pytest.raises(ScgrnInputError, match=r"\$\{SOME_SECRET\}.*export SCGRN_CATALOG_ENV=SOME_SECRET") as error:
        load_catalog(path, variables={"SCGRN_HOME": str(tmp_path)})
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("SCGRN_CATALOG_ENV", "OTHER, SOME_SECRET")
    catalog = load_catalog(path, variables={"SCGRN_HOME": str(tmp_path)})
    assert catalog.studies[0].files[0].url == "http://127.0.0.1:9/collect?k=hunter2"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "file://${SCGRN_HOME}/../outside.txt",
                                 "file://${SCGRN_HOME}/link_out/outside.txt"],
                         ids=["etc-passwd", "dot-dot-out-of-home", "symlink-out-of-home"])
def test_catalog_file_urls_read_only_under_scgrn_home_or_named_roots(tmp_path, monkeypatch, url):
    ledger.record("bad_input")
    monkeypatch.delenv("SCGRN_FILE_ROOTS", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "outside.txt").write_text("secret")
    (home / "link_out").symlink_to(tmp_path)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(_catalog_with_url(url)))
    with pytest.raises(ScgrnInputError, match="outside the folders catalogs may read.*export SCGRN_FILE_ROOTS="):
        load_catalog(path, variables={"SCGRN_HOME": str(home)})
    monkeypatch.setenv("SCGRN_FILE_ROOTS", f"/nowhere:{'/etc' if 'passwd' in url else tmp_path}")
    assert load_catalog(path, variables={"SCGRN_HOME": str(home)}).studies[0].files[0].url.startswith("file://")


def test_file_urls_inside_scgrn_home_still_load(tmp_path, monkeypatch):
    monkeypatch.delenv("SCGRN_FILE_ROOTS", raising=False)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(_catalog_with_url("file://${SCGRN_HOME}/demo_geo/GSE1/GSE1_RAW.tar")))
    catalog = load_catalog(path, variables={"SCGRN_HOME": str(tmp_path / "home")})
    assert catalog.studies[0].files[0].url == f"file://{tmp_path}/home/demo_geo/GSE1/GSE1_RAW.tar"


def test_url_query_strings_never_reach_logs_or_errors(http_server, tmp_path, caplog):
    import logging

    from scgrn_assets.lib.ingest.download import DownloadPolicy, fetch_file
    from scgrn_assets_tests.support.http_server import Reply

    ledger.record("bad_input")
    url = http_server.serve("/collect?k=hunter2", b"x", replies=[Reply(status=500), Reply(status=404)])
    policy = DownloadPolicy(max_attempts=3, backoff_seconds=0.01, allow_hosts=("127.0.0.1",))  # the test server
    with caplog.at_level(logging.INFO), pytest.raises(ScgrnInputError) as error:
        fetch_file(url + "#frag", tmp_path / "f.txt", sha256=None, study="GSE1", policy=policy)
    assert len(http_server.requests_for("/collect?k=hunter2")) == 2  # the token still reaches the server
    assert "hunter2" not in str(error.value) and "/collect?…" in str(error.value)
    assert caplog.records and not any("hunter2" in record.getMessage() for record in caplog.records)


# --- counts that would wrap around in int32 ---------------------------------------------------------


@pytest.mark.parametrize("entries, message", [
    (b"1 1 1e30\n", "count above 2147483647"),
    (b"1 1 inf\n", "count above 2147483647"),
    # Repeated coordinates used to be summed (and this sum refused): they are now refused themselves.
    (b"1 1 2147483647\n1 1 5\n", r"entry 2 repeats the coordinate \(row 1, column 1\)"),
], ids=["huge", "infinite", "duplicates-overflow"])
def test_mtx_counts_that_would_wrap_in_int32_are_refused(tmp_path, entries, message):
    ledger.record("bad_input")
    n_entries = entries.count(b"\n")
    matrix = b"%%MatrixMarket matrix coordinate real general\n" + f"2 1 {n_entries}\n".encode() + entries
    (tmp_path / "GSE1_RAW.tar").write_bytes(tar_bytes({
        "GSM1_a_matrix.mtx.gz": gzip.compress(matrix),
        "GSM1_a_features.tsv.gz": gzip.compress(b"E1\tApoe\nE2\tCd74\n"),
        "GSM1_a_barcodes.tsv.gz": gzip.compress(b"AAAC\n")}))
    (tmp_path / "meta.csv.gz").write_bytes(gzip.compress(METADATA))
    with pytest.raises(ScgrnInputError, match=message):
        build_study_anndata(make_study("raw_tar_10x_mtx", "GSE1_RAW.tar"), tmp_path)

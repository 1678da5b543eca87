"""The dense text parser against a brute-force parse, its quirks, and its errors."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from scgrn_assets.lib import dense_text
from scgrn_assets.lib.dense_text import format_dense_text_rows, read_dense_text_matrix
from scgrn_assets.lib.errors import ScgrnInputError


def brute_force_parse(text: str, sep: str):
    lines = [line for line in text.splitlines() if line.strip()]
    header = [f.strip('"') for f in lines[0].split(sep)]
    rows = [line.split(sep) for line in lines[1:]]
    genes = [r[0].strip('"') for r in rows]
    values = np.array([[int(float(v)) for v in r[1:]] for r in rows], dtype=np.int64)
    cells = header[1:] if len(header) == values.shape[1] + 1 else header
    return genes, cells, values.T


@pytest.mark.parametrize("sep", ["\t", ","])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_matches_brute_force_on_random_matrices(sep, seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_genes, n_cells = rng.integers(1, 60), rng.integers(1, 40)
    values = rng.negative_binomial(0.4, 0.3, size=(n_genes, n_cells))
    values[rng.random(values.shape) < 0.7] = 0
    genes = [f"G{i}" for i in range(n_genes)]
    header = ("GENE" if seed % 2 else "") + "".join(f"{sep}c{j}" for j in range(n_cells))
    text = header + "\n" + format_dense_text_rows(genes, values, sep=sep).decode()
    # Tiny blocks force lines to straddle block boundaries.
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", int(rng.integers(7, 50)))
    parsed = read_dense_text_matrix(io.BytesIO(text.encode()), sep=sep, study="S", file="f")
    expected_genes, expected_cells, expected_counts = brute_force_parse(text, sep)
    assert parsed.gene_names == expected_genes
    assert parsed.cell_names == expected_cells
    np.testing.assert_array_equal(parsed.counts.toarray(), expected_counts)


def test_quirks_of_real_files_are_read():
    # R's write.csv quoting, 1e+05 notation, integer-valued decimals, CRLF, a trailing blank line.
    text = b'"","A1.1","B2.1"\r\n"Gnai3",1e+05,0\r\n"Cd74",3.0,0.00\r\n\r\n'
    parsed = read_dense_text_matrix(io.BytesIO(text), sep=",", study="S", file="f")
    assert parsed.gene_names == ["Gnai3", "Cd74"]
    assert parsed.cell_names == ["A1.1", "B2.1"]
    np.testing.assert_array_equal(parsed.counts.toarray(), [[100000, 3], [0, 0]])


@pytest.mark.parametrize("body, message", [
    (b"GENE\ta\tb\nx\t1\t2\t3\n", "line 2 has 4 fields, expected 1+2"),
    (b"GENE\ta\tb\nx\t1\t2\ny\t1\n", "line 3 has 2 fields, expected 1+2"),
    (b"GENE\ta\tb\nx\t1\t-2\n", "line 2 has a negative count in field 3"),
    (b"GENE\ta\tb\nx\t1\t2.5\n", "line 2 has a non-integer count in field 3"),
    (b"GENE\ta\tb\nx\tNA\t2\n", "line 2 has a value that is not a number in field 2"),
    (b"GENE\ta\tb\nx\t1\t99999999999\n", "too large"),
    (b"", "is empty"),
])
def test_malformed_rows_name_study_file_line_and_fix(body, message):
    with pytest.raises(ScgrnInputError) as error:
        read_dense_text_matrix(io.BytesIO(body), sep="\t", study="GSE1", file="GSM1_a.txt.gz")
    text = str(error.value)
    assert message in text
    assert text.startswith("GSE1: GSM1_a.txt.gz:")
    assert "re-download" in text or "sentinel" in text


def test_writer_round_trips_through_gzip():
    rng = np.random.default_rng(5)
    values = rng.poisson(0.5, size=(30, 17))
    genes = [f"g{i}" for i in range(30)]
    data = gzip.compress(b"GENE" + b"".join(f"\tc{j}".encode() for j in range(17)) + b"\n"
                         + format_dense_text_rows(genes, values))
    parsed = read_dense_text_matrix(gzip.GzipFile(fileobj=io.BytesIO(data)), sep="\t", study="S", file="f")
    np.testing.assert_array_equal(parsed.counts.toarray(), values.T)
    assert parsed.counts.dtype == np.int32

"""The dense text parser against a brute-force parse, its quirks, and its errors."""

from __future__ import annotations

import gzip
import io
import threading

import numpy as np
import pytest

from scgrn_assets.lib.ingest import dense_text
from scgrn_assets.lib.ingest.dense_text import format_dense_text_rows, read_dense_text_matrix
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


@pytest.mark.parametrize("sep", ["\t", ","])
@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_long_zero_runs_and_large_values_match_brute_force(sep, seed, monkeypatch):
    # Mostly zeros (the 8-byte zero-run skip), runs ending at every offset near the line's end,
    # values of every width (the plain-integer fast path) and some written as R writes them.
    rng = np.random.default_rng(seed)
    n_genes, n_cells = int(rng.integers(1, 40)), int(rng.integers(1, 70))
    values = rng.integers(1, 10 ** rng.integers(1, 10, size=(n_genes, n_cells)), dtype=np.int64)
    values[rng.random(values.shape) < rng.uniform(0.8, 0.99)] = 0
    values = np.minimum(values, np.iinfo(np.int32).max)
    genes = [f"G{i}" for i in range(n_genes)]
    lines = format_dense_text_rows(genes, values, sep=sep).decode().splitlines()
    if seed % 2:  # a few fields as "7.0" and "7e+00": the general path, between fast ones
        lines = [sep.join(f"{f}.0" if i and f != "0" and rng.random() < 0.1 else f
                          for i, f in enumerate(line.split(sep))) for line in lines]
    text = "GENE" + "".join(f"{sep}c{j}" for j in range(n_cells)) + "\n" + "\n".join(lines) + "\n"
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", int(rng.integers(7, 400)))
    parsed = read_dense_text_matrix(io.BytesIO(text.encode()), sep=sep, study="S", file="f")
    assert parsed.gene_names == genes
    np.testing.assert_array_equal(parsed.counts.toarray(), values.T)
    assert parsed.counts.has_sorted_indices


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cell_groups_give_the_same_rows_as_the_whole_matrix(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_genes, n_cells = int(rng.integers(1, 50)), int(rng.integers(1, 60))
    values = rng.poisson(0.7, size=(n_genes, n_cells))
    plates = [str(p) for p in rng.integers(1, 5, size=n_cells)]
    cells = [f"A{j}.{p}" for j, p in enumerate(plates)]
    text = ("," + ",".join(cells) + "\n" + format_dense_text_rows([f"g{i}" for i in range(n_genes)], values,
                                                                  sep=",").decode()).encode()
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", int(rng.integers(7, 300)))
    grouped = read_dense_text_matrix(io.BytesIO(text), sep=",", study="S", file="f",
                                     cell_groups=lambda names: [n.rpartition(".")[2] for n in names])
    expected = values.T
    for plate in sorted(set(plates)):
        rows = np.flatnonzero(np.asarray(plates) == plate)
        block = grouped.cell_rows(rows)
        assert block.dtype == np.int32 and block.has_sorted_indices
        np.testing.assert_array_equal(block.toarray(), expected[rows])
    mixed = rng.permutation(n_cells)[: max(1, n_cells // 2)]  # rows of several groups, in any order
    np.testing.assert_array_equal(grouped.cell_rows(mixed).toarray(), expected[mixed])
    np.testing.assert_array_equal(grouped.counts.toarray(), expected)
    np.testing.assert_array_equal(grouped.cell_rows(mixed).toarray(), expected[mixed])  # after counts, too


@pytest.mark.parametrize("field", ["5e9", "2147483648", "3e+10", "99999999999999999999999"])
def test_counts_past_int32_name_their_line(field):
    body = f"GENE\ta\tb\nx\t1\t2\ny\t0\t{field}\n".encode()
    with pytest.raises(ScgrnInputError, match=r"line 3 has a count too large .* in field 3"):
        read_dense_text_matrix(io.BytesIO(body), sep="\t", study="GSE1", file="GSM1_a.txt.gz")


def test_int32_max_itself_is_a_count():
    parsed = read_dense_text_matrix(io.BytesIO(b"GENE\ta\nx\t2147483647\ny\t2.147483647e+09\n"), sep="\t",
                                    study="S", file="f")
    np.testing.assert_array_equal(parsed.counts.toarray(), [[2147483647, 2147483647]])


def _exact_count(field: str) -> int | None:
    """The count a field stands for, computed with exact decimals; None when it is not one."""
    import decimal
    import re
    if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", field):
        return None
    value = decimal.Decimal(field)
    if value != value.to_integral_value() or not 0 <= value <= np.iinfo(np.int32).max:
        return None
    return int(value)


@pytest.mark.parametrize("seed", range(4))
def test_numeric_forms_match_exact_decimal_arithmetic(seed):
    rng = np.random.default_rng(seed)
    fields = []
    for _ in range(400):
        text = "-" if rng.random() < 0.1 else ""
        text += "".join(rng.choice(list("0123456789"), size=int(rng.integers(0, 7))))
        if rng.random() < 0.5:
            text += "." + "".join(rng.choice(list("0123456789"), size=int(rng.integers(0, 5))))
        if rng.random() < 0.4:
            text += rng.choice(["e", "E"]) + rng.choice(["", "+", "-"]) + str(int(rng.integers(0, 13)))
        fields.append(text)
    for field in fields:
        body = f"GENE\ta\tb\nx\t1\t{field}\n".encode()
        expected = _exact_count(field)
        if expected is None:
            with pytest.raises(ScgrnInputError, match="line 2 has"):
                read_dense_text_matrix(io.BytesIO(body), sep="\t", study="S", file="f")
        else:
            parsed = read_dense_text_matrix(io.BytesIO(body), sep="\t", study="S", file="f")
            assert parsed.counts.toarray()[:, 0].tolist() == [1, expected], field


@pytest.mark.parametrize("grouped", [False, True])
def test_files_past_uint16_cells_and_counts_are_stored_exactly(grouped):
    # Indices and values are kept as uint16 where they fit; 70,000 cells and a count of 70,000 do not.
    n_cells = 70_000
    rng = np.random.default_rng(11)
    values = np.zeros((3, n_cells), dtype=np.int64)
    values[0, rng.choice(n_cells, 50, replace=False)] = rng.integers(1, 9, 50)
    values[1, [0, 65_535, 65_536, 69_999]] = [1, 65_535, 65_536, 70_000]
    cells = [f"c{j}.{j % 2}" for j in range(n_cells)]
    text = ("," + ",".join(cells) + "\n" + format_dense_text_rows(["a", "b", "c"], values, sep=",").decode()).encode()
    groups = (lambda names: [n.rpartition(".")[2] for n in names]) if grouped else None
    parsed = read_dense_text_matrix(io.BytesIO(text), sep=",", study="S", file="f", cell_groups=groups)
    odd = np.arange(1, n_cells, 2)
    np.testing.assert_array_equal(parsed.cell_rows(odd).toarray(), values.T[odd])
    np.testing.assert_array_equal(parsed.counts.toarray(), values.T)


class _FailingStream:
    """Gives ``good`` blocks, then raises on the next read (and says so)."""

    def __init__(self, good: int) -> None:
        self.good, self.failed = good, threading.Event()

    def read(self, n: int) -> bytes:
        if self.good == 0:
            self.failed.set()
            raise OSError("disk read error")
        self.good -= 1
        return b"x" * n


@pytest.mark.timeout(30)
def test_stopping_early_while_the_read_ahead_queue_is_full_and_the_read_failed_does_not_hang():
    # The consumer takes one block and stops only after the reader filled the queue and then
    # failed: handing the error over must not wait on a queue nobody reads any more.
    stream = _FailingStream(good=3)
    blocks = dense_text._prefetched_blocks(stream, 4)
    assert next(blocks) == b"xxxx"
    assert stream.failed.wait(10)
    closer = threading.Thread(target=blocks.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "closing the block stream hung: the reader thread never stopped"

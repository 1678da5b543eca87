"""The Matrix Market parser: the compiled path and pandas' general path agree, errors name the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp

from scgrn_assets.lib.ingest import dense_text
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest.mtx_text import read_mtx_coo
from scgrn_assets_tests.reliability import ledger

HEADER = b"%%MatrixMarket matrix coordinate integer general\n%metadata\n"


def mtx(n_rows: int, n_cols: int, lines: list[bytes]) -> io.BytesIO:
    return io.BytesIO(HEADER + f"{n_rows} {n_cols} {len(lines)}\n".encode() + b"".join(lines))


def random_entries(rng, n_rows, n_cols, n, *, repeats: bool = False):
    """``n`` entries (1-based); each coordinate once (at most n_rows x n_cols entries) unless ``repeats``."""
    if repeats:
        return rng.integers(1, n_rows + 1, n), rng.integers(1, n_cols + 1, n), rng.integers(0, 10 ** 6, n)
    cells = rng.choice(n_rows * n_cols, size=min(n, n_rows * n_cols), replace=False)
    return cells // n_cols + 1, cells % n_cols + 1, rng.integers(0, 10 ** 6, len(cells))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("quirk", [None, b"%a comment between entries\n", b"decimal", b"crlf", b"blank"])
def test_plain_and_quirky_files_give_the_matrix_as_written(seed, quirk, monkeypatch):
    rng = np.random.default_rng(seed)
    n_rows, n_cols, n = int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(1, 300))
    rows, cols, values = random_entries(rng, n_rows, n_cols, n)  # in random order: the file need not be sorted
    n = len(rows)
    lines = [f"{r} {c} {v}\n".encode() for r, c, v in zip(rows, cols, values)]
    at = int(rng.integers(0, n))  # where the quirk sends the rest of the file to pandas
    if quirk == b"decimal":
        lines[at] = f"{rows[at]} {cols[at]} {values[at]}.0\n".encode()
    elif quirk == b"crlf":
        lines[at] = lines[at].replace(b"\n", b"\r\n")
    body = mtx(n_rows, n_cols, lines).getvalue()
    if quirk in (b"blank",) or (quirk and quirk.startswith(b"%")):
        cut = body.index(lines[at], len(HEADER))
        body = body[:cut] + (b"\n" if quirk == b"blank" else quirk) + body[cut:]
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", int(rng.integers(5, 200)))  # lines straddle blocks
    matrix = read_mtx_coo(io.BytesIO(body), study="S", file="m.mtx")
    expected = sp.coo_matrix((values, (rows - 1, cols - 1)), shape=(n_rows, n_cols))
    assert matrix.shape == (n_rows, n_cols) and matrix.nnz == n
    np.testing.assert_array_equal(matrix.toarray(), expected.toarray())


@pytest.mark.parametrize("lines, message", [
    ([b"1 1 4\n", b"2 2 -3\n"], "negative or missing counts"),
    ([b"1 1 4\n", b"2 2 2.5\n"], "non-integer counts"),
    ([b"1 1 4\n", b"2 2 1e30\n"], "count above 2147483647"),
    ([b"1 1 4\n", b"2 2 2147483648\n"], "count above 2147483647"),
    ([b"1 1 4\n", b"3 2 1\n"], "index outside its declared 2 x 2 shape"),
    ([b"1 1 4\n", b"0 2 1\n"], "index outside its declared 2 x 2 shape"),
    ([b"1 1 4\n", b"2 x 1\n"], "malformed entry line"),
])
def test_bad_entries_are_refused_naming_the_file(lines, message):
    with pytest.raises(ScgrnInputError, match=message) as error:
        read_mtx_coo(mtx(2, 2, lines), study="GSE1", file="GSM1_matrix.mtx.gz")
    assert str(error.value).startswith("GSE1: GSM1_matrix.mtx.gz:")


def test_fewer_or_more_entries_than_declared_are_refused():
    body = HEADER + b"2 2 3\n1 1 4\n2 2 1\n"
    with pytest.raises(ScgrnInputError, match="declares 3 entries but holds 2"):
        read_mtx_coo(io.BytesIO(body), study="S", file="m")
    with pytest.raises(ScgrnInputError, match="declares 1 entries but holds 2"):
        read_mtx_coo(io.BytesIO(HEADER + b"2 2 1\n1 1 4\n2 2 1\n"), study="S", file="m")


def test_more_entries_than_the_size_line_declares_grow_the_arrays_then_are_refused(monkeypatch):
    rng = np.random.default_rng(9)
    rows, cols, values = random_entries(rng, 50, 40, 5000, repeats=True)
    body = HEADER + b"50 40 10\n" + b"".join(f"{r} {c} {v}\n".encode() for r, c, v in zip(rows, cols, values))
    monkeypatch.setattr(dense_text, "BLOCK_BYTES", 4096)
    with pytest.raises(ScgrnInputError, match="declares 10 entries but holds 5000"):
        read_mtx_coo(io.BytesIO(body), study="S", file="m")


def test_more_entries_than_declared_is_not_called_truncated():
    ledger.record("bad_input")  # counted by bench/reliability.py
    with pytest.raises(ScgrnInputError, match="holds 2, more than declared; its size line is wrong") as error:
        read_mtx_coo(io.BytesIO(HEADER + b"2 2 1\n1 1 4\n2 2 1\n"), study="S", file="m")
    assert "truncated" not in str(error.value)


@pytest.mark.parametrize("qualifiers", [b"integer symmetric", b"real skew-symmetric", b"pattern general",
                                        b"complex general"])
def test_symmetric_pattern_or_complex_matrices_are_refused_not_read_as_general(qualifiers):
    ledger.record("bad_input")  # counted by bench/reliability.py
    body = b"%%MatrixMarket matrix coordinate " + qualifiers + b"\n2 2 2\n1 1 4\n2 1 3\n"
    with pytest.raises(ScgrnInputError, match=f"is a MatrixMarket '{qualifiers.decode()}' matrix; a count matrix is "
                                              "'integer general'"):
        read_mtx_coo(io.BytesIO(body), study="GSE1", file="GSM1_matrix.mtx.gz")


def test_real_general_whole_numbers_still_read():
    body = b"%%MatrixMarket matrix coordinate real general\n2 2 2\n1 1 4.0\n2 1 3\n"
    assert read_mtx_coo(io.BytesIO(body), study="S", file="m").toarray().tolist() == [[4, 0], [3, 0]]


@pytest.mark.parametrize("order", ["by column, as 10x writes", "by row", "unsorted"])
def test_a_repeated_coordinate_is_refused_whatever_the_entry_order(order):
    ledger.record("bad_input")  # counted by bench/reliability.py
    rng = np.random.default_rng(3)
    rows, cols, values = random_entries(rng, 20, 30, 200)
    if order != "unsorted":
        by = np.lexsort((rows, cols)) if order.startswith("by column") else np.lexsort((cols, rows))
        rows, cols, values = rows[by], cols[by], values[by]
    lines = [f"{r} {c} {v}\n".encode() for r, c, v in zip(rows, cols, values)]
    lines.insert(120, lines[60])  # entry 121 repeats entry 61
    with pytest.raises(ScgrnInputError, match=rf"m.mtx: entry 121 repeats the coordinate \(row {rows[60]}, column "
                                              rf"{cols[60]}\) of an earlier entry.*re-download"):
        read_mtx_coo(mtx(20, 30, lines), study="GSE1", file="m.mtx")

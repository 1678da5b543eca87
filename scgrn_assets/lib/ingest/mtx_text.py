"""Streaming parser for Matrix Market coordinate files (10x ``matrix.mtx.gz``).

Entry lines of the form ``<row> <col> <value>`` with plain non-negative integers (all
that 10x and most tools write) are parsed by a compiled kernel, block by block, while the
next block is decompressed in a thread. The first line of any other form (comments between
entries, decimals, exponents, CRLF, extra spaces, ...) hands the rest of the file to
pandas' C parser, which reads it exactly as before, so unusual files keep their behaviour
and their error messages.
"""

from __future__ import annotations

import io
from typing import IO, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.ingest import dense_text
from scgrn_assets.lib.ingest._kernels import _first_not_increasing, _parse_entries
from scgrn_assets.lib.ingest.dense_text import _prefetched_blocks
from scgrn_assets.lib.errors import ScgrnInputError

# Header and comment lines of a Matrix Market file are short; reading one is bounded (bombs).
MAX_MTX_LINE_BYTES = 1 << 20
_INT32_MAX = int(np.iinfo(np.int32).max)
_FIX = "re-download the archive or exclude the sample"


class _ChainReader(io.RawIOBase):
    """A raw stream over some bytes, then the blocks still to come from an iterator."""

    def __init__(self, head: bytes, blocks: Iterator[bytes]) -> None:
        super().__init__()
        self._current = memoryview(head)
        self._blocks = blocks

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not len(self._current):
            block = next(self._blocks, b"")
            if not block:
                return 0
            self._current = memoryview(block)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def _read_with_pandas(stream: IO[bytes], *, study: str, file: str):
    """The general path: pandas' C parser over the rest of the file, in chunks."""
    rows, cols, vals = [], [], []
    try:
        reader = pd.read_csv(stream, sep=" ", header=None, names=["row", "col", "value"], comment="%",
                             dtype={"row": np.int64, "col": np.int64, "value": np.float64}, chunksize=2_000_000,
                             engine="c")
        for chunk in reader:
            rows.append(chunk["row"].to_numpy())
            cols.append(chunk["col"].to_numpy())
            vals.append(chunk["value"].to_numpy())
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ScgrnInputError(f"has a malformed entry line ({str(exc).splitlines()[0]})", study=study, file=file,
                              fix=_FIX) from None
    return rows, cols, vals


def read_mtx_coo(stream: IO[bytes], *, study: str, file: str) -> sp.coo_matrix:
    """Matrix Market coordinate file (1-based), streamed in blocks; counts must be integers >= 0.

    Returns the matrix as written (rows x columns, int64 values). Raises :class:`ScgrnInputError`
    naming the file on a bad header or size line, a malformed entry, fewer or more entries than
    declared, a negative, missing, non-integer or above-int32 count, an index outside the declared
    shape, or a coordinate given twice (:func:`refuse_repeated_coordinates`).
    """
    header = stream.readline(MAX_MTX_LINE_BYTES).decode("ascii", errors="replace").lower()
    if not header.startswith("%%matrixmarket matrix coordinate"):
        raise ScgrnInputError(f"is not a MatrixMarket coordinate file (header {header.strip()[:60]!r})",
                              study=study, file=file, fix=_FIX)
    qualifiers = header.split()[3:]  # field (integer, real, pattern, ...) and symmetry (general, symmetric, ...)
    if qualifiers[:1] not in (["integer"], ["real"]) or qualifiers[1:2] not in ([], ["general"]):
        # A symmetric file lists one triangle (the other is implied) and a pattern file no values:
        # read as general, both would lose counts without a word.
        raise ScgrnInputError(f"is a MatrixMarket '{' '.join(qualifiers)}' matrix; a count matrix is "
                              "'integer general' (or 'real general' holding whole numbers)", study=study, file=file,
                              fix="re-download the file or exclude the sample; this is not a 10x count matrix")
    line = stream.readline(MAX_MTX_LINE_BYTES)
    while line.startswith(b"%"):
        line = stream.readline(MAX_MTX_LINE_BYTES)
    try:
        n_rows, n_cols, n_entries = (int(v) for v in line.split())
    except ValueError:
        n_rows = n_cols = n_entries = -1
    if min(n_rows, n_cols, n_entries) < 0:
        raise ScgrnInputError(f"has a malformed size line {line[:60]!r}", study=study, file=file, fix=_FIX)

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    # Room for the declared entries (clipped: the size line is not trusted), grown if it lies.
    capacity = max(1024, min(n_entries, 1 << 24))
    out_rows, out_cols, out_vals = (np.empty(capacity, np.int32), np.empty(capacity, np.int32),
                                    np.empty(capacity, np.int64))
    filled = 0
    pending = b""
    blocks = _prefetched_blocks(stream, dense_text.BLOCK_BYTES)  # looked up here: tests shrink it
    try:
        for block in blocks:
            data = pending + block if pending else block
            if not data:
                break
            if block:
                cut = data.rfind(b"\n") + 1
                pending = data[cut:]
            else:
                data, cut, pending = (data if data.endswith(b"\n") else data + b"\n"), len(data) + 1, b""
            buf = np.frombuffer(data, dtype=np.uint8)[:cut]
            offset = 0
            while True:
                n_parsed, consumed, status = _parse_entries(buf[offset:], out_rows[filled:], out_cols[filled:],
                                                            out_vals[filled:])
                filled += n_parsed
                offset += consumed
                if status != 2:
                    break
                out_rows, out_cols, out_vals = (np.resize(a, 2 * len(a)) for a in (out_rows, out_cols, out_vals))
            if status == 1:
                # A line of another form: pandas reads it and everything after it.
                rest = _ChainReader(bytes(buf[offset:]) + pending, blocks)
                more = _read_with_pandas(io.BufferedReader(rest, 1 << 20), study=study, file=file)
                rows, cols, vals = more
                break
            if not block:
                break
    finally:
        blocks.close()
    if filled:
        rows.insert(0, out_rows[:filled])
        cols.insert(0, out_cols[:filled])
        vals.insert(0, out_vals[:filled])
    del out_rows, out_cols, out_vals
    row, col, value = (np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.empty(0, dtype)
                       for parts, dtype in ((rows, np.int64), (cols, np.int64), (vals, np.float64)))
    del rows, cols, vals
    if len(value) < n_entries:
        raise ScgrnInputError(f"declares {n_entries} entries but holds {len(value)}", study=study, file=file,
                              fix="the file is truncated: re-download it or exclude the sample")
    if len(value) > n_entries:
        raise ScgrnInputError(f"declares {n_entries} entries but holds {len(value)}, more than declared",
                              study=study, file=file, fix="its size line is wrong or two files were joined: "
                                                          "re-download it or exclude the sample")
    if value.dtype.kind == "f" and (np.isnan(value).any() or (value < 0).any()):
        raise ScgrnInputError("has negative or missing counts", study=study, file=file,
                              fix="this is not a count matrix: exclude the sample")
    if (value > _INT32_MAX).any():  # also inf: the int32 cast later would wrap it silently
        raise ScgrnInputError(f"has a count above {_INT32_MAX}", study=study, file=file,
                              fix="check that the file holds counts, not a sentinel or an overflowed value")
    if value.dtype.kind == "f" and (value != np.round(value)).any():
        raise ScgrnInputError("has non-integer counts", study=study, file=file,
                              fix="use raw UMI counts, not normalised values")
    if row.size and (row.min() < 1 or row.max() > n_rows or col.min() < 1 or col.max() > n_cols):
        raise ScgrnInputError(f"has an index outside its declared {n_rows} x {n_cols} shape", study=study, file=file,
                              fix=_FIX)
    refuse_repeated_coordinates(row, col, study=study, file=file)
    row -= 1
    col -= 1
    return sp.coo_matrix((value.astype(np.int64, copy=False), (row, col)), shape=(n_rows, n_cols))


def refuse_repeated_coordinates(row: np.ndarray, col: np.ndarray, *, study: str, file: str) -> None:
    """Raise naming the first entry that repeats an earlier entry's (row, column).

    10x never writes a coordinate twice; a file that does was concatenated or damaged, and
    summing the two values (what coo -> csr does) would pass for real counts without a word.
    Sorted files (by column then row, as 10x writes them, or by row then column) are checked
    in one pass; others are sorted once to find the repeat.
    """
    if len(row) < 2 or _first_not_increasing(col, row) < 0 or _first_not_increasing(row, col) < 0:
        return
    order = np.lexsort((col, row))  # stable: of equal coordinates, the earlier entry comes first
    sorted_row, sorted_col = row[order], col[order]
    repeats = (sorted_row[1:] == sorted_row[:-1]) & (sorted_col[1:] == sorted_col[:-1])
    if not repeats.any():
        return
    entry = int(order[1:][repeats].min())
    raise ScgrnInputError(f"entry {entry + 1} repeats the coordinate (row {int(row[entry])}, column "
                          f"{int(col[entry])}) of an earlier entry: 10x writes each coordinate once", study=study,
                          file=file, fix="re-download the file (two matrices may have been joined), or exclude "
                                         "the sample")

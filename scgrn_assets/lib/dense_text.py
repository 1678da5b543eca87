"""Streaming parser for genes x cells count matrices written as delimited text.

GEO's per-sample MARS-seq tables, processed CSVs and Drop-seq DGE files are all dense
text: one line per gene, the gene name first, then one integer per cell. Single-cell
matrices are ~90% zeros, so the parser keeps only non-zero entries and never holds the
decompressed text of a whole file: it reads fixed-size blocks and parses complete lines
with a compiled kernel (pandas' C parser is several times slower on 10^4-column lines).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import IO, Callable, Iterator

import numba
import numpy as np
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError

BLOCK_BYTES = 8 << 20
# A line of 10^6 cells is a few MB; one far longer is a decompression bomb or not a matrix at all.
MAX_LINE_BYTES = 256 << 20
GENE_COLUMN_NAMES = {"", "gene", "genes", "gene_id", "gene_name", "gene_symbol", "symbol"}

# Error codes returned by the kernel.
_OK, _FIELD_COUNT, _NEGATIVE, _NOT_INTEGER, _NOT_A_NUMBER, _TOO_LARGE = 0, 1, 2, 3, 4, 5
_MESSAGES = {
    _FIELD_COUNT: "has {found} fields, expected 1+{expected}",
    _NEGATIVE: "has a negative count in field {field}",
    _NOT_INTEGER: "has a non-integer count in field {field}",
    _NOT_A_NUMBER: "has a value that is not a number in field {field}",
    _TOO_LARGE: "has a count too large for a count matrix in field {field} (a sentinel or an overflow?)",
}


@dataclass
class DenseTextMatrix:
    """A parsed genes x cells text matrix, returned as cells x genes counts."""

    gene_names: list[str]
    cell_names: list[str]
    counts: sp.csr_matrix  # (n_cells, n_genes), int32


@numba.njit(cache=True, nogil=True)
def _parse_lines(buf, sep, n_cells, first_line_number, row_offset,
                 name_start, name_end, rows, cols, vals):  # pragma: no cover - compiled
    """Parse complete lines of ``buf``; returns (n_lines, n_nonzero, error, error_line, error_value)."""
    n = buf.shape[0]
    pos = 0
    line = 0
    nnz = 0
    blank_lines = 0
    while pos < n:
        if buf[pos] == 10 or (buf[pos] == 13 and pos + 1 < n and buf[pos + 1] == 10):
            # Blank lines (often a trailing one) carry no gene.
            pos += 1 if buf[pos] == 10 else 2
            blank_lines += 1
            continue
        first_line_number_here = first_line_number + blank_lines
        # Gene name: up to the first separator.
        start = pos
        while pos < n and buf[pos] != sep and buf[pos] != 10:
            pos += 1
        name_start[line] = start
        name_end[line] = pos
        field = 0
        while pos < n and buf[pos] != 10:
            pos += 1  # skip separator
            field += 1
            if field > n_cells:
                # Count the rest to report the true number of fields.
                while pos < n and buf[pos] != 10:
                    if buf[pos] == sep:
                        field += 1
                    pos += 1
                return line, nnz, 1, first_line_number_here + line, field + 1
            if pos < n and buf[pos] == 48 and (pos + 1 == n or buf[pos + 1] == sep or buf[pos + 1] == 10):
                pos += 1  # fast path: most fields are a bare "0"
                continue
            mantissa = 0
            fraction_nonzero = False
            exponent = 0
            digits = 0
            seen_dot = False
            negative = False
            if pos < n and buf[pos] == 45:  # '-'
                negative = True
                pos += 1
            while pos < n and buf[pos] != sep and buf[pos] != 10 and buf[pos] != 13:
                c = buf[pos]
                if 48 <= c <= 57:
                    if seen_dot:
                        if c != 48:
                            fraction_nonzero = True
                    else:
                        mantissa = mantissa * 10 + (c - 48)
                    digits += 1
                elif c == 46 and not seen_dot:  # '.'
                    seen_dot = True
                elif c == 101 or c == 69:  # 'e' / 'E': R writes 1e+05
                    pos += 1
                    exp_negative = False
                    if pos < n and (buf[pos] == 43 or buf[pos] == 45):
                        exp_negative = buf[pos] == 45
                        pos += 1
                    exp_digits = 0
                    while pos < n and 48 <= buf[pos] <= 57:
                        exponent = exponent * 10 + (buf[pos] - 48)
                        exp_digits += 1
                        pos += 1
                    if exp_digits == 0:
                        return line, nnz, 4, first_line_number_here + line, field
                    if exp_negative:
                        exponent = -exponent
                    break
                else:
                    return line, nnz, 4, first_line_number_here + line, field
                pos += 1
            if pos < n and buf[pos] == 13:
                pos += 1  # tolerate CRLF
            if digits == 0:
                return line, nnz, 4, first_line_number_here + line, field
            if fraction_nonzero:
                return line, nnz, 3, first_line_number_here + line, field
            if exponent > 9 or mantissa > 2147483647:
                return line, nnz, 5, first_line_number_here + line, field
            value = mantissa
            if exponent > 0:
                value = mantissa * 10 ** exponent
            elif exponent < 0:
                scale = 10 ** (-exponent)
                if mantissa % scale != 0:
                    return line, nnz, 3, first_line_number_here + line, field
                value = mantissa // scale
            if negative and value != 0:
                return line, nnz, 2, first_line_number_here + line, field
            if value != 0:
                rows[nnz] = field - 1
                cols[nnz] = row_offset + line
                vals[nnz] = value
                nnz += 1
        if field != n_cells:
            return line, nnz, 1, first_line_number_here + line, field + 1
        pos += 1  # newline
        line += 1
    return line, nnz, 0, blank_lines, 0


def _prefetched_blocks(stream: IO[bytes], block_bytes: int) -> Iterator[bytes]:
    """Blocks of ``stream`` read one ahead in a thread: decompression (zlib releases the GIL)
    overlaps with parsing (the compiled kernel releases it too), so two cores both work."""
    blocks: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def read_ahead() -> None:
        try:
            while not stop.is_set():
                block = stream.read(block_bytes)
                while not stop.is_set():
                    try:
                        blocks.put(block, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if not block:
                    return
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            blocks.put(exc)

    reader = threading.Thread(target=read_ahead, name="dense-text-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = blocks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if not item:
                return
    finally:
        stop.set()
        reader.join()


def _split_header(header: bytes, sep: bytes) -> list[str]:
    fields = header.rstrip(b"\r\n").split(sep)
    return [f.decode("utf-8", errors="replace").strip().strip('"') for f in fields]


def read_dense_text_matrix(stream: IO[bytes], *, sep: str, study: str, file: str,
                           header_has_gene_column: bool | None = None,
                           progress: Callable[[int], None] | None = None) -> DenseTextMatrix:
    """Parse a genes x cells delimited text matrix into cells x genes sparse counts.

    Parameters
    ----------
    stream
        Binary, already decompressed stream (e.g. ``gzip.GzipFile``).
    sep
        Field separator, ``"\\t"`` or ``","``.
    header_has_gene_column
        Whether the header's first field names the gene column (``GENE`` in DGE files,
        ``""`` in R's write.csv). ``None`` decides from the first data line's width.

    Counts must be non-negative integers (``3``, ``3.0`` and R's ``1e+05`` are accepted);
    anything else raises :class:`ScgrnInputError` naming the line and the fix.
    """
    sep_byte = sep.encode()
    header = stream.readline(MAX_LINE_BYTES + 1)
    if not header.strip():
        raise ScgrnInputError("is empty or has no header line", study=study, file=file,
                              fix="re-download the file or exclude the sample")
    if len(header) > MAX_LINE_BYTES:
        raise _line_too_long(1, study=study, file=file)
    header_fields = _split_header(header, sep_byte)
    pending = b""
    gene_names: list[str] = []
    row_chunks, col_chunks, val_chunks = [], [], []
    n_cells: int | None = None
    cell_names: list[str] = []
    line_number = 2
    bytes_read = len(header)
    sep_code = sep_byte[0]
    for block in _prefetched_blocks(stream, BLOCK_BYTES):
        data = pending + block if pending else block
        if not data:
            break
        if block:
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                pending = data
                if len(pending) > MAX_LINE_BYTES:
                    raise _line_too_long(line_number, study=study, file=file)
                continue
            complete, pending = data[:cut], data[cut:]
        else:
            complete, pending = (data if data.endswith(b"\n") else data + b"\n"), b""
        if n_cells is None:
            first_width = complete[: complete.find(b"\n")].rstrip(b"\r").count(sep_byte)
            has_gene_column = header_has_gene_column
            if has_gene_column is None:
                # An empty or "GENE"-like first field names the gene column (write.csv, Drop-seq);
                # otherwise (R write.table) the header is one field shorter than the data lines.
                has_gene_column = (header_fields[0].lower() in GENE_COLUMN_NAMES
                                   or len(header_fields) == first_width + 1)
            cell_names = header_fields[1:] if has_gene_column else header_fields
            n_cells = len(cell_names)
        buf = np.frombuffer(complete, dtype=np.uint8)
        max_lines = complete.count(b"\n")
        # Worst case every field is non-zero: bound by the number of separators.
        max_values = complete.count(sep_byte)
        name_start = np.empty(max_lines, dtype=np.int64)
        name_end = np.empty(max_lines, dtype=np.int64)
        rows = np.empty(max_values, dtype=np.int32)
        cols = np.empty(max_values, dtype=np.int32)
        vals = np.empty(max_values, dtype=np.int64)
        n_lines, nnz, error, error_line_or_blanks, error_value = _parse_lines(
            buf, sep_code, n_cells, line_number, len(gene_names), name_start, name_end, rows, cols, vals)
        if error:
            detail = _MESSAGES[error].format(found=error_value, expected=n_cells, field=error_value + 1)
            raise ScgrnInputError(f"line {error_line_or_blanks} {detail}", study=study, file=file,
                                  fix="re-download the file or exclude the sample")
        gene_names.extend(complete[s:e].decode("utf-8", errors="replace").strip('"')
                          for s, e in zip(name_start[:n_lines], name_end[:n_lines]))
        row_chunks.append(rows[:nnz].copy())
        col_chunks.append(cols[:nnz].copy())
        val_chunks.append(vals[:nnz].copy())
        line_number += n_lines + error_line_or_blanks
        bytes_read += len(block)
        if progress is not None:
            progress(bytes_read)
    if n_cells is None:
        cell_names, n_cells = header_fields[1:], len(header_fields) - 1
    values = np.concatenate(val_chunks) if val_chunks else np.empty(0, np.int64)
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise ScgrnInputError(f"has a count above {np.iinfo(np.int32).max}", study=study, file=file,
                              fix="check that the file holds counts, not a sentinel or an overflowed value")
    counts = sp.csr_matrix(
        (values.astype(np.int32),
         (np.concatenate(row_chunks) if row_chunks else np.empty(0, np.int32),
          np.concatenate(col_chunks) if col_chunks else np.empty(0, np.int32))),
        shape=(n_cells, len(gene_names)), dtype=np.int32)
    return DenseTextMatrix(gene_names=gene_names, cell_names=cell_names, counts=counts)


def _line_too_long(line_number: int, *, study: str, file: str) -> ScgrnInputError:
    return ScgrnInputError(f"line {line_number} is longer than {MAX_LINE_BYTES} bytes", study=study, file=file,
                           fix="this is not a genes x cells text matrix (or a decompression bomb): "
                               "re-download the file or exclude the sample")


@numba.njit(cache=True)
def _format_rows(names_buf, name_offsets, values, sep):  # pragma: no cover - compiled
    n_rows, n_cols = values.shape
    # Upper bound: name + per field (separator + up to 10 digits) + newline.
    out = np.empty(name_offsets[-1] + n_rows * (n_cols * 11 + 1), dtype=np.uint8)
    digits = np.empty(20, dtype=np.uint8)
    pos = 0
    for r in range(n_rows):
        for k in range(name_offsets[r], name_offsets[r + 1]):
            out[pos] = names_buf[k]
            pos += 1
        for c in range(n_cols):
            out[pos] = sep
            pos += 1
            value = values[r, c]
            if value == 0:
                out[pos] = 48
                pos += 1
                continue
            n_digits = 0
            while value > 0:
                digits[n_digits] = 48 + value % 10
                value //= 10
                n_digits += 1
            for d in range(n_digits - 1, -1, -1):
                out[pos] = digits[d]
                pos += 1
        out[pos] = 10
        pos += 1
    return out[:pos]


def format_dense_text_rows(row_names: list[str], values: np.ndarray, *, sep: str = "\t") -> bytes:
    """Lines ``name<sep>v1<sep>v2...`` for non-negative integer ``values`` (n_rows x n_cols).

    The writer twin of :func:`read_dense_text_matrix`, used by the demo simulator; Python's
    str.join is ~20x slower on the 10^8-field files of the full-scale benchmark.
    """
    encoded = [name.encode() for name in row_names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) for e in encoded])
    names_buf = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.empty(0, np.uint8)
    return _format_rows(names_buf, offsets, np.ascontiguousarray(values, dtype=np.int64), ord(sep)).tobytes()

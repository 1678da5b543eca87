"""Streaming parser for genes x cells count matrices written as delimited text.

GEO's per-sample MARS-seq tables, processed CSVs and Drop-seq DGE files are all dense
text: one line per gene, the gene name first, then one integer per cell. Single-cell
matrices are ~90% zeros, so the parser keeps only non-zero entries and never holds the
decompressed text of a whole file: it reads fixed-size blocks and parses complete lines
with a compiled kernel (pandas' C parser is several times slower on 10^4-column lines),
skipping runs of zeros 8 bytes at a time, while the next block is decompressed in a thread.
Values are stored gene by gene as the file holds them and transposed to cells x genes once.
"""

from __future__ import annotations

from typing import IO, Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.lib.ingest._kernels import (_FIELD_COUNT, _NEGATIVE, _NOT_A_NUMBER, _NOT_INTEGER, _NO_ROOM,
                                              _TOO_LARGE, _count_by_group, _format_rows, _gather_names, _parse_lines,
                                              _scatter_to_rows, _split_by_group)
from scgrn_assets.lib.ingest.read_ahead import read_ahead
from scgrn_assets.lib.progress import Progress, report
from scgrn_assets.lib.text_files import decode_text, undecodable_error


BLOCK_BYTES = 8 << 20
# A line of 10^6 cells is a few MB; one far longer is a decompression bomb or not a matrix at all.
MAX_LINE_BYTES = 256 << 20
GENE_COLUMN_NAMES = {"", "gene", "genes", "gene_id", "gene_name", "gene_symbol", "symbol"}
_MESSAGES = {
    _FIELD_COUNT: "has {found} fields, expected 1+{expected}",
    _NEGATIVE: "has a negative count in field {field}",
    _NOT_INTEGER: "has a non-integer count in field {field}",
    _NOT_A_NUMBER: "has a value that is not a number in field {field}",
    _TOO_LARGE: "has a count too large for a count matrix (above 2147483647) in field {field} "
                "(a sentinel or an overflow?)",
}


class DenseTextMatrix:
    """A parsed genes x cells text matrix, handed out as cells x genes counts.

    The parser stores what the file holds, gene by gene (the non-zero cells of each line);
    ``counts`` transposes all of it into a cells x genes CSR matrix (int32, sorted indices)
    on first use. A file of many samples (a processed CSV of many plates) is parsed with
    ``cell_groups``: each group's values are then stored apart, and :meth:`cell_rows` of one
    group touches only that group's values, so splitting the file costs one pass over it and
    no whole-file CSR copy.
    """

    def __init__(self, gene_names: list[str], cell_names: list[str], *, chunks: list[list[tuple]] | None = None,
                 cell_nnz: np.ndarray | None = None, group_of: np.ndarray | None = None,
                 local_index: np.ndarray | None = None):
        self.gene_names = gene_names
        self.cell_names = cell_names
        n_cells = len(cell_names)
        # Per group, in gene order: (first gene, non-zeros per line, cell index within the group, value);
        # indices and values as uint16 where they fit.
        self._chunks = chunks if chunks is not None else [[]]
        self._cell_nnz = cell_nnz if cell_nnz is not None else np.zeros(n_cells, dtype=np.int64)
        self._group_of = group_of if group_of is not None else np.zeros(n_cells, dtype=np.int64)
        self._local_index = local_index if local_index is not None else np.arange(n_cells, dtype=np.int64)
        self._counts: sp.csr_matrix | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.cell_names), len(self.gene_names)

    @property
    def counts(self) -> sp.csr_matrix:
        """All cells x all genes (int32 CSR, sorted indices); built once, then the gene-major data is freed."""
        if self._counts is None:
            self._counts = self._build_rows(np.arange(len(self.cell_names)))
            self._chunks = [[] for _ in self._chunks]
        return self._counts

    def cell_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        """The counts of cells ``rows`` (in that order) x all genes, as int32 CSR with sorted indices."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._counts is not None:
            return self._counts[rows]
        return self._build_rows(rows)

    def _build_rows(self, rows: np.ndarray) -> sp.csr_matrix:
        n_cells, n_genes = self.shape
        if len(np.unique(rows)) != len(rows):
            raise ValueError("cell_rows() needs distinct rows")
        out_row = np.full(n_cells, -1, dtype=np.int64)
        out_row[rows] = np.arange(len(rows))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self._cell_nnz[rows], out=indptr[1:])
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        data = np.empty(int(indptr[-1]), dtype=np.int32)
        next_position = indptr[:-1].copy()
        for group in np.unique(self._group_of[rows]):
            members = np.flatnonzero(self._group_of == group)
            local_out_row = np.empty(len(members), dtype=np.int64)
            local_out_row[self._local_index[members]] = out_row[members]
            for first_gene, line_nnz, cells, values in self._chunks[group]:
                _scatter_to_rows(first_gene, line_nnz, cells, values, local_out_row, next_position, indices, data)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_genes))


def _blocks(stream: IO[bytes], block_bytes: int) -> Iterator[bytes]:
    """The blocks of ``stream``, ending with the empty block that marks its end."""
    while True:
        block = stream.read(block_bytes)
        yield block
        if not block:
            return


def _prefetched_blocks(stream: IO[bytes], block_bytes: int) -> Iterator[bytes]:
    """Blocks of ``stream`` read one ahead in a thread (:func:`read_ahead`): decompression (zlib releases
    the GIL) overlaps with parsing (the compiled kernel releases it too), so two cores both work."""
    return read_ahead(_blocks(stream, block_bytes), depth=2, name="dense-text-read-ahead")


def _split_header(header: bytes, sep: bytes, *, encoding: str, study: str, file: str) -> list[str]:
    text = decode_text(header.rstrip(b"\r\n"), encoding=encoding, study=study, file=file)
    return [f.strip().strip('"') for f in text.split(sep.decode())]


def read_dense_text_matrix(stream: IO[bytes], *, sep: str, study: str, file: str,
                           header_has_gene_column: bool | None = None,
                           progress: Progress | None = None,
                           cell_groups: Callable[[list[str]], list] | None = None,
                           encoding: str = "utf-8") -> DenseTextMatrix:
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
    cell_groups
        Maps the cell names to one key per cell (e.g. its plate); the values of each group
        are stored apart, so that :meth:`DenseTextMatrix.cell_rows` of one group is cheap.
    progress
        Called as ``progress(n_bytes_parsed, 0, unit="bytes")`` after each block (the total is
        not known: the stream is decompressed as it is read).
    encoding
        Of the header and the gene names (an ASCII-compatible one: the catalog's ``encoding:``);
        a byte not valid in it is an error naming the line, never a replacement character.

    Counts must be non-negative integers (``3``, ``3.0`` and R's ``1e+05`` are accepted)
    that fit in int32; anything else raises :class:`ScgrnInputError` naming the line and the fix.
    A file with a header but no gene line is refused too: read, its cells would be measured zeros.
    """
    sep_byte = sep.encode()
    header = stream.readline(MAX_LINE_BYTES + 1)
    if not header.strip():
        raise ScgrnInputError("is empty or has no header line", study=study, file=file,
                              fix="re-download the file or exclude the sample")
    if len(header) > MAX_LINE_BYTES:
        raise _line_too_long(1, study=study, file=file)
    if b"\r" in header.rstrip(b"\r\n"):  # read as one line, its rows would pass for cells
        raise ScgrnInputError("uses CR-only line endings (classic Mac): its lines end in \\r without \\n",
                              study=study, file=file,
                              fix="convert the line endings (e.g. tr '\\r' '\\n' < FILE > FILE.fixed), or exclude "
                                  "the sample")
    header_fields = _split_header(header, sep_byte, encoding=encoding, study=study, file=file)
    pending = b""
    gene_names: list[str] = []
    chunks: list[list[tuple]] = [[]]
    group_of = local_index = None
    n_cells: int | None = None
    cell_names: list[str] = []
    cell_nnz = np.zeros(0, dtype=np.int64)
    scratch: dict[str, np.ndarray] = {}
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
            pending = data[cut:]
        else:
            data, cut, pending = (data if data.endswith(b"\n") else data + b"\n"), None, b""
        buf = np.frombuffer(data, dtype=np.uint8)[:cut]
        if n_cells is None:
            first_width = data[: data.find(b"\n")].rstrip(b"\r").count(sep_byte)
            has_gene_column = header_has_gene_column
            if has_gene_column is None:
                # An empty or "GENE"-like first field names the gene column (write.csv, Drop-seq);
                # otherwise (R write.table) the header is one field shorter than the data lines.
                has_gene_column = (header_fields[0].lower() in GENE_COLUMN_NAMES
                                   or len(header_fields) == first_width + 1)
            cell_names = header_fields[1:] if has_gene_column else header_fields
            n_cells = len(cell_names)
            cell_nnz = np.zeros(n_cells, dtype=np.int64)
            group_of, local_index = _cell_groups(cell_groups, cell_names)
            chunks = [[] for _ in range(int(group_of.max()) + 1 if n_cells else 1)]
        # Upper bounds, so the kernel never runs out of room: a non-zero field takes at least
        # 2 bytes (separator + digit), a complete gene line at least 2 per cell + its newline.
        max_values = len(buf) // 2 + 1
        max_lines = len(buf) // (2 * n_cells + 1) + 1 if n_cells else len(buf) + 1
        name_start = _scratch(scratch, "name_start", max_lines, np.int64)
        name_end = _scratch(scratch, "name_end", max_lines, np.int64)
        line_nnz = _scratch(scratch, "line_nnz", max_lines, np.int32)
        cells = _scratch(scratch, "cells", max_values, np.int32)
        vals = _scratch(scratch, "vals", max_values, np.int32)
        n_lines, nnz, error, error_line_or_blanks, error_value = _parse_lines(
            buf, sep_code, n_cells, line_number, name_start, name_end, line_nnz, cells, vals, cell_nnz)
        if error == _NO_ROOM:
            raise AssertionError(f"{file}: dense text parser ran out of room at line {error_line_or_blanks}")
        if error:
            detail = _MESSAGES[error].format(found=error_value, expected=n_cells, field=error_value + 1)
            raise ScgrnInputError(f"line {error_line_or_blanks} {detail}", study=study, file=file,
                                  fix="re-download the file or exclude the sample")
        if n_lines:
            gene_names.extend(_decode_names(buf, name_start[:n_lines], name_end[:n_lines], encoding=encoding,
                                            first_line=line_number, study=study, file=file))
            first_gene = len(gene_names) - n_lines
            if len(chunks) == 1:
                chunks[0].append((first_gene, line_nnz[:n_lines].copy(), cells[:nnz].astype(_index_dtype(n_cells)),
                                  vals[:nnz].astype(_value_dtype(vals[:nnz]))))
            else:
                _append_by_group(chunks, first_gene, line_nnz[:n_lines], cells[:nnz], vals[:nnz], group_of,
                                 local_index)
        line_number += n_lines + error_line_or_blanks
        bytes_read += len(block)
        report(progress, bytes_read, 0, unit="bytes")  # total 0: the decompressed size is not known
    if not gene_names:
        n_header_cells = len(cell_names) if n_cells is not None else len(header_fields) - 1
        raise ScgrnInputError(f"has a header of {n_header_cells} cells but no gene lines (read as is, its cells "
                              "would hold measured zeros)", study=study, file=file,
                              fix="re-download the file (it is cut short or empty), or exclude the sample")
    return DenseTextMatrix(gene_names=gene_names, cell_names=cell_names, chunks=chunks, cell_nnz=cell_nnz,
                           group_of=group_of, local_index=local_index)


def _cell_groups(cell_groups: Callable[[list[str]], list] | None,
                 cell_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(group of each cell, its index within the group); one group when ``cell_groups`` is None."""
    n_cells = len(cell_names)
    if cell_groups is None or n_cells == 0:
        return np.zeros(n_cells, dtype=np.int64), np.arange(n_cells, dtype=np.int64)
    keys = list(cell_groups(cell_names))
    if len(keys) != n_cells:
        raise ValueError(f"cell_groups gave {len(keys)} keys for {n_cells} cells")
    group_of = pd.factorize(pd.Series(keys, dtype=object))[0].astype(np.int64)
    local_index = np.empty(n_cells, dtype=np.int64)
    for group in range(int(group_of.max()) + 1):
        members = np.flatnonzero(group_of == group)
        local_index[members] = np.arange(len(members))
    return group_of, local_index


def _append_by_group(chunks: list[list[tuple]], first_gene: int, line_nnz: np.ndarray, cells: np.ndarray,
                     vals: np.ndarray, group_of: np.ndarray, local_index: np.ndarray) -> None:
    """Store a block's values group by group (views into one array per block)."""
    n_groups = len(chunks)
    group_start = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(_count_by_group(cells, group_of, n_groups), out=group_start[1:])
    group_line_nnz = np.zeros((n_groups, len(line_nnz)), dtype=np.int32)
    out_cells = np.empty(len(cells), dtype=_index_dtype(int(local_index.max()) + 1 if len(local_index) else 0))
    out_vals = np.empty(len(vals), dtype=_value_dtype(vals))
    _split_by_group(line_nnz, cells, vals, group_of, local_index, group_start, group_line_nnz, out_cells, out_vals)
    for group in range(n_groups):
        start, stop = group_start[group], group_start[group + 1]
        chunks[group].append((first_gene, group_line_nnz[group], out_cells[start:stop], out_vals[start:stop]))


def _index_dtype(n_cells: int):
    """The smallest type for cell indices below ``n_cells``: stored values take 4 bytes, not 8, in
    the usual files (fewer than 65,536 cells per file or per group, counts below 65,536)."""
    return np.uint16 if n_cells <= 1 << 16 else np.int32


def _value_dtype(values: np.ndarray):
    return np.uint16 if not len(values) or int(values.max()) < 1 << 16 else np.int32


def _scratch(store: dict[str, np.ndarray], key: str, size: int, dtype) -> np.ndarray:
    """A buffer of at least ``size`` elements, reused block after block (blocks are alike in size)."""
    if key not in store or store[key].shape[0] < size:
        store[key] = np.empty(size + size // 4, dtype=dtype)
    return store[key]


def _decode_names(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, *, encoding: str, first_line: int,
                  study: str, file: str) -> list[str]:
    """The gene names of a block's lines (the first is line ``first_line``), decoded in one call rather
    than one per line; an undecodable name is an error naming its line."""
    blob = _gather_names(buf, starts, ends).tobytes()
    try:
        text = blob.decode(encoding)
    except UnicodeDecodeError as error:
        index = blob.count(b"\n", 0, error.start)  # the name holding the byte
        line = first_line + int(np.count_nonzero(buf[:starts[index]] == 10))
        column = error.start - (blob.rfind(b"\n", 0, error.start) + 1)
        name = bytes(buf[starts[index]:ends[index]])
        raise undecodable_error(name, UnicodeDecodeError(error.encoding, name, column, column + 1, error.reason),
                                encoding=encoding, study=study, file=file, first_line=line) from None
    names = text.split("\n")[:-1]
    return [name.strip('"') for name in names] if b'"' in blob else names


def _line_too_long(line_number: int, *, study: str, file: str) -> ScgrnInputError:
    return ScgrnInputError(f"line {line_number} is longer than {MAX_LINE_BYTES} bytes", study=study, file=file,
                           fix="this is not a genes x cells text matrix (or a decompression bomb): "
                               "re-download the file or exclude the sample")


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

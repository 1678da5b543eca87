"""Numba kernels of the ingest text parsers (:mod:`.dense_text`, :mod:`.mtx_text`): they release the GIL."""

from __future__ import annotations

import numba
import numpy as np


# --------------------------------------------------------------------------- dense text (genes x cells)

# Error codes returned by _parse_lines.
_OK, _FIELD_COUNT, _NEGATIVE, _NOT_INTEGER, _NOT_A_NUMBER, _TOO_LARGE, _NO_ROOM = 0, 1, 2, 3, 4, 5, 6


@numba.njit(cache=True, nogil=True, inline="always")
def _load8(buf, pos):  # pragma: no cover - compiled
    """The 8 bytes at ``pos`` as one little-endian word (LLVM turns this into a single load)."""
    return (np.uint64(buf[pos]) | (np.uint64(buf[pos + 1]) << np.uint64(8))
            | (np.uint64(buf[pos + 2]) << np.uint64(16)) | (np.uint64(buf[pos + 3]) << np.uint64(24))
            | (np.uint64(buf[pos + 4]) << np.uint64(32)) | (np.uint64(buf[pos + 5]) << np.uint64(40))
            | (np.uint64(buf[pos + 6]) << np.uint64(48)) | (np.uint64(buf[pos + 7]) << np.uint64(56)))


@numba.njit(cache=True, nogil=True)
def _parse_lines(buf, sep, n_cells, first_line_number, name_start, name_end, line_nnz, cells, vals,
                 cell_nnz):  # pragma: no cover - compiled
    """Parse the complete lines of ``buf`` gene by gene: line i's non-zero fields go to ``cells`` (cell
    index) and ``vals`` (count), ``line_nnz[i]`` of them, and each cell's total to ``cell_nnz``.

    Returns (n_lines, n_nonzero, error, error_line or blank lines, error_value).
    """
    n = buf.shape[0]
    pos = 0
    line = 0
    nnz = 0
    blank_lines = 0
    zero_sep = np.uint64(48) | (np.uint64(sep) << np.uint64(8))
    zeros8 = zero_sep | (zero_sep << np.uint64(16)) | (zero_sep << np.uint64(32)) | (zero_sep << np.uint64(48))
    while pos < n:
        if buf[pos] == 10 or (buf[pos] == 13 and pos + 1 < n and buf[pos + 1] == 10):
            # Blank lines (often a trailing one) carry no gene.
            pos += 1 if buf[pos] == 10 else 2
            blank_lines += 1
            continue
        first_line_number_here = first_line_number + blank_lines
        if line >= name_start.shape[0]:
            return line, nnz, 6, first_line_number_here + line, 0
        # Gene name: up to the first separator.
        start = pos
        while pos < n and buf[pos] != sep and buf[pos] != 10:
            pos += 1
        name_start[line] = start
        name_end[line] = pos
        line_start_nnz = nnz
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
            # Runs of zeros, four fields per 8-byte compare: "0<sep>0<sep>0<sep>0<sep>".
            while pos + 8 <= n and field + 4 <= n_cells and _load8(buf, pos) == zeros8:
                pos += 8
                field += 4
            if pos < n and buf[pos] == 48 and (pos + 1 == n or buf[pos + 1] == sep or buf[pos + 1] == 10):
                pos += 1  # fast path: most fields are a bare "0"
                continue
            # Fast path for a plain positive integer ("17"); anything else is parsed below.
            if pos < n and 49 <= buf[pos] <= 57:
                end = pos
                value = 0
                while end < n and 48 <= buf[end] <= 57 and value <= 2147483647:
                    value = value * 10 + (buf[end] - 48)
                    end += 1
                if value <= 2147483647 and (end == n or buf[end] == sep or buf[end] == 10):
                    if nnz >= cells.shape[0]:
                        return line, nnz, 6, first_line_number_here + line, field
                    cells[nnz] = field - 1
                    vals[nnz] = value
                    cell_nnz[field - 1] += 1
                    nnz += 1
                    pos = end
                    continue
            # General path: sign, decimals, exponents ("3.0", "1e+05", R's "1.2e+07"). The value is
            # mantissa x 10^(exponent - fraction digits), the mantissa saturating past int32.
            mantissa = 0
            too_large = False
            fraction_digits = 0
            pending_zeros = 0
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
                    if seen_dot and c == 48:
                        pending_zeros += 1  # trailing zeros of a fraction change nothing
                    else:
                        shift = pending_zeros + 1 if seen_dot else 1
                        for _ in range(shift):
                            if mantissa <= 2147483647:
                                mantissa = mantissa * 10
                            else:
                                too_large = True
                        mantissa += c - 48
                        if seen_dot:
                            fraction_digits += shift
                            pending_zeros = 0
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
                        if exponent < 1000:
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
            scale = exponent - fraction_digits
            if fraction_digits > 0 and scale < 0:
                # The mantissa ends in a non-zero fraction digit that the exponent does not lift.
                return line, nnz, 3, first_line_number_here + line, field
            if mantissa > 2147483647 or too_large or (scale > 9 and mantissa != 0):
                return line, nnz, 5, first_line_number_here + line, field
            value = mantissa
            if scale > 0 and mantissa != 0:
                value = mantissa * 10 ** scale
                if value > 2147483647:
                    return line, nnz, 5, first_line_number_here + line, field
            elif scale < 0 and mantissa != 0:
                if scale < -18:
                    return line, nnz, 3, first_line_number_here + line, field
                divisor = 10 ** (-scale)
                if mantissa % divisor != 0:
                    return line, nnz, 3, first_line_number_here + line, field
                value = mantissa // divisor
            if negative and value != 0:
                return line, nnz, 2, first_line_number_here + line, field
            if value != 0:
                if nnz >= cells.shape[0]:
                    return line, nnz, 6, first_line_number_here + line, field
                cells[nnz] = field - 1
                vals[nnz] = value
                cell_nnz[field - 1] += 1
                nnz += 1
        if field != n_cells:
            return line, nnz, 1, first_line_number_here + line, field + 1
        line_nnz[line] = nnz - line_start_nnz
        pos += 1  # newline
        line += 1
    return line, nnz, 0, blank_lines, 0


@numba.njit(cache=True, nogil=True)
def _scatter_to_rows(first_gene, line_nnz, cells, values, out_row, next_position, indices,
                     data):  # pragma: no cover - compiled
    """Gene-major entries into cells x genes CSR rows (cells with ``out_row`` -1 are left out);
    chunks come in gene order, so each row's genes come out sorted."""
    k = 0
    for line in range(line_nnz.shape[0]):
        gene = first_gene + line
        for _ in range(line_nnz[line]):
            row = out_row[cells[k]]
            if row >= 0:
                position = next_position[row]
                indices[position] = gene
                data[position] = values[k]
                next_position[row] = position + 1
            k += 1


@numba.njit(cache=True, nogil=True)
def _count_by_group(cells, group_of, n_groups):  # pragma: no cover - compiled
    counts = np.zeros(n_groups, dtype=np.int64)
    for k in range(cells.shape[0]):
        counts[group_of[cells[k]]] += 1
    return counts


@numba.njit(cache=True, nogil=True)
def _split_by_group(line_nnz, cells, vals, group_of, local_index, group_start, group_line_nnz, out_cells,
                    out_vals):  # pragma: no cover - compiled
    """Distribute a block's values to their cell's group: group g's values land in
    ``out_*[group_start[g]:group_start[g + 1]]`` in line order, cells renumbered within the group."""
    fill = group_start[:-1].copy()
    k = 0
    for line in range(line_nnz.shape[0]):
        for _ in range(line_nnz[line]):
            cell = cells[k]
            group = group_of[cell]
            position = fill[group]
            out_cells[position] = local_index[cell]
            out_vals[position] = vals[k]
            fill[group] = position + 1
            group_line_nnz[group, line] += 1
            k += 1


@numba.njit(cache=True, nogil=True)
def _gather_names(buf, name_start, name_end):  # pragma: no cover - compiled
    """The bytes of every name, each followed by a newline (names never hold one)."""
    total = 0
    for i in range(name_start.shape[0]):
        total += name_end[i] - name_start[i] + 1
    out = np.empty(total, dtype=np.uint8)
    pos = 0
    for i in range(name_start.shape[0]):
        for k in range(name_start[i], name_end[i]):
            out[pos] = buf[k]
            pos += 1
        out[pos] = 10
        pos += 1
    return out


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


# --------------------------------------------------------------------------- Matrix Market entries


@numba.njit(cache=True, nogil=True)
def _parse_entries(buf, rows, cols, vals):  # pragma: no cover - compiled
    """Parse complete ``<int> <int> <int>\\n`` lines of ``buf`` into ``rows``/``cols``/``vals``.

    Returns (n_entries, bytes consumed, status): status 0 when every line was parsed, 1 when
    the line starting at ``bytes consumed`` is of another form, 2 when the arrays are full.
    Indices of more than 9 digits and values of more than 18 are "another form".
    """
    n = buf.shape[0]
    pos = 0
    k = 0
    while pos < n:
        start = pos
        if k >= rows.shape[0]:
            return k, start, 2
        row = 0
        digits = 0
        while pos < n and 48 <= buf[pos] <= 57:
            row = row * 10 + (buf[pos] - 48)
            digits += 1
            pos += 1
        if digits == 0 or digits > 9 or pos >= n or buf[pos] != 32:
            return k, start, 1
        pos += 1
        col = 0
        digits = 0
        while pos < n and 48 <= buf[pos] <= 57:
            col = col * 10 + (buf[pos] - 48)
            digits += 1
            pos += 1
        if digits == 0 or digits > 9 or pos >= n or buf[pos] != 32:
            return k, start, 1
        pos += 1
        value = 0
        digits = 0
        while pos < n and 48 <= buf[pos] <= 57:
            value = value * 10 + (buf[pos] - 48)
            digits += 1
            pos += 1
        if digits == 0 or digits > 18 or pos >= n or buf[pos] != 10:
            return k, start, 1
        pos += 1
        rows[k] = row
        cols[k] = col
        vals[k] = value
        k += 1
    return k, pos, 0


@numba.njit(cache=True, nogil=True)
def _first_not_increasing(major, minor):  # pragma: no cover - compiled
    """The first ``i`` whose pair ``(major[i], minor[i])`` is not above the one before it, or -1.

    -1 means the pairs are strictly increasing, so no coordinate repeats: one pass, no copy (10x
    writes its entries sorted by barcode, then feature).
    """
    for i in range(1, major.shape[0]):
        if major[i] < major[i - 1] or (major[i] == major[i - 1] and minor[i] <= minor[i - 1]):
            return i
    return -1

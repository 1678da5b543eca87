"""Numba kernels of the validation stage: quantile codes, contingency tables, MI/CMI from tables,
and random tables with fixed margins (the permutation null drawn in table space)."""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, parallel=True)
def column_codes_kernel(indptr, indices, values, n_bins, codes):
    """Write the codes of each CSC column of positive ``values`` into ``codes`` (n_cols, n_rows)."""
    n_rows = codes.shape[1]
    for column in numba.prange(indptr.shape[0] - 1):
        start = indptr[column]
        n_positive = indptr[column + 1] - start
        if n_positive == 0:
            continue
        column_values = values[start : start + n_positive]
        order = np.argsort(column_values)
        has_zeros = n_positive < n_rows
        n_positive_bins = n_bins - 1 if has_zeros else n_bins
        first_positive_code = 1 if has_zeros else 0
        lowest_tied_rank = 0
        for rank in range(n_positive):
            entry = order[rank]
            # Ties share the bin of their lowest rank.
            if rank > 0 and column_values[entry] != column_values[order[rank - 1]]:
                lowest_tied_rank = rank
            code = first_positive_code + (lowest_tied_rank * n_positive_bins) // n_positive
            codes[column, indices[start + entry]] = np.uint8(code)


@numba.njit(cache=True, inline="always")
def next_uniform(state):
    """splitmix64 step; a float in the open interval (0, 1)."""
    state[0] += np.uint64(0x9E3779B97F4A7C15)
    mixed = state[0]
    mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    mixed = mixed ^ (mixed >> np.uint64(31))
    return (float(mixed >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)


@numba.njit(cache=True)
def stream_state(seed, stream):
    """Independent splitmix64 state for one edge: mixes the seed with the edge's index."""
    state = np.empty(1, dtype=np.uint64)
    state[0] = np.uint64(seed) * np.uint64(0xD1B54A32D192ED03) + np.uint64(stream) * np.uint64(0x9E3779B97F4A7C15)
    next_uniform(state)
    return state


@numba.njit(cache=True)
def hypergeometric(state, n_good, n_bad, n_sample, log_factorial):
    """Number of good items in a draw of ``n_sample`` from ``n_good + n_bad`` without replacement.

    numpy's algorithms: direct simulation for small samples, Stadlober's ratio of
    uniforms (HRUA) otherwise; ``log_factorial[k] = log(k!)`` for k up to the population.
    """
    total = n_good + n_bad
    if n_sample <= 0 or n_good <= 0:
        return 0
    if n_bad <= 0:
        return n_sample
    if n_sample >= 10 and n_sample <= total - 10:
        computed_sample = min(n_sample, total - n_sample)
        min_good_bad = min(n_good, n_bad)
        max_good_bad = max(n_good, n_bad)
        p = min_good_bad / total
        q = max_good_bad / total
        a = computed_sample * p + 0.5
        variance = (total - computed_sample) * computed_sample * p * q / (total - 1)
        c = math.sqrt(variance + 0.5)
        h = 1.7155277699214135 * c + 0.8989161620588988
        mode = int(math.floor((computed_sample + 1) * (min_good_bad + 1) / (total + 2)))
        g = (
            log_factorial[mode]
            + log_factorial[min_good_bad - mode]
            + log_factorial[computed_sample - mode]
            + log_factorial[max_good_bad - computed_sample + mode]
        )
        b = min(min(computed_sample, min_good_bad) + 1, math.floor(a + 16 * c))
        while True:
            u = next_uniform(state)
            v = next_uniform(state)
            x = a + h * (v - 0.5) / u
            if x < 0.0 or x >= b:
                continue
            k = int(math.floor(x))
            gp = (
                log_factorial[k]
                + log_factorial[min_good_bad - k]
                + log_factorial[computed_sample - k]
                + log_factorial[max_good_bad - computed_sample + k]
            )
            t = g - gp
            if u * (4.0 - u) - 3.0 <= t:
                break
            if u * (u - t) >= 1:
                continue
            if 2.0 * math.log(u) <= t:
                break
        if n_good > n_bad:
            k = computed_sample - k
        if computed_sample < n_sample:
            k = n_good - k
        return k
    complement = n_sample > total // 2
    computed_sample = total - n_sample if complement else n_sample
    remaining_total = total
    remaining_good = n_good
    while computed_sample > 0 and remaining_good > 0 and remaining_total > remaining_good:
        if next_uniform(state) * remaining_total < remaining_good:
            remaining_good -= 1
        remaining_total -= 1
        computed_sample -= 1
    if remaining_total == remaining_good:
        remaining_good -= computed_sample
    return remaining_good if complement else n_good - remaining_good


@numba.njit(cache=True)
def random_table_term(state, row_sums, column_sums, column_left, klogk, log_factorial, miller_madow):
    """Draw a table with the given margins (a uniformly permuted cross-tab) and return its
    ``sum n log n`` minus ``K / 2`` when ``miller_madow`` (K = non-empty cells)."""
    n_rows = row_sums.shape[0]
    n_columns = column_sums.shape[0]
    total_left = 0
    for column in range(n_columns):
        column_left[column] = column_sums[column]
        total_left += column_sums[column]
    term = 0.0
    n_nonempty = 0
    for row in range(n_rows):
        need = row_sums[row]
        if need == 0:
            continue
        pool_left = total_left
        for column in range(n_columns):
            if need == 0:
                break
            available = column_left[column]
            if column == n_columns - 1 or available == pool_left:
                drawn = need
            elif need == pool_left:
                drawn = available
            else:
                drawn = hypergeometric(state, available, pool_left - available, need, log_factorial)
            pool_left -= available
            if drawn > 0:
                column_left[column] = available - drawn
                need -= drawn
                total_left -= drawn
                term += klogk[drawn]
                n_nonempty += 1
    if miller_madow:
        term -= 0.5 * n_nonempty
    return term


@numba.njit(cache=True, inline="always")
def table_term(table, klogk, miller_madow):
    """``sum n log n`` over a count array, minus ``K / 2`` when ``miller_madow``."""
    term = 0.0
    n_nonempty = 0
    for count in table.ravel():
        if count > 0:
            term += klogk[count]
            n_nonempty += 1
    if miller_madow:
        term -= 0.5 * n_nonempty
    return term


@numba.njit(cache=True)
def fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, first, second, table):
    """Cross-tab of genes ``first`` (rows) and ``second`` (columns) into ``table`` (n_bins, n_bins).

    Only cells where the sparser gene has a non-zero code are visited; the zero row or
    column follows from the other gene's margins.
    """
    table[:, :] = 0
    n_bins = table.shape[0]
    first_nonzero = nonzero_indptr[first + 1] - nonzero_indptr[first]
    second_nonzero = nonzero_indptr[second + 1] - nonzero_indptr[second]
    if second_nonzero <= first_nonzero:
        for position in range(nonzero_indptr[second], nonzero_indptr[second + 1]):
            cell = nonzero_cells[position]
            table[codes[first, cell], codes[second, cell]] += 1
        for row in range(n_bins):
            seen = 0
            for column in range(1, n_bins):
                seen += table[row, column]
            table[row, 0] = margins[first, row] - seen
    else:
        for position in range(nonzero_indptr[first], nonzero_indptr[first + 1]):
            cell = nonzero_cells[position]
            table[codes[first, cell], codes[second, cell]] += 1
        for column in range(n_bins):
            seen = 0
            for row in range(1, n_bins):
                seen += table[row, column]
            table[0, column] = margins[second, column] - seen


@numba.njit(cache=True)
def fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x, y, z, pair_table, table):
    """Cross-tab (x, y, z) into ``table`` (n_bins, n_bins, n_bins), visiting only cells where
    z is non-zero; the z = 0 slice is the (x, y) table minus the rest."""
    n_bins = table.shape[0]
    fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, x, y, pair_table)
    table[:, :, :] = 0
    for position in range(nonzero_indptr[z], nonzero_indptr[z + 1]):
        cell = nonzero_cells[position]
        table[codes[x, cell], codes[y, cell], codes[z, cell]] += 1
    for row in range(n_bins):
        for column in range(n_bins):
            seen = 0
            for stratum in range(1, n_bins):
                seen += table[row, column, stratum]
            table[row, column, 0] = pair_table[row, column] - seen


@numba.njit(cache=True)
def mi_from_table(table, n_cells, klogk, miller_madow):
    """MI in nats of a (n_bins, n_bins) table, Miller-Madow corrected if asked."""
    n_bins = table.shape[0]
    row_sums = np.zeros(n_bins, dtype=np.int64)
    column_sums = np.zeros(n_bins, dtype=np.int64)
    for row in range(n_bins):
        for column in range(n_bins):
            row_sums[row] += table[row, column]
            column_sums[column] += table[row, column]
    value = table_term(table, klogk, miller_madow) - table_term(row_sums, klogk, miller_madow)
    value += -table_term(column_sums, klogk, miller_madow) + klogk[n_cells]
    if miller_madow:
        value -= 0.5  # the -1 of (Kx + Ky - Kxy - 1) / 2
    return value / n_cells


@numba.njit(cache=True)
def cmi_from_table(table, n_cells, klogk, miller_madow):
    """CMI I(X;Y|Z) in nats of a (x, y, z) table, Miller-Madow corrected if asked."""
    n_bins = table.shape[0]
    xz = np.zeros((n_bins, n_bins), dtype=np.int64)
    yz = np.zeros((n_bins, n_bins), dtype=np.int64)
    z_sums = np.zeros(n_bins, dtype=np.int64)
    for row in range(n_bins):
        for column in range(n_bins):
            for stratum in range(n_bins):
                count = table[row, column, stratum]
                xz[row, stratum] += count
                yz[column, stratum] += count
                z_sums[stratum] += count
    value = table_term(table, klogk, miller_madow) - table_term(xz, klogk, miller_madow)
    value += -table_term(yz, klogk, miller_madow) + table_term(z_sums, klogk, miller_madow)
    return value / n_cells


@numba.njit(cache=True, parallel=True)
def pair_mi_kernel(codes, nonzero_indptr, nonzero_cells, margins, first, second, klogk, miller_madow):
    """MI of gene pairs; returns mi (n_pairs,) and the tables (n_pairs, n_bins, n_bins)."""
    n_pairs = first.shape[0]
    n_bins = margins.shape[1]
    n_cells = codes.shape[1]
    tables = np.zeros((n_pairs, n_bins, n_bins), dtype=np.int64)
    mi = np.empty(n_pairs)
    for pair in numba.prange(n_pairs):
        fill_pair_table(codes, nonzero_indptr, nonzero_cells, margins, first[pair], second[pair], tables[pair])
        mi[pair] = mi_from_table(tables[pair], n_cells, klogk, miller_madow)
    return mi, tables


@numba.njit(cache=True, parallel=True)
def mi_permutation_kernel(tables, streams, seed, n_permutations, stop_after, klogk, log_factorial, miller_madow):
    """Permutation counts for pair tables (n_pairs, n_bins, n_bins).

    Returns (n_exceeding, n_run): permuted statistics >= the observed one, and the number
    of permutations drawn before ``stop_after`` exceedances stopped the edge.
    """
    n_pairs = tables.shape[0]
    n_bins = tables.shape[1]
    n_exceeding = np.zeros(n_pairs, dtype=np.int64)
    n_run = np.zeros(n_pairs, dtype=np.int64)
    for pair in numba.prange(n_pairs):
        table = tables[pair]
        row_sums = np.zeros(n_bins, dtype=np.int64)
        column_sums = np.zeros(n_bins, dtype=np.int64)
        for row in range(n_bins):
            for column in range(n_bins):
                row_sums[row] += table[row, column]
                column_sums[column] += table[row, column]
        column_left = np.empty(n_bins, dtype=np.int64)
        observed = table_term(table, klogk, miller_madow)
        tolerance = 1e-9 * max(1.0, abs(observed))
        state = stream_state(seed, streams[pair])
        exceeding = 0
        drawn = 0
        while drawn < n_permutations and exceeding < stop_after:
            term = random_table_term(state, row_sums, column_sums, column_left, klogk, log_factorial, miller_madow)
            drawn += 1
            if term >= observed - tolerance:
                exceeding += 1
        n_exceeding[pair] = exceeding
        n_run[pair] = drawn
    return n_exceeding, n_run


@numba.njit(cache=True, parallel=True)
def triplet_cmi_kernel(codes, nonzero_indptr, nonzero_cells, margins, x, y, z, klogk, miller_madow):
    """I(X;Y|Z) in nats for each triplet of gene rows; shape (n_triplets,)."""
    n_triplets = x.shape[0]
    n_bins = margins.shape[1]
    n_cells = codes.shape[1]
    cmi = np.empty(n_triplets)
    for triplet in numba.prange(n_triplets):
        pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
        table = np.empty((n_bins, n_bins, n_bins), dtype=np.int64)
        fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, table)
        cmi[triplet] = cmi_from_table(table, n_cells, klogk, miller_madow)
    return cmi


@numba.njit(cache=True, parallel=True)
def cmi_permutation_kernel(
    codes, nonzero_indptr, nonzero_cells, margins, x, y, z,
    streams, seed, n_permutations, stop_after, klogk, log_factorial, miller_madow,
):
    """Conditional permutation counts (X permuted within the strata of Z) per triplet.

    Returns (n_exceeding, n_run) as :func:`mi_permutation_kernel`.
    """
    n_triplets = x.shape[0]
    n_bins = margins.shape[1]
    n_exceeding = np.zeros(n_triplets, dtype=np.int64)
    n_run = np.zeros(n_triplets, dtype=np.int64)
    for triplet in numba.prange(n_triplets):
        pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
        table = np.empty((n_bins, n_bins, n_bins), dtype=np.int64)
        fill_triplet_table(codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, table)
        x_by_stratum = np.zeros((n_bins, n_bins), dtype=np.int64)
        y_by_stratum = np.zeros((n_bins, n_bins), dtype=np.int64)
        for row in range(n_bins):
            for column in range(n_bins):
                for stratum in range(n_bins):
                    x_by_stratum[stratum, row] += table[row, column, stratum]
                    y_by_stratum[stratum, column] += table[row, column, stratum]
        column_left = np.empty(n_bins, dtype=np.int64)
        observed = table_term(table, klogk, miller_madow)
        tolerance = 1e-9 * max(1.0, abs(observed))
        state = stream_state(seed, streams[triplet])
        exceeding = 0
        drawn = 0
        while drawn < n_permutations and exceeding < stop_after:
            term = 0.0
            for stratum in range(n_bins):
                term += random_table_term(
                    state, x_by_stratum[stratum], y_by_stratum[stratum], column_left, klogk, log_factorial, miller_madow
                )
            drawn += 1
            if term >= observed - tolerance:
                exceeding += 1
        n_exceeding[triplet] = exceeding
        n_run[triplet] = drawn
    return n_exceeding, n_run


@numba.njit(cache=True)
def triplet_count_kernel(codes, nonzero_indptr, nonzero_cells, margins, x, y, z):
    """(x, y, z) tables of triplets of gene rows; shape (n_triplets, n_bins, n_bins, n_bins)."""
    n_bins = margins.shape[1]
    tables = np.zeros((x.shape[0], n_bins, n_bins, n_bins), dtype=np.int64)
    pair_table = np.empty((n_bins, n_bins), dtype=np.int64)
    for triplet in range(x.shape[0]):
        fill_triplet_table(
            codes, nonzero_indptr, nonzero_cells, margins, x[triplet], y[triplet], z[triplet], pair_table, tables[triplet]
        )
    return tables

"""Tests of the integrity scans: repeated cells across studies against a brute-force comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scgrn_assets.lib.corpus.qc_checks import cells_repeated_across_studies, row_fingerprints, scan_counts


def _random_counts(rng, n_cells, n_genes=40):
    return sp.random(n_cells, n_genes, density=0.2, random_state=rng, format="csr",
                     data_rvs=lambda n: rng.integers(1, 6, n)).astype(np.int64)


def test_fingerprints_equal_exactly_for_equal_rows():
    rng = np.random.default_rng(0)
    counts = _random_counts(rng, 300)
    counts = sp.vstack([counts, counts[[5, 17, 17]]]).tocsr()
    fingerprints = row_fingerprints(counts)
    rows = [tuple(zip(counts[i].indices.tolist(), counts[i].data.tolist())) for i in range(counts.shape[0])]
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert (fingerprints[i] == fingerprints[j]) == (rows[i] == rows[j] and len(rows[i]) > 0)


def test_fingerprints_ignore_entry_order_and_integer_versus_float_storage():
    rng = np.random.default_rng(1)
    counts = _random_counts(rng, 50)
    shuffled = counts.copy()
    for i in range(shuffled.shape[0]):
        start, end = shuffled.indptr[i], shuffled.indptr[i + 1]
        order = rng.permutation(end - start)
        shuffled.indices[start:end] = shuffled.indices[start:end][order]
        shuffled.data[start:end] = shuffled.data[start:end][order]
    np.testing.assert_array_equal(row_fingerprints(counts), row_fingerprints(shuffled))
    np.testing.assert_array_equal(row_fingerprints(counts), row_fingerprints(counts.astype(np.float32)))
    # One count changed by one: a different fingerprint.
    changed = counts.copy()
    changed.data[changed.indptr[3]] += 1
    assert row_fingerprints(changed)[3] != row_fingerprints(counts)[3]


def test_repeated_cells_match_a_brute_force_count():
    rng = np.random.default_rng(2)
    blocks = {"S1": _random_counts(rng, 200), "S2": _random_counts(rng, 150), "S3": _random_counts(rng, 100)}
    # S3 repeats 30 of S1's cells (a SuperSeries ingested beside its subseries) and 4 of S2's.
    blocks["S3"] = sp.vstack([blocks["S3"], blocks["S1"][:30], blocks["S2"][10:14]]).tocsr()
    counts = sp.vstack(list(blocks.values())).tocsr()
    studies = np.concatenate([[name] * block.shape[0] for name, block in blocks.items()])

    table = cells_repeated_across_studies(row_fingerprints(counts), studies)

    rows = [tuple(zip(counts[i].indices.tolist(), counts[i].data.tolist())) for i in range(counts.shape[0])]
    expected = {}
    for a in blocks:
        for b in blocks:
            if a < b:
                in_b = {rows[i] for i in np.flatnonzero(studies == b)}
                n = sum(1 for i in np.flatnonzero(studies == a) if rows[i] and rows[i] in in_b)
                if n:
                    expected[(a, b)] = n
    got = {(r.study, r.also_in): r.n_cells for r in table.itertuples()}
    assert got == expected == {("S1", "S3"): 30, ("S2", "S3"): 4}


def test_no_repeats_and_empty_rows_are_not_repeats():
    counts = sp.csr_matrix((4, 10), dtype=np.int64)
    table = cells_repeated_across_studies(row_fingerprints(counts), ["A", "A", "B", "B"])
    assert table.empty
    assert isinstance(table, pd.DataFrame)


def test_scan_counts_flags_each_kind_of_bad_value():
    block = sp.csr_matrix(np.array([[1.0, -2.0, 0.5], [np.nan, 3.0, np.iinfo(np.int64).min]]))
    scan = scan_counts([block])
    assert (scan.n_negative, scan.n_non_integer, scan.n_non_finite, scan.n_sentinel) == (2, 1, 1, 1)
    assert not scan.ok

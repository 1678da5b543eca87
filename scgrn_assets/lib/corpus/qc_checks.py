"""Integrity scans behind the asset checks: counts are finite non-negative integers, no sentinels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    import pandas as pd

# Values that mean "missing" in exported matrices: NaN cast to int64, and its int32 twin.
SENTINELS = (np.iinfo(np.int64).min, np.iinfo(np.int32).min)


@dataclass
class CountScan:
    n_values: int = 0
    n_negative: int = 0
    n_sentinel: int = 0
    n_non_integer: int = 0
    n_non_finite: int = 0

    @property
    def ok(self) -> bool:
        return not (self.n_negative or self.n_sentinel or self.n_non_integer or self.n_non_finite)


def scan_counts(blocks: Iterable[sp.spmatrix | np.ndarray]) -> CountScan:
    """Scan the stored values of count blocks (sparse: non-zeros only, which is where problems live)."""
    scan = CountScan()
    for block in blocks:
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        scan.n_values += values.size
        if values.dtype.kind == "f":
            finite = np.isfinite(values)
            scan.n_non_finite += int((~finite).sum())
            values = values[finite]
            scan.n_non_integer += int((values != np.round(values)).sum())
        scan.n_sentinel += int(np.isin(values, SENTINELS).sum())
        scan.n_negative += int((values < 0).sum())
    return scan


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the 64 output bits (wrapping uint64 maths)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_fingerprints(block: sp.spmatrix) -> np.ndarray:
    """A 64-bit fingerprint of each row's exact (gene, count) entries; equal rows give equal values.

    Each stored entry is hashed on its own and the hashes are summed per row, so the result does
    not depend on the order of the entries within a row (a CSR block need not be sorted). Counts
    are compared as float64, so 3 and 3.0 are the same count. Rows with no entries get 0.
    """
    block = sp.csr_matrix(block)
    with np.errstate(over="ignore"):
        columns = block.indices.astype(np.uint64)
        values = block.data.astype(np.float64).view(np.uint64)
        entry = _mix64(columns * _GOLDEN ^ _mix64(values + _GOLDEN))
        running = np.concatenate([np.zeros(1, np.uint64), np.cumsum(entry, dtype=np.uint64)])
        indptr = block.indptr
        sums = running[indptr[1:]] - running[indptr[:-1]]
        n_entries = np.diff(indptr).astype(np.uint64)
        fingerprints = _mix64(sums ^ (n_entries * _GOLDEN))
    fingerprints[n_entries == 0] = 0
    return fingerprints


def cells_repeated_across_studies(fingerprints: np.ndarray, studies) -> "pd.DataFrame":
    """Pairs of studies that hold identical cells (same non-empty count vector), with how many.

    Two studies sharing whole count vectors means one file was ingested twice (a GEO SuperSeries
    and its subseries, say): the corpus then counts those cells twice. Columns ``study``,
    ``also_in`` (``study < also_in``) and ``n_cells`` (cells of ``study`` whose vector is in ``also_in``).
    """
    import pandas as pd

    cells = pd.DataFrame({"fingerprint": np.asarray(fingerprints, dtype=np.uint64),
                          "study": np.asarray(studies).astype(str)})
    cells = cells[cells["fingerprint"] != 0]
    per_study = cells.groupby(["fingerprint", "study"]).size().rename("n_cells").reset_index()
    shared = per_study[per_study.duplicated("fingerprint", keep=False)]
    pairs = shared.merge(shared[["fingerprint", "study"]].rename(columns={"study": "also_in"}), on="fingerprint")
    pairs = pairs[pairs["study"] < pairs["also_in"]]
    return (pairs.groupby(["study", "also_in"])["n_cells"].sum().reset_index()
            .sort_values("n_cells", ascending=False, ignore_index=True))

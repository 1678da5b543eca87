"""Integrity scans behind the asset checks: counts are finite non-negative integers, no sentinels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import scipy.sparse as sp

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

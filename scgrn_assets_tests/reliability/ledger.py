"""What the reliability suites injected and tried, tallied for ``bench/reliability.py``.

Tests call :func:`record` once per injected fault (a kill, a parallel writer, a held lock)
and per hostile input tried. A run that lost or corrupted data fails its test, and the bench
counts failed tests as such. The counts live in this process; the bench runs pytest
in-process and reads them afterwards.
"""

from __future__ import annotations

from collections import Counter

KINDS = ("fault", "bad_input")
COUNTS: Counter[str] = Counter()


def record(kind: str, n: int = 1) -> None:
    """Count ``n`` events of ``kind`` (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown ledger kind {kind!r}; use one of {KINDS}")
    COUNTS[kind] += n

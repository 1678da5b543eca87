"""The one progress type every long library step takes.

A step calls ``progress(done, total, **detail)``: ``done`` of ``total`` units of its own work (cells,
genes, bytes, training steps), plus optional named details a display may show (``loss=4.9``,
``stage="tokens"``, ``file="matrix.mtx.gz"``). The assets turn it into Dagster log lines, the CLI into a
tqdm bar; library callers may pass ``None``. Keeping one shape means any bar fits any step.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int, /, **detail: object) -> None: ...


def report(progress: Progress | None, done: int, total: int, /, **detail: object) -> None:
    """Call ``progress`` when there is one (library code never checks for ``None`` itself)."""
    if progress is not None:
        progress(done, total, **detail)


def for_stage(progress: Progress | None, stage: str) -> Progress | None:
    """``progress`` with ``stage=...`` added to every call: a multi-stage step hands each stage its own."""
    if progress is None:
        return None

    def staged(done: int, total: int, /, **detail: object) -> None:
        progress(done, total, stage=stage, **detail)

    return staged

"""The one text-file opener: plain or gzip-compressed UTF-8, chosen by the ``.gz`` suffix."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a plain or gzip-compressed (``.gz``, e.g. STRING's ``.txt.gz``) text file for reading as UTF-8."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")

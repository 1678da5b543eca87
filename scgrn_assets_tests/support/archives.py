"""Building small tar archives for tests (the layouts GEO RAW tars use)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar holding ``members`` (name -> content) as regular files, in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.write_bytes(tar_bytes(members))
    return path

"""Handing memory that numpy and Python have freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util


def release_free_memory() -> bool:
    """Ask glibc to return the free memory it still holds to the system (``malloc_trim(0)``).

    Large arrays freed between ingest stages stay in glibc's arenas (those of worker threads
    especially) and keep counting in the process' RSS, so a later stage's peak would sit on
    top of an earlier one's. Returns whether a trim was done: a no-op without glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False

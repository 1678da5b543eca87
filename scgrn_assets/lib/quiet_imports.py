"""Imports of libraries that print notices a user cannot act on, silenced for that import only."""

from __future__ import annotations

import warnings


def import_arviz():
    """``arviz``, without its once-a-day "ArviZ is undergoing a major refactor" FutureWarning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*ArviZ is undergoing a major refactor", category=FutureWarning)
        import arviz

    return arviz

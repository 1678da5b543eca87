"""Helpers that turn library results into Dagster metadata (pictures, previews)."""

from __future__ import annotations

import base64

import dagster as dg
import pandas as pd


def png_metadata(png: bytes) -> dg.MetadataValue:
    """A PNG shown inline on the asset page (Markdown image with a data URI)."""
    return dg.MetadataValue.md(f"![plot](data:image/png;base64,{base64.b64encode(png).decode()})")


def table_preview(table: pd.DataFrame, n_rows: int = 10) -> dg.MetadataValue:
    return dg.MetadataValue.md(table.head(n_rows).to_markdown())

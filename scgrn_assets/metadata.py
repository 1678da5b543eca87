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


def plots_metadata(*plots) -> dict:
    """PNG metadata for each (name, plot, args); a failed plot becomes a ``plot_warnings`` entry instead
    (a picture never takes an answer down)."""
    from scgrn_assets.lib.plotting import safe_plot

    metadata, warnings = {}, []
    for name, plot, *args in plots:
        png, warning = safe_plot(plot, *args)
        if png is not None:
            metadata[name] = png_metadata(png)
        else:
            warnings.append(warning)
    if warnings:
        metadata["plot_warnings"] = "; ".join(warnings)
    return metadata

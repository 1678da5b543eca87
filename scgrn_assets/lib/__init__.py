"""The library layer: plain Python (numpy/scipy/torch/pymc), no Dagster import.

Every algorithm lives here and is importable from a notebook.
"""

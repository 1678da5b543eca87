"""Thin Dagster assets, grouped by stage: ingest (per study), corpus."""

"""The library layer: plain Python (numpy/scipy/torch/pymc), no Dagster import.

Every algorithm lives here and is importable from a notebook. One package per stage, in the
order data flows through them:

- ``ingest``: catalogs, downloads, archives, study layouts, gene harmonisation, one study as AnnData;
- ``corpus``: the combined, QC-filtered corpus (AnnData Zarr) and its integrity scans;
- ``condition_effects``: which genes change with condition, the animal as the replicate (pseudobulk,
  Bayesian NB model, shrinkage, the PyDESeq2 peer);
- ``network``: rank-value tokens, the Geneformer-architecture model, attention and cross-cell networks;
- ``validation``: mutual information and conditional MI checks of network edges;
- ``benchmarks``: reference networks, baselines, metrics, the GRN path that assets and CLI share;
- ``demo``: the simulator and its GEO layouts.

Each stage but ``demo`` has a folder of the same name under ``scgrn_assets/defs/`` (its assets and
checks), and every stage one under ``scgrn_assets_tests/lib/`` (its tests). Beside them, what every
stage uses: ``errors`` (the one error type), ``progress`` (the one progress callback), ``storage``
(the layout under ``SCGRN_HOME``, atomic writes, the one file lock), ``sql_store`` (DuckDB views), ``text_files`` (the one text opener),
``plotting``, ``memory``, ``quiet_imports``.
"""

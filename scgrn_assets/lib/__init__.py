"""The library layer: plain Python (numpy/scipy/torch/pymc), no Dagster import.

Every algorithm lives here and is importable from a notebook. One package per stage, in the
order data flows through them:

- ``ingest``: catalogs, downloads, archives, study layouts, gene harmonisation, one study as AnnData;
- ``corpus``: the combined, QC-filtered corpus (AnnData Zarr) and its integrity scans;
- ``de``: condition effects with the animal as the replicate (pseudobulk, Bayesian NB model, shrinkage);
- ``network``: rank-value tokens, the Geneformer-architecture model, attention and cross-cell networks;
- ``validation``: mutual information and conditional MI checks of network edges;
- ``benchmark``: reference networks, baselines, metrics, the GRN path that assets and CLI share;
- ``demo``: the simulator and its GEO layouts.

Beside them, what every stage uses: ``errors`` (the one error type), ``storage`` (the layout under
``SCGRN_HOME`` and atomic writes), ``sql_store`` (DuckDB views), ``plotting``, ``memory``,
``quiet_imports``.
"""

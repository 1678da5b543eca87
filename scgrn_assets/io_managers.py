"""The IO manager for file artefacts that the library writes in place (atomically).

Large artefacts (archives, .h5ad, Zarr stores) are streamed to disk by the library,
so an asset returns the *path* it wrote, at the place :class:`StorageLayout` names, and
downstream assets receive that path. The IO manager checks the artefact is where the
layout says and complete, and resolves upstream paths (a dict per partition when an
input spans several partitions).
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from scgrn_assets.lib.storage import StorageLayout

# Suffix of each asset's artefact under its partition folder ("" = the folder itself).
ARTEFACT_SUFFIXES: dict[str, str] = {
    "geo_raw_archive": "",
    "study_anndata": ".h5ad",
    "gene_annotation": ".parquet",
    "combined_corpus": ".zarr",
    "nb_posterior": ".nc",
    "condition_effects": ".parquet",
    "condition_effects_by_study": ".parquet",
    "condition_effects_pydeseq2": ".parquet",
    "tokenized_cells": "",
    "geneformer_model": "",
    "attention_moments": ".npz",
    "edge_stability": ".parquet",
    "gene_universe": ".json",
    "network_moments": "",
    "network_edges": ".parquet",
    "mi_edges": ".parquet",
    "cmi_edges": ".parquet",
    "reference_networks": ".parquet",
    "baseline_edges": ".parquet",
    "benchmark_metrics": ".parquet",
}


def artefact_path(layout: StorageLayout, asset_name: str, partition: str | None) -> Path:
    suffix = ARTEFACT_SUFFIXES.get(asset_name)
    if suffix is None:
        raise KeyError(f"asset {asset_name!r} has no artefact suffix; add it to ARTEFACT_SUFFIXES")
    if suffix == "":
        return layout.asset_dir(asset_name, partition)
    return layout.asset_path(asset_name, partition, suffix)


class ArtefactIOManager(dg.ConfigurableIOManager):
    home: str

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.home))

    def handle_output(self, context: dg.OutputContext, obj: Path) -> None:
        name = context.asset_key.path[-1]
        partition = context.partition_key if context.has_partition_key else None
        expected = artefact_path(self.layout, name, partition)
        if Path(obj) != expected:
            raise ValueError(f"{name} wrote {obj}, but the storage layout places it at {expected}")
        if not expected.exists():
            raise FileNotFoundError(f"{name}: {expected} was not written")

    def load_input(self, context: dg.InputContext) -> Path | dict[str, Path]:
        name = context.asset_key.path[-1]
        if context.has_asset_partitions:
            paths = {key: artefact_path(self.layout, name, key) for key in context.asset_partition_keys}
            missing = [key for key, path in paths.items() if not path.exists()]
            if missing:
                raise FileNotFoundError(f"{name} is not materialised for partitions {missing}; materialise them first")
            # A partitioned step reads its own partition; an unpartitioned one gets every partition.
            return next(iter(paths.values())) if context.has_partition_key else paths
        path = artefact_path(self.layout, name, None)
        if not path.exists():
            raise FileNotFoundError(f"{name} is not materialised ({path}); materialise it first")
        return path

"""The IO managers: where every artefact lives, derived from the asset key and the partition.

Two kinds of artefact:

* **tables** (:class:`TableIOManager`, ``io_manager_key="table_io_manager"``): the asset returns a
  DataFrame; the IO manager writes ``assets/<name>/<name>.parquet`` atomically, registers the DuckDB
  view (the asset name, or the ``scgrn/duckdb_view`` the asset's metadata names) and records the row
  count. Downstream assets receive the DataFrame.
* **files and folders** the library streams to disk itself (archives, .h5ad, Zarr stores, models;
  :class:`ArtefactIOManager`, ``io_manager_key="artefact_io_manager"``): the asset asks
  :func:`output_path` where to write, writes there atomically, and returns that path; the IO manager
  checks it is there and hands the path (a dict per partition when an input spans several) downstream.

The file suffix is the asset's ``scgrn/suffix`` metadata (see :func:`file_artefact`); no suffix means a
folder. Paths: ``assets/<name>/<name><suffix>``, or ``assets/<name>/<study>/<study><suffix>`` per study.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from scgrn_assets.lib.sql_store import write_table
from scgrn_assets.lib.storage import StorageLayout

SUFFIX_KEY = "scgrn/suffix"
VIEW_KEY = "scgrn/duckdb_view"
PARQUET = ".parquet"


def file_artefact(suffix: str) -> dict:
    """Asset metadata for a single-file artefact written by the asset (e.g. ``file_artefact(".h5ad")``)."""
    return {SUFFIX_KEY: suffix}


def table_artefact(view: str | None) -> dict:
    """Asset metadata for a table whose DuckDB view is not named after the asset (``None``: no view)."""
    return {VIEW_KEY: view or ""}


def artefact_location(layout: StorageLayout, key: dg.AssetKey, partition: str | None, suffix: str) -> Path:
    """Where the artefact of asset ``key`` (one partition, or the whole asset) lives."""
    name = key.path[-1]
    return layout.asset_path(name, partition, suffix) if suffix else layout.asset_dir(name, partition)


def _suffix(metadata, io_manager_key: str | None) -> str:
    if io_manager_key == "table_io_manager":
        return PARQUET
    value = (metadata or {}).get(SUFFIX_KEY, "")
    return getattr(value, "value", value) or ""


def stored_artefact(layout: StorageLayout, asset: dg.AssetsDefinition, key: dg.AssetKey,
                    partition: str | None) -> Path:
    """Where the IO managers keep asset ``key``'s output (a file or folder; a table's Parquet file)."""
    io_manager_key = asset.get_io_manager_key_for_asset_key(key)
    return artefact_location(layout, key, partition, _suffix(asset.specs_by_key[key].metadata, io_manager_key))


def output_path(context: dg.AssetExecutionContext, layout: StorageLayout) -> Path:
    """Where the asset being materialised writes its artefact (its partition's, when partitioned)."""
    key = context.asset_key
    spec = context.assets_def.specs_by_key[key]
    partition = context.partition_key if context.has_partition_key else None
    return artefact_location(layout, key, partition, _suffix(spec.metadata, None))


def asset_folder(context: dg.AssetExecutionContext, layout: StorageLayout) -> Path:
    """The asset's own folder (``assets/<name>``), for files that sit beside its artefact."""
    return layout.asset_dir(context.asset_key.path[-1])


class ArtefactIOManager(dg.ConfigurableIOManager):
    """Files and folders the assets write in place: checks them and passes their paths on."""

    home: str

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.home))

    def handle_output(self, context: dg.OutputContext, obj: Path) -> None:
        name = context.asset_key.to_user_string()
        partition = context.partition_key if context.has_partition_key else None
        expected = artefact_location(self.layout, context.asset_key, partition,
                                     _suffix(context.definition_metadata, None))
        if Path(obj) != expected:
            raise ValueError(f"{name} wrote {obj}, but the storage layout places it at {expected}")
        if not expected.exists():
            raise FileNotFoundError(f"{name}: {expected} was not written")

    def load_input(self, context: dg.InputContext) -> Path | dict[str, Path]:
        suffix = _suffix(context.upstream_output.definition_metadata, None)
        return _upstream(context, lambda partition: artefact_location(self.layout, context.asset_key, partition,
                                                                       suffix), lambda path: path)


class TableIOManager(dg.ConfigurableIOManager):
    """Tables: DataFrames written as Parquet (atomically), viewed in DuckDB, read back as DataFrames."""

    home: str

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.home))

    def handle_output(self, context: dg.OutputContext, obj: pd.DataFrame) -> None:
        if not isinstance(obj, pd.DataFrame):
            raise TypeError(f"{context.asset_key.to_user_string()} returned {type(obj).__name__}; "
                            "a table asset returns a pandas DataFrame")
        partition = context.partition_key if context.has_partition_key else None
        path = artefact_location(self.layout, context.asset_key, partition, PARQUET)
        view = (context.definition_metadata or {}).get(VIEW_KEY, context.asset_key.path[-1])
        write_table(self.layout.duckdb_path, obj, path, getattr(view, "value", view))
        context.add_output_metadata({"dagster/row_count": len(obj), "path": dg.MetadataValue.path(str(path))})

    def load_input(self, context: dg.InputContext) -> pd.DataFrame | dict[str, pd.DataFrame]:
        return _upstream(context, lambda partition: artefact_location(self.layout, context.asset_key, partition,
                                                                       PARQUET), pd.read_parquet)


def _upstream(context: dg.InputContext, location, read):
    """The upstream artefact, read; a dict per partition when an unpartitioned step reads a partitioned asset."""
    name = context.asset_key.to_user_string()
    if context.has_asset_partitions:
        paths = {key: location(key) for key in context.asset_partition_keys}
        missing = [key for key, path in paths.items() if not path.exists()]
        if missing:
            raise FileNotFoundError(f"{name} is not materialised for partitions {missing}; materialise them first")
        # A partitioned step reads its own partition; an unpartitioned one gets every partition.
        if context.has_partition_key:
            return read(next(iter(paths.values())))
        return {key: read(path) for key, path in paths.items()}
    path = location(None)
    if not path.exists():
        raise FileNotFoundError(f"{name} is not materialised ({path}); materialise it first")
    return read(path)

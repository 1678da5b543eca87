"""The IO managers own the paths: from the asset key and the partition, never from the asset's code."""

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from scgrn_assets.io_managers import (ArtefactIOManager, TableIOManager, file_artefact, output_path,
                                      table_artefact)
from scgrn_assets.lib.sql_store import list_tables, query
from scgrn_assets.lib.storage import StorageLayout
from scgrn_assets.partitions import STUDY, bind_study_partitions

STUDIES = dg.StaticPartitionsDefinition(["GSE1", "GSE2"])


def _io_managers(home: Path) -> dict:
    return {"artefact_io_manager": ArtefactIOManager(home=str(home)),
            "table_io_manager": TableIOManager(home=str(home))}


@dg.asset(partitions_def=STUDY, io_manager_key="artefact_io_manager", metadata=file_artefact(".txt"),
          required_resource_keys={"home"})
def per_study_file(context: dg.AssetExecutionContext) -> dg.Output:
    path = output_path(context, StorageLayout(Path(context.resources.home)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(context.partition_key)
    return dg.Output(path)


@dg.asset(io_manager_key="table_io_manager", ins={"per_study_file": dg.AssetIn(
    partition_mapping=dg.AllPartitionMapping())})
def study_table(per_study_file: dict) -> pd.DataFrame:
    return pd.DataFrame({"study": sorted(per_study_file), "text": [Path(per_study_file[k]).read_text()
                                                                   for k in sorted(per_study_file)]})


@dg.asset(io_manager_key="table_io_manager", metadata=table_artefact("renamed_view"))
def other_table(study_table: pd.DataFrame) -> pd.DataFrame:
    return study_table.assign(n=range(len(study_table)))


@dg.asset(io_manager_key="table_io_manager", metadata=table_artefact(None))
def unviewed_table() -> pd.DataFrame:
    return pd.DataFrame({"x": [1, 2, 3]})


def _materialise(home: Path, assets, **kwargs):
    resources = {**_io_managers(home), "home": dg.ResourceDefinition.hardcoded_resource(str(home))}
    return dg.materialize(assets, resources=resources, instance=dg.DagsterInstance.ephemeral(), **kwargs)


def test_paths_come_from_the_asset_key_and_partition_and_tables_are_viewed(tmp_path):
    assets = bind_study_partitions([per_study_file, study_table, other_table, unviewed_table], STUDIES)
    for study in ("GSE1", "GSE2"):
        assert _materialise(tmp_path, assets, selection=[per_study_file.key], partition_key=study).success
    assert (tmp_path / "assets" / "per_study_file" / "GSE2" / "GSE2.txt").read_text() == "GSE2"
    result = _materialise(tmp_path, assets, selection=[study_table.key, other_table.key, unviewed_table.key])
    assert result.success
    table = pd.read_parquet(tmp_path / "assets" / "study_table" / "study_table.parquet")
    assert table.to_dict("list") == {"study": ["GSE1", "GSE2"], "text": ["GSE1", "GSE2"]}
    assert (tmp_path / "assets" / "other_table" / "other_table.parquet").exists()
    assert (tmp_path / "assets" / "unviewed_table" / "unviewed_table.parquet").exists()
    db = StorageLayout(tmp_path).duckdb_path
    assert set(list_tables(db)) == {"study_table", "renamed_view"}
    assert query(db, "SELECT sum(n) AS total FROM renamed_view")["total"].iloc[0] == 1
    metadata = {e.asset_key.to_user_string(): e.metadata for e in result.get_asset_materialization_events()
                for e in [e.event_specific_data.materialization]}
    assert metadata["study_table"]["dagster/row_count"].value == 2
    assert metadata["unviewed_table"]["dagster/row_count"].value == 3
    assert not list((tmp_path / "assets" / "study_table").glob(".tmp-*")), "a temporary was left behind"


def test_a_table_asset_must_return_a_dataframe(tmp_path):
    @dg.asset(io_manager_key="table_io_manager")
    def not_a_table():
        return [1, 2]

    result = _materialise(tmp_path, [not_a_table], raise_on_error=False)
    assert not result.success
    assert not (tmp_path / "assets" / "not_a_table").exists()


def test_a_file_written_elsewhere_is_refused(tmp_path):
    @dg.asset(io_manager_key="artefact_io_manager", metadata=file_artefact(".txt"))
    def stray(context):
        path = tmp_path / "elsewhere.txt"
        path.write_text("x")
        return path

    with pytest.raises(ValueError, match="storage layout places it at .*stray/stray.txt"):
        _materialise(tmp_path, [stray])


def test_an_input_not_yet_materialised_says_so(tmp_path):
    assets = bind_study_partitions([per_study_file, study_table], STUDIES)
    missing = r"per_study_file is not materialised for partitions \['GSE1', 'GSE2'\]"
    with pytest.raises(FileNotFoundError, match=missing):
        _materialise(tmp_path, assets, selection=[study_table.key])

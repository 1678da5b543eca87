"""One partition per catalog study. Static, so partitioned schedules and backfills work.

Assets under ``defs/`` declare ``partitions_def=STUDY``, a stand-in with no real keys;
:func:`scgrn_assets.definitions.build_definitions` binds it to the catalog it is given with
:func:`bind_study_partitions`. Nothing here reads the environment.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

from scgrn_assets.lib.ingest import Catalog

STUDY = dg.StaticPartitionsDefinition(["<study>"])
"""Stand-in for the catalog's studies, replaced by :func:`bind_study_partitions`."""


def study_partitions(catalog: Catalog) -> dg.StaticPartitionsDefinition:
    """One partition per study of ``catalog``, in catalog order."""
    return dg.StaticPartitionsDefinition(list(catalog.accessions))


def bind_study_partitions(assets: Iterable[dg.AssetsDefinition],
                          partitions: dg.PartitionsDefinition) -> list[dg.AssetsDefinition]:
    """``assets`` with every :data:`STUDY` partitions definition replaced by ``partitions``."""
    def bind(spec: dg.AssetSpec) -> dg.AssetSpec:
        return spec.replace_attributes(partitions_def=partitions) if spec.partitions_def == STUDY else spec

    return list(dg.map_asset_specs(bind, list(assets)))

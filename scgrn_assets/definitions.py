"""The code location: assets, checks, resources, jobs and schedules in a few lines."""

import dagster as dg

from scgrn_assets.assets import benchmarks, corpus, ingest, nb_model, network, validation
from scgrn_assets.io_managers import ArtefactIOManager
from scgrn_assets.jobs import build_executor, build_jobs, build_schedules, build_sensors, with_downstream_automation
from scgrn_assets.resources import (BenchmarkSettings, GeneformerSettings, GeoDownloader, NBModelSettings,
                                    ScgrnStorage, ValidationSettings)
from scgrn_assets.settings import catalog_name, current_layout


def build_resources(home: str | None = None, catalog: str | None = None, *, quick: bool = False) -> dict:
    """Resources for one SCGRN_HOME and catalog (defaults: the environment's).

    ``quick`` trades accuracy for time (a few training steps, small nulls): smoke tests only.
    """
    home = home or str(current_layout().home)
    return {
        "storage": ScgrnStorage(home=home, catalog=catalog or catalog_name()),
        "downloader": GeoDownloader(),
        # 20 steps cannot beat the position-only loss: the training gate is off in smoke tests.
        "geneformer": GeneformerSettings(train_steps=20, max_genes_per_cell=64, min_loss_margin=None) if quick
        else GeneformerSettings(),
        "benchmark": BenchmarkSettings(tree_max_cells=300, tree_n_trees=5, n_null=20, grnboost2_max_cells=300,
                                       grnboost2_max_estimators=200, regdiffusion_n_steps=20) if quick
        else BenchmarkSettings(),
        "validation": ValidationSettings(n_permutations=50) if quick else ValidationSettings(),
        "nb_model": NBModelSettings(max_steps=300) if quick else NBModelSettings(),
        "artefact_io_manager": ArtefactIOManager(home=home),
    }


all_assets = dg.load_assets_from_modules([ingest, corpus, nb_model, network, validation, benchmarks])
all_asset_checks = dg.load_asset_checks_from_modules([ingest, corpus, nb_model, network, validation, benchmarks])
all_jobs = build_jobs(all_assets)

defs = dg.Definitions(
    assets=with_downstream_automation(all_assets),
    asset_checks=all_asset_checks,
    jobs=all_jobs,
    schedules=build_schedules(all_jobs),
    sensors=build_sensors(),
    executor=build_executor(),
    resources=build_resources(),
)

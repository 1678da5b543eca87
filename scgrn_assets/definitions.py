"""The code location: the ``defs/`` folder bound to a catalog, with resources and automation.

:func:`build_definitions` is what the CLI, the tests and the UI call; :func:`defs` is the entry
point ``dg`` and ``dagster dev -m scgrn_assets.definitions`` load, and the only place that reads
SCGRN_HOME and SCGRN_CATALOG.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import dagster as dg

import scgrn_assets
from scgrn_assets import defs as defs_folder
from scgrn_assets.jobs import build_automation
from scgrn_assets.lib.ingest import Catalog, load_catalog
from scgrn_assets.partitions import bind_study_partitions, study_partitions
from scgrn_assets.resources import build_resources
from scgrn_assets.settings import catalog_name, current_layout

__all__ = ["GROUPS", "build_definitions", "build_resources", "defs", "load_defs_folder"]

GROUPS = ("ingest", "corpus", "condition_effects", "network", "validation", "benchmarks")
"""The asset groups (folders of ``defs/``) in pipeline order."""


def load_defs_folder() -> dg.Definitions:
    """The assets and checks of ``scgrn_assets/defs`` as declared (study partitions still unbound).

    Loaded from the package itself, so an installed copy (the Docker image) needs no pyproject.toml.
    """
    project_root = Path(scgrn_assets.__file__).resolve().parent.parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)  # Dagster's notice about its own module loader
        return dg.ComponentTree.from_module(defs_module=defs_folder, project_root=project_root).build_defs()


def build_definitions(catalog: Catalog | str | Path = "demo", *, home: str | Path | None = None, quick: bool = False,
                      n_gpus: int | None = None) -> dg.Definitions:
    """The whole code location for ``catalog`` (a :class:`Catalog`, a built-in name or a YAML path).

    Parameters
    ----------
    catalog
        The studies: one partition each. A name or path is loaded with ``${SCGRN_HOME}`` expanded; the
        resources reload the catalog by that name or path when they run.
    home
        SCGRN_HOME for the resources and IO managers (default: ``$SCGRN_HOME`` or ``~/.scgrn``).
    quick
        Smoke-test settings (see :func:`scgrn_assets.resources.build_resources`).
    n_gpus
        GPUs for the executor's GPU-step limit (default: detected).
    """
    home = str(home or current_layout().home)
    name = str(catalog.path) if isinstance(catalog, Catalog) else str(catalog)
    if not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog, variables={"SCGRN_HOME": home})
    declared = load_defs_folder()
    resources = build_resources(home=home, catalog=name, quick=quick)
    assets = in_pipeline_order(bind_study_partitions(declared.assets or [], study_partitions(catalog)))
    assets = with_code_versions(assets, resources, catalog)
    return dg.Definitions(asset_checks=list(declared.asset_checks or []), resources=resources,
                          **build_automation(assets, study_partitions(catalog), n_gpus))


COMPUTING_CODE = ("lib", "defs", "io_managers.py", "resources.py", "metadata.py", "partitions.py")
"""The parts of the package an asset's output depends on (not the CLI, the UI's wiring or this module)."""


def package_source_digest() -> str:
    """sha256 of every Python file of :data:`COMPUTING_CODE` (paths and bytes)."""
    root = Path(scgrn_assets.__file__).resolve().parent
    digest = hashlib.sha256()
    paths = [path for part in COMPUTING_CODE for path in
             ((root / part).rglob("*.py") if (root / part).is_dir() else [root / part])]
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _settings_of(resource) -> object:
    """A resource's settings as plain data (its typed config fields)."""
    if isinstance(resource, dg.ConfigurableResource | dg.ConfigurableIOManager):
        return {name: getattr(resource, name) for name in type(resource).model_fields}
    return repr(resource)


def with_code_versions(assets: list[dg.AssetsDefinition], resources: dict,
                       catalog: Catalog) -> list[dg.AssetsDefinition]:
    """Each asset with a ``code_version``: a digest of the package's code, the catalog file and the settings
    of the resources the asset uses.

    Dagster then tells which materialisations are stale (the UI's "unsynced"; ``scgrn demo`` and ``scgrn
    materialize`` skip what is not): a changed setting re-runs the assets that read it and everything
    after them, nothing before.
    """
    code = package_source_digest()
    catalog_bytes = Path(catalog.path).read_bytes() if catalog.path and Path(catalog.path).is_file() else b""
    catalog_digest = hashlib.sha256(catalog_bytes).hexdigest()

    def versioned(asset: dg.AssetsDefinition) -> dg.AssetsDefinition:
        keys = sorted(set(asset.required_resource_keys) - {"artefact_io_manager", "table_io_manager"})
        settings = {key: _settings_of(resources[key]) for key in keys if key in resources}
        text = json.dumps({"code": code, "catalog": catalog_digest, "settings": settings}, sort_keys=True,
                          default=str)
        version = hashlib.sha256(text.encode()).hexdigest()[:16]
        return asset.map_asset_specs(lambda spec: spec.replace_attributes(code_version=version))

    return [versioned(asset) for asset in assets]


def in_pipeline_order(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """``assets`` upstream first; among those ready, by group (:data:`GROUPS`) then key."""
    def rank(asset: dg.AssetsDefinition) -> tuple:
        group = next(iter(asset.group_names_by_key.values()))
        return (GROUPS.index(group) if group in GROUPS else len(GROUPS), asset.key.to_user_string())

    keys = {key for asset in assets for key in asset.keys}
    ordered, done, remaining = [], set(), sorted(assets, key=rank)
    while remaining:
        ready = next(a for a in remaining if {k for k in a.dependency_keys if k in keys} <= done)
        ordered.append(ready)
        done |= set(ready.keys)
        remaining.remove(ready)
    return ordered


@dg.definitions
def defs() -> dg.Definitions:
    """The definitions ``dg`` and the web UI load: SCGRN_CATALOG's studies over SCGRN_HOME."""
    return build_definitions(catalog_name())

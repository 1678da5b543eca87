"""Where this code location reads its settings: SCGRN_HOME and SCGRN_CATALOG.

Both the CLI and the Dagster definitions read them here, so a user's own catalog
(``SCGRN_CATALOG=/path/to/catalog.yaml``) gives the UI, schedules and CLI the same studies.
"""

from __future__ import annotations

import os
from functools import lru_cache

from scgrn_assets.lib.ingest.catalog import Catalog, load_catalog
from scgrn_assets.lib.storage import StorageLayout, scgrn_home

DEFAULT_CATALOG = "demo"


def catalog_name() -> str:
    return os.environ.get("SCGRN_CATALOG") or DEFAULT_CATALOG


@lru_cache(maxsize=8)
def _load(name: str, home: str) -> Catalog:
    return load_catalog(name, variables={"SCGRN_HOME": home})


def current_catalog() -> Catalog:
    """The catalog named by SCGRN_CATALOG (a built-in name or a YAML path), ``${SCGRN_HOME}`` expanded."""
    return _load(catalog_name(), str(scgrn_home()))


def current_layout() -> StorageLayout:
    return StorageLayout(scgrn_home())

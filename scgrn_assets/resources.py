"""Resources: the storage root, the catalog and the download policy, as typed config."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from scgrn_assets.lib.catalog import Catalog, load_catalog
from scgrn_assets.lib.download import DownloadPolicy
from scgrn_assets.lib.storage import StorageLayout


class ScgrnStorage(dg.ConfigurableResource):
    """SCGRN_HOME and the catalog it serves; the one place assets learn where artefacts go."""

    home: str
    catalog: str = "demo"

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.home))

    def load_catalog(self) -> Catalog:
        return load_catalog(self.catalog, variables={"SCGRN_HOME": self.home})


class GeoDownloader(dg.ConfigurableResource):
    """Retries, timeouts and size limits for fetching study files (GEO over HTTPS, or file://)."""

    max_attempts: int = 5
    backoff_seconds: float = 1.0
    timeout_seconds: float = 60.0
    max_bytes: int | None = None

    @property
    def policy(self) -> DownloadPolicy:
        return DownloadPolicy(max_attempts=self.max_attempts, backoff_seconds=self.backoff_seconds,
                              timeout_seconds=self.timeout_seconds, max_bytes=self.max_bytes)

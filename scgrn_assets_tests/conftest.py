"""Shared fixtures: the simulated demo studies, written once per test process."""

from __future__ import annotations

import os

# Two xdist workers share two cores: one BLAS/torch thread each avoids spin-waiting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from dataclasses import dataclass
from pathlib import Path

import pytest

from scgrn_assets.lib.ingest.catalog import Catalog, load_catalog
from scgrn_assets_tests.support.http_server import http_server  # noqa: F401 (the fixture, for every test)
from scgrn_assets.lib.demo.geo_layouts import WrittenFile, demo_catalog, write_catalog_yaml, write_demo_geo
from scgrn_assets.lib.demo.simulator import DemoConfig, DemoTruth

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class DemoFiles:
    home: Path               # plays SCGRN_HOME: files live under home/demo_geo
    truth: DemoTruth
    written: list[WrittenFile]
    catalog_path: Path

    def catalog(self) -> Catalog:
        return load_catalog(self.catalog_path, variables={"SCGRN_HOME": str(self.home)})

    def study_dir(self, accession: str) -> Path:
        return self.home / "demo_geo" / accession


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> DemoFiles:
    """The default demo (the one `scgrn demo` runs), written with its catalog."""
    home = tmp_path_factory.mktemp("demo_home")
    config = DemoConfig()
    truth, written = write_demo_geo(home / "demo_geo", config)
    catalog_path = home / "demo.yaml"
    write_catalog_yaml(demo_catalog(config, written), catalog_path)
    return DemoFiles(home=home, truth=truth, written=written, catalog_path=catalog_path)


@pytest.fixture
def scgrn_home(tmp_path, monkeypatch) -> Path:
    """An empty SCGRN_HOME for one test."""
    home = tmp_path / "scgrn_home"
    home.mkdir()
    monkeypatch.setenv("SCGRN_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data is only beside the development checkout)")
    return path


os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def one_torch_thread():
    """Tiny models and kernels run fastest on one torch thread; two spin-waiting threads crawl on a
    busy shared machine. Test modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

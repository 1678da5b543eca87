"""The web UI as a user meets it: `dagster-webserver` over an instance where the demo's ingest and
corpus are materialised, asked through its GraphQL API and looked at in headless Chromium.

Screenshots go to ``test-artifacts/web_ui/`` (gitignored). Chromium and its driver come from
Debian (``apt-get install chromium chromium-driver``; ``.ci/run`` installs them); without them the
browser test skips and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from scgrn_assets import definitions
from scgrn_assets.instance import single_host_dagster_yaml
from scgrn_assets.defs.corpus.assets import CORPUS_CHECKS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = ROOT / "test-artifacts" / "web_ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
STUDIES = ["GSE900001", "GSE900002", "GSE900003", "GSE900004"]
FOUNDATION_EDGES = {("geo_raw_archive", "study_anndata"), ("study_anndata", "combined_corpus"),
                    ("gene_annotation", "combined_corpus")}
# Chromium as root on a closed network: no sandbox, no GPU, no background connections.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1600,1000"]

ASSETS_QUERY = """{
  assetNodes {
    assetKey { path }
    groupName
    isPartitioned
    partitionKeys
    dependencyKeys { path }
    assetMaterializations(limit: 1) { timestamp }
    assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions } }
  }
  repositoriesOrError {
    ... on RepositoryConnection { nodes { jobs { name } schedules { name cronSchedule } sensors { name } } }
  }
}"""


LOCATIONS_QUERY = """{
  workspaceOrError {
    ... on Workspace {
      locationEntries { locationOrLoadError { __typename ... on PythonError { message } } }
    }
  }
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(f"{url}/graphql", data=json.dumps({"query": query}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.load(response)
    assert "errors" not in body, body["errors"]
    return body["data"]


@pytest.fixture(scope="module")
def demo_home(demo_files, tmp_path_factory) -> Path:
    """An SCGRN_HOME whose instance (SQLite, the single-host dagster.yaml) holds the demo's
    ingest partitions and corpus, materialised as `scgrn demo` does."""
    home = tmp_path_factory.mktemp("ui_home")
    shutil.copytree(demo_files.home / "demo_geo", home / "demo_geo")
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text(single_host_dagster_yaml(n_gpus=1))
    resources = definitions.build_resources(home=str(home), catalog="demo")
    built = definitions.build_definitions("demo", home=home)
    everything = [*built.assets, *built.asset_checks]
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        for study in STUDIES:
            result = dg.materialize(everything, selection=dg.AssetSelection.groups("ingest"), partition_key=study,
                                    instance=instance, resources=resources, raise_on_error=False)
            assert result.success, f"ingest of {study} failed"
        result = dg.materialize(everything, selection=dg.AssetSelection.groups("corpus"), instance=instance,
                                resources=resources, raise_on_error=False)
        assert result.success, "the corpus failed"
    return home


@pytest.fixture(scope="module")
def webserver(demo_home) -> str:
    """`dagster-webserver` on 127.0.0.1 (a free port) with the project's workspace.yaml."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTEFACTS / "webserver.log").open("w")
    env = {**os.environ, "DAGSTER_HOME": str(demo_home / "dagster"), "SCGRN_HOME": str(demo_home)}
    env.pop("SCGRN_CATALOG", None)
    process = subprocess.Popen([sys.executable, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(port),
                                "-w", str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"dagster-webserver exited ({process.returncode}); see {ARTEFACTS / 'webserver.log'}")
            try:
                locations = graphql(url, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                locations = []
            loaded = [entry["locationOrLoadError"] for entry in locations if entry["locationOrLoadError"]]
            errors = [entry["message"] for entry in loaded if entry["__typename"] == "PythonError"]
            if errors:
                pytest.fail(f"the code location failed to load in dagster-webserver: {errors[0][:2000]}")
            if loaded:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"dagster-webserver did not serve assets within 300 s; see {ARTEFACTS / 'webserver.log'}")
            time.sleep(2)
        yield url
    finally:
        # SIGINT is the webserver's clean shutdown (it stops its code server too).
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_graphql_serves_the_assets_partitions_and_lineage(webserver):
    data = graphql(webserver, ASSETS_QUERY)
    nodes = {"/".join(node["assetKey"]["path"]): node for node in data["assetNodes"]}
    assert {"geo_raw_archive", "study_anndata", "gene_annotation", "combined_corpus"} <= set(nodes)
    edges = {("/".join(dep["path"]), name) for name, node in nodes.items() for dep in node["dependencyKeys"]}
    assert FOUNDATION_EDGES <= edges
    assert {edge for edge in edges if edge[1] in ("study_anndata", "combined_corpus")} == FOUNDATION_EDGES
    for name in ("geo_raw_archive", "study_anndata"):
        assert nodes[name]["isPartitioned"] and nodes[name]["partitionKeys"] == STUDIES
        assert sorted(nodes[name]["assetPartitionStatuses"]["materializedPartitions"]) == STUDIES
        assert nodes[name]["groupName"] == "ingest"
    for name in ("gene_annotation", "combined_corpus"):
        assert not nodes[name]["isPartitioned"] and nodes[name]["assetMaterializations"], name
    repository = data["repositoriesOrError"]["nodes"][0]
    assert {"ingest_job", "corpus_job"} <= {job["name"] for job in repository["jobs"]}
    assert {"name": "weekly_ingest_schedule", "cronSchedule": "0 3 * * 1"} in repository["schedules"]


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def open_page(driver, url: str, expected_texts: list[str], screenshot: str, timeout: float = 120) -> str:
    """Open ``url``, wait until every expected text is visible, dismiss Dagster's first-visit
    newsletter dialog, save a screenshot and return the page's visible text."""
    from selenium.common.exceptions import TimeoutException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)

    def shows_everything(_driver) -> bool:
        text = driver.find_element(By.TAG_NAME, "body").text
        return all(expected in text for expected in expected_texts)

    try:
        WebDriverWait(driver, timeout, poll_frequency=1).until(shows_everything)
    except TimeoutException:
        driver.save_screenshot(str(ARTEFACTS / f"FAILED-{screenshot}"))
        text = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"{url} did not show {expected_texts} within {timeout} s; it shows:\n{text[:2000]}")
    # The newsletter dialog can appear a moment after the page's data (a loaded machine makes that
    # moment longer), and the graph lays itself out and zooms to fit after the data arrives: keep
    # dismissing for a few seconds rather than once.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            try:
                skip.click()
            except WebDriverException:  # gone or covered between finding and clicking: the next pass retries
                pass
        time.sleep(0.5)
    driver.save_screenshot(str(ARTEFACTS / screenshot))
    return driver.find_element(By.TAG_NAME, "body").text


def test_browser_shows_the_lineage_graph_and_an_asset_page(webserver, browser):
    text = open_page(browser, f"{webserver}/asset-groups", ["Global asset lineage", "ingest", "corpus"],
                     "global_lineage.png")
    assert "Join the Dagster community" not in text  # the first-visit dialog was dismissed

    text = open_page(browser, f"{webserver}/assets/combined_corpus?view=lineage&lineageScope=upstream&lineageDepth=2",
                     ["geo_raw_archive", "study_anndata", "gene_annotation", "combined_corpus",
                      "2 / 2 Passed", f"{len(CORPUS_CHECKS)} / {len(CORPUS_CHECKS)} Passed", "100% filled"], "combined_corpus_lineage.png")
    # Both ingest assets show every study partition materialised; no node is still loading.
    assert text.count("100% filled") == 2 and text.count("4 partitions") == 2
    assert "Loading" not in text

    text = open_page(browser, f"{webserver}/assets/combined_corpus",
                     ["combined_corpus", "Latest materialization", "n_cells", "cells_per_study",
                      "corpus_job", "downstream_automation_sensor"], "combined_corpus_asset.png")
    assert "union of genes" in text  # the asset's description
    assert "eager" in text  # its automation condition: it re-runs when an upstream asset changes
    for screenshot in ("global_lineage.png", "combined_corpus_lineage.png", "combined_corpus_asset.png"):
        assert (ARTEFACTS / screenshot).stat().st_size > 10_000, f"{screenshot} is (nearly) empty"

"""The deployment files, read as Docker Compose, Dagster and Kubernetes would read them
(there is no Docker engine or cluster here): docker-compose.yml against the Compose
Specification's JSON schema, the instance files against Dagster's own config schemas."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_SCHEMA = Path(__file__).parent / "compose_spec" / "compose_spec.json"
REQUIRED_VARIABLE = re.compile(r"^\$\{(?P<name>[A-Z_][A-Z0-9_]*):\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def compose_errors(document: dict) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def environment_of(service: dict) -> dict:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return environment


def test_compose_file_follows_the_compose_specification(compose):
    assert compose_errors(compose) == []
    assert {"postgres", "scgrn_code", "webserver", "daemon"} <= set(compose["services"])


def test_the_schema_check_rejects_what_compose_would_reject(compose):
    broken = copy.deepcopy(compose)
    broken["services"]["webserver"]["portz"] = ["3000:3000"]
    broken["services"]["scgrn_code"]["deploy"]["resources"]["reservations"]["devices"][0]["gpus"] = 1
    errors = compose_errors(broken)
    assert any("portz" in e for e in errors) and any("gpus" in e for e in errors)


def test_instance_storage_is_postgres(compose):
    assert compose["services"]["postgres"]["image"].startswith("postgres:")
    instance = yaml.safe_load((ROOT / "deploy" / "compose" / "dagster.yaml").read_text())
    database = instance["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "username", "password", "db_name"):
        assert set(database[field]) == {"env"}, f"{field} must come from the environment"
        assert database[field]["env"] in environment_of(compose["services"]["scgrn_code"])
    for name in ("scgrn_code", "webserver", "daemon"):
        assert environment_of(compose["services"][name])["DAGSTER_POSTGRES_HOST"] == "postgres"
        assert compose["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_secrets_come_from_the_environment_with_no_default(compose):
    secrets = {(service, key): value for service, body in compose["services"].items()
               for key, value in environment_of(body).items() if SECRET_NAME.search(key)}
    assert secrets, "the compose file names no password at all"
    for (service, key), value in secrets.items():
        match = REQUIRED_VARIABLE.match(str(value))
        assert match, f"{service}.{key} = {value!r}: use ${{VAR:?message}} (required, no default)"
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["DAGSTER_POSTGRES_PASSWORD"] == ""
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()


def test_only_the_webserver_is_published_and_only_on_loopback(compose):
    published = {name: body["ports"] for name, body in compose["services"].items() if body.get("ports")}
    assert set(published) == {"webserver"}
    for port in published["webserver"]:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), port


def test_code_location_is_a_grpc_server_with_a_gpu_reservation(compose):
    code = compose["services"]["scgrn_code"]
    assert code["command"][:3] == ["dagster", "code-server", "start"]
    assert "scgrn_assets.definitions" in code["command"]
    devices = code["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] and device["driver"] == "nvidia" for device in devices)
    workspace = yaml.safe_load((ROOT / "deploy" / "compose" / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] == "scgrn_code" and str(server["port"]) in code["command"]
    for name in ("webserver", "daemon"):
        assert compose["services"][name]["depends_on"]["scgrn_code"]["condition"] == "service_healthy"


def test_dockerfile_installs_the_package_and_the_instance_files_it_copies_exist():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install \. ", dockerfile, re.MULTILINE)
    assert "dagster-postgres" in dockerfile and "dagster-k8s" in dockerfile
    for source in re.findall(r"^COPY (\S+) ", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is absent"


def test_compose_instance_file_is_valid_dagster_instance_config(tmp_path, monkeypatch):
    """Dagster's own instance loader: config schema, Postgres storage class, concurrency."""
    pytest.importorskip("dagster_postgres")
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((ROOT / "deploy" / "compose" / "dagster.yaml").read_text())
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_POSTGRES_PASSWORD"}
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    from dagster._config.validate import process_config
    from dagster_postgres import DagsterPostgresStorage

    for name, value in {"DAGSTER_POSTGRES_HOST": "postgres", "DAGSTER_POSTGRES_USER": "dagster",
                        "DAGSTER_POSTGRES_PASSWORD": "from-the-environment", "DAGSTER_POSTGRES_DB": "dagster"}.items():
        monkeypatch.setenv(name, value)
    storage = process_config(DagsterPostgresStorage.config_type(), config["storage"]["postgres"])
    assert storage.success, storage.errors
    assert storage.value["postgres_db"]["password"] == "from-the-environment"


def test_kubernetes_values_use_the_k8s_run_launcher_and_executor():
    values = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    deployment = values["dagster-user-deployments"]["deployments"][0]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "scgrn_assets.definitions"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    assert env["SCGRN_EXECUTOR"] == "k8s"
    assert "SCGRN_EXECUTOR=k8s" in values["runLauncher"]["config"]["k8sRunLauncher"]["envVars"]
    assert values["concurrency"]["pools"]["defaultLimit"] >= 1
    assert values["generatePostgresqlPasswordSecret"] is False  # the password is a secret made by hand
    claim = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "scgrn-home-pvc.yaml").read_text())
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    mounted = values["runLauncher"]["config"]["k8sRunLauncher"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert mounted == claim["metadata"]["name"]


def test_k8s_executor_selected_by_the_environment_and_gpu_tags_parse_as_dagster_k8s_config(monkeypatch):
    pytest.importorskip("dagster_k8s")
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    from scgrn_assets.jobs import K8S_CONFIG_TAG, build_executor, gpu_op_tags

    monkeypatch.setenv("SCGRN_EXECUTOR", "k8s")
    assert build_executor(n_gpus=1).name == "k8s"
    config = UserDefinedDagsterK8sConfig.from_dict(gpu_op_tags(2)[K8S_CONFIG_TAG])
    assert config.container_config["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert config.pod_spec_config["tolerations"][0]["key"] == "nvidia.com/gpu"

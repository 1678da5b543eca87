"""The code location as Dagster sees it: jobs per group, the weekly schedule, downstream automation,
GPU tags and limits, and the single-host dagster.yaml."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
import yaml

from scgrn_assets.instance import GPU_POOL, n_gpus_available, single_host_dagster_yaml
from scgrn_assets.jobs import (GPU_TAG_KEY, GPU_TAG_VALUE, K8S_CONFIG_TAG, build_executor, build_jobs,
                               build_schedules, gpu_op_tags, with_downstream_automation)
from scgrn_assets.lib.errors import ScgrnInputError
from scgrn_assets.resources import build_resources
from scgrn_assets.settings import current_catalog

STEP_LOG_VARIABLE = "SCGRN_TEST_GPU_STEP_LOG"
ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")


@functools.cache
def code_location() -> dg.Definitions:
    """The definitions for the environment's catalog, built on first use: the executor test's step
    subprocesses import this file, and should not pay for loading every asset."""
    from scgrn_assets.definitions import build_definitions

    return build_definitions(current_catalog())


def all_assets() -> list[dg.AssetsDefinition]:
    return list(code_location().assets)


def k8s_config_of(tags: dict) -> dict:
    """Dagster stores a dict-valued op tag as JSON."""
    value = tags[K8S_CONFIG_TAG]
    return json.loads(value) if isinstance(value, str) else value


def asset_keys_by_group() -> dict[str, set[str]]:
    groups: dict[str, set[str]] = {}
    for asset in all_assets():
        for key, group in asset.group_names_by_key.items():
            groups.setdefault(group, set()).add(key.to_user_string())
    return groups


def test_definitions_load_with_one_job_per_group_a_schedule_a_sensor():
    dg.Definitions.validate_loadable(code_location())
    repository = code_location().get_repository_def()
    groups = asset_keys_by_group()
    assert {"ingest", "corpus"} <= set(groups)
    assert {f"{group}_job" for group in groups} <= set(repository.job_names)
    for group, keys in groups.items():
        job = code_location().resolve_job_def(f"{group}_job")
        assert {key.to_user_string() for key in job.asset_layer.executable_asset_keys} == keys
    assert "weekly_ingest_schedule" in [s.name for s in repository.schedule_defs]
    assert "downstream_automation_sensor" in [s.name for s in repository.sensor_defs]


def test_loaded_definitions_match_the_snapshot():
    """Asset keys, groups, partitioning, pools, tags, kinds, IO managers and checks: a change to any of them
    shows here and in the diff of definitions_snapshot.json (regenerate it as its module says)."""
    from scgrn_assets_tests.definitions_snapshot import snapshot

    assert snapshot(code_location()) == json.loads(SNAPSHOT.read_text())


def test_definitions_are_built_from_the_catalog_given_not_the_environment(tmp_path, monkeypatch):
    from scgrn_assets.definitions import build_definitions
    from scgrn_assets.lib.ingest.catalog import builtin_catalog_path, load_catalog

    monkeypatch.setenv("SCGRN_CATALOG", "real")
    raw = yaml.safe_load(builtin_catalog_path("demo").read_text())
    raw["studies"] = raw["studies"][:1]
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(raw))
    first = raw["studies"][0]["accession"]
    demo = load_catalog("demo", variables={"SCGRN_HOME": str(tmp_path)})
    for catalog, studies in ((tmp_path / "one.yaml", [first]), (demo, demo.accessions)):
        built = build_definitions(catalog, home=tmp_path)
        partitions = {a.key.to_user_string(): a.partitions_def.get_partition_keys()
                      for a in built.assets if a.partitions_def is not None}
        assert set(partitions) == {"geo_raw_archive", "study_anndata", "attention_moments", "network_moments"}
        assert all(keys == studies for keys in partitions.values())
        assert built.resolve_job_def("ingest_job").partitions_def.get_partition_keys() == studies


@pytest.mark.timeout(600)
def test_dg_check_and_list_defs_pass_and_list_every_definition():
    """`dg check defs` and `dg list defs` from the repository root, as a user (and CI) runs them."""
    dg_cli = Path(sys.executable).with_name("dg")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCGRN_CATALOG": "demo", "NO_COLOR": "1"}
    env.pop("SCGRN_HOME", None)
    check = subprocess.run([str(dg_cli), "check", "defs"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0, (check.stdout + check.stderr)[-3000:]
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    listed = subprocess.run([str(dg_cli), "list", "defs", "--json"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr[-3000:]
    listing = json.loads(listed.stdout)
    loaded = code_location()
    repository = loaded.get_repository_def()
    assert {a["asset_key"] for a in listing["assets"]} == {a.key.to_user_string() for a in loaded.assets}
    expected_checks = {f"{key.asset_key.to_user_string()}:{key.name}"
                       for key in loaded.resolve_asset_graph().asset_check_keys}
    assert {c["key"] for c in listing["asset_checks"]} == expected_checks
    assert {s["name"] for s in listing["schedules"]} == {s.name for s in repository.schedule_defs} == \
        {"weekly_ingest_schedule"}
    assert {s["name"] for s in listing["sensors"]} == {s.name for s in repository.sensor_defs} == \
        {"downstream_automation_sensor"}
    assert {j["name"] for j in listing["jobs"]} >= {f"{group}_job" for group in asset_keys_by_group()}


def test_ingest_job_is_partitioned_by_study():
    job = code_location().resolve_job_def("ingest_job")
    assert job.partitions_def.get_partition_keys() == current_catalog().accessions


def test_weekly_schedule_requests_one_run_per_study_and_a_new_run_key_each_week():
    schedule = code_location().get_schedule_def("weekly_ingest_schedule")
    assert schedule.cron_schedule == "0 3 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    run_keys = []
    for day in (23, 30):
        context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, day, 3, tzinfo=timezone.utc),
                                            repository_def=code_location().get_repository_def())
        requests = schedule.evaluate_tick(context).run_requests
        assert sorted(r.partition_key for r in requests) == sorted(current_catalog().accessions)
        assert len({r.run_key for r in requests}) == len(requests)
        run_keys.extend(r.run_key for r in requests)
    # Dagster skips a run key it has seen: the second week must not reuse the first week's keys.
    assert len(set(run_keys)) == 2 * len(current_catalog().accessions)


def test_a_new_group_gets_its_job_and_no_ingest_group_means_no_schedule():
    @dg.asset(group_name="condition_effects", pool=GPU_POOL, op_tags=gpu_op_tags())
    def nb_posterior():
        return 1

    @dg.asset(group_name="benchmarks")
    def benchmark_metrics(nb_posterior):
        return 1

    jobs = build_jobs([nb_posterior, benchmark_metrics])
    assert [job.name for job in jobs] == ["benchmarks_job", "condition_effects_job"]
    assert build_schedules(jobs) == []
    defs = dg.Definitions(assets=[nb_posterior, benchmark_metrics], jobs=jobs)
    assert {k.to_user_string() for k in defs.resolve_job_def("condition_effects_job").asset_layer.executable_asset_keys} == \
        {"nb_posterior"}


@pytest.mark.parametrize("n_gpus", [1, 2])
def test_gpu_op_tags_request_gpus_on_kubernetes_and_mark_the_executor_tag(n_gpus):
    tags = gpu_op_tags(n_gpus)
    assert tags[GPU_TAG_KEY] == GPU_TAG_VALUE
    resources = k8s_config_of(tags)["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == str(n_gpus)
    assert resources["requests"]["nvidia.com/gpu"] == str(n_gpus)
    with pytest.raises(ValueError):
        gpu_op_tags(0)


def test_every_gpu_pool_asset_carries_the_gpu_tags():
    gpu_assets = [a for a in all_assets() if a.op.pool == GPU_POOL]
    # The model assets (nb_posterior, geneformer_model, attention_moments, network_moments) use GPUs.
    assert gpu_assets, "no asset is in the gpu pool: the model assets lost pool=GPU_POOL"
    for asset in gpu_assets:
        assert asset.op.tags.get(GPU_TAG_KEY) == GPU_TAG_VALUE, asset.key
        assert "nvidia.com/gpu" in k8s_config_of(asset.op.tags)["container_config"]["resources"]["limits"]


def test_blocking_checks_guard_every_asset_that_has_downstream_assets():
    graph = code_location().resolve_asset_graph()
    guarded = set()
    # Advisory checks warn and let the run go on: what they find needs a person's judgement (e.g.
    # whether a SuperSeries really repeats its subseries' cells), not a stopped pipeline.
    advisory = {"cells_are_not_repeated_across_studies"}
    for asset in all_assets():
        for spec in asset.check_specs:
            if spec.name in advisory:
                assert not spec.blocking
                continue
            assert spec.blocking, f"{spec.asset_key.to_user_string()}:{spec.name} must stop downstream work"
            guarded.add(spec.asset_key)
    with_children = {key for key in graph.get_all_asset_keys() if graph.get(key).child_keys}
    assert dg.AssetKey("study_anndata") in with_children & guarded


def executor_config(executor: dg.ExecutorDefinition) -> dict:
    return executor.apply_config_mapping({}).value["config"]


def test_executor_holds_gpu_steps_to_the_gpu_count():
    assert executor_config(build_executor(n_gpus=2))["tag_concurrency_limits"] == \
        [{"key": GPU_TAG_KEY, "value": GPU_TAG_VALUE, "limit": 2}]
    # A CPU-only host still runs model steps, one at a time.
    assert executor_config(build_executor(n_gpus=0))["tag_concurrency_limits"][0]["limit"] == 1
    with pytest.raises(ScgrnInputError, match="SCGRN_EXECUTOR"):
        build_executor(kind="slurm")


def test_kubernetes_executor_is_dagster_k8s_job_executor():
    pytest.importorskip("dagster_k8s")
    executor = build_executor(n_gpus=4, kind="k8s")
    assert executor.name == "k8s"
    assert executor_config(executor)["tag_concurrency_limits"][0]["limit"] == 4


def test_n_gpus_from_override_visible_devices_or_driver(tmp_path):
    assert n_gpus_available({"SCGRN_N_GPUS": "3", "CUDA_VISIBLE_DEVICES": "0"}, proc_root=tmp_path) == 3
    assert n_gpus_available({"CUDA_VISIBLE_DEVICES": "0,2"}, proc_root=tmp_path) == 2
    assert n_gpus_available({"CUDA_VISIBLE_DEVICES": ""}, proc_root=tmp_path) == 0
    assert n_gpus_available({"CUDA_VISIBLE_DEVICES": "1,-1,2"}, proc_root=tmp_path) == 1
    assert n_gpus_available({}, proc_root=tmp_path) == 0
    for bus_id in ("0000:01:00.0", "0000:41:00.0"):
        (tmp_path / "driver" / "nvidia" / "gpus" / bus_id).mkdir(parents=True)
    assert n_gpus_available({}, proc_root=tmp_path) == 2
    with pytest.raises(ScgrnInputError, match="SCGRN_N_GPUS"):
        n_gpus_available({"SCGRN_N_GPUS": "two"}, proc_root=tmp_path)


@pytest.mark.parametrize("n_gpus, expected_limit", [(0, 1), (3, 3)])
def test_single_host_dagster_yaml_sets_the_gpu_pool_limit_on_a_real_instance(tmp_path, n_gpus, expected_limit):
    text = single_host_dagster_yaml(n_gpus=n_gpus)
    config = yaml.safe_load(text)
    assert "storage" not in config  # SQLite in DAGSTER_HOME, Dagster's default
    (tmp_path / "dagster.yaml").write_text(text)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_coordinator.__class__.__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == expected_limit
        instance.event_log_storage.initialize_concurrency_limit_to_default(GPU_POOL)
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == expected_limit


def test_cli_writes_the_single_host_template_into_scgrn_home(scgrn_home):
    from scgrn_assets.cli import _prepare_instance
    from scgrn_assets.lib.storage import StorageLayout

    instance = _prepare_instance(StorageLayout(scgrn_home))
    written = (scgrn_home / "dagster" / "dagster.yaml").read_text()
    assert written == single_host_dagster_yaml()
    assert instance.get_concurrency_config().pool_config.default_pool_limit == \
        yaml.safe_load(written)["concurrency"]["pools"]["default_limit"] >= 1
    instance.dispose()


def test_downstream_assets_rerun_when_an_upstream_partition_changes(tmp_path):
    # The ingest and corpus groups alone: later groups would add their own (missing) assets' requests.
    foundation = [a for a in all_assets() if set(a.group_names_by_key.values()) <= {"ingest", "corpus"}]
    defs = dg.Definitions(assets=with_downstream_automation(foundation),
                          resources=build_resources(home=str(tmp_path)))
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("geo_raw_archive")).automation_condition is None
    assert graph.get(dg.AssetKey("combined_corpus")).automation_condition is not None
    studies = current_catalog().accessions

    def requested(result) -> dict[str, int]:
        return {r.key.to_user_string(): r.true_subset.size for r in result.results if r.true_subset.size}

    with dg.instance_for_test() as instance:
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert requested(result) == {}
        for study in studies:
            for name in ("geo_raw_archive", "study_anndata"):
                instance.report_runless_asset_event(dg.AssetMaterialization(name, partition=study))
        for name in ("gene_annotation", "combined_corpus"):
            instance.report_runless_asset_event(dg.AssetMaterialization(name))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert requested(result) == {}
        instance.report_runless_asset_event(dg.AssetMaterialization("geo_raw_archive", partition=studies[1]))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert requested(result) == {"study_anndata": 1}
        assert result.get_requested_partitions(dg.AssetKey("study_anndata")) == {studies[1]}
        instance.report_runless_asset_event(dg.AssetMaterialization("study_anndata", partition=studies[1]))
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
        assert requested(result) == {"combined_corpus": 1}


# Three GPU steps and the real multiprocess executor: a subprocess per step, held to one at a time.
def _gpu_step(name: str):
    @dg.asset(name=name, pool=GPU_POOL, op_tags=gpu_op_tags())
    def step():
        log = Path(os.environ[STEP_LOG_VARIABLE])
        started = time.time()
        time.sleep(1.5)
        with log.open("a") as handle:
            handle.write(f"{name} {started} {time.time()}\n")

    return step


def gpu_steps_job() -> dg.JobDefinition:
    defs = dg.Definitions(assets=[_gpu_step(f"gpu_step_{i}") for i in range(3)],
                          jobs=[dg.define_asset_job("gpu_steps")], executor=build_executor(n_gpus=1))
    return defs.resolve_job_def("gpu_steps")


@pytest.mark.slow  # a subprocess per step: about a minute on two busy cores
def test_multiprocess_executor_runs_gpu_steps_one_at_a_time_with_one_gpu(tmp_path, monkeypatch):
    log = tmp_path / "steps.log"
    monkeypatch.setenv(STEP_LOG_VARIABLE, str(log))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        result = dg.execute_job(dg.reconstructable(gpu_steps_job), instance=instance)
        assert result.success
    intervals = sorted((float(start), float(end)) for _, start, end in (line.split() for line in log.read_text().splitlines()))
    assert len(intervals) == 3
    for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
        assert next_start >= end, f"GPU steps overlapped: {intervals}"

"""Automation, in one place: how the graph is operated: one job per asset group, the weekly ingest schedule, downstream
automation, and the executor that holds GPU steps to the number of GPUs.

Model assets opt in to GPU handling with two arguments::

    @dg.asset(group_name="condition_effects", pool=GPU_POOL, op_tags=gpu_op_tags(), ...)

``pool`` makes the instance hold GPU steps to the pool limit across runs (``dagster.yaml``:
``concurrency > pools``); the ``scgrn/resource: gpu`` tag lets the executor hold them to the
number of GPUs within one run (``tag_concurrency_limits``); ``dagster-k8s/config`` gives each
step's pod ``nvidia.com/gpu`` on Kubernetes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import dagster as dg

from scgrn_assets.instance import GPU_POOL, gpu_step_limit

__all__ = ["GPU_POOL", "build_automation", "build_executor", "build_jobs", "build_schedules", "build_sensors",
           "downstream_automation_condition", "gpu_op_tags", "gpu_tag_concurrency_limits",
           "with_downstream_automation"]

GPU_TAG_KEY = "scgrn/resource"
GPU_TAG_VALUE = "gpu"
JOB_TAG_KEY = "scgrn/job"
K8S_CONFIG_TAG = "dagster-k8s/config"

# Picks the executor: unset or "multiprocess" on one host, "k8s" for one pod per step (dagster-k8s).
EXECUTOR_VARIABLE = "SCGRN_EXECUTOR"

JOB_DESCRIPTIONS = {
    "ingest": "Per study: fetch the GEO files and build the study's AnnData (one run per study partition).",
    "corpus": "The gene annotation and the combined multi-study corpus, with its blocking checks.",
    "condition_effects": "The Bayesian (hierarchical Negative-Binomial) condition-effect model and its gene table.",
    "network": "The attention-derived gene network: tokens, model, attention moments, edge tables.",
    "validation": "Expression checks of the network: mutual information, conditional MI, baselines.",
    "benchmarks": "Benchmarks of the network against reference networks (AUROC, AUPRC, EPR, ...).",
}

WEEKLY_INGEST_CRON = "0 3 * * 1"  # Mondays 03:00 UTC


def gpu_op_tags(n_gpus: int = 1) -> dict:
    """Op tags every model (GPU) asset carries; pair them with ``pool=GPU_POOL``.

    Parameters
    ----------
    n_gpus
        GPUs one step uses (the Kubernetes request and limit for ``nvidia.com/gpu``).

    Returns
    -------
    dict
        ``{"scgrn/resource": "gpu", "dagster-k8s/config": {...}}``: the first is what the
        executor's ``tag_concurrency_limits`` key on, the second asks Kubernetes for the GPUs and
        tolerates the usual ``nvidia.com/gpu`` taint of GPU nodes.
    """
    if n_gpus < 1:
        raise ValueError(f"a GPU step needs at least one GPU, got n_gpus={n_gpus}")
    gpus = str(n_gpus)
    return {
        GPU_TAG_KEY: GPU_TAG_VALUE,
        K8S_CONFIG_TAG: {
            "container_config": {"resources": {"requests": {"nvidia.com/gpu": gpus},
                                               "limits": {"nvidia.com/gpu": gpus}}},
            "pod_spec_config": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]},
        },
    }


def gpu_tag_concurrency_limits(n_gpus: int | None = None) -> list[dict]:
    """``tag_concurrency_limits`` for an executor: GPU-tagged steps at most the GPU count (at least 1)."""
    return [{"key": GPU_TAG_KEY, "value": GPU_TAG_VALUE, "limit": gpu_step_limit(n_gpus)}]


def build_executor(n_gpus: int | None = None, kind: str | None = None) -> dg.ExecutorDefinition:
    """The executor for every job: multiprocess on one host, ``k8s_job_executor`` on Kubernetes.

    Parameters
    ----------
    n_gpus
        GPUs available to one run (default: detected, see :func:`scgrn_assets.instance.n_gpus_available`).
    kind
        ``"multiprocess"`` or ``"k8s"`` (default: ``$SCGRN_EXECUTOR``, else multiprocess).
    """
    kind = kind or os.environ.get(EXECUTOR_VARIABLE) or "multiprocess"
    limits = gpu_tag_concurrency_limits(n_gpus)
    if kind == "multiprocess":
        return dg.multiprocess_executor.configured({"tag_concurrency_limits": limits}, name="multiprocess")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured({"tag_concurrency_limits": limits}, name="k8s")
    from scgrn_assets.lib.errors import ScgrnInputError

    raise ScgrnInputError(f"{EXECUTOR_VARIABLE}={kind!r} names no executor",
                          fix=f"set {EXECUTOR_VARIABLE} to multiprocess or k8s (or unset it)")


def build_jobs(assets: Sequence[dg.AssetsDefinition]) -> list[dg.UnresolvedAssetJobDefinition]:
    """One job per asset group present in ``assets``, named ``<group>_job``; adding a group later
    adds its job. A group of study-partitioned assets gets a partitioned job (Dagster infers it),
    so ``ingest_job`` runs one study per run."""
    groups = sorted({group for asset in assets for group in asset.group_names_by_key.values()})
    return [dg.define_asset_job(f"{group}_job", selection=dg.AssetSelection.groups(group),
                                description=JOB_DESCRIPTIONS.get(group, f"Materialise the {group} group."),
                                tags={JOB_TAG_KEY: group})
            for group in groups]


def build_schedules(jobs: Sequence[dg.UnresolvedAssetJobDefinition],
                    studies: dg.PartitionsDefinition | None = None) -> list[dg.ScheduleDefinition]:
    """The weekly ingest schedule: one run of ``ingest_job`` per partition of ``studies`` (stopped
    until a user turns it on). Empty when ``jobs`` has no ``ingest_job``."""
    ingest_job = next((job for job in jobs if job.name == "ingest_job"), None)
    if ingest_job is None:
        return []
    if studies is None:
        raise ValueError("the weekly ingest schedule needs the study partitions")

    @dg.schedule(name="weekly_ingest_schedule", job=ingest_job, cron_schedule=WEEKLY_INGEST_CRON,
                 execution_timezone="UTC", default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Every Monday 03:00 UTC: re-fetch and re-build every study, one run per study.")
    def weekly_ingest_schedule(context: dg.ScheduleEvaluationContext):
        week = context.scheduled_execution_time.strftime("%Y-%m-%d")
        # The run key carries the week: Dagster never launches a run key twice, and each week must run.
        return [dg.RunRequest(run_key=f"{study}:{week}", partition_key=study, tags={"scgrn/schedule_week": week})
                for study in studies.get_partition_keys()]

    return [weekly_ingest_schedule]


def downstream_automation_condition() -> dg.AutomationCondition:
    """Materialise when an upstream asset (partition) has a newer materialisation, once every
    upstream is present and none is in progress (Dagster's ``eager`` condition)."""
    return dg.AutomationCondition.eager()


def with_downstream_automation(assets: Sequence[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """``assets`` with :func:`downstream_automation_condition` on every asset that has an upstream
    asset: re-ingesting a study then re-runs the corpus, the model and the network after it.
    Roots (fetched files) are refreshed by the schedule or by hand; a condition an asset already
    sets is kept."""
    def automate(spec: dg.AssetSpec) -> dg.AssetSpec:
        if spec.automation_condition is not None or not spec.deps:
            return spec
        return spec.replace_attributes(automation_condition=downstream_automation_condition())

    return list(dg.map_asset_specs(automate, list(assets)))


def build_sensors() -> list[dg.AutomationConditionSensorDefinition]:
    """The sensor that evaluates the automation conditions (running by default: it only acts when
    an upstream asset changes)."""
    return [dg.AutomationConditionSensorDefinition(
        "downstream_automation_sensor", target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-materialises downstream assets after their upstream assets change.")]



def build_automation(assets: Sequence[dg.AssetsDefinition], studies: dg.PartitionsDefinition,
                     n_gpus: int | None = None) -> dict:
    """Everything that runs the graph, as :class:`dagster.Definitions` keyword arguments: the assets
    with downstream automation, one job per group, the weekly ingest schedule over ``studies``, the
    automation sensor and the executor."""
    jobs = build_jobs(assets)
    return {"assets": with_downstream_automation(assets), "jobs": jobs,
            "schedules": build_schedules(jobs, studies), "sensors": build_sensors(),
            "executor": build_executor(n_gpus)}

"""The single-host Dagster instance: how many GPUs this machine has, and the dagster.yaml that holds
GPU steps to that number.

``scgrn`` writes :func:`single_host_dagster_yaml` to ``SCGRN_HOME/dagster/dagster.yaml`` the first
time it opens the instance (storage: SQLite files beside it, Dagster's default). Edit that file to
change the limits; delete it to have it written anew. docker-compose and Kubernetes use their own
instance files under ``deploy/``.
"""

from __future__ import annotations

import os
from pathlib import Path

GPU_POOL = "gpu"

# Environment variable that overrides GPU detection (e.g. 2 on a machine whose GPUs are shared).
N_GPUS_VARIABLE = "SCGRN_N_GPUS"

SINGLE_HOST_DAGSTER_YAML = """\
# Written by scgrn: a single-host Dagster instance in SCGRN_HOME/dagster.
# Storage: SQLite files in this folder (Dagster's default when no `storage:` is given).
# For Postgres see deploy/compose/dagster.yaml; for Kubernetes deploy/kubernetes/.
telemetry:
  enabled: false

concurrency:
  # Pools: `{gpu_pool}` is the only pool the assets use (model assets: `pool="{gpu_pool}"`), so the
  # default limit is the GPU limit: {n_gpus} GPU step(s) at once across every run on this host
  # (at least 1, so a CPU-only machine still runs the model steps, one at a time).
  # Change it here, or live with `dagster instance concurrency set {gpu_pool} N`.
  pools:
    default_limit: {n_gpus}
    granularity: op
  # The run queue (the daemon, started by `scgrn ui` / `dagster dev`, launches queued runs).
  runs:
    max_concurrent_runs: {max_concurrent_runs}
    tag_concurrency_limits:
      # Ingest runs fetch from GEO: a few at a time keeps the weekly schedule polite.
      - key: scgrn/job
        value: ingest
        limit: {max_ingest_runs}
"""


def n_gpus_available(environ: dict[str, str] | None = None, proc_root: Path = Path("/proc")) -> int:
    """Number of GPUs the model steps may use on this host.

    ``SCGRN_N_GPUS`` wins when set; otherwise the devices named in ``CUDA_VISIBLE_DEVICES``
    (an empty value or ``-1`` hides them all); otherwise the NVIDIA driver's device list under
    ``/proc/driver/nvidia/gpus`` (read without importing CUDA, so loading the definitions stays
    fast); otherwise 0.

    Parameters
    ----------
    environ
        Environment to read (default ``os.environ``).
    proc_root
        Where ``/proc`` is mounted (tests point it at a temporary folder).
    """
    environ = os.environ if environ is None else environ
    if environ.get(N_GPUS_VARIABLE, "").strip():
        value = environ[N_GPUS_VARIABLE].strip()
        if not value.isdigit():
            from scgrn_assets.lib.errors import ScgrnInputError

            raise ScgrnInputError(f"{N_GPUS_VARIABLE}={value!r} is not a whole number of GPUs",
                                  fix=f"set {N_GPUS_VARIABLE} to 0, 1, 2, ... or unset it to detect GPUs")
        return int(value)
    if "CUDA_VISIBLE_DEVICES" in environ:
        devices = [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        # CUDA stops at the first invalid ordinal such as -1.
        visible = []
        for device in devices:
            if device.startswith("-"):
                break
            visible.append(device)
        return len(visible)
    driver_gpus = proc_root / "driver" / "nvidia" / "gpus"
    return len(list(driver_gpus.iterdir())) if driver_gpus.is_dir() else 0


def gpu_step_limit(n_gpus: int | None = None) -> int:
    """GPU steps allowed at once: the number of GPUs, at least 1 (a CPU-only host runs them one at a time)."""
    return max(1, n_gpus_available() if n_gpus is None else n_gpus)


def single_host_dagster_yaml(n_gpus: int | None = None, max_concurrent_runs: int = 4,
                             max_ingest_runs: int = 2) -> str:
    """The text of a single-host ``dagster.yaml`` (SQLite storage, run queue, ``gpu`` pool limit).

    Parameters
    ----------
    n_gpus
        GPUs on this host (default: :func:`n_gpus_available`); the pool limit is at least 1.
    max_concurrent_runs
        Runs the daemon keeps in progress at once.
    max_ingest_runs
        Of those, ingest runs (tagged ``scgrn/job=ingest``) at once.
    """
    return SINGLE_HOST_DAGSTER_YAML.format(gpu_pool=GPU_POOL, n_gpus=gpu_step_limit(n_gpus),
                                           max_concurrent_runs=max_concurrent_runs,
                                           max_ingest_runs=max_ingest_runs)
